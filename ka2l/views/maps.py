"""2-D projections (PCA, UMAP) of one layer's hidden states, cached on disk per run, layer and method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..paths import arrays_dir
from ..store import queries as Q
from ..store.arrays import open_array
from ..store.db import connect

METHODS = ("pca", "umap")


def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2), features standardised first."""
    if method not in METHODS:
        raise ConfigError(f"Unknown projection {method!r}. Choose one of: {', '.join(METHODS)}.")
    x = np.asarray(x, dtype=np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)
    import umap

    n_neighbors = max(2, min(15, len(x) - 1))
    # UMAP uses 500 epochs up to 10,000 points and 200 above; 200 from 2,000 points keeps a 10k map
    # well under a minute on a 2-core CPU. The seed makes maps reproducible (and UMAP single-threaded).
    n_epochs = 200 if len(x) > 2000 else None
    return umap.UMAP(n_components=2, n_neighbors=n_neighbors, n_epochs=n_epochs, random_state=seed).fit_transform(x).astype(np.float32)


def cache_path(run_id: int, layer: int, method: str) -> Path:
    return arrays_dir() / f"run-{run_id}-layer{layer}-{method}.npy"


def run_projection(run_id: int, layer: int, method: str = "pca") -> np.ndarray:
    """The projection for a run's layer, computed once and then read from disk."""
    path = cache_path(run_id, layer, method)
    if path.is_file():
        return np.load(path)
    with connect() as db:
        run = Q.get_run(db, run_id)
    hidden = open_array(run["hidden_path"])
    if not 0 <= layer < hidden.shape[1]:
        raise ConfigError(f"Layer {layer} does not exist; this run has layers 0..{hidden.shape[1] - 1}.")
    coords = project(hidden[:, layer], method)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, coords)
    tmp.rename(path)
    return coords
