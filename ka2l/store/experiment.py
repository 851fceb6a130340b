"""Reads and writes of the RQ1-RQ3 experiment: prompt entropies per run, experiments and their cells.
Rows come back as dicts with JSON columns decoded."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..errors import NotFound
from .db import now
from .queries import Db

_JSON = ("config", "test_keys", "inputs", "selected", "metrics")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in _JSON and isinstance(v, str) else v) for k, v in row.items()}


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON and v is not None and not isinstance(v, str) else v) for k, v in fields.items()}


# -- prompt entropies ----------------------------------------------------------------------------

def prompt_entropies(db: Db, run_id: int) -> dict[int, float]:
    """{question_id: next-token entropy of its prompt} stored for ``run_id``."""
    return {r["question_id"]: r["entropy"] for r in db.query("SELECT question_id, entropy FROM prompt_entropy WHERE run_id = ?", [run_id])}


def add_prompt_entropies(db: Db, run_id: int, values: dict[int, float]) -> None:
    with db.atomic():
        db["prompt_entropy"].insert_all(({"run_id": run_id, "question_id": int(q), "entropy": float(h)} for q, h in values.items()),
                                        replace=True)


# -- experiments -----------------------------------------------------------------------------------

def find_experiment(db: Db, pool_id: int, run_id: int, config_hash: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM experiments WHERE pool_id = ? AND run_id = ? AND config_hash = ?", [pool_id, run_id, config_hash]))
    return _decode(rows[0]) if rows else None


def create_experiment(db: Db, fields: dict[str, Any]) -> int:
    return int(db["experiments"].insert({**_encode(fields), "created_at": now(), "updated_at": now()}).last_pk)


def get_experiment(db: Db, experiment_id: int) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM experiments WHERE id = ?", [experiment_id]))
    if not rows:
        raise NotFound(f"No experiment {experiment_id}. List them with `python -m ka2l experiment-report --list`.")
    return _decode(rows[0])


def list_experiments(db: Db, pool_id: int | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM experiments", []
    if pool_id is not None:
        sql, params = sql + " WHERE pool_id = ?", [pool_id]
    return [_decode(r) for r in db.query(sql + " ORDER BY id", params)]


def update_experiment(db: Db, experiment_id: int, **fields: Any) -> None:
    db["experiments"].update(experiment_id, {**_encode(fields), "updated_at": now()})


# -- cells -------------------------------------------------------------------------------------------

def ensure_cells(db: Db, experiment_id: int, cells: Iterable[dict[str, Any]]) -> None:
    """Rows (strategy, budget, seed, n) for every cell of the grid; existing cells are kept as they are."""
    with db.atomic():
        db["experiment_cells"].insert_all(({"experiment_id": experiment_id, "status": "pending", **c} for c in cells), ignore=True)


def cells(db: Db, experiment_id: int) -> list[dict[str, Any]]:
    return [_decode(r) for r in db.query("SELECT * FROM experiment_cells WHERE experiment_id = ? ORDER BY id", [experiment_id])]


def get_cell(db: Db, cell_id: int) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM experiment_cells WHERE id = ?", [cell_id]))
    if not rows:
        raise NotFound(f"No experiment cell {cell_id}.")
    return _decode(rows[0])


def update_cell(db: Db, cell_id: int, **fields: Any) -> None:
    db["experiment_cells"].update(cell_id, _encode(fields))


def add_cell_seconds(db: Db, cell_id: int, column: str, seconds: float) -> None:
    if column not in ("select_seconds", "finetune_seconds", "eval_seconds"):
        raise ValueError(f"Unknown seconds column {column!r}.")
    db.execute(f"UPDATE experiment_cells SET {column} = {column} + ? WHERE id = ?", [seconds, cell_id])
