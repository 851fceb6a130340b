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


def remove(pool_id: int, question_ids: Iterable[int]) -> None:
    with connect() as db, db.atomic():
        for q in question_ids:
            db.execute("DELETE FROM curation WHERE pool_id = ? AND question_id = ?", [pool_id, int(q)])


def members(pool_id: int) -> list[dict[str, Any]]:
    with connect() as db:
        return list(db.query("""SELECT c.question_id, q.ext_id, q.question, c.source, c.added_at FROM curation c
                                JOIN questions q ON q.id = c.question_id WHERE c.pool_id = ? ORDER BY c.added_at, q.idx""", [pool_id]))
