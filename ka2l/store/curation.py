"""The curation set: questions a curator picked (from the scores table or the map) for later steps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .db import connect, now


def add(pool_id: int, question_ids: Iterable[int], source: str) -> int:
    rows = [{"pool_id": pool_id, "question_id": int(q), "source": source, "added_at": now()} for q in question_ids]
    with connect() as db, db.atomic():
        before = db.execute("SELECT count(*) FROM curation WHERE pool_id = ?", [pool_id]).fetchone()[0]
        db["curation"].insert_all(rows, ignore=True)
        return db.execute("SELECT count(*) FROM curation WHERE pool_id = ?", [pool_id]).fetchone()[0] - before


def remove(pool_id: int, question_ids: Iterable[int]) -> int:
    """Take questions out of the set; returns how many were in it. The questions themselves stay in the pool."""
    ids = [int(q) for q in question_ids]
    with connect() as db, db.atomic():
        before = db.execute("SELECT count(*) FROM curation WHERE pool_id = ?", [pool_id]).fetchone()[0]
        db.conn.executemany("DELETE FROM curation WHERE pool_id = ? AND question_id = ?", [(pool_id, q) for q in ids])
        return before - db.execute("SELECT count(*) FROM curation WHERE pool_id = ?", [pool_id]).fetchone()[0]


def member_ids(pool_id: int) -> set[int]:
    with connect() as db:
        return {r[0] for r in db.execute("SELECT question_id FROM curation WHERE pool_id = ?", [pool_id]).fetchall()}


def members(pool_id: int) -> list[dict[str, Any]]:
    with connect() as db:
        return list(db.query("""SELECT c.question_id, q.ext_id, q.question, c.source, c.added_at FROM curation c
                                JOIN questions q ON q.id = c.question_id WHERE c.pool_id = ? ORDER BY c.added_at, q.idx""", [pool_id]))
