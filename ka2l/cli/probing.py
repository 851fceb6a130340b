"""Stage 1 commands of ``python -m ka2l``: probe a pool, triage a new one with a saved probe, report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import BACKENDS, EMBEDDED_MODEL, EXECUTORS, JUDGE_KINDS, PROBE_KINDS, THRESHOLD_RULES, Stage1Config, TriageConfig, from_dict
from ..errors import ConfigError
from .parsing import add_command, add_run_flags, submit_job

GROUP = "Stage 1: probing"


def _cmd_runs(args: argparse.Namespace) -> int:
    from ..store import queries as Q
    from ..store.db import connect

    with connect() as db:
        for r in Q.list_runs(db):
            probes = ", ".join(f"probe {p['id']} (layer {p['layer']})" for p in Q.list_probes(db, r["id"]))
            print(f"{r['id']:>4}  {r['kind']:<7} {r['status']:<12} pool {r['pool_id']:<4} {r['model']}  {probes}")
    return 0


def stage1_config(args: argparse.Namespace) -> Stage1Config:
    """Config from --config FILE, with any explicit flags on top."""
    base: dict[str, Any] = {}
    if args.config:
        try:
            base = json.loads(open(args.config, encoding="utf-8").read())
        except OSError as exc:
            raise ConfigError(f"Cannot read --config {args.config}: {exc.strerror}.") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {args.config} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        if not isinstance(base, dict):
            raise ConfigError(f"--config {args.config} must hold a JSON object such as {{\"sampling\": {{\"k\": 5}}}}.")
    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            base.setdefault(section, {})[key] = value
    put("model", "name_or_path", args.model)
    put("model", "device", args.device)
    put("model", "dtype", args.dtype)
    put("sampling", "k", args.k)
    put("sampling", "temperature", args.temperature)
    put("sampling", "low_temperature", args.low_temperature)
    put("sampling", "max_new_tokens", args.max_new_tokens)
    put("sampling", "batch_size", args.batch_size)
    put("sampling", "seed", args.seed)
    put("sampling", "backend", args.backend)
    put("judge", "kind", args.judge)
    put("judge", "model", args.judge_model)
    put("judge", "strict", False if args.non_strict else None)
    put("threshold", "rule", args.threshold_rule)
    put("probe", "kind", args.probe_kind)
    put("probe", "device", args.device)
    for key, value in executor_flags(args).items():
        put("executor", key, value)
    return from_dict(Stage1Config, base)


def executor_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ExecutorConfig fields the --executor / --ray-* flags set (unset flags are left out)."""
    found = {"kind": args.executor, "address": args.ray_address, "num_cpus": args.ray_cpus, "num_actors": args.ray_actors}
    ray_flags = [f"--ray-{k.split('_')[-1]}" for k in ("address", "num_cpus", "num_actors") if found[k] is not None]
    if args.executor == "local" and ray_flags:
        raise ConfigError(f"{', '.join(ray_flags)} only apply to --executor ray; drop them or pass --executor ray.")
    return {k: v for k, v in found.items() if v is not None}


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, help="where the model stages run: local (this process, the default) or ray "
                   "(Ray Data actor pools; pip install 'ka2l[ray]')")
    p.add_argument("--ray-address", help="Ray cluster to connect to (e.g. auto, or ray://HEAD:10001); unset starts a local one")
    p.add_argument("--ray-cpus", type=int, help="logical CPUs of the local Ray cluster (default max(4, cores))")
    p.add_argument("--ray-actors", type=int, help="actors per model stage, one model load each (default 1)")


def _cmd_probe(args: argparse.Namespace) -> int:
    from ..scale import run_stage1
    from ..probing.storage import stage1_hidden_size
    from ..progress import TqdmProgress
    from ..probing.report import build_report, format_report
    from ..store.db import connect

    cfg = stage1_config(args)
    if args.background and args.no_resume:
        raise ConfigError("--background always resumes a matching run (a job continues where it stopped); "
                          "drop --no-resume, or run `probe` without --background to start a new one.")
    if args.background:
        return _submit_background(args.pool, cfg)
    size = stage1_hidden_size(args.pool, cfg)  # from the model's config, before the model loads
    if size is not None:
        print(size.describe() + ("" if size.fits else "  (more than is free there)"), flush=True)
    run_id = run_stage1(args.pool, cfg, progress=TqdmProgress(disable=args.quiet), resume=not args.no_resume)
    with connect() as db:
        print(format_report(build_report(db, run_id)))
        _print_left_out(db, run_id)
    return 0


def _print_left_out(db, run_id: int) -> None:
    """The questions the sampling engine could not answer (vLLM: over-long prompts), each with its reason."""
    from ..store import queries as Q

    left_out = Q.get_run(db, run_id)["summary"].get("left_out", {})
    if left_out:
        print(f"\n{len(left_out)} question(s) left out (no answers, no SE label, not in the probes' data):")
        for why in left_out.values():
            print(f"  - {why}")


def _submit_background(pool: str, cfg: Stage1Config) -> int:
    """Queue Stage 1 as a job (the app's Jobs page shows it), unless the same one is already queued or running."""
    from ..config import to_dict

    return submit_job("stage1", {"pool": pool, "stage1": to_dict(cfg)}, "the app's Jobs page")


def _cmd_triage(args: argparse.Namespace) -> int:
    from ..config import ExecutorConfig
    from ..scale import run_triage
    from ..progress import TqdmProgress
    from ..probing.report import build_report, format_report
    from ..store.db import connect

    cfg = TriageConfig(probe_id=args.probe, batch_size=args.batch_size, device=args.device or "auto",
                       executor=from_dict(ExecutorConfig, executor_flags(args)))
    run_id = run_triage(args.pool, cfg, progress=TqdmProgress(disable=args.quiet), resume=not args.no_resume)
    with connect() as db:
        print(format_report(build_report(db, run_id)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..probing.report import build_report, format_report
    from ..store import queries as Q
    from ..store.db import connect

    with connect() as db:
        if args.run is not None:
            run_id = args.run
        else:
            pool_id = Q.get_pool(db, args.pool)["id"] if args.pool else None
            run_id = Q.latest_run(db, "stage1", pool_id)["id"]
        rep = build_report(db, run_id)
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return 0


def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "probe", "Stage 1: hidden states, sampling, semantic entropy, BiSE, per-layer probes (resumable)")
    p.add_argument("--pool", required=True, help="pool name or id")
    p.add_argument("--config", help="JSON file with a full or partial Stage1Config; flags override it")
    p.add_argument("--model", help=f"hub id, folder or .gguf file (default {EMBEDDED_MODEL})")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--dtype", help="auto, float32, float16, bfloat16")
    p.add_argument("--k", type=int, help="samples per question (default 10)")
    p.add_argument("--temperature", type=float, help="temperature of the k samples (default 1.0)")
    p.add_argument("--low-temperature", type=float, help="temperature of the most-likely answer (default 0.1)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 32)")
    p.add_argument("--batch-size", type=int, help="questions per generate call (default 16)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--backend", choices=BACKENDS, help="sampling engine: hf (default) or vllm (NVIDIA GPU, pip install 'ka2l[vllm]'); "
                   "hidden states always come from HF, and a run keeps its backend")
    p.add_argument("--judge", choices=JUDGE_KINDS, help="equivalence judge (default lexical)")
    p.add_argument("--judge-model", help="model for the nli / embedding judge")
    p.add_argument("--non-strict", action="store_true", help="non-strict equivalence (no contradiction, not both neutral)")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, help="SE binarisation (default two-means)")
    p.add_argument("--probe-kind", choices=PROBE_KINDS, help="probe kind (default mlp)")
    p.add_argument("--no-resume", action="store_true", help="start a new run even if one with this pool and config exists (finished or not)")
    add_executor_flags(p)
    add_run_flags(p)
    p.set_defaults(func=_cmd_probe)

    p = add_command(sub, GROUP, "triage", "score a pool with a saved probe: one forward pass per question, no sampling")
    p.add_argument("--pool", required=True, help="pool name or id")
    p.add_argument("--probe", type=int, required=True, help="probe id (see `runs`)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--no-resume", action="store_true", help="start a new triage run even if this pool was triaged with this probe")
    add_executor_flags(p)
    add_run_flags(p, background=False)
    p.set_defaults(func=_cmd_triage)

    p = add_command(sub, GROUP, "report", "print a run's split, layer-wise AUROC and evidence tables")
    p.add_argument("--run", type=int, help="run id (default: the latest finished Stage 1 run)")
    p.add_argument("--pool", help="latest finished Stage 1 run of this pool")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_report)

    p = add_command(sub, GROUP, "runs", "list runs and their probes")
    p.set_defaults(func=_cmd_runs)
