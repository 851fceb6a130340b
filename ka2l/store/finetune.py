"""Reads and writes of Stage 3b training: fine-tune runs, their data split and their loss log. (The
evaluation's per-question answers have their own module.) Rows come back as dicts, JSON decoded."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import NotFound
from .db import now
from .queries import Db, _rows

_JSON = ("config", "versions", "evaluation")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in _JSON and isinstance(v, str) else v) for k, v in row.items()}


def create_finetune(db: Db, fields: dict[str, Any]) -> int:
    row = {**fields, **{k: json.dumps(fields[k]) for k in _JSON if k in fields}, "created_at": now(), "updated_at": now()}
    return int(db["finetunes"].insert(row).last_pk)


def find_finetune(db: Db, pool_id: int, config_hash: str, dataset_hash: str) -> dict[str, Any] | None:
    rows = [_decode(r) for r in db.query("SELECT * FROM finetunes WHERE pool_id = ? AND config_hash = ? AND dataset_hash = ?",
                                         [pool_id, config_hash, dataset_hash])]
    return rows[0] if rows else None


def finetunes_with_data(db: Db, pool_id: int, dataset_hash: str) -> list[dict[str, Any]]:
    """The pool's fine-tunes on exactly this data (any settings), oldest first."""
    return [_decode(r) for r in db.query("SELECT * FROM finetunes WHERE pool_id = ? AND dataset_hash = ? ORDER BY id",
                                         [pool_id, dataset_hash])]


def get_finetune(db: Db, finetune_id: int) -> dict[str, Any]:
    rows = [_decode(r) for r in db.query("SELECT * FROM finetunes WHERE id = ?", [finetune_id])]
    if not rows:
        raise NotFound(f"No fine-tune {finetune_id}. List them with `python -m ka2l finetunes`.")
    return rows[0]


def list_finetunes(db: Db, pool_id: int | None = None) -> list[dict[str, Any]]:
    if pool_id is None:
        return [_decode(r) for r in db.query("SELECT * FROM finetunes ORDER BY id")]
    return [_decode(r) for r in db.query("SELECT * FROM finetunes WHERE pool_id = ? ORDER BY id", [pool_id])]


def update_finetune(db: Db, finetune_id: int, **fields: Any) -> None:
    enc = {k: (json.dumps(v) if k in _JSON and v is not None and not isinstance(v, str) else v) for k, v in fields.items()}
    db["finetunes"].update(finetune_id, {**enc, "updated_at": now()})


def add_seconds(db: Db, finetune_id: int, seconds: float) -> None:
    db.execute("UPDATE finetunes SET seconds = seconds + ? WHERE id = ?", [seconds, finetune_id])


# -- the data split ------------------------------------------------------------------------------

def save_data(db: Db, finetune_id: int, rows: Iterable[dict[str, Any]]) -> None:
    """The run's pairs (item_key, split 'train' | 'eval', question, answer, origin), replacing what was stored."""
    with db.atomic():
        db.execute("DELETE FROM finetune_data WHERE finetune_id = ?", [finetune_id])
        db["finetune_data"].insert_all({"finetune_id": finetune_id, **r} for r in rows)


def load_data(db: Db, finetune_id: int, split: str | None = None) -> list[dict[str, Any]]:
    """Stored pairs in item-key order; ``split='eval'`` is the held-out set evaluation answers."""
    sql, params = "SELECT item_key, split, question, answer, origin FROM finetune_data WHERE finetune_id = ?", [finetune_id]
    if split:
        sql, params = sql + " AND split = ?", params + [split]
    return _rows(db, sql + " ORDER BY item_key", params)


# -- the loss log --------------------------------------------------------------------------------

def add_log(db: Db, finetune_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of step, split ('train' | 'eval'), loss, lr, tokens_per_s; a step logged again (training
    resumed from an earlier checkpoint) replaces the old row."""
    at = now()
    db["finetune_log"].insert_all(({"finetune_id": finetune_id, "lr": None, "tokens_per_s": None, **r, "at": at} for r in rows),
                                  replace=True)


def trim_log(db: Db, finetune_id: int, after_step: int) -> None:
    """Forget log rows past ``after_step``: training resumes from the checkpoint at that step."""
    db.execute("DELETE FROM finetune_log WHERE finetune_id = ? AND step > ?", [finetune_id, after_step])


def log(db: Db, finetune_id: int, split: str | None = None) -> list[dict[str, Any]]:
    """The loss curve: step, split, loss, lr, tokens_per_s, at, by step (train before eval at a step)."""
    sql, params = "SELECT step, split, loss, lr, tokens_per_s, at FROM finetune_log WHERE finetune_id = ?", [finetune_id]
    if split:
        sql, params = sql + " AND split = ?", params + [split]
    return _rows(db, sql + " ORDER BY step, split DESC", params)
