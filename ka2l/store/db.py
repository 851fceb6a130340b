"""Short-lived SQLite connections through sqlite-utils: WAL, foreign keys, schema migrated on open."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from ..errors import StoreError
from ..paths import db_path
from .migrations import migrate


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_db(path: Path | str | None = None) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the database. Call ``close()`` or use ``connect``."""
    path = Path(path) if path is not None else db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"Cannot open the database at {path}: {exc}. Check the folder exists and is writable.") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path} is not a ka2l database ({exc}). Point KA2L_DATA_DIR at another folder or move the file away.") from exc
    return sqlite_utils.Database(conn)


@contextmanager
def connect(path: Path | str | None = None) -> Iterator[sqlite_utils.Database]:
    db = open_db(path)
    try:
        yield db
    finally:
        db.conn.close()
