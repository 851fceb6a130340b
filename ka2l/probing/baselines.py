"""Evidence tables for a Stage 1 run (METHOD.md section 8), scored on the held-out test split.

- ``baseline_table``: the probe against the SE probe (logistic on BiSE), the accuracy probe
  (logistic on correctness), mean log-likelihood, regular entropy and SE itself. AUROC orientation:
  positive = unknown / incorrect, score = 'how unknown'. SE against BiSE is circular (BiSE is
  thresholded SE) and is shown only for completeness. Where gold answers exist every row also has
  the prediction rejection ratio against correctness of the low-temperature answer (``prr``, with
  its bootstrap interval ``prr_lo`` / ``prr_hi``; None without gold answers; see rejection.py).
- ``threshold_robustness``: retrain the probe at the chosen layer with labels from gamma* + delta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import ProbeConfig
from .entropy import binarize
from ..errors import ProbeError
from .probes import ProbeResult, Split, auroc, masked_auroc, predict_unknown, probe_layers, layer_features, train_probe
from ..progress import NullProgress, Progress
from .rejection import bootstrap_prr, prediction_rejection_ratio

DELTAS = (-0.20, -0.10, -0.05, 0.0, 0.05, 0.10, 0.20)


def prr_columns(wrong: np.ndarray | None, score: np.ndarray, n_boot: int, seed: int) -> dict[str, float | None]:
    """PRR of ``score`` (how unknown) against correctness over the rows with a gold answer
    (``wrong``: 1 wrong, 0 right, -1 no gold), with its bootstrap interval; None without gold."""
    if wrong is None:
        return {"prr": None, "prr_lo": None, "prr_hi": None}
    keep = wrong >= 0
    quality, u = 1 - wrong[keep], score[keep]
    lo, hi = bootstrap_prr(u, quality, n_boot, seed)
    return {"prr": prediction_rejection_ratio(u, quality), "prr_lo": lo, "prr_hi": hi}


def _row(method: str, y_bise: np.ndarray, wrong: np.ndarray | None, score: np.ndarray, cfg: ProbeConfig, note: str = "") -> dict[str, Any]:
    return {"method": method, "auroc_bise": auroc(y_bise, score),
            "auroc_incorrect": None if wrong is None else masked_auroc(wrong, score),
            **prr_columns(wrong, score, cfg.bootstrap, cfg.seed), "note": note}


def baseline_table(
    hidden: np.ndarray,
    scores: dict[str, np.ndarray],
    bise: np.ndarray,
    incorrect: np.ndarray | None,
    main: ProbeResult,
    cfg: ProbeConfig,
    progress: Progress | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """``scores`` holds per-question arrays se, se_weighted, regular_entropy, mean_loglik (pool order);
    the baseline probes train on ``device`` (the main probe's)."""
    progress = progress or NullProgress()
    test = main.split.test
    yb = bise[test]
    yw = None if incorrect is None else incorrect[test]
    rows = [_row(f"KA2L probe ({main.kind}, layer {main.best_layer})", yb, yw, main.test_scores, cfg)]
    if main.kind != "logistic":
        sep = probe_layers(hidden, bise, cfg, split=main.split, kind="logistic", device=device, progress=progress)
        rows.append(_row(f"SE probe (logistic, layer {sep.best_layer})", yb, yw, sep.test_scores, cfg))
    if incorrect is not None:
        known_rows = incorrect >= 0
        try:
            acc = probe_layers(hidden, np.where(known_rows, incorrect, 0), cfg, split=_restrict(main.split, known_rows), kind="logistic",
                               target="incorrect", device=device, progress=progress)
            rows.append(_row(f"Accuracy probe (logistic, layer {acc.best_layer})", bise[acc.split.test], incorrect[acc.split.test], acc.test_scores, cfg))
        except (ProbeError, ValueError) as exc:
            rows.append({"method": "Accuracy probe (logistic)", "auroc_bise": math.nan, "auroc_incorrect": math.nan,
                         "prr": math.nan, "prr_lo": math.nan, "prr_hi": math.nan, "note": f"skipped: {exc}"})
    rows += [
        _row("Mean log-likelihood (low-T answer)", yb, yw, -scores["mean_loglik"][test], cfg),
        _row("Regular (naive) entropy", yb, yw, scores["regular_entropy"][test], cfg),
        _row("Semantic entropy (likelihood-weighted)", yb, yw, scores["se_weighted"][test], cfg),
        _row("Semantic entropy (discrete)", yb, yw, scores["se"][test], cfg, note="circular against BiSE"),
    ]
    return rows


def _restrict(split: Split, keep: np.ndarray) -> Split:
    return Split(split.train[keep[split.train]], split.val[keep[split.val]], split.test[keep[split.test]])


def threshold_robustness(
    hidden: np.ndarray,
    se: np.ndarray,
    gamma: float,
    incorrect: np.ndarray | None,
    split: Split,
    layer: int,
    cfg: ProbeConfig,
    deltas: Sequence[float] = DELTAS,
    progress: Progress | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """AUROC of the probe retrained at ``layer`` on labels SE >= gamma + delta (same split), on ``device``
    (the main probe's)."""
    progress = progress or NullProgress()
    x = layer_features(hidden, layer)
    rows = []
    progress.stage("threshold robustness", total=len(deltas))
    for d in deltas:
        tau = gamma + d
        y = binarize(se, tau)
        parts = (split.train, split.val, split.test)
        row: dict[str, Any] = {"delta": d, "threshold": tau, "share_unknown": float(y.mean())}
        if any(len(np.unique(y[p])) < 2 for p in parts):
            row.update(auroc_bise=math.nan, auroc_incorrect=math.nan, note="one label only in a split")
        else:
            net = train_probe(cfg.kind, x[split.train], y[split.train], x[split.val], y[split.val], cfg, device,
                              name=f"The {cfg.kind} probe for layer {layer} at threshold {tau:.3f}")
            p = predict_unknown(net, x[split.test])
            row.update(auroc_bise=auroc(y[split.test], p),
                       auroc_incorrect=None if incorrect is None else masked_auroc(incorrect[split.test], p), note="")
        rows.append(row)
        progress.advance(1)
    return rows
