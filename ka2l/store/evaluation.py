"""Reads and writes of Stage 3b evaluation: both models' answers to the held-out questions with their
per-question metrics (``finetune_answers``), and the summary in ``finetunes.evaluation``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import NotFound
from .db import now
from .queries import Db, _rows

MODELS = ("base", "tuned")
METRICS = ("correct", "bleu", "rouge_l", "meteor", "bertscore")


def answered_keys(db: Db, finetune_id: int, model: str) -> set[str]:
    """Item keys ``model`` ('base' | 'tuned') has already answered."""
    return {r["item_key"] for r in db.query("SELECT item_key FROM finetune_answers WHERE finetune_id = ? AND model = ?",
                                            [finetune_id, model])}


def add_answers(db: Db, finetune_id: int, model: str, rows: Iterable[dict[str, Any]]) -> None:
    """Rows of item_key, question, gold, answer and any of the metric columns, in one transaction;
    an item answered again replaces its row."""
    with db.atomic():
        db["finetune_answers"].insert_all(({"finetune_id": finetune_id, "model": model, **r} for r in rows), replace=True)


def unscored(db: Db, finetune_id: int, metric: str = "bertscore") -> list[dict[str, Any]]:
    """Answers whose ``metric`` column is still empty (model, item_key, answer, gold)."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; one of {', '.join(METRICS)}.")
    return _rows(db, f"SELECT model, item_key, answer, gold FROM finetune_answers WHERE finetune_id = ? AND {metric} IS NULL "
                     "ORDER BY model, item_key", [finetune_id])


def set_scores(db: Db, finetune_id: int, metric: str, scores: Sequence[tuple[str, str, float]], bertscore_model: str | None = None) -> None:
    """(model, item_key, value) for one metric column, in one transaction; BERTScore's with the model that scored it."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; one of {', '.join(METRICS)}.")
    extra, args = (", bertscore_model = ?", [bertscore_model]) if metric == "bertscore" else ("", [])
    with db.atomic():
        db.conn.executemany(f"UPDATE finetune_answers SET {metric} = ?{extra} WHERE finetune_id = ? AND model = ? AND item_key = ?",
                            [(v, *args, finetune_id, m, k) for m, k, v in scores])


def made_with(db: Db, finetune_id: int, models: Sequence[str]) -> list[dict[str, Any]]:
    """The distinct answering settings (temperature, seed) of ``models``' stored answers that record them."""
    marks = ", ".join("?" for _ in models)
    rows = db.query(f"SELECT DISTINCT made_with FROM finetune_answers WHERE finetune_id = ? AND model IN ({marks}) "
                    "AND made_with IS NOT NULL", [finetune_id, *models])
    return [json.loads(r["made_with"]) for r in rows]


def clear_bertscore(db: Db, finetune_id: int, keep_model: str, legacy_model: str | None) -> int:
    """Forget BERTScores not scored by ``keep_model`` (rows stored before the model was recorded count as
    ``legacy_model``'s); the answers stay. Returns how many were forgotten."""
    with db.atomic():
        n = db.execute("UPDATE finetune_answers SET bertscore = NULL, bertscore_model = NULL WHERE finetune_id = ? "
                       "AND bertscore IS NOT NULL AND COALESCE(bertscore_model, ?, '') != ?",
                       [finetune_id, legacy_model, keep_model]).rowcount
    return int(n)


def answers(db: Db, finetune_id: int, model: str | None = None) -> list[dict[str, Any]]:
    """Stored answers of the items still in the held-out split, by model then item key."""
    sql = ("SELECT a.* FROM finetune_answers a JOIN finetune_data d ON d.finetune_id = a.finetune_id AND d.item_key = a.item_key "
           "AND d.split = 'eval' WHERE a.finetune_id = ?")
    params: list[Any] = [finetune_id]
    if model:
        sql, params = sql + " AND a.model = ?", params + [model]
    return _rows(db, sql + " ORDER BY a.model, a.item_key", params)


def table(db: Db, finetune_id: int) -> list[dict[str, Any]]:
    """The per-question table: item_key, question, gold, then ``base_answer``, ``tuned_answer`` and each
    metric per model (``base_correct``, ``tuned_bleu``, ...); None where a model has not answered."""
    rows: dict[str, dict[str, Any]] = {}
    for r in answers(db, finetune_id):
        row = rows.setdefault(r["item_key"], {"item_key": r["item_key"], "question": r["question"], "gold": r["gold"],
                                              **{f"{m}_{c}": None for m in MODELS for c in ("answer",) + METRICS}})
        row[f"{r['model']}_answer"] = r["answer"]
        for c in METRICS:
            row[f"{r['model']}_{c}"] = r[c]
    return [rows[k] for k in sorted(rows)]


def clear_answers(db: Db, finetune_id: int, model: str | None = None) -> int:
    """Forget stored answers (one model's or both) and the summary; returns how many rows went."""
    sql, params = "DELETE FROM finetune_answers WHERE finetune_id = ?", [finetune_id]
    if model:
        sql, params = sql + " AND model = ?", params + [model]
    with db.atomic():
        n = db.execute(sql, params).rowcount
        db.execute("UPDATE finetunes SET evaluation = NULL, updated_at = ? WHERE id = ?", [now(), finetune_id])
    return int(n)


def save_evaluation(db: Db, finetune_id: int, summary: dict[str, Any]) -> None:
    db.execute("UPDATE finetunes SET evaluation = ?, updated_at = ? WHERE id = ?", [json.dumps(summary), now(), finetune_id])


def get_evaluation(db: Db, finetune_id: int) -> dict[str, Any] | None:
    """The stored summary, or None before an evaluation finished."""
    rows = list(db.query("SELECT evaluation FROM finetunes WHERE id = ?", [finetune_id]))
    if not rows:
        raise NotFound(f"No fine-tune {finetune_id}. List them with `python -m ka2l finetunes`.")
    return json.loads(rows[0]["evaluation"]) if rows[0]["evaluation"] else None
