"""Stage 3b benchmark: LoRA on the embedded SmolLM2 with the cpu-small preset, and evaluation speed.

    .venv/bin/python bench/bench_finetune.py [--device cpu] [--questions 64] [--k 4]

1. Pool: a seeded sample of ``--questions`` capitals demo questions (they have gold answers).
2. Stage 1 on that pool through the command line, in its own process (a light k, 16 new tokens;
   reused when finished). ``finetune()`` reads the model and prompt from a finished Stage 1 run, and
   a run on a small subset pool is the cheapest legitimate one; its time is recorded, not part of the
   figures. With ``gold_set all`` the run's known / unknown split does not change the data.
3. A fresh LoRA fine-tune (preset cpu-small, ``--device``, gold answers of every question) in a copy
   of the work folder, so every bench run trains from scratch: seconds per optimizer step (median
   of the step-to-step intervals, and the mean over the whole training with its evaluations and
   checkpoints), tokens/s (non-padding tokens per second of training, as the fine-tune logs them),
   the process's RSS high-water mark (``resource.getrusage``; Stage 1 ran in another process), and
   on CUDA the peak allocated GPU memory. The held-out share is 0.25 (``--eval-share``), not the default 0.1,
   so the evaluation below has about 16 questions instead of 3.
4. ``evaluate()`` of base and tuned on the held-out split (answers, metrics, BERTScore): questions/s
   of each model's answering stage including its model load, and answering-only throughput of each
   model on every pool question (T = 0.1, batch 16, model already loaded), with the mean answer length
   (a tuned model that learned short gold answers stops sooner, so it answers faster).

Work lives in data/bench-finetune (the Stage 1 run, reused) and a temporary copy of it; writes
bench/results/finetune.json. ``--device cuda`` runs the same on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timings:
    """A progress reporter that remembers when each stage started and each advance happened."""

    def __init__(self):
        self.stages: list[tuple[str, float]] = []
        self.advances: dict[str, list[float]] = {}

    def stage(self, name, total=None, done=0):
        self.stages.append((name, time.perf_counter()))
        self.advances.setdefault(name, [])

    def advance(self, n=1, message=None):
        self.advances[self.stages[-1][0]].append(time.perf_counter())

    def close(self):
        pass

    def duration(self, name: str, end: float) -> float:
        """From the stage's start to the next stage's start (or ``end``)."""
        names = [s for s, _ in self.stages]
        i = names.index(name)
        return (self.stages[i + 1][1] if i + 1 < len(self.stages) else end) - self.stages[i][1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cli(work: Path, *args: str) -> None:
    env = {**os.environ, "KA2L_DATA_DIR": str(work), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "ka2l", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"`ka2l {' '.join(args)}` failed:\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, auto (fine-tune, evaluation and Stage 1)")
    ap.add_argument("--dtype", default=None, help="override the preset's dtype (cpu-small: float32), e.g. bfloat16 on a GPU")
    ap.add_argument("--questions", type=int, default=64, help="capitals questions in the pool")
    ap.add_argument("--k", type=int, default=4, help="Stage 1 samples per question (light: only the run is needed)")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--eval-share", type=float, default=0.25, help="held-out share (the preset leaves the default 0.1, "
                                                                    "3 questions of 64: too few to time the evaluation)")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench-finetune"), help="where the pool and Stage 1 run live (reused)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    args = ap.parse_args()

    work = Path(args.work)
    (work / "models").mkdir(parents=True, exist_ok=True)
    shared = ROOT / "data" / "models" / "smollm2-135m-instruct"
    link = work / "models" / shared.name
    if shared.is_dir() and not link.exists():
        link.symlink_to(shared.resolve())
    pool = f"capitals-{args.questions}"

    # -- 1-2. pool and Stage 1, in child processes -------------------------------------------------
    t0 = time.perf_counter()
    cli(work, "import", "demo:capitals", "--limit", str(args.questions), "--seed", "0", "--name", pool, "--if-missing")
    cli(work, "probe", "--pool", pool, "--k", str(args.k), "--max-new-tokens", "16", "--device", args.device, "-q")
    stage1_s = time.perf_counter() - t0

    # -- 3. a fresh fine-tune in a copy of the work folder -----------------------------------------
    scratch = Path(tempfile.mkdtemp(prefix="ka2l-bench-finetune-"))
    try:
        data = scratch / "data"
        shutil.copytree(work, data, symlinks=True, ignore=shutil.ignore_patterns("finetunes", "logs"))
        os.environ["KA2L_DATA_DIR"] = str(data)
        result = measure(args, pool, stage1_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    ft, ev = result["finetune"], result["evaluation"]
    print(f"fine-tune ({args.preset}, {ft['device']}, {ft['dtype']}): {ft['n_train']} train / {ft['n_eval']} held-out pairs, "
          f"{ft['steps']} steps in {ft['train_seconds']:.1f} s")
    print(f"  {ft['seconds_per_step_median']:.2f} s/step (median; mean {ft['seconds_per_step_mean']:.2f} with evaluations and checkpoints), "
          f"{ft['tokens_per_s_median']:.0f} tokens/s (median of logged steps)")
    print(f"  held-out loss {ft['eval_loss_first']:.3f} -> {ft['eval_loss_last']:.3f}; train loss {ft['train_loss_first']:.3f} -> {ft['train_loss_last']:.3f}")
    print(f"  peak RSS {result['memory']['peak_rss_mib_after_finetune']:.0f} MiB after the fine-tune, "
          f"{result['memory']['peak_rss_mib_after_evaluation']:.0f} MiB after the evaluation"
          + (f"; peak GPU {result['memory']['cuda_peak_allocated_mib']:.0f} MiB" if result["memory"].get("cuda_peak_allocated_mib") else ""))
    for m in ("base", "tuned"):
        e = ev[m]
        print(f"  {m:<5}: evaluate {e['evaluate_questions_per_s']:.2f} q/s on {ev['n_eval']} held-out (incl. load {e['answer_stage_seconds']:.1f} s); "
              f"answering only {e['answering_questions_per_s']:.2f} q/s on {ev['n_answering']} questions "
              f"({e['answering_mean_answer_tokens']:.1f} tokens per answer); correct {e['correct']:.1f}%")
    print(f"  tuned/base answering-only throughput: {ev['tuned']['answering_questions_per_s'] / ev['base']['answering_questions_per_s']:.2f}")
    print(f"wrote {args.out}")


def measure(args, pool: str, stage1_s: float) -> dict:
    import torch

    from ka2l.config import FinetuneConfig, SamplingConfig, Stage1Config, finetune_preset, from_dict, to_dict
    from ka2l.finetune.evaluate import evaluate
    from ka2l.finetune.lora import load_finetuned, run_model, versions
    from ka2l.models.llm import build_prompt, generate_answers, load_model
    from ka2l.store import finetune as S
    from ka2l.store import queries as Q
    from ka2l.store.db import connect

    overrides = {"source": "gold", "gold_set": "all", "device": args.device, "eval_share": args.eval_share}
    if args.dtype:
        overrides["dtype"] = args.dtype
    cfg: FinetuneConfig = finetune_preset(args.preset, **overrides)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mib()

    from ka2l.finetune.lora import finetune

    timing = Timings()
    t0 = time.perf_counter()
    fid = finetune(pool, cfg, progress=timing)
    finetune_wall = time.perf_counter() - t0
    rss_finetune = peak_rss_mib()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    with connect() as db:
        row = S.get_finetune(db, fid)
        train_log, eval_log = S.log(db, fid, "train"), S.log(db, fid, "eval")
        run = Q.get_run(db, row["run_id"])
        questions = Q.pool_questions(db, row["pool_id"])
    steps = timing.advances.get("training", [])
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    train_s = timing.duration("training", t0 + finetune_wall)
    rates = [r["tokens_per_s"] for r in train_log if r["tokens_per_s"]]

    # -- 4. evaluation: base and tuned on the held-out split, then answering-only throughput ---------
    timing_eval = Timings()
    t0 = time.perf_counter()
    summary = evaluate(fid, progress=timing_eval, device=args.device)
    eval_wall = time.perf_counter() - t0
    stage1 = from_dict(Stage1Config, run["config"])
    sampling = SamplingConfig(**{**to_dict(stage1.sampling), "batch_size": 16})
    evaluation: dict = {"n_eval": summary["n_eval"], "evaluate_seconds": eval_wall, "bertscore_model": summary["bertscore_model"]}
    answering = questions  # every pool question
    for m in ("base", "tuned"):
        stage_s = timing_eval.duration(f"{m} answers", t0 + eval_wall)
        if m == "base":
            spec, prompt = run_model(run["id"], cfg)  # the run's model with the fine-tune's device and dtype
            lm = load_model(spec)
        else:
            lm, prompt = load_finetuned(fid, device=args.device)
        prompts = [build_prompt(lm.tokenizer, q["question"], prompt) for q in answering]
        ta = time.perf_counter()
        lengths = []
        for b in range(0, len(prompts), sampling.batch_size):
            out = generate_answers(lm, prompts[b : b + sampling.batch_size], sampling, 0.1, 1, b)
            lengths += [len(g[0].token_ids) for g in out]
        answer_s = time.perf_counter() - ta
        del lm
        evaluation[m] = {"answer_stage_seconds": stage_s, "evaluate_questions_per_s": summary["n_eval"] / stage_s,
                         "answering_seconds": answer_s, "answering_questions_per_s": len(prompts) / answer_s,
                         "answering_mean_answer_tokens": statistics.fmean(lengths),
                         "correct": summary["metrics"]["correct"][m]["value"],
                         "bertscore": summary["metrics"]["bertscore"][m]["value"]}
    evaluation["n_answering"] = len(answering)
    rss_eval = peak_rss_mib()

    return {
        "what": "LoRA fine-tune of the embedded SmolLM2-135M-Instruct with the cpu-small preset on gold answers, and base vs "
                "tuned evaluation speed",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None},
        "versions": versions(),
        "pool": {"name": pool, "questions": len(questions), "source": f"demo:capitals, seeded sample of {len(questions)} (seed 0)"},
        "stage1": {"run_id": run["id"], "k": args.k, "max_new_tokens": 16, "seconds_incl_import": stage1_s,
                   "why": "finetune() reads the model and prompt from a finished Stage 1 run; a run on a small subset pool with a "
                          "light k is the cheapest legitimate one. Not part of the fine-tune figures (it ran in another process, "
                          "reused when finished)."},
        "settings": {"preset": args.preset, "overrides": overrides, "config": to_dict(cfg),
                     "why_overrides": "gold answers of every pool question; eval_share raised from the default 0.1 so the "
                                      "evaluation has more than a handful of held-out questions"},
        "finetune": {"id": fid, "device": cfg.device, "dtype": cfg.dtype, "n_train": row["n_train"], "n_eval": row["n_eval"],
                     "steps": row["step"], "total_steps": row["total_steps"], "stopped_early": bool(row["stopped_early"]),
                     "wall_seconds": finetune_wall, "train_seconds": train_s,
                     "seconds_per_step_median": statistics.median(intervals) if intervals else train_s,
                     "seconds_per_step_mean": train_s / max(1, len(steps)),
                     "tokens_per_s_median": statistics.median(rates) if rates else None,
                     "tokens_per_s_mean": statistics.fmean(rates) if rates else None,
                     "train_loss_first": train_log[0]["loss"], "train_loss_last": train_log[-1]["loss"],
                     "eval_loss_first": eval_log[0]["loss"], "eval_loss_last": eval_log[-1]["loss"],
                     "best_eval_loss": row["best_eval_loss"]},
        "memory": {"peak_rss_mib_before_finetune": rss_before, "peak_rss_mib_after_finetune": rss_finetune,
                   "peak_rss_mib_after_evaluation": rss_eval, "cuda_peak_allocated_mib": cuda_peak,
                   "note": "ru_maxrss is the process's high-water mark: the value after the evaluation covers the fine-tune too"},
        "evaluation": evaluation,
    }


if __name__ == "__main__":
    main()
