"""Selection strategies at an equal budget, on planted data: each picks what it is meant to, none picks an
excluded (test) item, budgets are exact, and an exhausted pool says so."""

from __future__ import annotations

import numpy as np
import pytest

from ka2l.errors import ConfigError
from ka2l.finetune import selection as S


def clusters(k: int = 4, per: int = 10, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` tight, far-apart clusters of ``per`` points: (vectors (k*per, dim), cluster id (k*per,))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 10
    x = np.concatenate([c + 0.05 * rng.normal(size=(per, dim)) for c in centres])
    return x + 100.0, np.repeat(np.arange(k), per)  # a common offset, as raw LLM states have


def planted(n_extra: int = 0) -> S.SelectionPool:
    """40 questions in 4 clusters; cluster 0 has high entropy; questions 0-19 are unknown (BiSE 1)."""
    x, cid = clusters()
    n = len(cid)
    entropy = np.where(cid == 0, 2.0, 0.3) + 0.01 * np.arange(n) / n
    bise = (np.arange(n) < 20).astype(int)
    p = np.where(bise == 1, 0.6, 0.4) + 0.3 * np.sin(np.arange(n))  # noisy, overlaps across the labels
    return S.SelectionPool(keys=tuple(f"q:{i}" for i in range(n)), vectors=x, entropy=entropy, bise=bise, p_unknown=p,
                           extra_keys=tuple(f"c:{i}" for i in range(n_extra)), extra_p_unknown=np.linspace(0.5, 0.9, n_extra))


def idx(keys):
    return [int(k.split(":")[1]) for k in keys]


def test_registry_names_every_strategy_with_a_description():
    names = [n for n, _ in S.describe()]
    assert names == ["random", "entropy", "coreset", "badge", "ka2l-unknown", "ka2l-known", "combine", "ka2l-augmented"]
    assert all(d for _, d in S.describe())
    with pytest.raises(ConfigError, match="Strategies: random, entropy"):
        S.select("uncertainty", planted(), 3)


@pytest.mark.parametrize("seed", range(5))
def test_coreset_covers_every_cluster(seed):
    pool = planted()
    _, cid = clusters()
    got = idx(S.select("coreset", pool, 4, seed))
    assert sorted(cid[got]) == [0, 1, 2, 3]
    random_hits = [len(set(cid[idx(S.select("random", pool, 4, s))])) for s in range(20)]
    assert min(random_hits) < 4  # the planted data does not make covering trivial


def test_entropy_takes_the_high_entropy_prompts_highest_first():
    pool = planted()
    got = idx(S.select("entropy", pool, 10, 0))
    assert got == list(range(9, -1, -1))  # cluster 0, its highest-entropy prompt first


@pytest.mark.parametrize("seed", range(5))
def test_badge_mixes_uncertainty_and_diversity(seed):
    pool = planted()
    _, cid = clusters()
    badge = cid[idx(S.select("badge", pool, 6, seed))]
    entropy = cid[idx(S.select("entropy", pool, 6, seed))]
    assert set(entropy) == {0}
    assert 0 in badge and len(set(badge)) >= 3  # the high-entropy cluster, and the others by distance


def test_badge_draws_follow_entropy_when_distances_are_equal():
    """Orthogonal unit vectors are all at the same distance: the first picks follow entropy alone."""
    n = 30
    h = np.where(np.arange(n) < 3, 10.0, 0.01)
    pool = S.SelectionPool(keys=tuple(f"q:{i}" for i in range(n)), vectors=np.eye(n), entropy=h)
    firsts = [idx(S.select("badge", pool, 1, s))[0] for s in range(40)]
    assert sum(f < 3 for f in firsts) >= 35


def test_ka2l_unknown_known_and_combine():
    pool = planted()
    unknown = idx(S.select("ka2l-unknown", pool, 12, 0))
    known = idx(S.select("ka2l-known", pool, 12, 0))
    assert all(i < 20 for i in unknown) and all(i >= 20 for i in known)
    p = np.asarray(pool.p_unknown)
    assert list(p[unknown]) == sorted(p[unknown], reverse=True)  # P(unknown) orders within the label
    assert list(p[known]) == sorted(p[known])
    combine = idx(S.select("combine", pool, 11, 0))
    assert combine[:6] == unknown[:6] and sorted(combine[6:]) == sorted(known[:5])


def test_augmented_adds_decoded_questions_up_to_its_share():
    pool = planted(n_extra=3)
    got = S.select("ka2l-augmented", pool, 10, 0)
    decoded = [k for k in got if k.startswith("c:")]
    assert decoded == ["c:2", "c:1", "c:0"]  # all three (share 0.5 of 10 allows 5), highest P(unknown) first
    assert all(i < 20 for i in idx(k for k in got if k.startswith("q:")))
    few = S.select("ka2l-augmented", planted(n_extra=30), 10, 0)
    assert sum(k.startswith("c:") for k in few) == 5


@pytest.mark.parametrize("name", list(S.STRATEGIES))
@pytest.mark.parametrize("n", [0, 1, 7, 30])
def test_budgets_are_exact_and_no_test_item_is_ever_picked(name, n):
    pool = planted(n_extra=4)
    test = {f"q:{i}" for i in range(0, 40, 4)} | {"c:1"}  # every cluster, both labels, high and low entropy
    for seed in (0, 1):
        got = S.select(name, pool, n, seed, exclude=test)
        assert len(got) == n == len(set(got)) and not set(got) & test
        assert S.select(name, pool, n, seed, exclude=test) == got  # deterministic


def test_an_exhausted_pool_says_how_many_are_available():
    pool = planted()
    test = {f"q:{i}" for i in range(37)}
    with pytest.raises(S.PoolExhausted, match=r"Pool exhausted: 3 available / 10 requested"):
        S.select("random", pool, 10, exclude=test)
    assert len(S.select("coreset", pool, 3, exclude=test)) == 3


def test_a_strategy_without_its_data_says_what_is_missing():
    pool = S.SelectionPool(keys=("q:1", "q:2"))
    with pytest.raises(ConfigError, match="entropy"):
        S.select("entropy", pool, 1)
    with pytest.raises(ConfigError, match="BiSE"):
        S.select("ka2l-unknown", pool, 1)
    with pytest.raises(ConfigError, match="whole number"):
        S.select("random", pool, -1)
