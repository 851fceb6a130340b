"""Stage 3a commands of ``python -m ka2l``: a local Label Studio, push a pool's approved set to it in
annotation order, pull the answers back, see where things stand, export the SFT dataset.

The server's URL and token come from the connection (environment, ``.streamlit/secrets.toml`` or the
0600 file the Settings page and ``annotate serve`` write); they never appear on a command line, in a
job row or in output (the token is shown masked)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import PullConfig, PushConfig, from_dict, to_dict
from ..errors import ConfigError, Ka2lError
from .parsing import add_command, add_run_flags, submit_job

GROUP = "Stage 3: annotation"
EXPORT_FORMATS = ("alpaca", "jsonl", "csv")


def _options(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag, None) is not None}


def _pool_name(pool: str) -> str:
    """The stored pool's name for a name or an id (job configs and push / pull take the name)."""
    from ..store import queries as Q
    from ..store.db import connect

    with connect() as db:
        return Q.get_pool(db, pool)["name"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..annotate import server
    from ..annotate.connection import mask
    from ..progress import TqdmProgress

    if args.stop:
        info = server.status(args.folder)
        if server.stop(args.folder):
            print(f"stopped the local Label Studio at {info['url']} (pid {info['pid']})")
        else:
            print("no local Label Studio is running")
        return 0
    progress = TqdmProgress(disable=args.quiet)
    try:
        if not server.installed():
            print(f"installing Label Studio into {server.venv_dir()} (once, about a minute)...")
            server.install(progress=progress)
        if args.install:
            print(f"Label Studio is installed in {server.venv_dir()}; start it with `python -m ka2l annotate serve`.")
            return 0
        info = server.start(port=args.port, folder=args.folder, progress=progress)
    finally:
        progress.close()
    print(f"Label Studio runs at {info.url} (pid {info.pid}, data in {info.folder}); ka2l is connected to it "
          f"as {info.username} (token {mask(info.token)}).")
    print("Stop it with `python -m ka2l annotate serve --stop`.")
    return 0


def push_config(args: argparse.Namespace) -> PushConfig:
    return from_dict(PushConfig, _options(args, {"project": "project", "title": "title", "diversity": "diversity",
                                                 "batch_size": "batch_size"}))


def _cmd_push(args: argparse.Namespace) -> int:
    from ..annotate import push

    pool = _pool_name(args.pool)
    cfg = push_config(args)
    if args.dry_run:
        frame = push.preview(pool, cfg)
        print(format_preview(frame, args.limit))
        return 0
    return _run("push", push.push, pool, cfg, args, describe_push)


def _run(kind: str, call, pool: str, cfg, args: argparse.Namespace, describe) -> int:
    """A push or pull: queued as a background job with --background, else run here with a progress bar."""
    from ..progress import TqdmProgress

    if args.background:
        return submit_job(kind, {"pool": pool, kind: to_dict(cfg)}, "the app's Annotate or Jobs page,")
    progress = TqdmProgress(disable=args.quiet)
    try:
        result = call(pool, cfg, progress=progress)
    finally:
        progress.close()
    print(describe(result))
    return 0


def format_preview(frame, limit: int) -> str:
    """The first ``limit`` rows of what a push would send, in annotation order."""
    if frame is None or len(frame) == 0:
        return "nothing to push: the approved set is empty (add unknown questions to the curation set, approve candidates)"
    lines = [f"{len(frame)} item(s) in annotation order (first {min(limit, len(frame))}):"]
    cols = [c for c in ("rank", "kind", "p_unknown", "pushed", "question") if c in frame.columns]
    for row in frame.head(limit).to_dict("records"):
        bits = []
        for c in cols:
            v = row[c]
            if c == "p_unknown" and v is not None and v == v:
                bits.append(f"P(unknown) {float(v):.2f}")
            elif c == "pushed":
                bits.append("pushed" if bool(v) else "new")
            elif c == "question":
                bits.append(str(v)[:90])
            else:
                bits.append(str(v))
        lines.append("  " + "  ".join(bits))
    return "\n".join(lines)


def describe_push(r: dict[str, Any]) -> str:
    return (f"pushed {r['pushed']} new task(s) to project {r['title']!r} ({r['url']}): {r['linked']} linked in all, "
            f"{r['skipped']} already there, {r['reconciled']} link(s) rebuilt from the server")


def describe_pull(r: dict[str, Any]) -> str:
    return (f"pulled {r['annotations']} annotation(s) of {r['tasks']} task(s): {r['added']} added, {r['updated']} updated, "
            f"{r['deleted']} deleted · answered {r['answered']}, cannot answer {r['cannot_answer']}, skipped {r['skipped']}, "
            f"pending {r['pending']}, conflicts {r['conflicts']}")


def _cmd_pull(args: argparse.Namespace) -> int:
    from ..annotate import pull

    pool = _pool_name(args.pool)
    cfg = from_dict(PullConfig, _options(args, {"project": "project"}))
    return _run("pull", pull.pull, pool, cfg, args, describe_pull)


def _cmd_status(args: argparse.Namespace) -> int:
    from ..annotate import connection, server
    from ..annotate.labelstudio import Client

    local = server.status()
    if local and local["running"]:
        print(f"local server: running at {local['url']} (pid {local['pid']}{'' if local['healthy'] else ', not answering yet'})")
    else:
        print("local server: not running" + ("" if server.installed() else " (not installed)")
              + "; start one with `python -m ka2l annotate serve`")
    conn = connection.load()
    if conn is None:
        print(f"connection: none. {connection.HOW_TO_CONNECT}")
        return 0
    print(f"connection: {conn.url} · token {conn.masked} · from {conn.source}")
    try:
        user = Client(conn.url, conn.token).whoami()
    except Ka2lError as exc:
        print(f"server: not usable. {exc}")
        return 2
    print(f"server: reachable · signed in as {user.get('email') or user.get('username') or user.get('id')}")
    if args.pool:
        from ..annotate import pull

        p = pull.progress(_pool_name(args.pool))
        print(f"pool {_pool_name(args.pool)}: project {p['project']} ({p['url']}) · {p['pushed']} pushed · {p['tasks']} tasks on the "
              f"server · {p['annotated']} annotated · {p['skipped']} skipped · {p['pulled']} pulled (last pull: {p['pulled_at'] or 'never'})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..annotate import dataset
    from ..views.export import to_safe_csv

    pool = _pool_name(args.pool)
    out = Path(args.out)
    frame = dataset.pairs(pool, conflicts=not args.no_conflicts)
    if args.format == "alpaca":
        # LLaMA-Factory reads a folder: <name>.json beside a dataset_info.json that names it
        folder, name = (out.parent, out.stem) if out.suffix == ".json" else (out, dataset.dataset_name(pool))
        written = dataset.write_llamafactory(frame, folder, name)
        print(f"wrote {len(frame)} pair(s) to {written['data']} and its entry {name!r} to {written['dataset_info']}")
        print(f"fine-tune with: llamafactory-cli train ... --dataset_dir {folder} --dataset {name}")
        return 0
    if args.format == "jsonl":
        if out.suffix != ".jsonl":
            raise ConfigError(f"--out for --format jsonl must end in .jsonl, got {out.name!r}.")
        dataset.write_jsonl(frame, out)
    else:
        if out.suffix != ".csv":
            raise ConfigError(f"--out for --format csv must end in .csv, got {out.name!r}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(to_safe_csv(frame))
    print(f"wrote {len(frame)} pair(s) to {out}")
    return 0


def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "annotate", "Stage 3a: push the approved set to Label Studio, pull the answers back")
    asub = p.add_subparsers(dest="annotate_command", required=True, metavar="ACTION", help="serve, push, pull, status or export")

    a = asub.add_parser("serve", help="install (once) and start a local Label Studio on loopback and connect ka2l to it",
                        description="Install (once) and start a local Label Studio on 127.0.0.1 with its own data folder under "
                                    "ka2l's; the user and token are created headlessly and the connection saved. Or stop it.")
    a.add_argument("--port", type=int, help="port to listen on (default: the last one when it is free, else a free one)")
    a.add_argument("--folder", help="Label Studio's data folder (default: <data folder>/labelstudio)")
    a.add_argument("--stop", action="store_true", help="stop the running local server (by its pid) instead")
    a.add_argument("--install", action="store_true", help="only install Label Studio into its own venv (if missing); do not start it")
    add_run_flags(a, background=False)
    a.set_defaults(func=_cmd_serve)

    a = asub.add_parser("push", help="send the pool's approved set to its Label Studio project in annotation order",
                        description="Send a pool's approved set (curated originals + approved candidates) to its Label Studio "
                                    "project, most useful first (P(unknown) with a diversity term). Only what is not yet "
                                    "pushed is sent; a push stopped half-way and run again creates no duplicate.")
    a.add_argument("--pool", required=True, help="pool name or id")
    a.add_argument("--project", type=int, help="ka2l's project id to push to (default: the pool's newest, created on first push)")
    a.add_argument("--title", help="title of a project this push creates (default 'ka2l: <pool>')")
    a.add_argument("--diversity", type=float, help="weight of the diversity term, 0..1 (default 0.3)")
    a.add_argument("--batch-size", type=int, help="tasks per import call (default 200)")
    a.add_argument("--dry-run", action="store_true", help="print what would be pushed, in order, and push nothing")
    a.add_argument("--limit", type=int, default=20, help="rows --dry-run prints (default 20)")
    add_run_flags(a)
    a.set_defaults(func=_cmd_push)

    a = asub.add_parser("pull", help="fetch the project's annotations back into ka2l (adds none twice)",
                        description="Fetch a pool's Label Studio annotations through the export API and store them: new ones "
                                    "added, changed ones updated, deleted ones removed.")
    a.add_argument("--pool", required=True, help="pool name or id")
    a.add_argument("--project", type=int, help="ka2l's project id to pull from (default: the pool's newest)")
    add_run_flags(a)
    a.set_defaults(func=_cmd_pull)

    a = asub.add_parser("status", help="show the connection, the local server and a pool's annotation progress",
                        description="Show the Label Studio connection (token masked), whether the server answers and as whom, "
                                    "the local server, and with --pool that pool's pushed / annotated counts.")
    a.add_argument("--pool", help="pool name or id whose progress to show")
    a.set_defaults(func=_cmd_status)

    a = asub.add_parser("export", help="write the pulled answers as an SFT dataset (alpaca JSON, JSONL or CSV)",
                        description="Write the pool's pulled answers as (question, answer) pairs with provenance: LLaMA-Factory's "
                                    "alpaca JSON (with dataset_info.json beside it), JSONL for `datasets`, or formula-safe CSV.")
    a.add_argument("--pool", required=True, help="pool name or id")
    a.add_argument("--format", choices=EXPORT_FORMATS, default="alpaca", help="alpaca (default), jsonl or csv")
    a.add_argument("--out", required=True, help="alpaca: a .json file (dataset_info.json goes beside it) or a folder; "
                                                "jsonl: a .jsonl file; csv: a .csv file")
    a.add_argument("--no-conflicts", action="store_true", help="leave out items whose annotators disagree")
    a.set_defaults(func=_cmd_export)
