"""Per-question views of a Stage 1 run: the scores table and one question's drill-down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store import queries as Q
from ..store.hidden import HiddenStates
from ..store.db import connect


def probe_scores(run: dict[str, Any], probe: dict[str, Any]) -> np.ndarray:
    """P(unknown) of the run's probe on the run's own questions (from stored hidden states)."""
    from ..probing.probes import load_probe, predict_unknown

    net, meta = load_probe(probe["path"])
    hidden = HiddenStates.open(run["hidden_path"])
    return predict_unknown(net, np.asarray(hidden.layer(meta["layer"]), dtype=np.float32))


def scores_frame(run_id: int):
    """One row per question: SE (both kinds), BiSE, probe P(unknown), triage label, correctness, gold."""
    import pandas as pd

    with connect() as db:
        run = Q.get_run(db, run_id)
        rows = Q.load_scores(db, run_id)
        probes = Q.list_probes(db, run_id)
        triage = _latest_triage(db, run["pool_id"])
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["gold"] = frame["answers"].map(lambda a: " | ".join(a))
    frame["split"] = "unused"
    if probes:
        frame["p_unknown"] = probe_scores(run, probes[-1])
        split = probes[-1]["metrics"]["split"]
        for part in ("train", "val", "test"):
            frame.loc[frame["idx"].isin(split[part]), "split"] = part
    if triage:
        label_of = {p["question_id"]: p["label"] for p in triage}
        frame["triage_label"] = frame["question_id"].map(label_of)
    cols = ["question_id", "ext_id", "question", "se", "se_weighted", "bise", "p_unknown", "triage_label", "correct", "gold",
            "regular_entropy", "mean_loglik", "n_clusters", "split"]
    return frame[[c for c in cols if c in frame.columns]]


def with_curation(frame, member_ids: set[int]):
    """The scores frame with an ``in_set`` column (is the question in the curation set?) after the question.

    >>> import pandas as pd
    >>> with_curation(pd.DataFrame({"question_id": [1, 2], "question": ["a?", "b?"], "se": [0.1, 0.2]}), {2}).columns.tolist()
    ['question_id', 'question', 'in_set', 'se']
    >>> with_curation(pd.DataFrame({"question_id": [1, 2], "question": ["a?", "b?"]}), {2})["in_set"].tolist()
    [False, True]
    """
    if frame.empty:
        return frame.assign(in_set=False)
    out = frame.drop(columns=["in_set"], errors="ignore")
    out.insert(out.columns.get_loc("question") + 1, "in_set", out["question_id"].isin(member_ids))
    return out


def curated_ids(frame) -> list[int]:
    """The question ids of the rows of a frame from ``with_curation`` that are in the curation set."""
    return [int(q) for q in frame.loc[frame["in_set"], "question_id"]] if "in_set" in frame else []


LABEL_FILTERS = ("all", "unknown", "known")
CORRECTNESS_FILTERS = ("all", "correct", "incorrect")


@dataclass(frozen=True)
class ScoresFilter:
    """What the Scores page filters on; every field's default keeps every row."""

    label: str = "all"                 # all, unknown (BiSE = 1), known (BiSE = 0)
    correctness: str = "all"           # all, correct, incorrect (the low-temperature answer against the gold answers)
    se_range: tuple[float, float] | None = None  # inclusive SE bounds in nats; None keeps every SE
    contains: str = ""                 # case-insensitive substring of the question, not a pattern

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.label not in LABEL_FILTERS:
            raise ConfigError(f"label filter {self.label!r} is not one of {', '.join(LABEL_FILTERS)}.")
        if self.correctness not in CORRECTNESS_FILTERS:
            raise ConfigError(f"correctness filter {self.correctness!r} is not one of {', '.join(CORRECTNESS_FILTERS)}.")


def filter_scores(frame, f: ScoresFilter):
    """The rows of a scores frame that pass every filter, in their order.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"question": ["Capital of Peru?", "Who wrote Emma?"], "bise": [1, 0], "correct": [0, 1], "se": [1.2, 0.0]})
    >>> filter_scores(t, ScoresFilter(label="unknown"))["question"].tolist()
    ['Capital of Peru?']
    >>> filter_scores(t, ScoresFilter(se_range=(0.0, 0.5), contains="EMMA"))["question"].tolist()
    ['Who wrote Emma?']
    """
    view = frame
    if f.label != "all":
        view = view[view["bise"] == (1 if f.label == "unknown" else 0)]
    if f.correctness != "all":
        view = view[view["correct"] == (1 if f.correctness == "correct" else 0)]
    if f.se_range is not None:
        lo, hi = f.se_range
        view = view[(view["se"] >= lo - 1e-9) & (view["se"] <= hi + 1e-9)]  # slider values are rounded floats
    if f.contains:
        view = view[view["question"].str.contains(f.contains, case=False, regex=False)]
    return view


def _latest_triage(db, pool_id: int) -> list[dict[str, Any]] | None:
    runs = [r for r in Q.list_runs(db, pool_id) if r["kind"] == "triage" and r["status"] == "done"]
    return Q.load_predictions(db, runs[-1]["id"]) if runs else None


def question_detail(run_id: int, question_id: int) -> dict[str, Any]:
    """The low-temperature answer, the samples grouped into their clusters, the judge's verdicts."""
    with connect() as db:
        run = Q.get_run(db, run_id)
        answers = Q.load_answers(db, run_id, [question_id]).get(question_id, {"low": [], "sample": []})
        cl = Q.get_clustering(db, run_id, question_id)
        q = Q.get_question(db, question_id)
        probes = Q.list_probes(db, run_id)
    samples = [a["text"] for a in answers["sample"]]
    ids = cl["cluster_ids"] if cl else [0] * len(samples)
    clusters: dict[int, list[str]] = {}
    for text, c in zip(samples, ids):
        clusters.setdefault(c, []).append(text)
    verdicts = cl["verdicts"] if cl else []
    return {
        "question": q["question"], "gold": q["answers"],
        "low": answers["low"][0]["text"] if answers["low"] else None,
        "clusters": [{"cluster": c, "size": len(t), "answers": t} for c, t in sorted(clusters.items(), key=lambda kv: -len(kv[1]))],
        "verdicts": [{"answer": samples[i], "representative": samples[j], "equivalent": bool(e)} for i, j, e in verdicts],
        "judge_calls": cl["judge_calls"] if cl else 0, "judge": run["config"]["judge"]["kind"],
        "layer": probes[-1]["layer"] if probes else None,
    }
