"""Page actions that need backend modules the pages may not import directly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import PoolError
from ..pools.reader import FORMATS, PoolData, read_columns, read_pool
from ..pools.sources import demo_pools, load_builtin
from ..store import queries as Q
from ..store.db import connect


SKIP_INVALID_LABEL = "Leave out invalid rows instead of refusing the file"
POOL_NAME_LABEL = "Pool name"
QUESTION_COLUMN_LABEL = "Column holding the questions"
# How the reader's messages name the Pool page's controls (the CLI's name its flags).
UPLOAD_HINTS = {
    "skip_invalid": f"tick “{SKIP_INVALID_LABEL}” above",
    "max_mb": "import it from the command line, which takes a higher --max-mb",
    "encoding": "open it in a spreadsheet program and save it as “CSV UTF-8”",
    "question_column": f"Choose the column that holds the questions in “{QUESTION_COLUMN_LABEL}” below.",
}


def _upload_name(filename: str) -> str:
    return Path(filename).name or "upload"


def _check_type(filename: str) -> None:
    """The upload widget takes any file, so a wrong type is explained on the page, not in a tooltip."""
    name, suffix = _upload_name(filename), Path(filename).suffix.lower()
    if suffix == ".txt":
        raise PoolError(f"{name} is a plain text file, and a pool needs columns. Save it as CSV with a first line "
                        "'question' and one question per line below it, or as JSONL, JSON or Parquet.")
    if suffix not in FORMATS:
        raise PoolError(f"{name}: files of type {suffix or '(none)'!r} cannot be read as a pool. "
                        f"Upload one of: {', '.join(sorted(FORMATS))}.")


def read_upload(filename: str, content: bytes, skip_invalid: bool = False, question_column: str | None = None) -> PoolData:
    """Validate an uploaded file through the same reader the CLI uses. Messages name the user's file
    (not the server's temporary copy) and the page's controls (not CLI flags)."""
    _check_type(filename)
    name = _upload_name(filename)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        pool = read_pool(path, name=Path(name).stem, skip_invalid=skip_invalid, source=name,
                         question_column=question_column, hints=UPLOAD_HINTS)
    pool.source = filename
    return pool


def upload_columns(filename: str, content: bytes) -> list[str]:
    """The columns of an uploaded pool file; [] when it cannot be read (its own message says why)."""
    try:
        _check_type(filename)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / _upload_name(filename)
            path.write_bytes(content)
            return read_columns(path)
    except PoolError:
        return []


def needs_question_column(columns: list[str]) -> bool:
    """A file with columns but none named 'question' (the reader matches it case-insensitively)."""
    return bool(columns) and not any(c.strip().lower() == "question" for c in columns)


def store_pool(pool: PoolData, name: str) -> int:
    pool.name = name.strip() or pool.name
    with connect() as db:
        taken = next((p for p in Q.list_pools(db) if p["name"] == pool.name), None)
        if taken is not None:  # the store refuses it too, in the CLI's words
            raise PoolError(f"A pool named {pool.name!r} already exists (id {taken['id']}). Type another name in "
                            f"“{POOL_NAME_LABEL}”; the stored pool is unchanged.")
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


def hidden_states_size(pool: str, model: str) -> str | None:
    """The Probe page's note on the disk a Stage 1 run of ``model`` on ``pool`` stores, from the model's
    config (no weights loaded); None when that config cannot be read before loading."""
    from ..config import ModelSpec, Stage1Config
    from ..errors import Ka2lError
    from ..probing.storage import stage1_hidden_size

    try:
        size = stage1_hidden_size(pool, Stage1Config(model=ModelSpec(name_or_path=model)))
    except Ka2lError:
        return None
    if size is None:
        return None
    return size.describe() + ("" if size.fits else ". That is more than is free: the run would refuse to start.")


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


def check_executor(kind: str) -> None:
    """Raise a ConfigError saying how to install Ray when the ray executor is chosen without it."""
    from ..scale.cluster import check_executor as check

    check(kind)
