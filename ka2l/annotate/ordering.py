"""The order in which annotators see questions: most uncertain first, but not twenty near-copies of
the most uncertain one.

Greedy maximal marginal relevance (Carbonell & Goldstein 1998) over the probe layer's hidden states:
at each step pick the question maximising

    (1 - diversity) * P(unknown)_i  -  diversity * max_{j chosen} cos(h_i, h_j)

with h the centred, L2-normalised hidden states and negative cosines counted as 0 (an opposite
question is simply not a near-copy; it earns no bonus over the uncertainty order). ``diversity=0`` is plain P(unknown) order;
``diversity=1`` is farthest-point order. Ties break by position, so the order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..augment.candidates import Similarity
from ..errors import ConfigError


@dataclass(frozen=True)
class Ranking:
    order: np.ndarray       # (n,) indices into the inputs, first = annotate first
    rank: np.ndarray        # (n,) 1-based rank of each input (rank[order[0]] == 1)
    max_similarity: np.ndarray  # (n,) at pick time: the picked item's highest cosine to anything picked before (0 for the first)


def rank_for_annotation(p_unknown, vectors, diversity: float = 0.3, limit: int | None = None) -> Ranking:
    """Order questions for annotation by P(unknown) with a diversity penalty.

    ``limit`` ranks only the first ``limit`` picks by MMR (O(limit * n * d)); the rest follow by
    P(unknown). Two near-identical uncertain questions are split by a distinct one:

    >>> v = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [-1.0, -1.0]])
    >>> rank_for_annotation([0.9, 0.89, 0.6, 0.1], v, diversity=0.5).order.tolist()
    [0, 2, 3, 1]
    >>> rank_for_annotation([0.9, 0.89, 0.6, 0.1], v, diversity=0.0).order.tolist()
    [0, 1, 2, 3]
    """
    p = np.asarray(p_unknown, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"P(unknown) must be one value per question, got shape {p.shape}.")
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[0] != p.shape[0]:
        raise ConfigError(f"Need one hidden-state vector per question: {p.shape[0]} scores but vectors of shape {x.shape}.")
    if not 0.0 <= diversity <= 1.0:
        raise ConfigError(f"diversity must be between 0 and 1, got {diversity}.")
    if not np.isfinite(p).all():
        raise ConfigError(f"P(unknown) holds {int((~np.isfinite(p)).sum())} non-finite value(s); re-run triage.")
    n = p.shape[0]
    steps = n if limit is None else max(0, min(int(limit), n))
    unit = Similarity(x).pool  # (n, d): centred, L2-normalised, as the candidate filters compare questions
    chosen = np.zeros(n, dtype=bool)
    nearest = np.full(n, -np.inf)  # (n,) highest cosine to anything chosen so far
    order, sims = [], np.zeros(n)
    for _ in range(steps):
        penalty = np.clip(np.where(np.isfinite(nearest), nearest, 0.0), 0.0, None)  # (n,)
        score = (1.0 - diversity) * p - diversity * penalty
        score[chosen] = -np.inf
        i = int(np.argmax(score))  # first maximum: ties keep input order
        sims[i] = penalty[i] if order else 0.0
        order.append(i)
        chosen[i] = True
        nearest = np.maximum(nearest, unit @ unit[i])  # (n,)
    rest = np.flatnonzero(~chosen)
    rest = rest[np.argsort(-p[rest], kind="stable")]
    full = np.concatenate([np.asarray(order, dtype=np.int64), rest.astype(np.int64)])
    rank = np.empty(n, dtype=np.int64)
    rank[full] = np.arange(1, n + 1)
    return Ranking(order=full, rank=rank, max_similarity=sims)


def region_coverage(xy_region, xy_chosen, bins: int = 20) -> float:
    """Share of a 2-D map region's occupied grid cells that hold at least one chosen point.

    The region is the unknown questions' points on the map; the grid spans their bounding box.
    Two of the region's three occupied cells are covered here:

    >>> region = [[0, 0], [0, 0.1], [5, 5], [10, 10]]
    >>> round(region_coverage(region, [[0, 0], [10, 10]], bins=2), 3)
    1.0
    >>> round(region_coverage(region, [[0, 0.1]], bins=4), 3)
    0.333
    """
    r = np.asarray(xy_region, dtype=np.float64).reshape(-1, 2)
    c = np.asarray(xy_chosen, dtype=np.float64).reshape(-1, 2)
    if r.size == 0:
        return 0.0
    lo, hi = r.min(axis=0), r.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)

    def cells(points: np.ndarray) -> set[tuple[int, int]]:
        idx = np.clip(((points - lo) / span * bins).astype(int), 0, bins - 1)
        return set(map(tuple, idx.tolist()))

    occupied = cells(r)
    inside = c[((c >= lo) & (c <= hi)).all(axis=1)] if c.size else c
    return len(occupied & cells(inside)) / len(occupied) if inside.size else 0.0
