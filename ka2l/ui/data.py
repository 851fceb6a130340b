"""Read-only views of the store for the pages. Connections are opened per call, never cached (only
files built from a table are, by the table's content)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ..probing.report import build_report
from ..store import queries as Q
from ..store.db import connect
from ..views import export
from ..views.tables import CORRECTNESS_FILTERS, LABEL_FILTERS, ScoresFilter, curated_ids, filter_scores, with_curation  # noqa: F401 (the Scores page)


def pools() -> list[dict[str, Any]]:
    with connect() as db:
        return Q.list_pools(db)


def runs() -> list[dict[str, Any]]:
    with connect() as db:
        return Q.list_runs(db)


def report(run_id: int) -> dict[str, Any]:
    with connect() as db:
        return build_report(db, run_id)


def scores(run_id: int):
    from ..views.tables import scores_frame

    return scores_frame(run_id)


@st.cache_data(max_entries=16, show_spinner=False)
def download_files(frame) -> tuple[bytes, bytes]:
    """(formula-safe CSV, JSONL) of a table, built when the page is drawn and cached by the table's content.

    A file built only on click (a callable passed to st.download_button) is registered for one script
    run; after a rerun (a drill-down choice) the button's file was gone and the download spun forever.
    Ready bytes are served at once, and the same table gives the same file (and URL) on every rerun."""
    return export.to_safe_csv(frame), export.to_jsonl(frame)


def detail(run_id: int, question_id: int) -> dict[str, Any]:
    from ..views.tables import question_detail

    return question_detail(run_id, question_id)


def run_threshold(run_id: int) -> dict[str, Any]:
    with connect() as db:
        return Q.get_run(db, run_id)["threshold"]


# -- Stage 2 -------------------------------------------------------------------------------------

def decoders(pool_id: int) -> list[dict[str, Any]]:
    from ..store import augment as S

    with connect() as db:
        return S.list_decoders(db, pool_id)


def decoder_losses(decoder_id: int) -> list[dict[str, Any]]:
    from ..store import augment as S

    with connect() as db:
        return S.losses(db, decoder_id)


def generations(pool_id: int) -> list[dict[str, Any]]:
    from ..store import augment as S

    with connect() as db:
        return S.list_generations(db, pool_id)


def unknown_ids(run_id: int) -> list[int]:
    with connect() as db:
        return [r["question_id"] for r in Q.load_scores(db, run_id) if r["bise"] == 1]
