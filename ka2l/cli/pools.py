"""Pool commands of ``python -m ka2l``: prepare the embedded model, import and list question pools."""

from __future__ import annotations

import argparse

from .parsing import add_command

GROUP = "Pools and models"


def _cmd_setup_model(args: argparse.Namespace) -> int:
    from ..models.embedded import ensure_embedded_model
    from ..paths import models_dir

    print(f"embedded model ready at {ensure_embedded_model(models_dir())}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from ..pools.reader import read_pool
    from ..pools.sources import is_builtin, load_builtin
    from ..store import queries as Q
    from ..store.db import connect

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
    from ..store import queries as Q
    from ..store.db import connect

    with connect() as db:
        for p in Q.list_pools(db):
            print(f"{p['id']:>4}  {p['name']:<24} {p['n_questions']:>6} questions  {'gold answers' if p['has_answers'] else ''}  {p['source']}")
    return 0

def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "setup-model", "convert the embedded SmolLM2 model once per machine (~/.cache/ka2l/models, linked from data/models; done by make setup)")
    p.set_defaults(func=_cmd_setup_model)

    p = add_command(sub, GROUP, "import", "import a question pool from a file or a built-in source")
    p.add_argument("source", help="a .csv/.tsv/.jsonl/.json/.parquet file, demo:NAME, or fanoutqa[:dev|test]")
    p.add_argument("--name", help="pool name (default: the file name)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid rows instead of refusing the file")
    p.add_argument("--encoding", help="text encoding of the file (default UTF-8)")
    p.add_argument("--max-mb", type=float, default=200, help="refuse files larger than this (default 200)")
    p.add_argument("--limit", type=int, help="import only a random sample of this many questions")
    p.add_argument("--seed", type=int, default=0, help="seed for --limit")
    p.add_argument("--if-missing", action="store_true", help="do nothing if a pool of that name exists")
    p.set_defaults(func=_cmd_import)

    p = add_command(sub, GROUP, "pools", "list stored pools")
    p.set_defaults(func=_cmd_pools)
