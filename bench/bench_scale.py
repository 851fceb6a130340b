"""Local against Ray executor: Stage 1 on the same pool, the same model and config, each in its own process.

    .venv/bin/python bench/bench_scale.py [--n 24] [--k 5] [--model embedded] [--max-new-tokens 12] [--cpus 4]

    local   ``run_stage1`` in one process: its model stages' wall time (the run's hidden + answers + scores timings)
    ray     ``ka2l.scale.run_stage1`` with ``executor.kind = 'ray'`` on a local single-node cluster of ``--cpus``
            logical CPUs: the cluster start, then the model stages (read the pool as a Ray Dataset, one actor per
            stage, Parquet blocks with checkpointing, the ingest), from the run's own record

Both runs then train the same probes (not timed here). The overhead ratio is Ray's model-stage wall time over
the local one's (with and without the cluster's start); on one 2-core machine Ray can only add overhead (its
actors share the same cores), the point of the executor is more machines. The two runs' answers and SE are
compared too (they must be equal). Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(args, executor: str):
    from ka2l.config import EMBEDDED_MODEL, ExecutorConfig, ModelSpec, ProbeConfig, SamplingConfig, Stage1Config

    model = EMBEDDED_MODEL if args.model == "embedded" else args.model
    return Stage1Config(model=ModelSpec(name_or_path=model, device="cpu"),
                        sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=8, hidden_batch_size=8),
                        probe=ProbeConfig(device="cpu", epochs=20, bootstrap=50),
                        executor=ExecutorConfig(kind=executor, num_cpus=args.cpus, block_size=args.block_size))


def _child(args) -> None:
    """One measured run, in this process (a fresh Python: its own torch threads, its own Ray driver)."""
    import torch

    torch.set_num_threads(args.threads)
    from ka2l.store import queries as Q
    from ka2l.store.db import connect

    out: dict = {"executor": args.child}
    if args.child == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        out["cluster_start_s"] = time.perf_counter() - t0
    from ka2l.scale import run_stage1

    from ka2l.errors import ProbeError

    t0 = time.perf_counter()
    try:
        run_stage1("bench", _config(args, args.child), resume=args.child == "local")
    except ProbeError as exc:  # too few known / unknown questions for probes: the model stages, timed here, are stored
        out["probe_error"] = str(exc)
    out["run_s"] = time.perf_counter() - t0
    with connect() as db:
        run_id = max(r["id"] for r in Q.list_runs(db))  # this process's run (the ray run is the second)
        run = Q.get_run(db, run_id)
        answers = Q.load_answers(db, run_id)
        scores = Q.load_scores(db, run_id)
    t = run["timings"]
    if args.child == "ray":
        out["model_stages_s"] = sum(e["seconds"] for e in run["summary"]["ray"])
        out["actor_busy_s"] = {k: t[k]["seconds"] for k in ("hidden", "answers", "scores")}
    else:
        out["model_stages_s"] = sum(t[k]["seconds"] for k in ("hidden", "answers", "scores"))
    out["run_id"] = run_id
    out["answers"] = {str(q): [a["text"] for a in v["low"] + v["sample"]] for q, v in answers.items()}
    out["se"] = {str(s["question_id"]): s["se"] for s in scores}
    print("RESULT " + json.dumps(out))


def _run(args, which: str, data: Path) -> dict:
    env = {**os.environ, "KA2L_DATA_DIR": str(data), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", which, *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{which} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="questions (the first n of the capitals demo pool)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M from PyPI) or a model folder")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--block-size", type=int, default=8, help="questions per Ray block")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    from ka2l.paths import PROJECT_ROOT

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        os.environ["KA2L_DATA_DIR"] = str(data)
        from ka2l.pools.sources import load_builtin
        from ka2l.store import queries as Q
        from ka2l.store.db import connect

        pool = load_builtin("demo:capitals")
        pool = type(pool)(**{**vars(pool), "name": "bench", "rows": pool.rows[: args.n], "n_read": args.n})
        with connect() as db:
            Q.insert_pool(db, pool)
        local = _run(args, "local", data)  # first: it also prepares the embedded model's folder the Ray actors load
        remote = _run(args, "ray", data)
    same_answers = local["answers"] == remote["answers"]
    same_se = local["se"] == remote["se"]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {k: getattr(args, k) for k in ("n", "k", "max_new_tokens", "model", "cpus", "block_size", "threads")},
        "local_model_stages_s": round(local["model_stages_s"], 2),
        "ray_cluster_start_s": round(remote["cluster_start_s"], 2),
        "ray_model_stages_s": round(remote["model_stages_s"], 2),
        "ray_actor_busy_s": {k: round(v, 2) for k, v in remote["actor_busy_s"].items()},
        "overhead_ratio": round(remote["model_stages_s"] / local["model_stages_s"], 2),
        "overhead_ratio_with_cluster_start": round((remote["model_stages_s"] + remote["cluster_start_s"]) / local["model_stages_s"], 2),
        "local_run_s": round(local["run_s"], 2), "ray_run_s": round(remote["run_s"], 2),
        "same_answers": same_answers, "same_se": same_se,
    }
    print(json.dumps(result, indent=1))
    out = PROJECT_ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Ray / local model-stage time: {result['overhead_ratio']}x ({result['overhead_ratio_with_cluster_start']}x with the "
          f"cluster's start); answers {'identical' if same_answers else 'DIFFER'}, SE {'identical' if same_se else 'DIFFERS'}. "
          f"Wrote {out.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
