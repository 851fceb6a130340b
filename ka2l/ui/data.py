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


def pools_table():
    """Stored pools as the Pool page lists them: gold answers as yes / no, the file's name, not a server path."""
    import pandas as pd
    from pathlib import PurePath

    rows = [{"id": p["id"], "name": p["name"], "questions": p["n_questions"], "gold answers": "yes" if p["has_answers"] else "no",
             "file": PurePath(p["source"]).name if p["source"] else "", "imported": p["created_at"]} for p in pools()]
    return pd.DataFrame(rows, columns=["id", "name", "questions", "gold answers", "file", "imported"])


def runs() -> list[dict[str, Any]]:
    with connect() as db:
        return Q.list_runs(db)


def report(run_id: int) -> dict[str, Any]:
    with connect() as db:
        return build_report(db, run_id)


def cost_table(meter: dict[str, Any]):
    """The cost meter of a report (``report(run_id)["cost"]``) as the Probes page shows it."""
    import pandas as pd

    from ..probing.cost import cost_rows

    return pd.DataFrame(cost_rows(meter))


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


# -- is a split big enough to conclude? -----------------------------------------------------------

MIN_SPLIT_QUESTIONS = 30   # below this an AUROC's bootstrap interval spans most of [0, 1]
MIN_SPLIT_PER_LABEL = 10   # and each label needs enough questions to be ranked against the other
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def split_counts(run_id: int) -> tuple[dict[str, dict[str, int]], tuple[float, float, float]]:
    """Questions per split of the run's probe and per label, and the split's shares:
    ({"train": {"n": 42, "known": 25, "unknown": 17}, "val": ..., "test": ...}, (0.7, 0.2, 0.1)).
    ({}, shares) when the run has no probe."""
    with connect() as db:
        run = Q.get_run(db, run_id)
        probes = Q.list_probes(db, run_id)
        bise = {r["idx"]: r["bise"] for r in Q.load_scores(db, run_id)}
    shares = tuple(run["config"]["probe"].get("split", (0.7, 0.2, 0.1)))
    if not probes:
        return {}, shares
    parts = probes[-1]["metrics"]["split"]
    counts = {}
    for part in ("train", "val", "test"):
        labels = [bise.get(i) for i in parts.get(part, [])]
        counts[part] = {"n": len(labels), "known": labels.count(0), "unknown": labels.count(1)}
    return counts, shares


def small_split_warnings(counts: dict[str, dict[str, int]], shares: tuple[float, float, float]) -> list[str]:
    """Plain warnings for the validation and test splits too small to conclude from, each with the
    pool size the run's split shares and label balance would need.

    >>> counts = {"train": {"n": 43, "known": 26, "unknown": 17}, "val": {"n": 12, "known": 7, "unknown": 5},
    ...           "test": {"n": 6, "known": 4, "unknown": 2}}
    >>> for w in small_split_warnings(counts, (0.7, 0.2, 0.1)): print(w)  # doctest: +ELLIPSIS
    The validation split holds 12 questions (5 unknown, 7 known): too few to conclude from. ...
    The test split holds 6 questions (2 unknown, 4 known): too few to conclude from. ... that takes a pool of about 300 questions (this one has 61).
    >>> needed_pool_size(counts, (0.7, 0.2, 0.1))
    300
    """
    need = needed_pool_size(counts, shares)
    total = sum(c["n"] for c in counts.values())
    out = []
    for part, share in (("val", shares[1]), ("test", shares[2])):
        c = counts.get(part)
        if not c or (c["n"] >= MIN_SPLIT_QUESTIONS and min(c["known"], c["unknown"]) >= MIN_SPLIT_PER_LABEL):
            continue
        size = (f"a pool of about {need} questions (this one has {total})" if need is not None
                else "questions of both labels: this run has none of one label")
        out.append(f"The {SPLIT_NAMES[part]} split holds {c['n']} questions ({c['unknown']} unknown, {c['known']} known): too few to "
                   f"conclude from. An AUROC on so few questions can be 1 or 0 by chance, and its interval spans most of 0 to 1. "
                   f"A conclusion needs at least {MIN_SPLIT_QUESTIONS} {SPLIT_NAMES[part]} questions with at least "
                   f"{MIN_SPLIT_PER_LABEL} of each label; with this run's split ({share:.0%} {SPLIT_NAMES[part]}) and "
                   f"{_unknown_share(counts):.0%} unknown questions, that takes {size}.")
    return out


def needed_pool_size(counts: dict[str, dict[str, int]], shares: tuple[float, float, float]) -> int | None:
    """The smallest pool whose validation and test splits reach MIN_SPLIT_QUESTIONS questions and
    MIN_SPLIT_PER_LABEL of the rarer label, at the run's shares and label balance (None: one label is missing)."""
    import math

    minority = min(_unknown_share(counts), 1 - _unknown_share(counts))
    if minority <= 0:
        return None
    need = max(max(MIN_SPLIT_QUESTIONS / s, MIN_SPLIT_PER_LABEL / (s * minority)) for s in shares[1:])
    return int(math.ceil(need / 10 - 1e-9) * 10)  # a round figure: this is an order of magnitude, not a target


def _unknown_share(counts: dict[str, dict[str, int]]) -> float:
    n = sum(c["n"] for c in counts.values())
    return sum(c["unknown"] for c in counts.values()) / n if n else 0.0


# Column names of the evidence tables (baselines, threshold robustness) as the page shows them;
# columns not listed here are named by their parts (prr_lo -> "PRR 95% low").
COLUMN_NAMES = {"method": "Method", "auroc_bise": "AUROC vs BiSE", "auroc_incorrect": "AUROC vs incorrect", "note": "Note",
                "delta": "Shift δ (nats)", "threshold": "Threshold τ (nats)", "share_unknown": "Unknown share"}
_WORDS = {"auroc": "AUROC", "prr": "PRR", "bise": "BiSE", "se": "SE", "ci": "CI", "lo": "95% low", "hi": "95% high", "vs": "vs",
          "n": "n"}


def readable_column(name: str) -> str:
    """A table column's name as the page shows it.

    >>> [readable_column(c) for c in ("auroc_bise", "prr", "prr_lo", "prr_hi", "share_unknown", "n_test")]
    ['AUROC vs BiSE', 'PRR', 'PRR 95% low', 'PRR 95% high', 'Unknown share', 'N test']
    """
    if name in COLUMN_NAMES:
        return COLUMN_NAMES[name]
    words = [_WORDS.get(w, w) for w in str(name).split("_")]
    return (words[0][:1].upper() + words[0][1:] + " " + " ".join(words[1:])).strip()


def evidence_table(rows: list[dict[str, Any]]):
    """Rows of an evidence table as a frame with readable column names, numbers to 3 decimals;
    whatever columns the rows have (PRR and its interval included) are shown."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.round(3).rename(columns=readable_column)


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
