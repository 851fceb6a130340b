"""The job cards (ka2l/ui/jobs_panel.py) through AppTest, over real jobs run by real worker processes
on the memorising tiny model: whole-job progress with its phases, start time and duration,
parameters, a link to the results, a readable log, and a second launch of the same work."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from ka2l import jobs
from ka2l.config import to_dict
from ka2l.paths import PROJECT_ROOT
from helpers import import_pool, stage1_cfg

APP = str(PROJECT_ROOT / "app.py")


def wait_for(pred, timeout=180.0, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs.refresh()
        if pred():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting")


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.success]
    parts += [e.label for e in at.expander] + [c.value for c in at.code]
    return "\n".join(parts)


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def test_launching_the_same_stage1_twice_says_it_is_already_queued(memo_model, capitals):
    import_pool(capitals)
    at = open_page("probe")
    next(t for t in at.text_input if t.label.startswith("Model")).set_value(str(memo_model))
    next(n for n in at.number_input if n.label == "Samples k").set_value(50)  # slow enough to be running at the second click
    next(n for n in at.number_input if n.label == "Max new tokens").set_value(64)
    next(b for b in at.button if b.label == "Launch Stage 1").click().run()
    first = jobs.list_jobs()[0]["id"]
    try:
        assert any("submitted" in s.value for s in at.success)
        next(b for b in at.button if b.label == "Launch Stage 1").click().run()
        assert not at.exception, at.exception
        assert any(f"already job {first}" in i.value for i in at.info), [i.value for i in at.info]
        assert [j["id"] for j in jobs.list_jobs()] == [first], "nothing was queued twice"
        assert any(link.proto.label == f"Follow job {first} on the Jobs page" for link in at.get("page_link"))
    finally:
        jobs.cancel(first, wait=True)
