"""2-D projections (PCA, UMAP) of one layer's hidden states, cached on disk per run, layer and method."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..paths import arrays_dir
from ..store import queries as Q
from ..store.hidden import HiddenStates
from ..store.db import connect

METHODS = ("pca", "umap")
# What the map can be coloured by, with the names the page and the legend show.
COLOUR_LABELS = {"se": "SE (nats)", "bise": "BiSE", "p_unknown": "P(unknown)", "correct": "correctness", "se_weighted": "SE weighted (nats)"}
# Binary columns are named categories, never the numbers 0 / 1; a missing value has its own category.
CATEGORIES = {"bise": {0: "known", 1: "unknown"}, "correct": {1: "correct", 0: "incorrect"}}
MISSING_CATEGORY = {"bise": "no label", "correct": "no gold answer"}


def category_labels(values, column: str) -> list[str]:
    """Names for a binary column's values.

    >>> category_labels([0, 1, None], "correct")
    ['incorrect', 'correct', 'no gold answer']
    >>> category_labels([1.0, 0.0], "bise")
    ['unknown', 'known']
    """
    names = CATEGORIES[column]
    out = []
    for v in values:
        missing = v is None or v != v  # None or NaN
        out.append(MISSING_CATEGORY[column] if missing else names[int(v)])
    return out


def density_grid(x, y, size: int = 60, pad: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A Gaussian kernel density of the points (x, y) on a size x size grid spanning them, padded by
    ``pad`` of their range on each side; the density is scaled to a maximum of 1. Computed from the
    very coordinates the points are drawn at, so a contour sits on its points whatever the projection
    (a histogram contour binned by the browser put a few points' density at the centre of one wide
    bin, away from them). None for fewer than 3 distinct points or points on one line.

    >>> gx, gy, z = density_grid(np.array([4.5, 4.7, 5.0, 4.6]), np.array([1.0, 1.3, 1.1, 0.8]))
    >>> bool(4.5 <= gx[z.max(0).argmax()] <= 5.0 and 0.8 <= gy[z.max(1).argmax()] <= 1.3)
    True
    """
    from scipy.stats import gaussian_kde

    pts = np.vstack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])  # (2, n)
    pts = pts[:, np.isfinite(pts).all(0)]
    if len(np.unique(pts, axis=1).T) < 3 or np.linalg.cond(np.cov(pts)) > 1e10:  # too few, or all on one line
        return None
    try:
        kde = gaussian_kde(pts)
    except np.linalg.LinAlgError:
        return None
    lo, hi = pts.min(1), pts.max(1)
    span = np.maximum(hi - lo, 1e-6)
    gx = np.linspace(lo[0] - pad * span[0], hi[0] + pad * span[0], size)  # (size,)
    gy = np.linspace(lo[1] - pad * span[1], hi[1] + pad * span[1], size)  # (size,)
    xx, yy = np.meshgrid(gx, gy)  # (size, size): rows follow y, columns follow x, as plotly's z
    z = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(size, size)
    return gx, gy, z / z.max()


def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2), features standardised first."""
    return fit_projection(x, method, seed)[0]


def fit_projection(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The projection fitted on ``x`` (n, d): (x's own coordinates (n, 2), as ``project`` gives them, and a
    function placing other points (m, d) -> (m, 2) in the same map, standardised with x's mean and spread).

    >>> x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    >>> coords, place = fit_projection(x)
    >>> bool(np.allclose(place(x), coords, atol=1e-4)) and place(x[:3] + 1).shape == (3, 2)
    True
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown projection {method!r}. Choose one of: {', '.join(METHODS)}.")
    x = np.asarray(x, dtype=np.float32)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / scale

    def standardised(y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float32) - mean) / scale

    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        return pca.fit_transform(x).astype(np.float32), lambda y: pca.transform(standardised(y)).astype(np.float32)
    import umap

    n_neighbors = max(2, min(15, len(x) - 1))
    # UMAP uses 500 epochs up to 10,000 points and 200 above; 200 from 2,000 points keeps a 10k map
    # well under a minute on a 2-core CPU. The seed makes maps reproducible (and UMAP single-threaded).
    n_epochs = 200 if len(x) > 2000 else None
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, n_epochs=n_epochs, random_state=seed)
    return reducer.fit_transform(x).astype(np.float32), lambda y: reducer.transform(standardised(y)).astype(np.float32)


def cache_path(run_id: int, layer: int, method: str) -> Path:
    return arrays_dir() / f"run-{run_id}-layer{layer}-{method}.npy"


def run_projection(run_id: int, layer: int, method: str = "pca") -> np.ndarray:
    """The projection for a run's layer, computed once and then read from disk."""
    path = cache_path(run_id, layer, method)
    if path.is_file():
        return np.load(path)
    with connect() as db:
        run = Q.get_run(db, run_id)
    hidden = HiddenStates.open(run["hidden_path"])
    if layer not in hidden.layers:
        raise ConfigError(f"Layer {layer} does not exist; this run has layers 0..{hidden.shape[1] - 1}.")
    coords = project(hidden.layer(layer), method)  # reads that layer's file alone
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, coords)
    tmp.rename(path)
    return coords


# -- the annotation order on the map (Stage 3a) --------------------------------------------------------

def annotation_order(pool_id: int, diversity: float = 0.3):
    """The pool's tasks in annotation order, as a DataFrame (rank, question_id, kind; question_id is
    missing for decoded candidates, which have no point on the map) and where the order comes from: the
    ranks stored when the newest project was pushed (``ls_tasks``), else the ranks the next push would
    give (``push.preview``, store only). ``attrs['source']`` says which; an empty frame before anything
    is approved."""
    import pandas as pd

    from ..annotate import push
    from ..config import PushConfig
    from ..store import annotate as A

    with connect() as db:
        projects = A.projects(db, pool_id=pool_id)
        links = A.links(db, projects[0]["id"]) if projects else []
    if links:
        frame = pd.DataFrame([{"rank": r["rank"], "question_id": r["question_id"], "kind": "original" if r["question_id"] is not None
                               else "decoded"} for r in links if r["rank"] is not None])
        frame.attrs["source"] = f"pushed to Label Studio project {projects[0]['project_id']} ({projects[0]['title']})"
    else:
        preview = push.preview(pool_id, PushConfig(diversity=diversity))
        frame = preview[["rank", "question_id", "kind"]].copy() if len(preview) else pd.DataFrame(columns=["rank", "question_id", "kind"])
        frame.attrs["source"] = "the order the next push would use (nothing pushed yet)"
    source = frame.attrs["source"]
    frame = frame.sort_values("rank", kind="stable").reset_index(drop=True).astype({"rank": "int64", "question_id": "Int64"})
    frame.attrs["source"] = source
    return frame


def rank_coverage(points, order, n: int) -> dict:
    """How much of the map's unknown region the first ``n`` tasks of ``order`` cover.

    ``points``: the map's frame (question_id, x, y, bise); the unknown region is the points with BiSE 1.
    Returns the share of the region's occupied grid cells holding one of the first ``n`` tasks'
    questions (``ordering.region_coverage``), how many of those tasks are on the map and how many
    unknown points there are.

    >>> import pandas as pd
    >>> pts = pd.DataFrame({"question_id": [1, 2, 3], "x": [0.0, 0.1, 9.0], "y": [0.0, 0.0, 9.0], "bise": [1, 1, 1]})
    >>> order = pd.DataFrame({"rank": [1, 2, 3], "question_id": [1, 2, 3]})
    >>> rank_coverage(pts, order, 1)["coverage"], rank_coverage(pts, order, 3)["coverage"]
    (0.5, 1.0)
    """
    from ..annotate.ordering import region_coverage

    first = order.head(max(0, int(n)))
    chosen_ids = set(first["question_id"].dropna().astype(int))
    on_map = points[points["question_id"].isin(chosen_ids)]
    region = points[points["bise"] == 1] if "bise" in points else points.iloc[:0]
    coverage = region_coverage(region[["x", "y"]].to_numpy(), on_map[["x", "y"]].to_numpy()) if len(region) else 0.0
    return {"coverage": float(coverage), "on_map": int(len(on_map)), "tasks": int(len(first)), "unknown_points": int(len(region))}
