"""How much disk a run's hidden states take, known before the model is loaded, and the refusal to start
on a disk that cannot hold them. The states themselves live in ``ka2l.store.hidden`` (a file per layer).

    n questions × (L + 1) layers × hidden size × 2 bytes (float16)
    e.g. 10M questions on a 32-layer, 4096-wide model: 10e6 × 33 × 4096 × 2 B = 2.7 TB
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelSpec, Stage1Config
from ..paths import arrays_dir
from ..store import queries as Q
from ..store.hidden import HiddenStates, check_free_space, describe_size, estimate_bytes, format_bytes, free_bytes, hidden_dir

log = logging.getLogger(__name__)


def run_hidden_path(run: dict[str, Any]) -> Path:
    """Where a run's hidden states are: the path it recorded (a per-layer folder, or the single .npy file
    of a run stored before per-layer storage), else the per-layer folder it will get."""
    return Path(run["hidden_path"]) if run["hidden_path"] else hidden_dir(run["id"])


def hidden_layers(n_layers: int, layer: int | None = None) -> list[int]:
    """The model layers a run stores: every one from the embeddings (0) to the last (Stage 1), or the probe's (triage)."""
    return list(range(n_layers + 1)) if layer is None else [int(layer)]


def model_dims(spec: ModelSpec) -> tuple[int, int] | None:
    """(decoder layers L, hidden size) from the model's config alone, no weights loaded; None when the
    config cannot be read here (loading the model then says why)."""
    from ..config import EMBEDDED_MODEL
    from ..models.llm import resolve_source

    try:
        if spec.name_or_path == EMBEDDED_MODEL:  # a converted copy's config, else the GGUF's (no one-off conversion here)
            from ..models import embedded as E
            from ..paths import models_dir

            copies = [d / E.LOCAL_NAME for d in (models_dir(), E.model_cache_dir(), E.project_models_dir())]
            done = next((c for c in copies if E.is_complete(c)), None)
            gguf = None if done else E.embedded_gguf()
            source, gguf = (str(done), None) if done else (str(gguf.parent), gguf.name)
        else:
            source, gguf = resolve_source(spec)
        quick = _dims_from_config_json(Path(source) / "config.json") if gguf is None else None
        if quick is not None:
            return quick
        from transformers import AutoConfig

        kw = {k: v for k, v in (("revision", spec.revision), ("gguf_file", gguf)) if v}
        cfg = AutoConfig.from_pretrained(source, local_files_only=True, **kw)  # a hub id: its cached config, never the network
        cfg = cfg if hasattr(cfg, "num_hidden_layers") else cfg.get_text_config()
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
    except Exception as exc:  # noqa: BLE001 - an unreadable config only postpones the check to after the load
        log.debug("no model config for %r before loading: %s", spec.name_or_path, exc)
        return None


def _dims_from_config_json(path: Path) -> tuple[int, int] | None:
    """(layers, hidden size) read straight from a model folder's config.json when it names them as most
    decoders do (a page can show the size without importing transformers); None otherwise."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int) and isinstance(c.get("hidden_size"), int):
            return c["num_hidden_layers"], c["hidden_size"]
    return None


@dataclass(frozen=True)
class HiddenSize:
    """What a run's hidden states take: the whole store, what is still to be written, the free disk."""

    n_questions: int
    n_layers: int  # stored layers (L + 1 for Stage 1)
    hidden_size: int
    total: int  # bytes
    todo: int  # bytes of the rows not yet stored
    free: int  # bytes free on the data disk
    folder: str

    def describe(self) -> str:
        left = f", {format_bytes(self.todo)} of it still to write" if self.todo != self.total else ""
        return (f"Hidden states: {describe_size(self.n_questions, self.n_layers, self.hidden_size)}{left}, one file per layer "
                f"under {self.folder} ({format_bytes(self.free)} free there)")

    @property
    def fits(self) -> bool:
        return self.todo <= self.free


def hidden_size_of(db, run_id: int | None, n_questions: int, n_layers: int, hidden_size: int, layer: int | None = None) -> HiddenSize:
    """The size of a run's store (``run_id`` None: a run not started yet; all of it is still to write)."""
    n_stored = len(hidden_layers(n_layers, layer))
    total = estimate_bytes(n_questions, n_stored, hidden_size)
    todo = total
    if run_id is not None and HiddenStates.exists(run_hidden_path(Q.get_run(db, run_id))):
        todo = estimate_bytes(max(n_questions - len(Q.hidden_done_ids(db, run_id)), 0), n_stored, hidden_size)
    return HiddenSize(n_questions, n_stored, hidden_size, total, todo, free_bytes(arrays_dir()), str(arrays_dir()))


def check_hidden_space(db, run_id: int, n_questions: int, n_layers: int, hidden_size: int, layer: int | None = None) -> HiddenSize:
    """Log the size of this run's hidden states and refuse (StoreError) when the data disk has less free
    space than the rows still to be written need."""
    size = hidden_size_of(db, run_id, n_questions, n_layers, hidden_size, layer)
    log.info("run %d: %s", run_id, size.describe())
    check_free_space(arrays_dir(), size.todo, what=f"the hidden states of run {run_id} "
                     f"({describe_size(n_questions, size.n_layers, hidden_size)})")
    return size


def stage1_hidden_size(pool: int | str, cfg: Stage1Config) -> HiddenSize | None:
    """What a Stage 1 run of ``cfg`` on ``pool`` will store, from the model's config (no weights loaded);
    None when that config cannot be read before loading."""
    from ..store.db import connect

    dims = model_dims(cfg.model)
    if dims is None:
        return None
    with connect() as db:
        n = Q.get_pool(db, pool)["n_questions"]
    return hidden_size_of(None, None, n, *dims)
