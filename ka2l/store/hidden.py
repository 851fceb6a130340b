"""A run's last-prompt-token hidden states on disk, one memory-mapped file per layer.

    data/arrays/run-12-hidden/
        meta.json          run, model, layers, dtype, position, shape (n, n_layers_stored, hidden)
        layer-000.npy      (n, hidden) float16, the embeddings' output
        layer-001.npy      (n, hidden) after decoder layer 1
        ...

Training a probe on layer l, drawing a map of it or triaging with it reads ``layer-l.npy`` alone:
a pool of 10M questions on a 32-layer, 4096-wide model takes 2.6 TB in all but 80 GB per layer.

Runs stored before this layout hold ONE file ``run-N-hidden.npy`` of shape (n, L+1, hidden) with a
``.json`` sidecar; :meth:`HiddenStates.open` opens both, so every reader goes through this class, and
a resumed old run keeps writing its own file. ``hidden[:, j]`` indexes the j-th *stored* layer (as the
old array did); ``hidden.layer(l)`` names the model's layer ``l`` (the same for a Stage 1 run, which
stores every layer from 0; a triage run stores the probe's layer alone).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..paths import arrays_dir

FORMAT = "ka2l-hidden-per-layer/1"
META_FILE = "meta.json"
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}  # what a state takes; ka2l stores float16
DTYPES = ("float16", "float32")  # what a store holds (numpy has no bfloat16)


def hidden_dir(run_id: int) -> Path:
    """The folder of run ``run_id``'s per-layer hidden states."""
    return arrays_dir() / f"run-{int(run_id)}-hidden"


def layer_file(folder: Path | str, layer: int) -> Path:
    return Path(folder) / f"layer-{int(layer):03d}.npy"


# -- sizing ---------------------------------------------------------------------------------------

def estimate_bytes(n_questions: int, n_layers: int, hidden_size: int, dtype: str = "float16") -> int:
    """Bytes the hidden states take: ``n_questions`` × ``n_layers`` stored layers × ``hidden_size`` ×
    the dtype's size (the .npy headers, 128 bytes a file, are left out).

    >>> estimate_bytes(10_000_000, 32, 4096)
    2621440000000
    """
    for name, value in (("n_questions", n_questions), ("n_layers", n_layers), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise StoreError(f"estimate_bytes: {name} must be a whole number >= 0, got {value!r}.")
    return int(n_questions) * int(n_layers) * int(hidden_size) * _itemsize(dtype)


def format_bytes(n: int | float) -> str:
    """Decimal units, as disks are sold: 2.62e12 -> '2.6 TB', 41_000 -> '41 kB'.

    >>> format_bytes(2_621_440_000_000), format_bytes(999), format_bytes(41_000)
    ('2.6 TB', '999 B', '41 kB')
    """
    n, units = float(n), ("B", "kB", "MB", "GB", "TB", "PB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    if i == 0:
        return f"{int(n)} B"
    return f"{n:.1f} {units[i]}" if abs(n) < 10 else f"{n:.0f} {units[i]}"


def describe_size(n_questions: int, n_layers: int, hidden_size: int, dtype: str = "float16") -> str:
    """'10,000,000 questions × 32 layers × 4096 × float16 (2 B) = 2.6 TB'."""
    size = estimate_bytes(n_questions, n_layers, hidden_size, dtype)
    return (f"{n_questions:,} questions × {n_layers} layers × {hidden_size} × {dtype} ({_itemsize(dtype)} B) = {format_bytes(size)}")


def free_bytes(folder: Path | str) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    p = Path(folder).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def check_free_space(folder: Path | str, needed: int, what: str = "the hidden states") -> None:
    """Refuse, before any work, to write ``needed`` bytes to a disk with less free space."""
    free = free_bytes(folder)
    if free < needed:
        raise StoreError(
            f"Not enough disk space for {what}: they need {format_bytes(needed)} but the disk of {folder} has "
            f"{format_bytes(free)} free. Free some space there, or point ka2l at a larger disk (the Data folder on the Settings "
            f"page, or the KA2L_DATA_DIR environment variable), or probe a smaller pool or a smaller model.")


def _itemsize(dtype: str) -> int:
    if dtype not in ITEMSIZE:
        raise StoreError(f"Hidden-state dtype {dtype!r} is not known; use one of: {', '.join(ITEMSIZE)}.")
    return ITEMSIZE[dtype]


# -- the store ------------------------------------------------------------------------------------

class HiddenStates:
    """The hidden states of one run, (n, n_stored_layers, hidden): a per-layer folder or a legacy single
    .npy file. Use :meth:`create` or :meth:`open`; layer files are opened when first read."""

    def __init__(self, path: Path, layers: Sequence[int], n: int, hidden_size: int, dtype: str, mode: str,
                 meta: dict[str, Any], legacy: np.ndarray | None = None):
        self.path, self.mode, self.meta = Path(path), mode, meta
        self._layers = tuple(int(l) for l in layers)
        self._pos = {l: j for j, l in enumerate(self._layers)}
        self._n, self._hidden, self._dtype = int(n), int(hidden_size), np.dtype(dtype)
        self._legacy = legacy
        self._files: dict[int, np.ndarray] = {}

    # construction
    @classmethod
    def create(cls, folder: Path | str, n: int, layers: Sequence[int], hidden_size: int, meta: dict[str, Any] | None = None,
               dtype: str = "float16") -> "HiddenStates":
        """A new per-layer store (any earlier one in ``folder`` is replaced), open for writing. Files are
        sparse until written; ``meta.json`` is written last, so a store whose creation was cut short
        counts as missing (:meth:`exists`)."""
        layers = [int(l) for l in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise StoreError(f"A hidden-state store needs distinct layer indices >= 0, got {layers}.")
        if dtype not in DTYPES:
            raise StoreError(f"A hidden-state store holds {' or '.join(DTYPES)}, not {dtype!r}.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_FILE).unlink(missing_ok=True)
        for old in folder.glob("layer-*.npy"):
            old.unlink()
        store = cls(folder, layers, n, hidden_size, dtype, "r+", {})
        for j, l in enumerate(layers):
            store._files[j] = np.lib.format.open_memmap(layer_file(folder, l), mode="w+", dtype=dtype, shape=(int(n), int(hidden_size)))
        store.meta = {**(meta or {}), "format": FORMAT, "layers": layers, "dtype": dtype, "shape": [int(n), len(layers), int(hidden_size)]}
        tmp = folder / (META_FILE + ".partial")
        tmp.write_text(json.dumps(store.meta, indent=1))
        tmp.replace(folder / META_FILE)
        return store

    @classmethod
    def open(cls, path: Path | str, mode: str = "r") -> "HiddenStates":
        """Open a per-layer folder, or a legacy single (n, L+1, hidden) .npy file; ``mode`` 'r' or 'r+'."""
        if mode not in ("r", "r+"):
            raise StoreError(f"Hidden states open with mode 'r' (read) or 'r+' (read and write), not {mode!r}.")
        path = Path(path)
        if path.is_dir():
            try:
                meta = json.loads((path / META_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"Hidden-state folder {path} has no readable {META_FILE} ({exc}); its run was cut short while "
                                 f"creating it or the folder was damaged. Resume or re-run the run to recompute its states.") from exc
            n, _, hidden = meta["shape"]
            return cls(path, meta["layers"], n, hidden, meta["dtype"], mode, meta)
        if path.is_file():
            arr = np.load(path, mmap_mode=mode)
            if arr.ndim != 3:
                raise StoreError(f"Hidden-state file {path} has shape {arr.shape}; expected (questions, layers, hidden).")
            side = path.with_suffix(".json")
            meta = json.loads(side.read_text()) if side.is_file() else {}
            layers = meta.get("layers") or list(range(arr.shape[1]))  # Stage 1 stored every layer from 0; triage named its one
            if len(layers) != arr.shape[1]:
                layers = list(range(arr.shape[1]))
            return cls(path, layers, arr.shape[0], arr.shape[2], str(arr.dtype), mode, meta, legacy=arr)
        raise StoreError(f"Hidden states {path} are missing. They belong to a run whose data folder was moved or deleted; "
                         f"resume the run (its states are recomputed) or re-run it.")

    @staticmethod
    def exists(path: Path | str | None) -> bool:
        """Whether ``path`` holds a complete store: a legacy file, or a folder with its meta and every layer file."""
        if not path:
            return False
        path = Path(path)
        if path.is_file():
            return True
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            return False
        return all(layer_file(path, l).is_file() for l in meta.get("layers", []))

    # shape
    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers stored, in storage order (0 = the embeddings' output)."""
        return self._layers

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self._n, len(self._layers), self._hidden)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return 3

    @property
    def legacy(self) -> bool:
        """True for a single-file store made before per-layer storage."""
        return self._legacy is not None

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        kind = "single file" if self.legacy else "per-layer folder"
        return f"HiddenStates({str(self.path)!r}, {kind}, shape={self.shape}, layers={list(self._layers)})"

    # reading
    def layer(self, l: int) -> np.ndarray:
        """Model layer ``l``'s states, (n, hidden), memory-mapped: reads that layer's file alone."""
        if int(l) not in self._pos:
            stored = f"layers {self._layers[0]}..{self._layers[-1]}" if self._layers == tuple(range(self._layers[0], self._layers[-1] + 1)) \
                else f"layers {', '.join(map(str, self._layers))}"
            raise StoreError(f"Layer {l} is not stored in {self.path}; it holds {stored}. Choose a stored layer.")
        return self._at(self._pos[int(l)])

    def _at(self, j: int) -> np.ndarray:
        """The j-th stored layer, (n, hidden)."""
        if not -len(self._layers) <= j < len(self._layers):
            raise IndexError(f"index {j} is out of bounds for the {len(self._layers)} stored layers of {self.path}")
        j %= len(self._layers)
        if self._legacy is not None:
            return self._legacy[:, j]
        if j not in self._files:
            path = layer_file(self.path, self._layers[j])
            if not path.is_file():
                raise StoreError(f"Hidden-state file {path} (layer {self._layers[j]}) is missing. Resume the run to recompute its "
                                 f"states, or re-run it.")
            try:
                arr = np.load(path, mmap_mode=self.mode)
            except (OSError, ValueError) as exc:
                raise StoreError(f"Hidden-state file {path} (layer {self._layers[j]}) cannot be read ({exc}); the folder was "
                                 f"damaged. Start a new run of this pool and config (--no-resume).") from exc
            if arr.shape != (self._n, self._hidden):
                raise StoreError(f"Hidden-state file {path} has shape {arr.shape}, not {(self._n, self._hidden)} as {META_FILE} "
                                 f"says; the folder was damaged. Re-run the run.")
            self._files[j] = arr
        return self._files[j]

    def __getitem__(self, key: Any) -> np.ndarray:
        """Numpy indexing over (rows, stored layer, hidden); a single stored layer reads one file."""
        if self._legacy is not None:
            return self._legacy[key]
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > 3:
            raise IndexError("HiddenStates supports [rows], [rows, layer] and [rows, layer, features] indexing")
        rows, cols, rest = (key + (slice(None),) * 3)[:3]
        if isinstance(cols, (int, np.integer)):
            return self._at(int(cols))[rows, rest]
        js = range(len(self._layers))[cols] if isinstance(cols, slice) else [int(c) for c in np.asarray(cols).ravel()]
        if isinstance(rows, (int, np.integer)):
            return np.stack([self._at(j)[rows, rest] for j in js], axis=0)
        return np.stack([self._at(j)[rows, rest] for j in js], axis=1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self[:, :])
        return out if dtype is None else out.astype(dtype)

    # writing
    def write(self, rows: Sequence[int], states: np.ndarray) -> None:
        """Store ``states`` (len(rows), n_stored_layers, hidden) at pool rows ``rows``; :meth:`flush` makes it durable."""
        if self.mode != "r+":
            raise StoreError(f"Hidden states {self.path} were opened read-only; open them with mode='r+' to write.")
        states = np.asarray(states)
        want = (len(rows), len(self._layers), self._hidden)
        if states.shape != want:
            raise StoreError(f"Cannot write hidden states of shape {states.shape} to {self.path}: {len(rows)} rows need shape {want}.")
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self._n):
            raise StoreError(f"Rows {rows.min()}..{rows.max()} are outside the {self._n} rows of {self.path}.")
        if self._legacy is not None:
            self._legacy[rows] = states
            return
        for j in range(len(self._layers)):
            self._at(j)[rows] = states[:, j]

    def flush(self) -> None:
        if self._legacy is not None:
            if isinstance(self._legacy, np.memmap):
                self._legacy.flush()
            return
        for arr in self._files.values():
            if isinstance(arr, np.memmap):
                arr.flush()

    def close(self) -> None:
        """Flush and drop the open layer files (a later read opens them again)."""
        if self.mode == "r+":
            self.flush()
        self._files.clear()

    def __enter__(self) -> "HiddenStates":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def nbytes_on_disk(self) -> int:
        """Bytes the store's files hold (their apparent size, sparse parts included)."""
        if self._legacy is not None:
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("layer-*.npy"))
