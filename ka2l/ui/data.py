"""Read-only views of the store for the pages. Connections are opened per call, never cached."""

from __future__ import annotations

from typing import Any

from ..report import build_report
from ..store import queries as Q
from ..store.db import connect


def pools() -> list[dict[str, Any]]:
    with connect() as db:
        return Q.list_pools(db)


def runs() -> list[dict[str, Any]]:
    with connect() as db:
        return Q.list_runs(db)


def report(run_id: int) -> dict[str, Any]:
    with connect() as db:
        return build_report(db, run_id)


def progress(run_id: int) -> dict[str, int]:
    with connect() as db:
        return Q.run_progress(db, run_id)
