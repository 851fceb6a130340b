"""Page actions that need backend modules the pages may not import directly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..pools.reader import PoolData, read_pool
from ..pools.sources import demo_pools, load_builtin
from ..store import queries as Q
from ..store.db import connect


def read_upload(filename: str, content: bytes, skip_invalid: bool = False) -> PoolData:
    """Validate an uploaded file through the same reader the CLI uses."""
    suffix = Path(filename).suffix
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        pool = read_pool(path, name=Path(filename).stem, skip_invalid=skip_invalid)
    pool.source = filename
    return pool


def store_pool(pool: PoolData, name: str) -> int:
    pool.name = name.strip() or pool.name
    with connect() as db:
        return Q.insert_pool(db, pool)


def demo_names() -> list[str]:
    return demo_pools()


def read_demo(name: str) -> PoolData:
    return load_builtin(f"demo:{name}")


def probes_of_run(run_id: int) -> list[dict]:
    with connect() as db:
        return Q.list_probes(db, run_id)


def all_probes() -> list[dict]:
    with connect() as db:
        return [p for r in Q.list_runs(db) for p in Q.list_probes(db, r["id"])]


def data_dir():
    from ..paths import data_dir as current

    return current()


def data_dir_from_env() -> bool:
    import os

    return bool(os.environ.get("KA2L_DATA_DIR"))


def set_data_dir(folder: str):
    from ..paths import set_data_dir as remember

    return remember(folder)


# Backend modules the pages use, reached through ka2l.ui (pages import only ui, config, errors, jobs).
from ..store import curation  # noqa: E402,F401
from ..views import export, maps  # noqa: E402,F401
from ..augment import review  # noqa: E402,F401
from .. import settings  # noqa: E402,F401


def read_corpus(filename: str, content: bytes) -> PoolData:
    """An extra question corpus: a .txt file (one question per line) or a pool file with a 'question'
    column or a single column of any name."""
    from ..pools.reader import read_corpus as read

    suffix = Path(filename).suffix
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        corpus = read(path, name=f"corpus-{Path(filename).stem}")
    corpus.source = filename
    return corpus
