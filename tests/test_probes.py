"""Probes find a planted signal in the right layer, and are at chance on shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest

from ka2l.config import ProbeConfig
from ka2l.errors import ProbeError
from ka2l.probing.probes import auroc, bootstrap_auroc, load_probe, predict_unknown, probe_layers, save_probe, stratified_split


def planted(n=300, layers=4, dim=24, signal_layer=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    hidden = rng.normal(size=(n, layers + 1, dim)).astype(np.float16)
    direction = rng.normal(size=dim)
    hidden[:, signal_layer] += (np.outer(y * 2 - 1, direction) * 0.6).astype(np.float16)
    return hidden, y


def test_auroc_orientation_and_bootstrap():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert np.isnan(auroc([1, 1], [0.3, 0.4]))
    y = np.array([0, 1] * 50)
    assert bootstrap_auroc(y, y.astype(float), n=200) == (1.0, 1.0)  # perfectly separated in every resample
    rng = np.random.default_rng(0)
    noisy = y + rng.normal(0, 1.0, 100)
    lo, hi = bootstrap_auroc(y, noisy, n=500)
    assert lo < auroc(y, noisy) < hi and hi - lo > 0.1


def test_split_is_stratified_7_2_1_and_refuses_tiny_classes():
    y = np.array([0] * 70 + [1] * 30)
    s = stratified_split(y, (0.7, 0.2, 0.1), seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (70, 20, 10)
    assert set(s.train) | set(s.val) | set(s.test) == set(range(100))
    assert y[s.test].sum() == 3 and y[s.val].sum() == 6
    with pytest.raises(ProbeError, match="known=97, unknown=3"):
        stratified_split(np.array([0] * 97 + [1] * 3))
    with pytest.raises(ProbeError, match="Cannot split 12 questions"):
        stratified_split(np.array([0] * 6 + [1] * 6), (0.9, 0.05, 0.05))


@pytest.mark.parametrize("kind", ["logistic", "mlp", "llama-mlp"])
def test_planted_signal_found_in_its_layer(kind):
    hidden, y = planted()
    cfg = ProbeConfig(kind=kind, intermediate_size=64, epochs=30 if kind == "mlp" else 0, lr=3e-4 if kind == "llama-mlp" else 0.0, bootstrap=100)
    rng = np.random.default_rng(1)
    incorrect = np.where(rng.random(len(y)) < 0.1, 1 - y, y)  # correctness agrees with the label 90% of the time
    incorrect[rng.random(len(y)) < 0.3] = -1  # and a third of the questions have no gold answer
    res = probe_layers(hidden, y, cfg, incorrect=incorrect)
    assert res.best_layer == 2
    assert res.best.test_auroc > 0.9
    others = [s.test_auroc for s in res.layers if s.layer != 2]
    assert max(others) < 0.75, others
    # the reported numbers are the chosen probe's, on the held-out test rows only
    test = res.split.test
    assert not set(test) & (set(res.split.train) | set(res.split.val))
    np.testing.assert_allclose(res.test_scores, predict_unknown(res.net, hidden[test, 2].astype(np.float32)))
    graded = incorrect[test] >= 0
    assert res.best.test_auroc_correct == pytest.approx(auroc(incorrect[test][graded], res.test_scores[graded]))
    assert res.best.test_auroc_correct < res.best.test_auroc, "the noisy, partial correctness labels are harder to rank"
    lo, hi = bootstrap_auroc(y[test], res.test_scores, n=100, seed=cfg.seed)
    assert (res.best.test_ci_low, res.best.test_ci_high) == pytest.approx((lo, hi))
    assert 0.75 < lo < res.best.test_auroc and hi - lo < 0.25


def test_shuffled_labels_give_chance():
    hidden, y = planted(n=400)
    rng = np.random.default_rng(5)
    res = probe_layers(hidden, rng.permutation(y), ProbeConfig(kind="logistic", bootstrap=0), layers=[2])
    assert abs(res.best.test_auroc - 0.5) < 0.2


def test_saved_probe_reloads_and_predicts_identically(tmp_path):
    hidden, y = planted()
    res = probe_layers(hidden, y, ProbeConfig(kind="mlp", epochs=10, bootstrap=0), layers=[2])
    save_probe(tmp_path / "p", res.net, "mlp", 2, ProbeConfig(kind="mlp", epochs=10), {"target": "bise"})
    net, meta = load_probe(tmp_path / "p" / "probe.safetensors")
    x = hidden[:, 2].astype(np.float32)
    np.testing.assert_allclose(predict_unknown(net, x), predict_unknown(res.net, x), atol=1e-6)
    assert meta["layer"] == 2 and meta["kind"] == "mlp" and "torch" in meta["versions"]
    with pytest.raises(ProbeError, match="missing"):
        load_probe(tmp_path / "nope" / "probe.safetensors")


def test_a_probe_whose_validation_loss_is_never_finite_names_its_layer():
    """An absurd learning rate makes the mlp diverge at once: no epoch has a finite validation loss,
    so there is no epoch to keep. A ProbeError names the layer and what to change."""
    hidden, y = planted(n=120)
    cfg = ProbeConfig(kind="mlp", epochs=3, lr=1e30, bootstrap=0)
    with pytest.raises(ProbeError, match=r"layer 1\b.*not finite in any of the 3 epochs") as err:
        probe_layers(hidden, y, cfg)
    assert "lr" in str(err.value)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_non_finite_hidden_states_are_refused_with_the_layer_named(kind):
    """float16 states overflow to inf on models with huge activations; such a layer is refused by name."""
    hidden, y = planted(n=120)
    hidden[[3, 7], 2, 5] = np.inf
    with pytest.raises(ProbeError, match=r"Layer 2: 2 of 120 questions have non-finite hidden states"):
        probe_layers(hidden, y, ProbeConfig(kind=kind, epochs=2, bootstrap=0))


# -- prediction rejection ratio ------------------------------------------------------------------

def test_prr_against_hand_computed_values():
    from ka2l.probing.rejection import prediction_rejection_ratio as prr, rejection_curve

    right = [1, 1, 0, 0]
    # oracle ordering: the wrong answers are the most uncertain
    assert prr([0.1, 0.2, 0.8, 0.9], right) == pytest.approx(1.0)
    # reversed oracle: the right answers are the most uncertain
    assert prr([0.9, 0.8, 0.2, 0.1], right) == pytest.approx(-1.0)
    # by hand: ranked right, wrong, right, wrong -> kept means 1/2, 2/3, 1/2, 1 (area 2/3);
    # oracle 1/2, 2/3, 1, 1 (area 19/24); random 1/2 -> (2/3 - 1/2) / (19/24 - 1/2) = 4/7
    np.testing.assert_allclose(rejection_curve([0.2, 0.6, 0.4, 0.9], right), [1 / 2, 2 / 3, 1 / 2, 1])
    assert prr([0.2, 0.6, 0.4, 0.9], right) == pytest.approx(4 / 7)
    # 5 answers, 2 right, not symmetric: ranked (right, wrong, wrong, right, wrong)
    # kept means: 2/5, 2/4, 1/3, 1/2, 1 -> area 0.54667; oracle 2/5, 2/4, 2/3, 1, 1 -> 0.71333; random 0.4
    assert prr([1, 2, 3, 4, 5], [1, 0, 0, 1, 0]) == pytest.approx((0.54667 - 0.4) / (0.71333 - 0.4), abs=1e-4)
    # graded quality works the same way: (0.9, 0.5, 0.1) ranked in the oracle's order
    assert prr([0, 1, 2], [0.9, 0.5, 0.1]) == pytest.approx(1.0)


def test_prr_ties_random_scores_and_degenerate_quality():
    from ka2l.probing.rejection import bootstrap_prr, prediction_rejection_ratio as prr

    right = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    assert prr(np.zeros(8), right) == 0.0, "a constant score rejects at random"
    # a tie is broken in expectation, whatever the row order: ties between a right and a wrong answer
    a = prr([0.1, 0.5, 0.5, 0.9], [1, 1, 0, 0])
    assert a == prr([0.1, 0.5, 0.5, 0.9], [1, 0, 1, 0]) and 0 < a < 1
    assert np.isnan(prr([0.1, 0.2, 0.3], [1, 1, 1])) and np.isnan(prr([], []))
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2, 4000)
    assert abs(prr(rng.random(4000), q)) < 0.05, "a random score is about 0"
    noisy = 1 - q + rng.normal(0, 0.8, 4000)  # uncertain where wrong, noisily
    value = prr(noisy, q)
    lo, hi = bootstrap_prr(noisy[:400], q[:400], n=300)
    assert 0.3 < value < 0.9 and lo < prr(noisy[:400], q[:400]) < hi and hi - lo < 0.3
    assert bootstrap_prr(noisy, np.ones(4000)) == (pytest.approx(np.nan, nan_ok=True),) * 2
