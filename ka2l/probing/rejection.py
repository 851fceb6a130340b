"""Prediction rejection ratio (PRR), LM-Polygraph's main metric for uncertainty scores.

Reject the answers an uncertainty score ranks most uncertain, one at a time, and follow the mean
quality (here: correctness, 1 or 0) of the answers kept. The area under that curve is compared
with two references: random rejection (the curve stays at the mean quality) and the oracle
(rejects the worst answers first)::

    PRR = (area(method) - area(random)) / (area(oracle) - area(random))

1 is the oracle, 0 is no better than random, negative ranks the good answers as the uncertain
ones. Unlike AUROC it weights the ranking by how much quality is gained where it matters (the
first rejections) and is defined for graded quality too.

Curve: with ``n`` answers, for ``m = n, n-1, ..., 1`` kept answers (rejecting 0 .. n-1), the mean
quality of the ``m`` least uncertain; the area is the mean of those ``n`` points. Tied uncertainty
scores are broken in expectation (each tied answer counts with its group's mean quality), so a
constant score is exactly random (PRR 0) and the order of the rows never matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rejection_curve(uncertainty: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Mean quality of the kept answers after rejecting 0, 1, ..., n-1 of the most uncertain.

    >>> rejection_curve([0.2, 0.6, 0.4, 0.9], [1, 1, 0, 0]).round(3).tolist()
    [0.5, 0.667, 0.5, 1.0]
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if u.shape != q.shape or u.ndim != 1:
        raise ValueError(f"need one quality value per uncertainty score, got {q.shape} for {u.shape}")
    order = np.argsort(u, kind="stable")  # least uncertain first
    u_sorted, q_sorted = u[order], q[order]  # (n,), (n,)
    # ties: every member of a group of equal scores gets the group's mean quality
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])  # (groups,)
    sums = np.add.reduceat(q_sorted, starts) if len(q_sorted) else np.zeros(0)
    sizes = np.diff(np.r_[starts, len(q_sorted)])
    q_sorted = np.repeat(sums / sizes, sizes)  # (n,)
    kept_means = np.cumsum(q_sorted) / np.arange(1, len(q_sorted) + 1)  # kept m = 1..n
    return kept_means[::-1]  # rejected 0..n-1


def prediction_rejection_ratio(uncertainty: Sequence[float], quality: Sequence[float]) -> float:
    """PRR of ``uncertainty`` (higher = less sure) against ``quality`` (higher = better); NaN when
    every answer has the same quality (the oracle is then no better than random) or there are none.

    Worked example: answers 1 and 2 are right (quality 1), 3 and 4 wrong; the score ranks them
    1 (0.2), 3 (0.4), 2 (0.6), 4 (0.9). Rejecting 0..3 of the most uncertain keeps mean quality
    1/2, 2/3, 1/2, 1 (area 2/3); the oracle keeps 1/2, 2/3, 1, 1 (area 19/24); random keeps 1/2
    (area 1/2). PRR = (2/3 - 1/2) / (19/24 - 1/2) = 4/7:

    >>> round(prediction_rejection_ratio([0.2, 0.6, 0.4, 0.9], [1, 1, 0, 0]), 4)
    0.5714
    >>> round(prediction_rejection_ratio([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]), 4)  # the oracle's own ranking
    1.0
    >>> round(prediction_rejection_ratio([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]), 4)  # exactly backwards
    -1.0
    """
    q = np.asarray(quality, dtype=np.float64)
    if q.size == 0 or np.all(q == q[0]):
        return math.nan
    area = rejection_curve(uncertainty, q).mean()
    oracle = rejection_curve(-q, q).mean()  # least uncertain = best quality
    random = q.mean()
    return float((area - random) / (oracle - random))


def bootstrap_prr(uncertainty: Sequence[float], quality: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of PRR over ``n`` resamples of the rows (resamples where every
    answer has the same quality are skipped); (NaN, NaN) when none is usable or ``n`` is 0."""
    from .probes import bootstrap_interval

    return bootstrap_interval(prediction_rejection_ratio, uncertainty, quality, n=n, seed=seed)
