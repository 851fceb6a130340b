"""Annotation order: uncertainty first, with near-copies pushed back (greedy MMR), and the map coverage of the first N."""

from __future__ import annotations

import numpy as np
import pytest

from ka2l.annotate.ordering import rank_for_annotation, region_coverage
from ka2l.errors import ConfigError


def clusters(seed: int = 0):
    """Three tight clusters of 10 in 16-D; cluster 0 is the most uncertain, then 1, then 2."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(scale=0.05, size=(10, 16)) for c in centres])  # (30, 16)
    p = np.concatenate([0.95 - 0.001 * np.arange(10), 0.80 - 0.001 * np.arange(10), 0.60 - 0.001 * np.arange(10)])
    return x, p, np.repeat([0, 1, 2], 10)


def test_diversity_puts_one_question_per_cluster_first():
    x, p, label = clusters()
    plain = rank_for_annotation(p, x, diversity=0.0)
    assert label[plain.order[:3]].tolist() == [0, 0, 0]  # uncertainty alone: three near-copies first
    assert plain.order.tolist() == np.argsort(-p, kind="stable").tolist()
    mixed = rank_for_annotation(p, x, diversity=0.3)
    assert sorted(label[mixed.order[:3]].tolist()) == [0, 1, 2]
    assert mixed.order[0] == int(np.argmax(p))  # the first pick is the most uncertain question
    assert mixed.max_similarity[mixed.order[1]] < 0.5 and mixed.max_similarity[mixed.order[3]] > 0.9


def test_rank_is_a_permutation_consistent_with_order_and_limit_falls_back_to_uncertainty():
    x, p, label = clusters(1)
    r = rank_for_annotation(p, x, diversity=0.3, limit=3)
    assert sorted(r.order.tolist()) == list(range(30))
    assert [int(r.rank[i]) for i in r.order] == list(range(1, 31))
    rest = r.order[3:]
    assert p[rest].tolist() == sorted(p[rest].tolist(), reverse=True)
    full = rank_for_annotation(p, x, diversity=0.3)
    assert full.order[:3].tolist() == r.order[:3].tolist()


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="3 scores but vectors of shape \\(2, 4\\)"):
        rank_for_annotation([0.1, 0.2, 0.3], np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="diversity must be between 0 and 1"):
        rank_for_annotation([0.1], np.zeros((1, 4)), diversity=2)
    with pytest.raises(ConfigError, match="1 non-finite"):
        rank_for_annotation([0.1, float("nan")], np.zeros((2, 4)))


def test_region_coverage_grows_with_the_first_n_and_diversity_covers_more():
    x, p, label = clusters(2)
    xy = x[:, :2]  # a stand-in 2-D map of the same points
    plain = rank_for_annotation(p, x, diversity=0.0).order
    mixed = rank_for_annotation(p, x, diversity=0.3).order
    cov = [region_coverage(xy, xy[mixed[:n]], bins=3) for n in range(1, 31)]
    assert all(a <= b for a, b in zip(cov, cov[1:])) and cov[-1] == 1.0
    assert region_coverage(xy, xy[mixed[:3]], bins=3) > region_coverage(xy, xy[plain[:3]], bins=3)
    assert region_coverage(xy, np.zeros((0, 2))) == 0.0
