"""Reads and writes of Stage 2: decoders and their loss curves, generation batches, candidates and
the review log. Rows come back as dicts with JSON columns decoded (see ``queries``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import NotFound
from .db import now
from .queries import Db, _one, _rows

# -- decoders ------------------------------------------------------------------------------------


def create_decoder(db: Db, fields: dict[str, Any]) -> int:
    row = {**fields, "config": json.dumps(fields["config"]), "versions": json.dumps(fields.get("versions", {})),
           "created_at": now(), "updated_at": now()}
    return int(db["decoders"].insert(row).last_pk)


def find_decoder(db: Db, config_hash: str) -> dict[str, Any] | None:
    return _one(db, "SELECT * FROM decoders WHERE config_hash = ? ORDER BY id DESC LIMIT 1", [config_hash])


def get_decoder(db: Db, decoder_id: int) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM decoders WHERE id = ?", [decoder_id])
    if row is None:
        raise NotFound(f"No decoder {decoder_id}. List them with `python -m ka2l decoders`.")
    return row


def list_decoders(db: Db, pool_id: int | None = None) -> list[dict[str, Any]]:
    if pool_id is None:
        return _rows(db, "SELECT * FROM decoders ORDER BY id")
    return _rows(db, "SELECT * FROM decoders WHERE pool_id = ? ORDER BY id", [pool_id])


def update_decoder(db: Db, decoder_id: int, **fields: Any) -> None:
    enc = {k: json.dumps(v) if k in ("metrics", "config", "versions") else v for k, v in fields.items()}
    db["decoders"].update(decoder_id, {**enc, "updated_at": now()})


def add_losses(db: Db, decoder_id: int, rows: Sequence[tuple[int, int, float]]) -> None:
    """(step, epoch, loss) rows; a step logged again (after a resume from an older checkpoint) is replaced."""
    db["decoder_losses"].insert_all(({"decoder_id": decoder_id, "step": s, "epoch": e, "loss": l} for s, e, l in rows), replace=True)


def trim_losses(db: Db, decoder_id: int, after_step: int) -> None:
    """Forget losses past ``after_step`` (training restarts from a checkpoint, or from scratch at 0)."""
    db.execute("DELETE FROM decoder_losses WHERE decoder_id = ? AND step > ?", [decoder_id, after_step])


def losses(db: Db, decoder_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT step, epoch, loss FROM decoder_losses WHERE decoder_id = ? ORDER BY step", [decoder_id])


# -- generations and candidates ------------------------------------------------------------------


def start_generation(db: Db, decoder_id: int, pool_id: int, config: dict, config_hash: str, resume: bool = True) -> tuple[int, str]:
    """(generation id, 'new' | 'resumed' | 'done') for a config: a finished batch is reused, an unfinished one resumed."""
    row = None
    if resume:
        row = _one(db, "SELECT * FROM generations WHERE decoder_id = ? AND config_hash = ? ORDER BY id DESC LIMIT 1", [decoder_id, config_hash])
    if row is not None and row["status"] == "done":
        return int(row["id"]), "done"
    if row is not None:
        db["generations"].update(row["id"], {"status": "running", "error": None, "updated_at": now()})
        return int(row["id"]), "resumed"
    gen_id = db["generations"].insert({"decoder_id": decoder_id, "pool_id": pool_id, "config": json.dumps(config), "config_hash": config_hash,
                                       "status": "running", "created_at": now(), "updated_at": now()}).last_pk
    return int(gen_id), "new"


def update_generation(db: Db, gen_id: int, **fields: Any) -> None:
    enc = {k: json.dumps(v) if k == "summary" else v for k, v in fields.items()}
    db["generations"].update(gen_id, {**enc, "updated_at": now()})


def add_generation_seconds(db: Db, gen_id: int, seconds: float) -> None:
    db.execute("UPDATE generations SET seconds = seconds + ? WHERE id = ?", [seconds, gen_id])


def get_generation(db: Db, gen_id: int) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM generations WHERE id = ?", [gen_id])
    if row is None:
        raise NotFound(f"No generation batch {gen_id}.")
    return row


def list_generations(db: Db, pool_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT * FROM generations WHERE pool_id = ? ORDER BY id", [pool_id])


def generated_sources(db: Db, gen_id: int) -> set[int]:
    return {r["source_question_id"] for r in db.query("SELECT DISTINCT source_question_id FROM candidates WHERE generation_id = ?", [gen_id])}


def insert_candidates(db: Db, rows: Sequence[dict[str, Any]]) -> None:
    with db.atomic():
        db["candidates"].insert_all(
            {**r, "vector": None if r.get("vector") is None else np.asarray(r["vector"], dtype=np.float32).tobytes(), "created_at": now()}
            for r in rows)


def kept_texts(db: Db, pool_id: int) -> list[str]:
    """Texts of every kept candidate of a pool, whatever decoder made them (for text deduplication)."""
    return [r["text"] for r in db.query("SELECT text FROM candidates WHERE pool_id = ? AND status = 'kept' ORDER BY id", [pool_id])]


def kept_vectors(db: Db, pool_id: int, decoder_ids: Iterable[int]) -> np.ndarray | None:
    """Decoder-space vectors of the kept candidates of a pool made by ``decoder_ids`` (decoders that share
    one vector space: vectors of other spaces must never be compared with them), oldest first."""
    ids = [int(i) for i in decoder_ids]
    if not ids:
        return None
    rows = list(db.query(f"""SELECT c.vector FROM candidates c JOIN generations g ON g.id = c.generation_id
                             WHERE c.pool_id = ? AND c.status = 'kept' AND c.vector IS NOT NULL
                             AND g.decoder_id IN ({','.join('?' * len(ids))}) ORDER BY c.id""", [pool_id, *ids]))
    if not rows:
        return None
    return np.stack([np.frombuffer(r["vector"], dtype=np.float32) for r in rows])


def candidate_vectors(db: Db, candidate_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """Stored decoder-space vectors of the given candidates, by id (candidates without one are left out)."""
    ids = [int(i) for i in candidate_ids]
    if not ids:
        return {}
    rows = db.query(f"SELECT id, vector FROM candidates WHERE vector IS NOT NULL AND id IN ({','.join('?' * len(ids))})", ids)
    return {r["id"]: np.frombuffer(r["vector"], dtype=np.float32) for r in rows}


# A candidate's probe values are those of its current text: the curator's edit once re-probed (None
# before), else the decoder's; the decoder's own values stay beside them as decoded_*.
_CANDIDATE_VIEW = """
    SELECT c.id, c.generation_id, c.pool_id, c.source_question_id, s.question AS source_question, s.ext_id AS source_ext_id,
           c.sample, c.noise, c.raw_text, c.text, c.status, c.drop_reason,
           CASE WHEN c.edited_text IS NULL THEN c.p_unknown ELSE e.p_unknown END AS p_unknown,
           CASE WHEN c.edited_text IS NULL THEN c.flagged_known ELSE e.flagged_known END AS flagged_known,
           CASE WHEN c.edited_text IS NULL THEN n.question ELSE en.question END AS nearest_question,
           CASE WHEN c.edited_text IS NULL THEN c.nearest_similarity ELSE e.nearest_similarity END AS nearest_similarity,
           c.p_unknown AS decoded_p_unknown, c.nearest_similarity AS decoded_nearest_similarity,
           c.decision, c.edited_text, c.decided_at
    FROM candidates c JOIN questions s ON s.id = c.source_question_id LEFT JOIN questions n ON n.id = c.nearest_question_id
         LEFT JOIN candidate_edits e ON e.candidate_id = c.id AND e.text = c.edited_text
         LEFT JOIN questions en ON en.id = e.nearest_question_id
"""


def candidates(db: Db, pool_id: int, status: str | None = "kept", decision: str | None = None) -> list[dict[str, Any]]:
    sql, params = _CANDIDATE_VIEW + " WHERE c.pool_id = ?", [pool_id]
    if status:
        sql, params = sql + " AND c.status = ?", params + [status]
    if decision:
        sql, params = sql + " AND c.decision = ?", params + [decision]
    return _rows(db, sql + " ORDER BY c.id", params)


def get_candidates(db: Db, candidate_ids: Iterable[int]) -> list[dict[str, Any]]:
    ids = [int(i) for i in candidate_ids]
    if not ids:
        return []
    return _rows(db, _CANDIDATE_VIEW + f" WHERE c.id IN ({','.join('?' * len(ids))}) ORDER BY c.id", ids)


def has_edit_probe(db: Db, candidate_id: int, text: str) -> bool:
    return db.execute("SELECT 1 FROM candidate_edits WHERE candidate_id = ? AND text = ?", [candidate_id, text]).fetchone() is not None


def save_edit_probe(db: Db, candidate_id: int, text: str, values: dict[str, Any]) -> None:
    """Re-probe values (p_unknown, flagged_known, nearest_question_id, nearest_similarity, vector) of an edited text."""
    vector = values.get("vector")
    db["candidate_edits"].insert({"candidate_id": candidate_id, "text": text, "p_unknown": values["p_unknown"],
                                  "flagged_known": values["flagged_known"], "nearest_question_id": values.get("nearest_question_id"),
                                  "nearest_similarity": values.get("nearest_similarity"),
                                  "vector": None if vector is None else np.asarray(vector, dtype=np.float32).tobytes(),
                                  "probed_at": now()}, replace=True)


# -- review log ------------------------------------------------------------------------------------


def set_decisions(db: Db, pool_id: int, changes: Sequence[tuple[int, str, str | None, str, str | None]]) -> int:
    """Apply (candidate id, before decision, before text, after decision, after text) changes as one
    undoable action; returns its action id."""
    with db.atomic():
        action = (db.execute("SELECT coalesce(max(action_id), 0) FROM review_log").fetchone()[0] or 0) + 1
        at = now()
        for cid, bd, bt, ad, at_text in changes:
            db.execute("UPDATE candidates SET decision = ?, edited_text = ?, decided_at = ? WHERE id = ?",
                       [ad, at_text, None if ad == "pending" else at, cid])
            db["review_log"].insert({"action_id": action, "pool_id": pool_id, "candidate_id": cid, "before_decision": bd,
                                     "before_text": bt, "after_decision": ad, "after_text": at_text, "at": at})
    return action


def undo_last(db: Db, pool_id: int) -> list[dict[str, Any]]:
    """Revert the pool's latest review action; returns the log rows it reverted (empty if none)."""
    with db.atomic():
        last = db.execute("SELECT max(action_id) FROM review_log WHERE pool_id = ?", [pool_id]).fetchone()[0]
        if last is None:
            return []
        rows = _rows(db, "SELECT * FROM review_log WHERE pool_id = ? AND action_id = ? ORDER BY id DESC", [pool_id, last])
        for r in rows:
            db.execute("UPDATE candidates SET decision = ?, edited_text = ?, decided_at = CASE WHEN ? = 'pending' THEN NULL ELSE decided_at END WHERE id = ?",
                       [r["before_decision"], r["before_text"], r["before_decision"], r["candidate_id"]])
        db.execute("DELETE FROM review_log WHERE pool_id = ? AND action_id = ?", [pool_id, last])
    return rows


def last_action(db: Db, pool_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT * FROM review_log WHERE action_id = (SELECT max(action_id) FROM review_log WHERE pool_id = ?) ORDER BY id", [pool_id])


def decision_counts(db: Db, pool_id: int) -> dict[str, int]:
    counts = {"pending": 0, "approved": 0, "rejected": 0}
    for r in db.query("SELECT decision, count(*) AS n FROM candidates WHERE pool_id = ? AND status = 'kept' GROUP BY decision", [pool_id]):
        counts[r["decision"]] = r["n"]
    return counts
