"""Shared helpers for tests that run Stage 1 on the memorising tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ka2l.config import ModelSpec, ProbeConfig, SamplingConfig, Stage1Config
from ka2l.progress import NullProgress
from ka2l.pools.reader import PoolData, QuestionRow
from ka2l.store import queries as Q
from ka2l.store.db import connect

N_KNOWN = 40  # the first N_KNOWN capitals questions are memorised by the ``memo_model`` fixture


def stage1_cfg(model: Path, **probe) -> Stage1Config:
    return Stage1Config(
        model=ModelSpec(name_or_path=str(model), device="cpu"),
        sampling=SamplingConfig(k=6, max_new_tokens=8, batch_size=8, hidden_batch_size=8),
        probe=ProbeConfig(kind=probe.pop("kind", "mlp"), epochs=probe.pop("epochs", 40), bootstrap=100, **probe),
    )


def import_pool(capitals, name="caps", rows=None) -> int:
    rows = rows if rows is not None else capitals
    pool = PoolData(name=name, source="test", n_read=len(rows),
                    rows=[QuestionRow(ext_id=str(i), question=q, answers=tuple(a)) for i, (q, a) in enumerate(rows)])
    with connect() as db:
        return Q.insert_pool(db, pool)


def open_page(page: str, **query: str):
    """Run the app once (its router and sidebar), switch to app_pages/<page>.py with ``query`` in its URL
    and run it; no exception allowed."""
    from streamlit.testing.v1 import AppTest

    from ka2l.paths import PROJECT_ROOT

    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=90)
    at.run()
    at.switch_page(f"app_pages/{page}.py")
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


@contextmanager
def data_dir(folder: Path) -> Iterator[Path]:
    """Point ka2l at ``folder`` while module-scoped fixtures build their store, then restore the setting
    exactly (unset stays unset; monkeypatch cannot serve a module-scoped fixture)."""
    old = os.environ.get("KA2L_DATA_DIR")
    os.environ["KA2L_DATA_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("KA2L_DATA_DIR", None)
        else:
            os.environ["KA2L_DATA_DIR"] = old


def wait_for(pred, timeout: float = 180.0, every: float = 0.2) -> bool:
    """Poll ``pred`` (refreshing the job queue each time, so finished workers hand over) until it holds."""
    import time

    from ka2l import jobs

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs.refresh()
        if pred():
            return True
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting")


def private_copy(folder: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a module's store for one test, with ka2l pointed at it: its writes stay its own."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(folder, copy)
    monkeypatch.setenv("KA2L_DATA_DIR", str(copy))
    return copy


def require_label_studio() -> None:
    """Skip a test that needs the Label Studio of .venv-ls when it is not installed; fail instead under
    KA2L_REQUIRE_LABEL_STUDIO=1 (CI), where skipping would hide a broken setup."""
    import pytest

    from ka2l.annotate import server

    if not server.installed():
        message = f"Label Studio is not installed in {server.venv_dir()}: run `make setup`"
        if os.environ.get("KA2L_REQUIRE_LABEL_STUDIO") == "1":
            pytest.fail(message + " (KA2L_REQUIRE_LABEL_STUDIO=1 requires it)")
        pytest.skip(message)


def select_caps(at):
    """Make pool 'caps' the active one (the sidebar's selectbox) and rerun an AppTest."""
    with connect() as db:
        caps = Q.get_pool(db, "caps")["id"]
    at.sidebar.selectbox[0].set_value(caps).run()
    assert not at.exception, at.exception
    return at


class Recorder(NullProgress):
    """A progress that records each stage's (done, total) as it starts."""

    def __init__(self):
        self.stages = {}

    def stage(self, name, total=None, done=0):
        self.stages[name] = (done, total)


class CancelAfter(Recorder):
    """Cancels once ``n`` items of ``stage`` were reported (after they were stored)."""

    def __init__(self, stage: str, n: int):
        super().__init__()
        self.stage_name, self.n, self.current, self.seen = stage, n, None, 0

    def stage(self, name, total=None, done=0):
        super().stage(name, total, done)
        self.current = name

    def advance(self, n=1, message=None):
        from ka2l.errors import Cancelled

        if self.current == self.stage_name:
            self.seen += n
            if self.seen >= self.n:
                raise Cancelled("test cancel")
