"""Per-layer probes that predict 'unknown' (BiSE = 1) from last-prompt-token hidden states.

One probe per Transformer layer (layer 0, the embeddings, is not probed); the best layer is chosen
on **validation** AUROC and reported on the held-out test split with a bootstrap interval.
Kinds: ``logistic`` (the SE-probe baseline; L2 strength chosen on validation), ``mlp`` (small,
default) and ``llama-mlp`` (paper-faithful gated MLP, 4 linear layers + SiLU, GPU-sized).
Probes are saved as safetensors weights + a JSON sidecar; inputs are standardised inside the
module, so a saved probe takes raw hidden states.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ProbeConfig, from_dict, to_dict
from ..errors import ProbeError
from ..progress import NullProgress, Progress
from ..store.hidden import HiddenStates

log = logging.getLogger(__name__)

MIN_PER_CLASS = 5


# -- metrics -------------------------------------------------------------------------------------

def auroc(y: Sequence[int], score: Sequence[float]) -> float:
    """AUROC with positive class 1 ('unknown' / 'incorrect'); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if y.size == 0 or len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score, dtype=np.float64)))


def masked_auroc(y: Sequence[int], score: Sequence[float]) -> float:
    """AUROC over the rows whose label is known (label -1 = unknown, e.g. no gold answer)."""
    y, score = np.asarray(y), np.asarray(score)
    keep = y >= 0
    return auroc(y[keep], score[keep])


def bootstrap_interval(metric, a: Sequence, b: Sequence, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``metric(a[idx], b[idx])`` over ``n`` resamples of the rows; a resample
    where the metric is undefined (NaN, e.g. one class only) is skipped; (NaN, NaN) when none is usable."""
    a, b = np.asarray(a), np.asarray(b)
    if n == 0 or a.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))  # (rows,)
        v = metric(a[idx], b[idx])
        if not np.isnan(v):
            vals.append(v)
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (float("nan"), float("nan"))


def bootstrap_auroc(y: Sequence[int], score: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of AUROC over ``n`` resamples (resamples with one class are skipped)."""
    if len(np.unique(np.asarray(y))) < 2:
        return float("nan"), float("nan")
    return bootstrap_interval(auroc, y, score, n=n, seed=seed)


# -- split ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict[str, list[int]]:
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist()}


def stratified_split(y: Sequence[int], shares: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0) -> Split:
    """Train / validation / test indices, stratified on ``y``."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    counts = {int(c): int((y == c).sum()) for c in (0, 1)}
    if min(counts.values()) < MIN_PER_CLASS:
        raise ProbeError(
            f"Probes need at least {MIN_PER_CLASS} questions of each label to split 7:2:1; got known={counts[0]}, "
            f"unknown={counts[1]}. Use a larger or more varied pool, or another threshold rule."
        )
    idx = np.arange(len(y))
    try:
        train, rest = train_test_split(idx, train_size=shares[0], stratify=y, random_state=seed)
        val_share = shares[1] / (shares[1] + shares[2])
        val, test = train_test_split(rest, train_size=val_share, stratify=y[rest], random_state=seed)
    except ValueError as exc:  # a class too small to appear in every part
        raise ProbeError(
            f"Cannot split {len(y)} questions (known={counts[0]}, unknown={counts[1]}) {shares} with both labels in "
            f"every part: {exc}. Use a larger pool."
        ) from exc
    return Split(np.sort(train), np.sort(val), np.sort(test))


# -- modules -------------------------------------------------------------------------------------

def build_probe(kind: str, dim: int, cfg: ProbeConfig):
    """A fresh probe module: standardisation buffers, then the kind's body, ending in 2 logits."""
    import torch
    from torch import nn

    class Standardize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

        def forward(self, x):  # (batch, dim) -> (batch, dim)
            return (x - self.mean) / self.std

    class GatedMLP(nn.Module):
        """Llama-style MLP (gate/up/down + SiLU) then a 2-way head: the paper's probe."""

        def __init__(self) -> None:
            super().__init__()
            inter = cfg.intermediate_size
            self.gate, self.up = nn.Linear(dim, inter, bias=False), nn.Linear(dim, inter, bias=False)
            self.down, self.head = nn.Linear(inter, dim, bias=False), nn.Linear(dim, 2)

        def forward(self, x):  # (batch, dim) -> (batch, 2)
            return self.head(self.down(nn.functional.silu(self.gate(x)) * self.up(x)))

    if kind == "logistic":
        body = nn.Linear(dim, 2)
    elif kind == "mlp":
        body = nn.Sequential(nn.Linear(dim, cfg.hidden_size), nn.SiLU(), nn.Dropout(0.1), nn.Linear(cfg.hidden_size, 2))
    elif kind == "llama-mlp":
        body = GatedMLP()
    else:
        raise ProbeError(f"Unknown probe kind {kind!r}.")
    return nn.Sequential(Standardize(), body)


def _set_standardisation(net, x: np.ndarray) -> None:
    import torch

    net[0].mean.copy_(torch.as_tensor(x.mean(0)))
    net[0].std.copy_(torch.as_tensor(x.std(0) + 1e-6))


def _fit_logistic(net, xtr, ytr, xva, yva, seed: int) -> None:
    """Choose C on validation AUROC; copy the winner into the 2-logit linear layer ([0, w.x + b])."""
    import torch
    from sklearn.linear_model import LogisticRegression

    z_tr = (xtr - xtr.mean(0)) / (xtr.std(0) + 1e-6)
    z_va = (xva - xtr.mean(0)) / (xtr.std(0) + 1e-6)
    best = None
    for c in (1e-3, 1e-2, 1e-1, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z_tr, ytr)
        score = auroc(yva, clf.decision_function(z_va))
        if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
            best = (score, clf)
    clf = best[1]
    lin = net[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = torch.as_tensor(clf.coef_[0], dtype=lin.weight.dtype)
        lin.bias[1] = float(clf.intercept_[0])


def _fit_neural(net, xtr, ytr, xva, yva, cfg: ProbeConfig, device: str, name: str = "The probe") -> None:
    """Adam + cross-entropy; keeps the epoch with the best (finite) validation loss."""
    import torch

    torch.manual_seed(cfg.seed)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.as_tensor(xtr, device=device), torch.as_tensor(ytr, device=device)
    xv, yv = torch.as_tensor(xva, device=device), torch.as_tensor(yva, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state = math.inf, None
    for _ in range(cfg.resolved_epochs):
        net.train()
        for b in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss_fn(net(xt[b]), yt[b]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(xv), yv))
        if val_loss < best_loss:
            best_loss, best_state = val_loss, copy.deepcopy(net.state_dict())
    if best_state is None:  # NaN / inf in every epoch: training diverged
        raise ProbeError(
            f"{name}: the validation loss was not finite in any of the {cfg.resolved_epochs} epochs (last: {val_loss}), so there "
            f"is no epoch to keep. Training diverged: lower the learning rate (ProbeConfig.lr, now {cfg.resolved_lr:g}) or "
            f"use another probe kind (--probe-kind logistic)."
        )
    net.load_state_dict(best_state)
    net.to("cpu")


def train_probe(kind: str, xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, cfg: ProbeConfig, device: str = "cpu",
                name: str = "The probe"):
    """Train one probe on float32 features (n, dim); returns the module on CPU in eval mode. ``name``
    says which probe it is in errors ('The mlp probe for layer 3')."""
    import torch

    torch.manual_seed(cfg.seed)
    net = build_probe(kind, xtr.shape[1], cfg)
    _set_standardisation(net, xtr)
    if kind == "logistic":
        _fit_logistic(net, xtr, ytr, xva, yva, cfg.seed)
    else:
        _fit_neural(net, xtr, ytr, xva, yva, cfg, device, name)
    return net.eval()


def predict_unknown(net, x: np.ndarray) -> np.ndarray:
    """P(unknown) for raw features (n, dim)."""
    import torch

    with torch.no_grad():
        logits = net(torch.as_tensor(np.asarray(x, dtype=np.float32)))  # (n, 2)
        return torch.softmax(logits, -1)[:, 1].numpy().astype(np.float64)


def distance_from_training(net, x: np.ndarray) -> np.ndarray:
    """Mean absolute z-score of each row under the probe's own standardisation: about 0.8 for rows
    like its training data, much larger for questions from elsewhere (domain shift)."""
    import torch

    with torch.no_grad():
        z = net[0](torch.as_tensor(np.asarray(x, dtype=np.float32)))  # (n, dim)
        return z.abs().mean(-1).numpy().astype(np.float64)


# -- layer sweep ---------------------------------------------------------------------------------

@dataclass
class LayerScore:
    layer: int
    val_auroc: float
    test_auroc: float
    test_ci_low: float
    test_ci_high: float
    test_auroc_correct: float | None = None  # against 'incorrect' when gold answers exist


@dataclass
class ProbeResult:
    kind: str
    target: str
    best_layer: int
    layers: list[LayerScore]
    split: Split
    net: Any
    test_scores: np.ndarray  # P(unknown) of the best layer's probe on the test split
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> LayerScore:
        return next(s for s in self.layers if s.layer == self.best_layer)


def layer_features(hidden: np.ndarray | HiddenStates, layer: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Layer ``layer``'s states as float32 (n, dim); from a stored run's ``HiddenStates``, that layer's file alone."""
    src = hidden.layer(layer) if isinstance(hidden, HiddenStates) else hidden[:, layer]  # (n_all, dim), float16 on disk
    x = src if rows is None else src[rows]
    return np.asarray(x, dtype=np.float32)


def check_finite(x: np.ndarray, layer: int) -> None:
    """Refuse a layer whose features hold inf / NaN (float16 storage overflows past 65504)."""
    bad = ~np.isfinite(x).all(axis=1)  # (n,)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ProbeError(
            f"Layer {layer}: {int(bad.sum())} of {len(x)} questions have non-finite hidden states (inf or NaN), e.g. rows "
            f"{', '.join(map(str, rows[:5]))}, so this layer cannot be probed. Either the model overflowed in its own dtype (run "
            f"Stage 1 again with --dtype float32) or its activations exceed the float16 range (65504) in which hidden states are stored."
        )


def probe_layers(
    hidden: np.ndarray,
    y: Sequence[int],
    cfg: ProbeConfig,
    split: Split | None = None,
    incorrect: Sequence[int] | None = None,  # 1 = wrong answer, 0 = right, -1 = no gold answer
    layers: Sequence[int] | None = None,
    kind: str | None = None,
    target: str = "bise",
    device: str = "cpu",
    progress: Progress | None = None,
) -> ProbeResult:
    """Train one probe per layer of ``hidden`` (n, L+1, dim) on ``y``; choose the layer by validation AUROC."""
    progress = progress or NullProgress()
    kind = kind or cfg.kind
    y = np.asarray(y, dtype=np.int64)
    if hidden.shape[0] != len(y):
        raise ProbeError(f"{hidden.shape[0]} hidden-state rows but {len(y)} labels; they must match.")
    split = split or stratified_split(y, cfg.split, cfg.seed)
    layers = list(layers or range(1, hidden.shape[1]))
    wrong = None if incorrect is None else np.asarray(incorrect, dtype=np.int64)
    scores, best = [], None
    progress.stage(f"probes ({kind})", total=len(layers))
    for layer in layers:
        x = layer_features(hidden, layer)
        check_finite(x, layer)
        net = train_probe(kind, x[split.train], y[split.train], x[split.val], y[split.val], cfg, device, name=f"The {kind} probe for layer {layer}")
        p_val, p_test = predict_unknown(net, x[split.val]), predict_unknown(net, x[split.test])
        lo, hi = bootstrap_auroc(y[split.test], p_test, cfg.bootstrap, cfg.seed)
        s = LayerScore(layer, auroc(y[split.val], p_val), auroc(y[split.test], p_test), lo, hi,
                       None if wrong is None else masked_auroc(wrong[split.test], p_test))
        scores.append(s)
        if best is None or (not math.isnan(s.val_auroc) and (math.isnan(best[0].val_auroc) or s.val_auroc > best[0].val_auroc)):
            best = (s, net, p_test)
        progress.advance(1, f"layer {layer}: val AUROC {s.val_auroc:.3f}")
    return ProbeResult(kind=kind, target=target, best_layer=best[0].layer, layers=scores, split=split, net=best[1], test_scores=best[2])


# -- persistence ---------------------------------------------------------------------------------

def save_probe(folder: Path, net, kind: str, layer: int, cfg: ProbeConfig, meta: dict[str, Any]) -> Path:
    """Weights as safetensors plus a JSON sidecar with everything needed to rebuild and trust it."""
    import safetensors.torch
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    dim = int(net[0].mean.shape[0])
    sidecar = {"kind": kind, "layer": layer, "dim": dim, "config": to_dict(cfg),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, **meta}
    (folder / "probe.json").write_text(json.dumps(sidecar, indent=1))
    return path


def load_probe(path: Path | str):
    """(module, sidecar dict) for a probe saved by ``save_probe``."""
    import safetensors.torch

    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise ProbeError(f"Probe files missing at {path} (+ .json). The data folder may have moved; re-run Stage 1 to retrain.")
    meta = json.loads(side.read_text())
    net = build_probe(meta["kind"], meta["dim"], from_dict(ProbeConfig, meta["config"]))
    net.load_state_dict(safetensors.torch.load_file(str(path)))
    return net.eval(), meta
