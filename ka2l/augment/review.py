"""The curator's review of decoded candidates, and the approved set later steps take.

Every decision is written at once (a reload, a second tab or a crash loses nothing) and logged with
its before / after state, so the latest action, one candidate or a bulk decision, can be undone. An
edit never overwrites what the decoder wrote: the edited text is kept beside it.

    approved set = the pool's curation set (original questions) + approved candidates (edited text if edited)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError, NotFound
from ..store import augment as S
from ..store.db import connect

DECISIONS = ("pending", "approved", "rejected")


def queue(pool_id: int, decision: str | None = "pending") -> list[dict[str, Any]]:
    """Kept candidates of a pool (all, or those with ``decision``), oldest first."""
    with connect() as db:
        return S.candidates(db, pool_id, status="kept", decision=decision)


def decide(pool_id: int, candidate_ids: Iterable[int], decision: str, edited_text: str | None = None) -> int:
    """Set ``decision`` on candidates as one undoable action; returns how many changed.

    ``edited_text`` (one candidate only) approves the candidate with a curator's wording."""
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
        if changes:
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


def approved_set(pool_id: int) -> list[dict[str, Any]]:
    """Original curated questions followed by approved candidates, one row each, ready to export."""
    from ..store import curation

    rows = [{"kind": "original", "question": m["question"], "question_id": m["question_id"], "candidate_id": None,
             "source_question": None, "decoded_text": None, "edited": False, "p_unknown": None, "added_from": m["source"]}
            for m in curation.members(pool_id)]
    for c in queue(pool_id, "approved"):
        rows.append({"kind": "decoded", "question": c["edited_text"] or c["text"], "question_id": None, "candidate_id": c["id"],
                     "source_question": c["source_question"], "decoded_text": c["text"], "edited": c["edited_text"] is not None,
                     "p_unknown": c["p_unknown"], "added_from": f"generation {c['generation_id']}"})
    return rows
