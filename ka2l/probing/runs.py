"""A Stage 1 or triage run's row and its hidden-state store: the hash that identifies a resumable run, starting
or resuming one (refusing another dtype or sampling backend than it began with), the package versions it
records, its status and stage timings while it runs, and the per-run hidden-state store."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from .. import __version__
from ..config import Stage1Config, config_hash, from_dict, to_dict
from ..errors import Cancelled, ConfigError, ProbeError
from ..progress import Progress
from ..store import queries as Q
from ..store.hidden import HiddenStates, hidden_dir
from .storage import check_hidden_space, hidden_layers, run_hidden_path

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"ka2l": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_hash(cfg: Any) -> str:
    """The hash that identifies a resumable run. Like the device, the dtype setting is left out: a run
    is tied to the dtype its model actually ran in (``versions['dtype']``), so ``--dtype bfloat16``
    finds the run that 'auto' resolved to bfloat16 on a GPU."""
    if isinstance(cfg, Stage1Config):
        cfg = replace(cfg, model=replace(cfg.model, dtype="auto"))
    return config_hash(cfg)


def start_run(db, pool_id: int, kind: str, cfg: Any, model: str, resume: bool, dtype: str) -> tuple[int, str]:
    """(run id, 'new' | 'resumed' | 'done'): a matching finished run is reused, an unfinished one resumed,
    only if it was computed in ``dtype`` (the torch dtype the model runs in now): one run never holds
    hidden states and samples of two precisions. A matching run in another dtype is refused."""
    h = run_hash(cfg)
    if resume:
        runs = Q.find_matching_runs(db, pool_id, kind, h)
        same = [r for r in runs if r["versions"].get("dtype") in (None, dtype)]  # None: made before the dtype was recorded
        if runs and not same:
            raise ConfigError(_dtype_conflict(runs[0], dtype, kind, cfg))
        row = same[0] if same else None
        if row is not None:
            check_same_backend(row, cfg)
        if row is not None and row["status"] == "done":
            return int(row["id"]), "done"
        if row is not None:
            Q.update_run(db, row["id"], status="running", error=None, versions=_resumed_versions(row["versions"], dtype))
            return int(row["id"]), "resumed"
    return Q.create_run(db, pool_id, kind, to_dict(cfg), h, model, {**versions(), "dtype": dtype}), "new"


def check_same_backend(row: dict[str, Any], cfg: Any) -> None:
    """Refuse to continue run ``row`` under another sampling backend than the one it started with: one run's
    answers (and so its SE labels and the probes trained on them) come from one engine. Hidden states are
    always the HF forward pass. Any code that resumes a stored run by its id calls this."""
    if not isinstance(cfg, Stage1Config) or row["kind"] != "stage1":
        return
    stored = from_dict(Stage1Config, row["config"]).sampling.backend
    if stored != cfg.sampling.backend:
        raise ConfigError(f"Run {row['id']} ({row['status']}) drew its answers with the {stored} backend; it cannot be resumed with "
                          f"--backend {cfg.sampling.backend}: one run's answers, SE labels and probes come from one engine. "
                          f"Pass --backend {stored} to continue run {row['id']}, or --no-resume to start a new run with "
                          f"{cfg.sampling.backend}.")


def _resumed_versions(stored: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A resumed run's record: its dtype (set now for runs made before it was recorded), and the package
    versions of each resume that ran other versions than the run started with."""
    out = {**stored, "dtype": stored.get("dtype") or dtype}
    now = versions()
    if any(stored.get(k) != v for k, v in now.items()) and now not in out.get("resumed_with", []):
        out["resumed_with"] = [*out.get("resumed_with", []), now]
    return out


def _dtype_conflict(row: dict[str, Any], dtype: str, kind: str, cfg: Any) -> str:
    old, verb = row["versions"]["dtype"], "reuse" if row["status"] == "done" else "resume"
    if kind == "stage1":
        auto = " ('auto' means bfloat16 on CUDA GPUs that support it, float32 elsewhere)" if cfg.model.dtype == "auto" else ""
        return (f"Run {row['id']} ({row['status']}) of this pool and config computed its hidden states and answers in {old}, "
                f"but the model would run in {dtype} here{auto}. One run must not mix {old} and {dtype} results. "
                f"On the command line pass --dtype {old} to {verb} run {row['id']}, or --no-resume to start a new run in {dtype}; "
                f"in the app, set the device in Settings back to the one run {row['id']} used.")
    return (f"Triage run {row['id']} ({row['status']}) of this pool and probe computed its hidden states in {old}, but they "
            f"would now be computed in {dtype}. On the command line pass --no-resume to start a new triage run in {dtype}; "
            f"in the app, set the device in Settings back to the one that run used.")


class StageTimer:
    """Adds a stage's wall time to the run row when the block ends (also on interruption)."""

    def __init__(self, db, run_id: int, stage: str):
        self.db, self.run_id, self.stage, self.n = db, run_id, stage, 0

    def __enter__(self) -> "StageTimer":
        self.t0 = time.perf_counter()
        Q.update_run(self.db, self.run_id, stage=self.stage)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.n:
            Q.add_timing(self.db, self.run_id, self.stage, time.perf_counter() - self.t0, self.n)


@contextmanager
def run_status(db, run_id: int, progress: Progress) -> Iterator[None]:
    """Mark the run done when the block completes, interrupted on cancel / Ctrl-C, failed (with the
    error) otherwise. A run killed outright stays 'running' and is resumed by the next call."""
    try:
        yield
    except (Cancelled, KeyboardInterrupt):
        Q.update_run(db, run_id, status="interrupted")
        raise
    except Exception as exc:
        Q.update_run(db, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        progress.close()
    Q.update_run(db, run_id, status="done", stage="done")


def forget_lost_hidden_states(db, run_id: int) -> None:
    """Rows marked done whose store is gone or incomplete (a folder, its meta or a layer file deleted)
    would be read back as zeros: clear the marks so the states are recomputed (answers and scores do
    not depend on them and are kept)."""
    path = run_hidden_path(Q.get_run(db, run_id))
    if not HiddenStates.exists(path) and Q.hidden_done_ids(db, run_id):
        log.warning("run %d: hidden states %s are missing or incomplete; they will be recomputed", run_id, path)
        Q.clear_hidden_done(db, run_id)


def open_run_hidden(db, run_id: int, n_questions: int, n_layers: int, hidden_size: int, model: str,
                    layer: int | None = None) -> HiddenStates:
    """The run's hidden-state store, open for writing: the stored one when it is complete and fits (a
    resumed run made before per-layer storage keeps writing its single file), else a new per-layer
    folder, recorded on the run. Refuses a disk with too little free space before anything is written."""
    run = Q.get_run(db, run_id)
    path, layers = run_hidden_path(run), hidden_layers(n_layers, layer)
    shape = (n_questions, len(layers), hidden_size)
    check_hidden_space(db, run_id, n_questions, n_layers, hidden_size, layer)
    if run["hidden_path"] and HiddenStates.exists(path):
        store = HiddenStates.open(path, mode="r+")
        if store.shape != shape or list(store.layers) != layers:
            raise ProbeError(f"Stored hidden states {store.shape} (layers {list(store.layers)}) do not match the model/pool {shape} "
                             f"(layers {layers}); start a new run (--no-resume).")
        return store
    Q.clear_hidden_done(db, run_id)  # nothing of an incomplete store is kept
    folder = hidden_dir(run_id)
    extra = {"layer0": "embeddings"} if layer is None else {}
    store = HiddenStates.create(folder, n_questions, layers, hidden_size,
                                meta={"run_id": run_id, "model": model, "position": "last prompt token", **extra})
    Q.update_run(db, run_id, hidden_path=str(folder), n_layers=n_layers, hidden_size=hidden_size)
    return store
