"""Stage 3a, pull: fetch a Label Studio project's annotations through the export API, keep every one
of them in ka2l's store, and choose one answer per task by a documented rule.

Pulling mirrors the server: a new annotation is added, a changed one (its answer, flag, skip or
timestamps) is updated, one deleted in Label Studio is removed, and pulling again adds none twice
(annotations are keyed by Label Studio's annotation id). The export is fetched before anything is
written, and everything it changes is written in one transaction, so a server that is down, a wrong
token or a deleted project changes nothing stored.

The rule choosing one answer per task
-------------------------------------
1. Every annotation of the task is a vote, except a skipped one (Label Studio's ``was_cancelled``) and
   one with neither an answer nor the "cannot answer" choice. Several annotations by one user count
   as several votes (the export names annotators only by user id: "user 1").
2. A vote's verdict is "cannot answer" when the annotator ticked that choice (whatever they also
   typed), else its answer normalised by ``answer_key`` (Unicode NFKC, case-folded, punctuation at
   the edges of words and the articles a / an / the dropped, whitespace collapsed), so "Paris." and
   "paris" agree.
3. The verdict with the most votes wins. A tie goes to the tied verdict holding the most recently
   updated vote.
4. The chosen answer is the text, as typed (surrounding whitespace dropped), of the most recently
   updated vote for the winning verdict.
5. A task is a **conflict** when its votes hold more than one verdict (after normalisation).

A task's status is ``pending`` (no annotation yet), ``skipped`` (only skipped or empty annotations),
``answered`` or ``cannot answer``. A "cannot answer" verdict yields no (question, answer) pair for
the SFT dataset; ``answers()`` reports it. ``decided_by`` says how: ``single`` (one vote),
``unanimous``, ``majority`` or ``latest (tie)``.

>>> v = lambda a, when, who, cannot=False: {"annotation_id": when, "annotator": who, "answer": a,
...     "cannot_answer": cannot, "skipped": False, "updated_at": f"2026-01-0{when}"}
>>> c = choose([v("Paris", 1, "ann"), v("paris.", 2, "bob"), v("Lyon", 3, "cy")])
>>> c["status"], c["answer"], c["conflict"], c["decided_by"]
('answered', 'paris.', True, 'majority')
>>> choose([v("Paris", 1, "ann"), v("", 2, "bob", cannot=True)])["status"]
'cannot answer'
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..config import PullConfig
from ..errors import ConfigError, NotFound
from ..progress import NullProgress, Progress
from ..store import annotate as A
from ..store import queries as Q
from ..store.db import connect
from .push import ANSWER, CANNOT, CANNOT_CHOICE

log = logging.getLogger(__name__)

FLAG, CANNOT_ANSWER = CANNOT, CANNOT_CHOICE  # push.LABEL_CONFIG's Choices and its one choice; ANSWER: its TextArea

STATUSES = ("pending", "skipped", "answered", "cannot answer")
ANSWER_COLUMNS = ("rank", "item_key", "kind", "question_id", "candidate_id", "question", "status", "answer", "conflict",
                  "decided_by", "votes", "skipped", "tally", "all_answers", "annotator", "annotation_id", "updated_at",
                  "task_id", "project", "ls_project_id")

_CANNOT = "\x00cannot answer"  # the verdict of a ticked "cannot answer": no normalised answer can equal it
_ARTICLES = {"a", "an", "the"}
_EDGE_PUNCT = re.compile(r"(?<!\w)[^\w\s]+|[^\w\s]+(?!\w)")


# -- parsing Label Studio's JSON export ----------------------------------------------------------

def _annotator(completed_by: Any) -> str | None:
    """Label Studio 1.23's JSON export names the annotator by user id ("user 1"); an object (other
    versions) by its email, else its username, else its id. Two annotators stay two:

    >>> _annotator(1), _annotator(2), _annotator(None)
    ('user 1', 'user 2', None)
    >>> _annotator({"id": 3, "email": "ann@example.org"}), _annotator({"id": 4, "username": "bo"}), _annotator({"id": 5})
    ('ann@example.org', 'bo', 'user 5')
    """
    if isinstance(completed_by, dict):
        return completed_by.get("email") or completed_by.get("username") or (f"user {completed_by['id']}" if "id" in completed_by else None)
    return None if completed_by is None else f"user {completed_by}"


def parse_annotation(task_id: int, annotation: dict[str, Any]) -> dict[str, Any]:
    """One exported annotation as a row for ``ka2l.store.annotate.upsert_annotations``: the TextArea's
    lines joined (None when empty), whether the "cannot answer" choice is ticked, whether it was skipped."""
    texts, cannot = [], False
    for r in annotation.get("result") or []:
        value = r.get("value") or {}
        if r.get("from_name") == ANSWER and r.get("type") == "textarea":
            texts += [str(t) for t in value.get("text") or []]
        elif r.get("from_name") == FLAG and r.get("type") == "choices":
            cannot = cannot or CANNOT_ANSWER in (value.get("choices") or [])
    answer = "\n".join(t.strip() for t in texts if str(t).strip()) or None
    return {"annotation_id": int(annotation["id"]), "task_id": int(annotation.get("task") or task_id),
            "annotator": _annotator(annotation.get("completed_by")), "answer": answer, "cannot_answer": cannot,
            "skipped": bool(annotation.get("was_cancelled")), "lead_time": annotation.get("lead_time"),
            "created_at": annotation.get("created_at"), "updated_at": annotation.get("updated_at")}


def parse_export(tasks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every annotation of a JSON export (a list of tasks, each with its ``annotations``)."""
    return [parse_annotation(int(t["id"]), a) for t in tasks for a in t.get("annotations") or []]


# -- the rule ----------------------------------------------------------------------------------

def answer_key(text: str | None) -> str:
    """The form two answers are compared in.

    >>> answer_key("  The  Eiffel-Tower. "), answer_key("eiffel-tower"), answer_key("3.14"), answer_key("U.S.A.")
    ('eiffel-tower', 'eiffel-tower', '3.14', 'u.s.a')
    """
    t = unicodedata.normalize("NFKC", text or "").casefold()
    t = _EDGE_PUNCT.sub(" ", t)
    return " ".join(w for w in t.split() if w not in _ARTICLES)


def _verdict(a: dict[str, Any]) -> str | None:
    if a.get("skipped"):
        return None
    if a.get("cannot_answer"):
        return _CANNOT
    return answer_key(a.get("answer")) or None


def _when(a: dict[str, Any]) -> tuple[str, int]:
    return (a.get("updated_at") or a.get("created_at") or "", int(a.get("annotation_id") or 0))


def choose(annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Apply the module's rule to one task's annotations (rows as ``parse_annotation`` makes them).
    Returns status, answer, cannot_answer, conflict, decided_by, votes, skipped, tally and the chosen
    annotation's id and annotator."""
    votes = [a for a in annotations if _verdict(a) is not None]
    n_skipped = len(annotations) - len(votes)
    out = {"status": "pending" if not annotations else "skipped", "answer": None, "cannot_answer": False, "conflict": False,
           "decided_by": None, "votes": len(votes), "skipped": n_skipped, "tally": "", "annotation_id": None, "annotator": None}
    if not votes:
        return out
    counts = Counter(_verdict(a) for a in votes)
    newest = {v: max(_when(a) for a in votes if _verdict(a) == v) for v in counts}
    top = max(counts.values())
    tied = [v for v in counts if counts[v] == top]
    winner = max(tied, key=lambda v: newest[v])
    chosen = max((a for a in votes if _verdict(a) == winner), key=_when)
    cannot = winner == _CANNOT
    out.update(status="cannot answer" if cannot else "answered", answer=None if cannot else chosen["answer"].strip(),
               cannot_answer=cannot, conflict=len(counts) > 1, annotation_id=int(chosen["annotation_id"]),
               annotator=chosen.get("annotator"),
               decided_by="single" if len(votes) == 1 else "unanimous" if len(counts) == 1 else
               "latest (tie)" if len(tied) > 1 else "majority",
               tally=" · ".join(f"{'cannot answer' if v == _CANNOT else v} ×{counts[v]}"
                                for v in sorted(counts, key=lambda v: (counts[v], newest[v]), reverse=True)))
    return out


# -- which project ------------------------------------------------------------------------------

def resolve_project(db, pool: str | int | None = None, project: int = 0) -> dict[str, Any]:
    """ka2l's row of the project to pull from: ``project`` (ka2l's id) when given, else the pool's newest."""
    if project:
        row = A.get_project(db, project)
        if pool is not None and row["pool_id"] != Q.get_pool(db, pool)["id"]:
            raise ConfigError(f"Label Studio project {project} belongs to another pool than {pool!r}; "
                              f"pick one of {pool!r}'s projects or leave the project at 0 (the pool's newest).")
        return row
    if pool is None:
        raise ConfigError("Name a pool or a project (ka2l's project id) to read Label Studio answers for.")
    pool_row = Q.get_pool(db, pool)
    rows = A.projects(db, pool_id=pool_row["id"])
    if not rows:
        raise NotFound(f"Pool {pool_row['name']!r} has no Label Studio project yet: push it first "
                       f"(the Annotate page's Push, or `python -m ka2l annotate push --pool {pool_row['name']}`).")
    return rows[0]


def _client(row: dict[str, Any], client=None):
    """The given client, or one for the saved connection. A connection to another URL than the project's
    is used only when the project there has the project's title (the local server restarted on another
    port); otherwise pulling would read some other project with the same id."""
    if client is not None:
        return client
    from .connection import require
    from .labelstudio import Client

    conn = require()
    client = Client.from_connection(conn)
    if conn.url.rstrip("/") != row["url"].rstrip("/"):
        there = client.project(row["project_id"])
        if there["title"] != row["title"]:
            raise ConfigError(f"Label Studio project {row['id']} ({row['title']!r}) was made on {row['url']}, but the connection "
                              f"points at {conn.url}, where project {row['project_id']} is {there['title']!r}. Connect to "
                              f"{row['url']} (Settings page, or KA2L_LABEL_STUDIO_URL) to pull it.")
        log.info("Project %s was made on %s; reading it at %s (same title).", row["id"], row["url"], conn.url)
    return client


# -- pull ---------------------------------------------------------------------------------------

def pull(pool: str | int, cfg: PullConfig | None = None, progress: Progress | None = None, client=None) -> dict[str, Any]:
    """Fetch the project's annotations and store them (see the module docstring). Returns what changed
    and where the answers stand, JSON-able (a job's result)."""
    cfg = cfg or PullConfig()
    progress = progress or NullProgress()
    with connect() as db:
        row = resolve_project(db, pool, cfg.project)
    client = _client(row, client)
    progress.stage("exporting annotations", total=1)
    tasks = client.export(row["project_id"])
    rows = parse_export(tasks)
    progress.advance(1, f"{len(tasks)} tasks, {len(rows)} annotations")
    progress.stage("storing annotations", total=len(rows))
    with connect() as db:
        with db.atomic():
            stored = {a["annotation_id"] for a in A.annotations(db, row["id"])}
            added, updated = A.upsert_annotations(db, row["id"], rows)
            deleted = A.delete_annotations(db, row["id"], stored - {r["annotation_id"] for r in rows})
            A.touch_project(db, row["id"], "pulled_at")
            linked = {r["task_id"] for r in A.links(db, row["id"])}
    progress.advance(len(rows), f"{added} new, {updated} changed, {deleted} deleted in Label Studio")
    frame = answers(project=row["id"])
    counts = frame["status"].value_counts()
    unlinked = len({r["task_id"] for r in rows} - linked)
    if unlinked:
        log.warning("%d annotated task(s) of project %s are not linked to a ka2l question; they are stored but not in the dataset.",
                    unlinked, row["id"])
    return {"project": int(row["id"]), "ls_project_id": int(row["project_id"]), "tasks": len(tasks), "annotations": len(rows),
            "added": added, "updated": updated, "deleted": deleted, "unlinked_tasks": unlinked,
            **{s.replace(" ", "_"): int(counts.get(s, 0)) for s in STATUSES}, "conflicts": int(frame["conflict"].sum())}


# -- what the page shows ------------------------------------------------------------------------

def _all_answers(rows: Sequence[dict[str, Any]]) -> str:
    def one(a):
        what = "skipped" if a["skipped"] else "cannot answer" if a["cannot_answer"] else (a["answer"] or "(empty)")
        return f"{a['annotator'] or '?'}: {what}"

    return " | ".join(one(a) for a in rows)


def answers(pool: str | int | None = None, project: int = 0):
    """One row per pushed item of the project (ka2l's id; 0 = the pool's newest), in annotation order
    (rank): the chosen answer by the module's rule, its status, whether annotators disagree (``conflict``),
    how it was decided, the vote ``tally`` and every annotation (``all_answers``). Columns: ``ANSWER_COLUMNS``."""
    import pandas as pd

    with connect() as db:
        row = resolve_project(db, pool, project)
        links = A.links(db, row["id"])
        by_task: dict[int, list[dict[str, Any]]] = {}
        for a in A.annotations(db, row["id"]):
            by_task.setdefault(a["task_id"], []).append(a)
    out = []
    for link in links:
        anns = by_task.get(link["task_id"], [])
        c = choose(anns)
        out.append({"rank": link["rank"], "item_key": link["item_key"], "kind": "decoded" if link["candidate_id"] is not None
                    or link["item_key"].startswith("c:") else "original", "question_id": link["question_id"],
                    "candidate_id": link["candidate_id"], "question": link["question"], "status": c["status"],
                    "answer": c["answer"], "conflict": c["conflict"], "decided_by": c["decided_by"], "votes": c["votes"],
                    "skipped": c["skipped"], "tally": c["tally"], "all_answers": _all_answers(anns), "annotator": c["annotator"],
                    "annotation_id": c["annotation_id"],
                    "updated_at": max((a["updated_at"] or "" for a in anns), default=None) or None,
                    "task_id": link["task_id"], "project": row["id"], "ls_project_id": row["project_id"]})
    frame = pd.DataFrame(out, columns=list(ANSWER_COLUMNS))
    return frame.astype({"rank": "Int64", "question_id": "Int64", "candidate_id": "Int64", "annotation_id": "Int64",
                         "votes": "int64", "skipped": "int64", "conflict": "bool", "task_id": "int64", "project": "int64",
                         "ls_project_id": "int64"})


def progress(pool: str | int | None = None, project: int = 0, client=None) -> dict[str, Any]:
    """Annotation progress for the page to poll, from one cheap call (the project's counters, no export):
    ``pushed`` (tasks ka2l linked), ``tasks`` (tasks on the server), ``annotated`` (tasks with at least one
    submitted, not skipped, annotation), ``skipped`` and ``annotations`` (counts of annotations), ``pulled``
    (items ka2l has a chosen answer or verdict for, as of the last pull) and the project's ``url``."""
    with connect() as db:
        row = resolve_project(db, pool, project)
        pushed = A.link_count(db, row["id"])
        pulled = A.decided_task_count(db, row["id"])
    client = _client(row, client)
    info = client.project(row["project_id"])
    return {"project": int(row["id"]), "ls_project_id": int(row["project_id"]), "pushed": pushed,
            "tasks": int(info.get("task_number") or 0), "annotated": int(info.get("num_tasks_with_annotations") or 0),
            "skipped": int(info.get("skipped_annotations_number") or 0),
            "annotations": int(info.get("total_annotations_number") or 0), "pulled": int(pulled),
            "pulled_at": row["pulled_at"], "url": client.project_url(row["project_id"])}
