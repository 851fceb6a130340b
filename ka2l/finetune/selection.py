"""Which questions to annotate at a fixed budget: the KA2L selections and the active-learning baselines
of the paper's §4.5, as pure functions of a run's stored data (no model, no database), deterministic
given a seed.

    random          a seeded permutation
    entropy         next-token entropy of the prompt at T = 1.0, highest first
    coreset         k-center greedy on the chosen layer's hidden states (Sener & Savarese 2018)
    badge           k-means++ seeding where a question's pick probability is proportional to its squared
                    distance to the nearest chosen centre times its entropy (BADGE adapted, as in the paper)
    ka2l-unknown    BiSE = 1 first, then the probe's P(unknown), highest first
    ka2l-known      BiSE = 0 first, then P(unknown), lowest first
    combine         half from ka2l-unknown, half from ka2l-known
    ka2l-augmented  ka2l-unknown plus approved decoded questions (Stage 2) up to a share of the budget

Distances are between centred, L2-normalised hidden states (``ka2l.augment.candidates.Similarity``), as
everywhere else in ka2l: raw LLM states all point one way, and a few huge dimensions would decide
Euclidean distances alone. Ties break by a seeded random key, so a seed changes only the ties.

``select`` is the protocol: it removes the excluded items (the experiment's test split) before a
strategy sees the pool, refuses a budget the pool cannot fill ("Pool exhausted: 3 available / 10
requested") and checks that what comes back is exactly ``n`` distinct allowed items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ConfigError, Ka2lError


class PoolExhausted(Ka2lError):
    """A strategy was asked for more items than the pool (without its excluded items) holds."""


@dataclass(frozen=True)
class SelectionPool:
    """What the strategies choose from: one row per pool question (``keys`` like ``q:12``), aligned
    arrays (None when the run does not have them), and decoded candidates for ``ka2l-augmented``."""

    keys: tuple[str, ...]
    vectors: np.ndarray | None = None      # (n, d) hidden states at the chosen layer
    entropy: np.ndarray | None = None      # (n,) next-token entropy of the prompt, nats
    bise: np.ndarray | None = None         # (n,) 1 unknown, 0 known
    p_unknown: np.ndarray | None = None    # (n,) the probe's P(unknown)
    extra_keys: tuple[str, ...] = ()       # approved decoded questions (``c:3``)
    extra_p_unknown: np.ndarray | None = None  # (m,) their re-probed P(unknown)
    extra_share: float = 0.5               # ka2l-augmented: at most this share of the budget is decoded questions
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(set(self.keys)) != n:
            raise ConfigError("SelectionPool.keys repeats an item; every question appears once.")
        for name in ("vectors", "entropy", "bise", "p_unknown"):
            arr = getattr(self, name)
            if arr is not None and np.asarray(arr).shape[0] != n:
                raise ConfigError(f"SelectionPool.{name} has {np.asarray(arr).shape[0]} rows for {n} questions; give one row per question.")
        if self.extra_p_unknown is not None and len(self.extra_p_unknown) != len(self.extra_keys):
            raise ConfigError(f"{len(self.extra_p_unknown)} P(unknown) values for {len(self.extra_keys)} decoded questions.")
        if not 0 <= self.extra_share <= 1:
            raise ConfigError(f"extra_share must be in [0, 1], got {self.extra_share}.")

    def __len__(self) -> int:
        return len(self.keys)

    def without(self, excluded: Iterable[str]) -> "SelectionPool":
        """The pool less ``excluded`` items (and less decoded questions named there)."""
        drop = set(excluded)
        keep = np.array([k not in drop for k in self.keys], dtype=bool)
        keep_x = np.array([k not in drop for k in self.extra_keys], dtype=bool)

        def cut(a, mask):
            return None if a is None else np.asarray(a)[mask]

        return replace(self, keys=tuple(k for k, m in zip(self.keys, keep) if m), vectors=cut(self.vectors, keep),
                       entropy=cut(self.entropy, keep), bise=cut(self.bise, keep), p_unknown=cut(self.p_unknown, keep),
                       extra_keys=tuple(k for k, m in zip(self.extra_keys, keep_x) if m), extra_p_unknown=cut(self.extra_p_unknown, keep_x))


def _need(pool: SelectionPool, name: str, strategy: str, how: str) -> np.ndarray:
    value = getattr(pool, name)
    if value is None:
        raise ConfigError(f"Strategy {strategy!r} needs {how}, which this run does not have. {_HOW.get(name, '')}".strip())
    return np.asarray(value, dtype=np.float64)


_HOW = {"vectors": "Run Stage 1 to the end (it stores every layer's hidden states).",
        "entropy": "The experiment computes it from one forward pass over the pool; run the experiment rather than select alone.",
        "bise": "Finish the run's Stage 1 (the labels come after semantic entropy).",
        "p_unknown": "Finish the run's Stage 1 (it trains the probe)."}


def _ties(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)  # (n,) a seeded tiebreak key


def _descending(score: np.ndarray, seed: int) -> np.ndarray:
    """Indices by ``score``, highest first; ties in seeded random order.

    >>> _descending(np.array([0.1, 0.9, 0.5]), 0).tolist()
    [1, 2, 0]
    """
    return np.lexsort((_ties(len(score), seed), -score))


def _units(pool: SelectionPool, strategy: str) -> np.ndarray:
    from ..augment.candidates import Similarity

    return Similarity(_need(pool, "vectors", strategy, "hidden states").astype(np.float32)).pool  # (n, d) centred, unit length


# -- the strategies: (pool, n, seed) -> indices into pool.keys (or, for ka2l-augmented, keys) -----------

def select_random(pool: SelectionPool, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(len(pool))[:n].tolist()


def select_entropy(pool: SelectionPool, n: int, seed: int) -> list[int]:
    return _descending(_need(pool, "entropy", "entropy", "the prompts' next-token entropies"), seed)[:n].tolist()


def select_coreset(pool: SelectionPool, n: int, seed: int) -> list[int]:
    """k-center greedy: a seeded first centre, then always the question farthest from every chosen one.

    >>> x = np.array([[0, 0], [0, 0.1], [10, 10], [10, 10.1], [-10, 10]], dtype=float)
    >>> sorted(select_coreset(SelectionPool(keys=tuple("abcde"), vectors=x), 3, 0)) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])
    True
    """
    if n == 0:
        return []
    u = _units(pool, "coreset")
    first = int(np.random.default_rng(seed).integers(len(pool)))
    chosen = [first]
    d2 = np.sum((u - u[first]) ** 2, axis=1)  # (n,) squared distance to the nearest centre
    ties = _ties(len(pool), seed)
    for _ in range(n - 1):
        d2[chosen] = -1.0
        i = int(np.lexsort((ties, -d2))[0])
        chosen.append(i)
        d2 = np.minimum(d2, np.sum((u - u[i]) ** 2, axis=1))
    return chosen


def select_badge(pool: SelectionPool, n: int, seed: int) -> list[int]:
    """k-means++ seeding weighted by uncertainty: the first pick has probability proportional to its
    entropy, each next one to (squared distance to the nearest chosen question) x entropy. A pool with
    no weight left (every remaining question at distance 0 or entropy 0) continues uniformly."""
    if n == 0:
        return []
    h = _need(pool, "entropy", "badge", "the prompts' next-token entropies")
    if (h < 0).any() or not np.isfinite(h).all():
        raise ConfigError("badge needs non-negative, finite entropies; recompute the prompt entropies.")
    u = _units(pool, "badge")
    rng = np.random.default_rng(seed)
    available = np.ones(len(pool), dtype=bool)
    d2 = np.ones(len(pool))  # before the first pick every question counts as far
    chosen: list[int] = []
    for _ in range(n):
        w = np.where(available, d2 * h, 0.0)  # (n,)
        if w.sum() <= 0:
            w = available.astype(np.float64)
        i = int(rng.choice(len(pool), p=w / w.sum()))
        chosen.append(i)
        available[i] = False
        dist = np.sum((u - u[i]) ** 2, axis=1)
        d2 = dist if len(chosen) == 1 else np.minimum(d2, dist)
    return chosen


def _unknown_order(pool: SelectionPool, seed: int, strategy: str) -> np.ndarray:
    if pool.bise is None and pool.p_unknown is None:
        raise ConfigError(f"Strategy {strategy!r} needs the run's BiSE labels or its probe's P(unknown); finish the run's Stage 1.")
    bise = np.zeros(len(pool)) if pool.bise is None else np.asarray(pool.bise, dtype=np.float64)
    p = np.zeros(len(pool)) if pool.p_unknown is None else np.asarray(pool.p_unknown, dtype=np.float64)
    return np.lexsort((_ties(len(pool), seed), -p, -bise))  # unknown label first, then P(unknown), highest first


def select_unknown(pool: SelectionPool, n: int, seed: int) -> list[int]:
    return _unknown_order(pool, seed, "ka2l-unknown")[:n].tolist()


def select_known(pool: SelectionPool, n: int, seed: int) -> list[int]:
    return _unknown_order(pool, seed, "ka2l-known")[::-1][:n].tolist()


def select_combine(pool: SelectionPool, n: int, seed: int) -> list[int]:
    """``n - n // 2`` from the top of ka2l-unknown, ``n // 2`` from the top of ka2l-known."""
    order = _unknown_order(pool, seed, "combine")
    unknown = order[: n - n // 2].tolist()
    taken = set(unknown)
    known = [int(i) for i in order[::-1] if int(i) not in taken][: n // 2]
    return unknown + known


def select_augmented(pool: SelectionPool, n: int, seed: int) -> list[str]:
    """Up to ``floor(extra_share * n)`` approved decoded questions (highest P(unknown) first), the rest from ka2l-unknown."""
    m = min(len(pool.extra_keys), math.floor(pool.extra_share * n))
    extra: list[str] = []
    if m:
        p = np.zeros(len(pool.extra_keys)) if pool.extra_p_unknown is None else np.nan_to_num(np.asarray(pool.extra_p_unknown, dtype=np.float64))
        extra = [pool.extra_keys[i] for i in _descending(p, seed)[:m]]
    return [pool.keys[i] for i in _unknown_order(pool, seed, "ka2l-augmented")[: n - m]] + extra


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    fn: Callable[[SelectionPool, int, int], list]
    needs: tuple[str, ...]  # stored data it reads: hidden, entropy, se (BiSE / probe), decoded
    returns_keys: bool = False


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("random", "a seeded random sample of the pool", select_random, ()),
    Strategy("entropy", "highest next-token entropy of the prompt at T = 1.0 first", select_entropy, ("entropy",)),
    Strategy("coreset", "k-center greedy on the chosen layer's hidden states", select_coreset, ("hidden",)),
    Strategy("badge", "k-means++ seeding, pick probability ~ squared distance to the nearest chosen x entropy", select_badge,
             ("hidden", "entropy")),
    Strategy("ka2l-unknown", "KA2L: BiSE = 1 first, then the probe's P(unknown), highest first", select_unknown, ("hidden", "se")),
    Strategy("ka2l-known", "KA2L: BiSE = 0 first, then the probe's P(unknown), lowest first", select_known, ("hidden", "se")),
    Strategy("combine", "half ka2l-unknown, half ka2l-known", select_combine, ("hidden", "se")),
    Strategy("ka2l-augmented", "ka2l-unknown plus approved decoded questions (Stage 2) up to a share of the budget",
             select_augmented, ("hidden", "se", "decoded"), returns_keys=True),
)}


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every strategy, in registry order."""
    return [(s.name, s.description) for s in STRATEGIES.values()]


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"No selection strategy {name!r}. Strategies: {', '.join(STRATEGIES)}.")
    return STRATEGIES[name]


def select(name: str, pool: SelectionPool, n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """The keys of exactly ``n`` distinct items ``name`` picks from ``pool`` less ``exclude``, in pick order."""
    strategy = get_strategy(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"The budget must be a whole number >= 0, got {n!r}.")
    excluded = set(exclude)
    allowed = pool.without(excluded)
    available = len(allowed) + (len(allowed.extra_keys) if name == "ka2l-augmented" else 0)
    if n > available or (name == "ka2l-augmented" and n - min(len(allowed.extra_keys), math.floor(allowed.extra_share * n)) > len(allowed)):
        raise PoolExhausted(f"Pool exhausted: {available} available / {n} requested for strategy {name!r}"
                            f"{f' ({len(excluded)} test items excluded)' if excluded else ''}. Lower the budget or use a larger pool.")
    picked = strategy.fn(allowed, int(n), seed)
    keys = [str(k) for k in picked] if strategy.returns_keys else [allowed.keys[int(i)] for i in picked]
    if len(keys) != n or len(set(keys)) != n or excluded & set(keys):
        raise AssertionError(f"strategy {name} returned {len(keys)} keys ({len(set(keys))} distinct) for a budget of {n}")  # a bug, not input
    return keys
