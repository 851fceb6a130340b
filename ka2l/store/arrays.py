"""Large float arrays as memory-mapped .npy files, each with a sidecar JSON that records how it was made.
A run's hidden states have their own per-layer store, ``ka2l.store.hidden``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError


def create_array(path: Path, shape: tuple[int, ...], dtype: str = "float16", meta: dict[str, Any] | None = None) -> np.memmap:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    path.with_suffix(".json").write_text(json.dumps({"shape": list(shape), "dtype": dtype, **(meta or {})}, indent=1))
    return arr


def open_array(path: Path | str, mode: str = "r") -> Any:
    """A memory-mapped .npy file; a per-layer hidden-state folder opens as ``ka2l.store.hidden.HiddenStates``
    (same shape and indexing; prefer opening hidden states with it, and reading a layer with ``.layer(l)``)."""
    path = Path(path)
    if path.is_dir():
        from .hidden import HiddenStates

        return HiddenStates.open(path, mode)
    if not path.is_file():
        raise StoreError(f"Array file {path} is missing. It belongs to a run whose data folder was moved or deleted; re-run it.")
    return np.load(path, mmap_mode=mode)


def read_meta(path: Path | str) -> dict[str, Any]:
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}
