"""``python -m ka2l``: a thin command line over the same library calls the app uses."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from .config import EMBEDDED_MODEL, JUDGE_KINDS, PROBE_KINDS, THRESHOLD_RULES, Stage1Config, TriageConfig, from_dict
from .errors import ConfigError, Ka2lError

EPILOG = """examples:
  python -m ka2l import demo:capitals                 # a committed demo pool
  python -m ka2l import questions.csv --name support  # your own pool (CSV, JSONL, JSON, Parquet)
  python -m ka2l probe --pool capitals                # Stage 1 on the embedded SmolLM2 (resumable)
  python -m ka2l report --pool capitals               # split, layer-wise AUROC, baselines
  python -m ka2l triage --pool new-questions --probe 1
  python -m ka2l decoder-train --probe 1 --minutes 10  # Stage 2: hidden-state -> question decoder
  python -m ka2l generate --decoder 1 --noise 0.1      # new candidate questions from the unknowns
  python -m ka2l approved --pool capitals --out approved.jsonl
"""


def _cmd_setup_model(args: argparse.Namespace) -> int:
    from .embedded import ensure_embedded_model
    from .paths import models_dir

    print(f"embedded model ready at {ensure_embedded_model(models_dir())}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .pool import read_pool
    from .sources import is_builtin, load_builtin
    from .store import queries as Q
    from .store.db import connect

    if is_builtin(args.source):
        pool = load_builtin(args.source, name=args.name, skip_invalid=args.skip_invalid)
    else:
        pool = read_pool(args.source, name=args.name, skip_invalid=args.skip_invalid, encoding=args.encoding, max_mb=args.max_mb)
    if args.limit:
        pool = pool.sample(args.limit, args.seed)
    with connect() as db:
        if args.if_missing and any(p["name"] == pool.name for p in Q.list_pools(db)):
            print(f"pool {pool.name!r} already imported; kept as it is")
            return 0
        pool_id = Q.insert_pool(db, pool)
    rep = pool.report()
    print(f"imported pool {pool.name!r} (id {pool_id}): {rep['rows_imported']} questions, {rep['rows_with_answers']} with gold answers")
    for problem in rep["skipped"][:20]:
        print(f"  skipped: {problem}")
    if len(rep["skipped"]) > 20:
        print(f"  ... and {len(rep['skipped']) - 20} more skipped rows")
    return 0


def _cmd_pools(args: argparse.Namespace) -> int:
    from .store import queries as Q
    from .store.db import connect

    with connect() as db:
        for p in Q.list_pools(db):
            print(f"{p['id']:>4}  {p['name']:<24} {p['n_questions']:>6} questions  {'gold answers' if p['has_answers'] else ''}  {p['source']}")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from .store import queries as Q
    from .store.db import connect

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
    put("judge", "kind", args.judge)
    put("judge", "model", args.judge_model)
    put("judge", "strict", False if args.non_strict else None)
    put("threshold", "rule", args.threshold_rule)
    put("probe", "kind", args.probe_kind)
    put("probe", "device", args.device)
    return from_dict(Stage1Config, base)


def _cmd_probe(args: argparse.Namespace) -> int:
    from .pipeline import run_stage1
    from .progress import TqdmProgress
    from .report import build_report, format_report
    from .store.db import connect

    cfg = stage1_config(args)
    if args.background:
        return _submit_background(args.pool, cfg)
    run_id = run_stage1(args.pool, cfg, progress=TqdmProgress(disable=args.quiet), resume=not args.no_resume)
    with connect() as db:
        print(format_report(build_report(db, run_id)))
    return 0


def _submit_background(pool: str, cfg: Stage1Config) -> int:
    """Queue Stage 1 as a job (the app's Jobs page shows it), unless the same one is already queued or running."""
    from . import jobs
    from .config import to_dict

    config = {"pool": pool, "stage1": to_dict(cfg)}
    jobs.refresh()
    same = [j for j in jobs.list_jobs() if j["status"] in jobs.PENDING and j["config"] == config]
    if same:
        print(f"Stage 1 on {pool!r} is already job {same[0]['id']} ({same[0]['status']})")
        return 0
    print(f"submitted job {jobs.submit('stage1', config)}: follow it on the app's Jobs page or with `python -m ka2l jobs`")
    return 0


def _cmd_triage(args: argparse.Namespace) -> int:
    from .pipeline import run_triage
    from .progress import TqdmProgress
    from .report import build_report, format_report
    from .store.db import connect

    cfg = TriageConfig(probe_id=args.probe, batch_size=args.batch_size, device=args.device or "auto")
    run_id = run_triage(args.pool, cfg, progress=TqdmProgress(disable=args.quiet), resume=not args.no_resume)
    with connect() as db:
        print(format_report(build_report(db, run_id)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, format_report
    from .store import queries as Q
    from .store.db import connect

    with connect() as db:
        if args.run is not None:
            run_id = args.run
        else:
            pool_id = Q.get_pool(db, args.pool)["id"] if args.pool else None
            run_id = Q.latest_run(db, "stage1", pool_id)["id"]
        rep = build_report(db, run_id)
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return 0


def _cmd_job_run(args: argparse.Namespace) -> int:
    from .jobs import run_worker

    logging.getLogger("ka2l").setLevel(logging.INFO)
    return run_worker(args.id)


def _cmd_job_cancel(args: argparse.Namespace) -> int:
    from .jobs import cancel

    cancel(args.id, wait=True)
    print(f"job {args.id} cancelled")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .jobs import list_jobs, refresh

    refresh()
    for j in list_jobs():
        print(f"{j['id']:>4}  {j['kind']:<9} {j['status']:<10} {j['stage'] or '':<18} {j['done']}/{j['total'] or '?'}  {j['error'] or j['message'] or ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ka2l", description="Find where a language model's knowledge ends (KA2L).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("setup-model", help="convert the embedded SmolLM2 model once into data/models (done by make setup)")
    p.set_defaults(func=_cmd_setup_model)

    p = sub.add_parser("import", help="import a question pool from a file or a built-in source")
    p.add_argument("source", help="a .csv/.tsv/.jsonl/.json/.parquet file, demo:NAME, or fanoutqa[:dev|test]")
    p.add_argument("--name", help="pool name (default: the file name)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid rows instead of refusing the file")
    p.add_argument("--encoding", help="text encoding of the file (default UTF-8)")
    p.add_argument("--max-mb", type=float, default=200, help="refuse files larger than this (default 200)")
    p.add_argument("--limit", type=int, help="import only a random sample of this many questions")
    p.add_argument("--seed", type=int, default=0, help="seed for --limit")
    p.add_argument("--if-missing", action="store_true", help="do nothing if a pool of that name exists")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("pools", help="list stored pools")
    p.set_defaults(func=_cmd_pools)
    p = sub.add_parser("runs", help="list runs and their probes")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("probe", help="Stage 1: hidden states, sampling, semantic entropy, BiSE, per-layer probes (resumable)")
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
    p.add_argument("--judge", choices=JUDGE_KINDS, help="equivalence judge (default lexical)")
    p.add_argument("--judge-model", help="model for the nli / embedding judge")
    p.add_argument("--non-strict", action="store_true", help="non-strict equivalence (no contradiction, not both neutral)")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, help="SE binarisation (default two-means)")
    p.add_argument("--probe-kind", choices=PROBE_KINDS, help="probe kind (default mlp)")
    p.add_argument("--no-resume", action="store_true", help="start a new run even if one with this pool and config exists (finished or not)")
    p.add_argument("--background", action="store_true", help="queue the run as a background job (as the app does) and return at once")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("triage", help="score a pool with a saved probe: one forward pass per question, no sampling")
    p.add_argument("--pool", required=True, help="pool name or id")
    p.add_argument("--probe", type=int, required=True, help="probe id (see `runs`)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--no-resume", action="store_true", help="start a new triage run even if this pool was triaged with this probe")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_triage)

    p = sub.add_parser("jobs", help="list background jobs (started from the app)")
    p.set_defaults(func=_cmd_jobs)
    p = sub.add_parser("job", help="background job worker and control")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION", help="run or cancel")
    jp = jsub.add_parser("run", help="run a queued job in this process (the app starts this for you)")
    jp.add_argument("id", type=int, help="job id")
    jp.set_defaults(func=_cmd_job_run)
    jp = jsub.add_parser("cancel", help="cancel a job: stored work is kept")
    jp.add_argument("id", type=int, help="job id")
    jp.set_defaults(func=_cmd_job_cancel)

    p = sub.add_parser("report", help="print a run's split, layer-wise AUROC and evidence tables")
    p.add_argument("--run", type=int, help="run id (default: the latest finished Stage 1 run)")
    p.add_argument("--pool", help="latest finished Stage 1 run of this pool")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_report)

    from .cli_augment import add_commands

    add_commands(sub)
    return parser


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: stored work kept, the run marked interrupted


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if not args.verbose:  # keep the terminal to ka2l's own progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Ka2lError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: everything stored so far is kept; run the same command again to continue.", file=sys.stderr)
        return 130
