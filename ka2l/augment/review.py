"""The curator's review of decoded candidates, and the approved set later steps take.

Every decision is written at once (a reload, a second tab or a crash loses nothing) and logged with
its before / after state, so the latest action, one candidate or a bulk decision, can be undone. An
edit never overwrites what the decoder wrote: the edited text is kept beside it, and it is re-probed
(P(unknown), nearest pool question) as generation probed the decoder's text; a candidate's values
are those of its current text.

    approved set = the pool's curation set (original questions) + approved candidates (edited text if edited)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigError, NotFound
from ..store import augment as S
from ..store.db import connect

DECISIONS = ("pending", "approved", "rejected")


def queue(pool_id: int, decision: str | None = "pending") -> list[dict[str, Any]]:
    """Kept candidates of a pool (all, or those with ``decision``), oldest first."""
    with connect() as db:
        return S.candidates(db, pool_id, status="kept", decision=decision)


def decide(pool_id: int, candidate_ids: Iterable[int], decision: str, edited_text: str | None = None,
           reprobe: Callable[[dict[str, Any], str], dict[str, Any]] | None = None) -> int:
    """Set ``decision`` on candidates as one undoable action; returns how many changed.

    ``edited_text`` (one candidate only) approves the candidate with a curator's wording, re-probed by
    ``reprobe(candidate, text)`` (default: a ``Reprober`` over the candidate's decoder, which loads
    the probed model) unless that text was probed before."""
    if decision not in DECISIONS:
        raise ConfigError(f"Decision {decision!r} is not one of {', '.join(DECISIONS)}.")
    ids = [int(i) for i in candidate_ids]
    if edited_text is not None:
        edited_text = " ".join(edited_text.split())
        if len(ids) != 1:
            raise ConfigError("An edit applies to one candidate at a time.")
        if not edited_text:
            raise ConfigError("The edited question is empty. Type the question, or reject the candidate instead.")
    with connect() as db:
        rows = S.get_candidates(db, ids)
        missing = set(ids) - {r["id"] for r in rows}
        if missing:
            raise NotFound(f"No candidate(s) {sorted(missing)}; the list may be stale, reload the page.")
        foreign = [r["id"] for r in rows if r["pool_id"] != pool_id]
        if foreign:
            raise ConfigError(f"Candidate(s) {foreign} belong to another pool.")
        changes = []
        for r in rows:
            text = r["edited_text"] if edited_text is None else (None if edited_text == r["text"] else edited_text)
            if decision != r["decision"] or text != r["edited_text"]:
                changes.append((r["id"], r["decision"], r["edited_text"], decision, text))
        new_text = changes[0][4] if edited_text is not None and changes else None
        if new_text is not None and S.has_edit_probe(db, ids[0], new_text):
            new_text = None  # probed before (an edit undone and made again)
    probed = None
    if new_text is not None:  # before any write: a failed probe changes nothing
        if reprobe is None:
            from .candidates import Reprober

            def reprobe(candidate: dict[str, Any], text: str) -> dict[str, Any]:
                return Reprober(candidate["generation_id"])([text])[0]
        probed = reprobe(rows[0], new_text)
    if changes:
        with connect() as db, db.atomic():
            if probed is not None:
                S.save_edit_probe(db, ids[0], new_text, probed)
            S.set_decisions(db, pool_id, changes)
    return len(changes)


def undo(pool_id: int) -> list[dict[str, Any]]:
    """Revert the latest review action of the pool; returns the reverted changes (empty: nothing to undo)."""
    with connect() as db:
        return S.undo_last(db, pool_id)


def last_action(pool_id: int) -> list[dict[str, Any]]:
    with connect() as db:
        return S.last_action(db, pool_id)


def counts(pool_id: int) -> dict[str, int]:
    with connect() as db:
        return S.decision_counts(db, pool_id)


APPROVED_COLUMNS = {"kind": "string", "question": "string", "ext_id": "string", "answers": "object", "question_id": "Int64",
                    "candidate_id": "Int64", "source_question_id": "Int64", "source_ext_id": "string", "source_question": "string",
                    "decoded_text": "string", "edited": "boolean", "p_unknown": "Float64", "nearest_similarity": "Float64",
                    "added_from": "string"}


def approved_set(pool_id: int):
    """Original curated questions followed by approved candidates, one row each, ready to export (a
    DataFrame with ``APPROVED_COLUMNS``; ids are nullable integers, never floats). Originals keep their
    pool id (``ext_id``) and gold ``answers``; decoded questions have no gold answer yet and name the pool
    question they were decoded from. ``p_unknown`` / ``nearest_similarity`` are those of the exported
    text (an edit's re-probe)."""
    import pandas as pd

    from ..store import curation
    from ..store import queries as Q

    with connect() as db:
        answers = {q["id"]: q["answers"] or [] for q in Q.pool_questions(db, pool_id)}
    rows = [{"kind": "original", "question": m["question"], "ext_id": m["ext_id"], "answers": answers.get(m["question_id"], []),
             "question_id": m["question_id"], "added_from": m["source"]} for m in curation.members(pool_id)]
    for c in queue(pool_id, "approved"):
        rows.append({"kind": "decoded", "question": c["edited_text"] or c["text"], "answers": None, "candidate_id": c["id"],
                     "source_question_id": c["source_question_id"], "source_ext_id": c["source_ext_id"],
                     "source_question": c["source_question"], "decoded_text": c["text"], "edited": c["edited_text"] is not None,
                     "p_unknown": c["p_unknown"], "nearest_similarity": c["nearest_similarity"], "added_from": f"generation {c['generation_id']}"})
    frame = pd.DataFrame(rows, columns=list(APPROVED_COLUMNS))
    return frame.astype({k: v for k, v in APPROVED_COLUMNS.items() if v != "object"})
