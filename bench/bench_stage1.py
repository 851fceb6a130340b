"""Stage 1 benchmark: throughput, judge cost, triage vs full-SE cost, probe AUROC on capitals.

    .venv/bin/python bench/bench_stage1.py [--pool capitals] [--measure 32] [--k 10]

Throughput and the triage/SE cost ratio are timed in this one process on the same ``--measure``
questions (machines are noisy: compare ratios, not seconds across runs). Probe AUROC comes from a
full Stage 1 run on the pool, which is run here if needed (resumable) or reused if finished.
Writes bench/results/stage1.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ka2l.config import SamplingConfig, Stage1Config  # noqa: E402
from ka2l.probing.judges import LexicalJudge  # noqa: E402
from ka2l.models.llm import build_prompt, extract_hidden_states, generate_answers, load_model  # noqa: E402
from ka2l.probing.stage1 import run_stage1, score_question  # noqa: E402
from ka2l.probing.probes import load_probe, predict_unknown  # noqa: E402
from ka2l.progress import TqdmProgress  # noqa: E402
from ka2l.probing.report import build_report  # noqa: E402
from ka2l.pools.sources import load_builtin  # noqa: E402
from ka2l.store import queries as Q  # noqa: E402
from ka2l.store.db import connect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="capitals", help="demo pool to use (imported if missing)")
    ap.add_argument("--measure", type=int, default=32, help="questions timed in-process")
    ap.add_argument("--k", type=int, default=10, help="samples per question")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage1.json"))
    args = ap.parse_args()

    import torch

    cfg = Stage1Config(sampling=SamplingConfig(k=args.k))
    with connect() as db:
        if args.pool not in [p["name"] for p in Q.list_pools(db)]:
            Q.insert_pool(db, load_builtin(f"demo:{args.pool}"))
        pool = Q.get_pool(db, args.pool)
        questions = Q.pool_questions(db, pool["id"])[: args.measure]

    # -- in-process timings on the same questions ------------------------------------------------
    t0 = time.perf_counter()
    lm = load_model(cfg.model)
    load_s = time.perf_counter() - t0
    prompts = [build_prompt(lm.tokenizer, q["question"], cfg.prompt) for q in questions]
    n = len(prompts)
    t0 = time.perf_counter()
    for _ in extract_hidden_states(lm, prompts, cfg.sampling.hidden_batch_size):
        pass
    hidden_s = time.perf_counter() - t0
    s = cfg.sampling
    t0 = time.perf_counter()
    low, samples = [], []
    for b in range(0, n, s.batch_size):
        chunk = prompts[b : b + s.batch_size]
        low += generate_answers(lm, chunk, s, s.low_temperature, 1, b)
        samples += generate_answers(lm, chunk, s, s.temperature, s.k, b + 1)
    gen_s = time.perf_counter() - t0
    judge = LexicalJudge()
    t0 = time.perf_counter()
    scored = []
    for q, lo, sa in zip(questions, low, samples):
        ans = {"low": [{"text": lo[0].text, "token_logprobs": list(lo[0].token_logprobs)}],
               "sample": [{"text": g.text, "seq_logprob": g.seq_logprob} for g in sa]}
        scored.append(score_question(judge, q, ans))
    score_s = time.perf_counter() - t0

    # -- the full run (for AUROC), then triage timing with its probe -----------------------------
    run_id = run_stage1(args.pool, cfg, progress=TqdmProgress())  # returns a finished matching run at once
    with connect() as db:
        rep = build_report(db, run_id)
    net, meta = load_probe(rep["probe"]["path"])
    t0 = time.perf_counter()
    states = [st for _, st in extract_hidden_states(lm, prompts, cfg.sampling.hidden_batch_size)]
    import numpy as np

    predict_unknown(net, np.concatenate(states)[:, meta["layer"]].astype(np.float32))
    triage_s = time.perf_counter() - t0

    se_per_1000 = (hidden_s + gen_s + score_s) / n * 1000
    triage_per_1000 = triage_s / n * 1000
    calls = [x["judge_calls"] for x in scored]
    distinct = [len({g.text for g in sa}) for sa in samples]
    p = rep["probe"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": lm.device},
        "model": cfg.model.name_or_path, "k": s.k, "max_new_tokens": s.max_new_tokens, "measured_questions": n,
        "model_load_s": round(load_s, 3),
        "hidden_states_q_per_s": round(n / hidden_s, 2),
        "generations_per_s": round(n * (s.k + 1) / gen_s, 2),
        "sampling_share_of_se_cost": round(gen_s / (hidden_s + gen_s + score_s), 4),
        "distinct_samples_per_question": round(sum(distinct) / n, 2),
        "judge_calls_per_question": round(sum(calls) / n, 2), "naive_judge_calls": s.k * (s.k - 1),
        "judge_calls_ratio_to_naive": round(sum(calls) / n / (s.k * (s.k - 1)), 4),
        "se_seconds_per_1000_questions": round(se_per_1000, 1),
        "triage_seconds_per_1000_questions": round(triage_per_1000, 1),
        "se_to_triage_cost_ratio": round(se_per_1000 / triage_per_1000, 1),
        "full_run": {"run_id": run_id, "pool": args.pool, "n_questions": rep["pool"]["n_questions"], "split": rep.get("split"),
                     "probe_kind": p["kind"], "best_layer": p["best_layer"], "val_auroc": p["val_auroc"],
                     "test_auroc": p["test_auroc"], "test_ci": p["test_ci"], "test_auroc_vs_incorrect": p["test_auroc_correct"],
                     "baselines": p["baselines"], "timings": rep["run"]["timings"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for key in ("hidden_states_q_per_s", "generations_per_s", "sampling_share_of_se_cost", "distinct_samples_per_question",
                "judge_calls_per_question", "naive_judge_calls", "se_seconds_per_1000_questions", "triage_seconds_per_1000_questions",
                "se_to_triage_cost_ratio"):
        print(f"{key:<36} {result[key]}")
    fr = result["full_run"]
    print(f"probe ({fr['probe_kind']}) on {fr['pool']} ({fr['n_questions']} q): layer {fr['best_layer']}, "
          f"test AUROC {fr['test_auroc']:.3f} [{fr['test_ci'][0]:.3f}, {fr['test_ci'][1]:.3f}], vs incorrect {fr['test_auroc_vs_incorrect']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
