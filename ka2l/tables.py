"""Per-question views of a Stage 1 run: the scores table and one question's drill-down."""

from __future__ import annotations

from typing import Any

import numpy as np

from .store import queries as Q
from .store.arrays import open_array
from .store.db import connect


def probe_scores(run: dict[str, Any], probe: dict[str, Any]) -> np.ndarray:
    """P(unknown) of the run's probe on the run's own questions (from stored hidden states)."""
    from .probes import load_probe, predict_unknown

    net, meta = load_probe(probe["path"])
    hidden = open_array(run["hidden_path"])
    return predict_unknown(net, np.asarray(hidden[:, meta["layer"]], dtype=np.float32))


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
