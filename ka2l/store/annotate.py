"""Label Studio round trip state (migration 7): projects ka2l created, the task each pushed item became,
and the annotations pulled back. The token is never stored here (see ``ka2l.annotate.connection``).

Item keys name what a task holds: ``'q:<question id>'`` for a pool question, ``'c:<candidate id>'`` for a
decoded candidate; the same key rides in the task's data, so links lost in a crash are rebuilt from the
server rather than pushed twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import NotFound
from .db import now
from .queries import Db


def item_key(kind: str, item_id: int) -> str:
    """The key of a question or candidate.

    >>> item_key("question", 12), item_key("candidate", 3)
    ('q:12', 'c:3')
    """
    return {"question": "q", "original": "q", "candidate": "c", "decoded": "c"}[kind] + f":{int(item_id)}"


def parse_key(key: str) -> tuple[str, int]:
    """The kind and id a key names.

    >>> parse_key("c:3")
    ('candidate', 3)
    """
    prefix, _, number = key.partition(":")
    return {"q": "question", "c": "candidate"}[prefix], int(number)


def add_project(db: Db, pool_id: int, url: str, project_id: int, title: str, label_config_hash: str) -> int:
    return int(db["ls_projects"].insert({"pool_id": pool_id, "url": url.rstrip("/"), "project_id": int(project_id), "title": title,
                                         "label_config_hash": label_config_hash, "created_at": now()}).last_pk)


def get_project(db: Db, project: int) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM ls_projects WHERE id = ?", [project]))
    if not rows:
        raise NotFound(f"No Label Studio project {project} is known to ka2l.")
    return rows[0]


def projects(db: Db, pool_id: int | None = None, url: str | None = None) -> list[dict[str, Any]]:
    """Newest first; optionally only one pool's and / or one server's."""
    where, args = [], []
    if pool_id is not None:
        where.append("pool_id = ?"), args.append(pool_id)
    if url is not None:
        where.append("url = ?"), args.append(url.rstrip("/"))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return list(db.query(f"SELECT * FROM ls_projects {clause} ORDER BY id DESC", args))


def move_project(db: Db, project: int, url: str) -> None:
    """The project's server now answers at ``url`` (the local server restarted on another port)."""
    db.execute("UPDATE ls_projects SET url = ? WHERE id = ?", [url.rstrip("/"), project])


def touch_project(db: Db, project: int, field: str) -> None:
    if field not in ("pushed_at", "pulled_at"):
        raise ValueError(field)
    db["ls_projects"].update(project, {field: now()})


def add_links(db: Db, project: int, rows: Sequence[dict[str, Any]]) -> int:
    """Record pushed tasks: each row has item_key, task_id, question (text), optional rank. An item
    already linked keeps its first task (ignored), so recording twice never duplicates. Returns the
    number of new links."""
    key_ids = []
    for r in rows:
        kind, number = parse_key(r["item_key"])
        key_ids.append({"project": project, "item_key": r["item_key"], "task_id": int(r["task_id"]), "rank": r.get("rank"),
                        "question": r["question"], "pushed_at": r.get("pushed_at") or now(),
                        "question_id": number if kind == "question" else None,
                        "candidate_id": number if kind == "candidate" else None})
    before = link_count(db, project)
    with db.atomic():
        db["ls_tasks"].insert_all(key_ids, ignore=True)
    return link_count(db, project) - before


def link_count(db: Db, project: int) -> int:
    return int(db.execute("SELECT count(*) FROM ls_tasks WHERE project = ?", [project]).fetchone()[0])


def linked_keys(db: Db, project: int) -> set[str]:
    return {r[0] for r in db.execute("SELECT item_key FROM ls_tasks WHERE project = ?", [project]).fetchall()}


def links(db: Db, project: int) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM ls_tasks WHERE project = ? ORDER BY rank IS NULL, rank, task_id", [project]))


def upsert_annotations(db: Db, project: int, rows: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Store pulled annotations (keyed by Label Studio's annotation id): new ones are added, changed ones
    updated, unchanged ones left alone. Returns (added, updated)."""
    fields = ("task_id", "annotator", "answer", "cannot_answer", "skipped", "lead_time", "created_at", "updated_at")
    added = updated = 0
    with db.atomic():
        for r in rows:
            old = list(db.query("SELECT * FROM ls_annotations WHERE project = ? AND annotation_id = ?", [project, int(r["annotation_id"])]))
            values = {f: r.get(f) for f in fields}
            values["cannot_answer"], values["skipped"] = int(bool(values["cannot_answer"])), int(bool(values["skipped"]))
            if not old:
                db["ls_annotations"].insert({"project": project, "annotation_id": int(r["annotation_id"]), **values, "pulled_at": now()})
                added += 1
            elif any(old[0][f] != values[f] for f in fields):
                db.execute("UPDATE ls_annotations SET " + ", ".join(f"{f} = ?" for f in fields) + ", pulled_at = ? "
                           "WHERE project = ? AND annotation_id = ?", [*(values[f] for f in fields), now(), project, int(r["annotation_id"])])
                updated += 1
    return added, updated


def delete_annotations(db: Db, project: int, annotation_ids: Iterable[int]) -> int:
    """Forget annotations that were deleted in Label Studio; returns how many went."""
    ids = [(project, int(a)) for a in annotation_ids]
    with db.atomic():
        before = db.execute("SELECT count(*) FROM ls_annotations WHERE project = ?", [project]).fetchone()[0]
        db.conn.executemany("DELETE FROM ls_annotations WHERE project = ? AND annotation_id = ?", ids)
        return before - db.execute("SELECT count(*) FROM ls_annotations WHERE project = ?", [project]).fetchone()[0]


def decided_task_count(db: Db, project: int) -> int:
    """Linked tasks with at least one stored, not skipped answer or cannot-answer verdict (as of the last pull)."""
    return int(db.execute("""SELECT count(DISTINCT a.task_id) FROM ls_annotations a JOIN ls_tasks t
                             ON t.project = a.project AND t.task_id = a.task_id
                             WHERE a.project = ? AND a.skipped = 0 AND (a.cannot_answer = 1 OR a.answer IS NOT NULL)""",
                          [project]).fetchone()[0])


def annotations(db: Db, project: int) -> list[dict[str, Any]]:
    """Every stored annotation of the project with the item it annotates, by task then annotation id."""
    return list(db.query("""SELECT a.*, t.item_key, t.question_id, t.candidate_id, t.question, t.rank
                            FROM ls_annotations a LEFT JOIN ls_tasks t ON t.project = a.project AND t.task_id = a.task_id
                            WHERE a.project = ? ORDER BY a.task_id, a.annotation_id""", [project]))
