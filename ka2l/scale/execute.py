"""Run one Ray Data pipeline over a run's work folder: read the input Parquet, map it through the actor
pools, write the result blocks as Parquet with Ray Data's checkpointing keyed on the question id, while
reporting progress and honouring cancel.

The pipeline runs in this (the calling) thread, so a Ctrl-C or a job's SIGTERM (turned into
KeyboardInterrupt by the CLI) stops Ray Data's executor, which tears its actors down. A watcher thread
counts the committed blocks, reports them through the injected Progress and, when the Progress raises
Cancelled (the job's Cancel), interrupts this thread the same way. A run killed outright leaves its
committed blocks; the next execution skips their questions (Ray's checkpoint filter) and Ray removes the
half-written block of the kill.
"""

from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..errors import Ka2lError, ProbeError
from ..progress import Progress
from .blocks import WorkDir

log = logging.getLogger(__name__)

ID_COLUMN = "question_id"
POLL_S = 0.5


class _Watcher(threading.Thread):
    """Reports the rows of newly committed blocks; stops the pipeline when the Progress cancels."""

    def __init__(self, work: WorkDir, progress: Progress, seen: set[str], note: str):
        super().__init__(name="ka2l-ray-progress", daemon=True)
        self.work, self.progress, self.seen, self.note = work, progress, set(seen), note
        self.new_rows, self.error = 0, None
        self._halt, self._lock, self.running = threading.Event(), threading.Lock(), True

    def poll(self) -> None:
        new = [b for b in self.work.committed() if b not in self.seen]
        rows = sum(self.work.block_rows(b) for b in new)
        self.seen |= set(new)
        self.new_rows += rows
        self.progress.advance(rows, f"{self.new_rows} questions written in {len(self.seen)} blocks ({self.note})")

    def run(self) -> None:
        while not self._halt.wait(POLL_S):
            try:
                self.poll()
            except BaseException as exc:  # noqa: BLE001 - Cancelled, or a failing progress: stop the pipeline with it
                self.error = exc
                with self._lock:
                    if self.running:
                        _thread.interrupt_main()
                return

    def stop(self) -> None:
        with self._lock:
            self.running = False
        self._halt.set()
        self.join()


def execute(ray: Any, work: WorkDir, build: Callable[[Any], Any], progress: Progress, note: str) -> int:
    """Run ``build(read_parquet(input))`` into ``work.output``; returns the questions this execution wrote."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    ctx = DataContext.get_current()
    saved = (ctx.checkpoint_config, ctx.enable_progress_bars)
    ctx.checkpoint_config = CheckpointConfig(id_column=ID_COLUMN, checkpoint_path=str(work.checkpoint),
                                             delete_checkpoint_on_success=False)  # the ingest removes the folder once stored
    ctx.enable_progress_bars = False
    work.output.mkdir(parents=True, exist_ok=True)
    watcher = _Watcher(work, progress, set(work.committed()), note)
    try:
        ds = build(ray.data.read_parquet(str(work.input)))
        watcher.start()
        try:
            try:
                ds.write_parquet(str(work.output))
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                raise _user_error(exc) from exc
            finally:
                watcher.stop()
        except KeyboardInterrupt:
            if watcher.error is not None:  # the watcher stopped the pipeline: its Cancelled (or its failure)
                raise watcher.error from None
            raise
        if watcher.error is None:
            watcher.poll()  # the last blocks
    finally:
        ctx.checkpoint_config, ctx.enable_progress_bars = saved
    if watcher.error is not None:
        raise watcher.error
    return watcher.new_rows


def _user_error(exc: BaseException) -> BaseException:
    """The ka2l error an actor raised (a model that cannot load, a bad score), unwrapped from Ray's
    exceptions; anything else as a ProbeError that keeps Ray's message."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, Ka2lError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return ProbeError(f"The Ray pipeline failed: {type(exc).__name__}: {str(exc)[:2000]}. The blocks written so far are kept; "
                      f"resume the run to continue, or run it with --executor local to see the error in this process.")
