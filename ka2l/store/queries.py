"""Reads and writes of pools, runs and their results. (``ka2l.jobs``, ``ka2l.curation`` and
``ka2l.settings`` each own one small table.) Multi-row writes run inside ``db.atomic()``.

Rows come back as plain dicts with JSON columns decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import sqlite_utils

from ..errors import NotFound, PoolError
from .db import now

Db = sqlite_utils.Database
_JSON_COLUMNS = ("answers", "metadata", "report", "config", "threshold", "versions", "timings", "metrics",
                 "token_logprobs", "cluster_ids", "verdicts", "result", "summary")


def _decode(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (json.loads(v) if k in _JSON_COLUMNS and isinstance(v, str) else v) for k, v in row.items()}


def _rows(db: Db, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return [_decode(r) for r in db.query(sql, params)]


def _one(db: Db, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
    rows = _rows(db, sql, params)
    return rows[0] if rows else None


# -- pools ---------------------------------------------------------------------------------------

def insert_pool(db: Db, pool) -> int:
    """Store a validated ``PoolData``; all rows or none. A taken name is refused, never overwritten."""
    existing = _one(db, "SELECT id FROM pools WHERE name = ?", [pool.name])
    if existing:
        raise PoolError(f"A pool named {pool.name!r} already exists (id {existing['id']}). Choose another name (--name); the stored pool is unchanged.")
    with db.atomic():
        pool_id = db["pools"].insert(
            {"name": pool.name, "source": pool.source, "created_at": now(), "n_questions": len(pool.rows),
             "has_answers": int(pool.has_answers), "report": json.dumps(pool.report())}
        ).last_pk
        db["questions"].insert_all(
            {"pool_id": pool_id, "idx": i, "ext_id": r.ext_id, "question": r.question,
             "answers": json.dumps(list(r.answers)), "metadata": json.dumps(r.metadata)}
            for i, r in enumerate(pool.rows)
        )
    return int(pool_id)


def get_pool(db: Db, ref: int | str) -> dict[str, Any]:
    """A pool by id or by name."""
    row = _one(db, "SELECT * FROM pools WHERE name = ?", [str(ref)])
    if row is None and str(ref).isdigit():
        row = _one(db, "SELECT * FROM pools WHERE id = ?", [int(ref)])
    if row is None:
        names = [r["name"] for r in list_pools(db)]
        raise NotFound(f"No pool {ref!r}. Pools: {', '.join(names) or '(none yet: import one with `python -m ka2l import FILE`)'}.")
    return row


def list_pools(db: Db) -> list[dict[str, Any]]:
    return _rows(db, "SELECT * FROM pools ORDER BY id")


def pool_questions(db: Db, pool_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT id, idx, ext_id, question, answers, metadata FROM questions WHERE pool_id = ? ORDER BY idx", [pool_id])


# -- runs ----------------------------------------------------------------------------------------

def create_run(db: Db, pool_id: int, kind: str, config: dict[str, Any], config_hash: str, model: str, versions: dict[str, str]) -> int:
    ts = now()
    return int(db["runs"].insert(
        {"pool_id": pool_id, "kind": kind, "config": json.dumps(config), "config_hash": config_hash, "model": model,
         "status": "running", "stage": "created", "versions": json.dumps(versions), "created_at": ts, "updated_at": ts}
    ).last_pk)


def find_matching_runs(db: Db, pool_id: int, kind: str, config_hash: str) -> list[dict[str, Any]]:
    """Every run of this kind with the same pool and config, newest first (finished or not)."""
    return _rows(db, "SELECT * FROM runs WHERE pool_id = ? AND kind = ? AND config_hash = ? ORDER BY id DESC",
                 [pool_id, kind, config_hash])


def get_run(db: Db, run_id: int) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM runs WHERE id = ?", [run_id])
    if row is None:
        raise NotFound(f"No run {run_id}. See `python -m ka2l runs` for the runs that exist.")
    return row


def list_runs(db: Db, pool_id: int | None = None) -> list[dict[str, Any]]:
    if pool_id is None:
        return _rows(db, "SELECT * FROM runs ORDER BY id")
    return _rows(db, "SELECT * FROM runs WHERE pool_id = ? ORDER BY id", [pool_id])


def latest_run(db: Db, kind: str = "stage1", pool_id: int | None = None) -> dict[str, Any]:
    sql, params = "SELECT * FROM runs WHERE kind = ? AND status = 'done'", [kind]
    if pool_id is not None:
        sql, params = sql + " AND pool_id = ?", params + [pool_id]
    row = _one(db, sql + " ORDER BY id DESC LIMIT 1", params)
    if row is None:
        raise NotFound(f"No finished {kind} run{' for this pool' if pool_id else ''} yet. Run `python -m ka2l probe` first.")
    return row


def update_run(db: Db, run_id: int, **fields: Any) -> None:
    enc = {k: (json.dumps(v) if k in _JSON_COLUMNS and not isinstance(v, str) else v) for k, v in fields.items()}
    db["runs"].update(run_id, {**enc, "updated_at": now()})


def add_timing(db: Db, run_id: int, stage: str, seconds: float, n: int) -> None:
    """Accumulate wall time per stage (a resumed run adds to what the interrupted one spent)."""
    timings = get_run(db, run_id)["timings"]
    t = timings.get(stage, {"seconds": 0.0, "n": 0})
    timings[stage] = {"seconds": t["seconds"] + seconds, "n": t["n"] + n}
    update_run(db, run_id, timings=timings)


# -- per-question results ------------------------------------------------------------------------

def _ids(db: Db, table: str, run_id: int) -> set[int]:
    return {r["question_id"] for r in db.query(f"SELECT DISTINCT question_id FROM {table} WHERE run_id = ?", [run_id])}


def hidden_done_ids(db: Db, run_id: int) -> set[int]:
    return _ids(db, "hidden_done", run_id)


def mark_hidden_done(db: Db, run_id: int, question_ids: Iterable[int]) -> None:
    with db.atomic():
        db["hidden_done"].insert_all(({"run_id": run_id, "question_id": q} for q in question_ids), ignore=True)


def clear_hidden_done(db: Db, run_id: int) -> None:
    """Forget which hidden states were computed (their array file was lost): they are recomputed."""
    with db.atomic():
        db.execute("DELETE FROM hidden_done WHERE run_id = ?", [run_id])


def answered_ids(db: Db, run_id: int) -> set[int]:
    return {r["question_id"] for r in db.query("SELECT question_id FROM answers WHERE run_id = ? AND kind = 'low'", [run_id])}


def insert_answers(db: Db, run_id: int, per_question: dict[int, tuple[Any, Sequence[Any]]]) -> None:
    """``{question_id: (low_generation, [sample_generations])}``, all in one transaction."""
    rows = []
    for qid, (low, samples) in per_question.items():
        for kind, gens in (("low", [low]), ("sample", samples)):
            rows += [{"run_id": run_id, "question_id": qid, "kind": kind, "sample_idx": i, "text": g.text,
                      "token_logprobs": json.dumps(list(g.token_logprobs)), "seq_logprob": g.seq_logprob} for i, g in enumerate(gens)]
    with db.atomic():
        db["answers"].insert_all(rows, replace=True)


def load_answers(db: Db, run_id: int, question_ids: Iterable[int] | None = None) -> dict[int, dict[str, list[dict[str, Any]]]]:
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for r in _rows(db, "SELECT * FROM answers WHERE run_id = ? ORDER BY question_id, kind, sample_idx", [run_id]):
        out.setdefault(r["question_id"], {"low": [], "sample": []})[r["kind"]].append(r)
    if question_ids is not None:
        wanted = set(question_ids)
        out = {q: v for q, v in out.items() if q in wanted}
    return out


def get_question(db: Db, question_id: int) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM questions WHERE id = ?", [question_id])
    if row is None:
        raise NotFound(f"No question {question_id}.")
    return row


def get_clustering(db: Db, run_id: int, question_id: int) -> dict[str, Any] | None:
    return _one(db, "SELECT * FROM clusters WHERE run_id = ? AND question_id = ?", [run_id, question_id])


def scored_ids(db: Db, run_id: int) -> set[int]:
    return _ids(db, "scores", run_id)


def insert_scores(db: Db, run_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Rows with question_id, clustering (cluster_ids, n_clusters, judge_calls, verdicts) and scores."""
    cluster_keys = ("cluster_ids", "n_clusters", "judge_calls", "verdicts")
    with db.atomic():
        db["clusters"].insert_all(
            ({"run_id": run_id, "question_id": r["question_id"],
              **{k: (json.dumps(r[k]) if k in ("cluster_ids", "verdicts") else r[k]) for k in cluster_keys}} for r in rows), replace=True)
        db["scores"].insert_all(
            ({"run_id": run_id, **{k: v for k, v in r.items() if k not in cluster_keys}} for r in rows), replace=True)


def set_bise(db: Db, run_id: int, labels: dict[int, int]) -> None:
    with db.atomic():
        for qid, label in labels.items():
            db.execute("UPDATE scores SET bise = ? WHERE run_id = ? AND question_id = ?", [int(label), run_id, qid])


def load_scores(db: Db, run_id: int) -> list[dict[str, Any]]:
    """Scores joined with questions and clustering, in pool order."""
    return _rows(db, """
        SELECT q.idx, q.id AS question_id, q.ext_id, q.question, q.answers, s.se, s.se_weighted, s.regular_entropy,
               s.mean_loglik, s.correct, s.bise, c.n_clusters, c.judge_calls
        FROM scores s JOIN questions q ON q.id = s.question_id JOIN clusters c ON c.run_id = s.run_id AND c.question_id = s.question_id
        WHERE s.run_id = ? ORDER BY q.idx""", [run_id])


# -- probes and predictions ----------------------------------------------------------------------

def insert_probe(db: Db, run_id: int, kind: str, target: str, layer: int, path: str, config: dict, metrics: dict, layers: Sequence[dict]) -> int:
    with db.atomic():
        probe_id = db["probes"].insert(
            {"run_id": run_id, "kind": kind, "target": target, "layer": layer, "path": path, "config": json.dumps(config),
             "metrics": json.dumps(metrics), "created_at": now()}).last_pk
        db["probe_layers"].insert_all({"probe_id": probe_id, **row} for row in layers)
    return int(probe_id)


def get_probe(db: Db, probe_id: int) -> dict[str, Any]:
    row = _one(db, "SELECT * FROM probes WHERE id = ?", [probe_id])
    if row is None:
        raise NotFound(f"No probe {probe_id}. See `python -m ka2l runs` for runs and their probes.")
    return row


def list_probes(db: Db, run_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT * FROM probes WHERE run_id = ? ORDER BY id", [run_id])


def probe_layers(db: Db, probe_id: int) -> list[dict[str, Any]]:
    return _rows(db, "SELECT * FROM probe_layers WHERE probe_id = ? ORDER BY layer", [probe_id])


def insert_predictions(db: Db, run_id: int, probe_id: int, rows: Sequence[dict[str, Any]]) -> None:
    with db.atomic():
        db["predictions"].insert_all(({"run_id": run_id, "probe_id": probe_id, **r} for r in rows), replace=True)


def load_predictions(db: Db, run_id: int) -> list[dict[str, Any]]:
    return _rows(db, """
        SELECT q.idx, q.id AS question_id, q.ext_id, q.question, p.p_unknown, p.label, p.layer, p.probe_id
        FROM predictions p JOIN questions q ON q.id = p.question_id WHERE p.run_id = ? ORDER BY q.idx""", [run_id])

