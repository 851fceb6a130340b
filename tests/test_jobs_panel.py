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
from helpers import import_pool, open_page, stage1_cfg, wait_for

APP = str(PROJECT_ROOT / "app.py")






def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.success]
    parts += [e.label for e in at.expander] + [c.value for c in at.code]
    return "\n".join(parts)


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


@pytest.fixture
def slow_config(memo_model):
    """Stage 1 that spends several seconds in its answers phase (one question per batch, many samples)."""
    cfg = to_dict(stage1_cfg(memo_model, kind="logistic"))
    cfg["sampling"].update(batch_size=1, k=40, max_new_tokens=48)
    return {"pool": "caps", "stage1": cfg}


def test_a_running_job_card_shows_the_whole_job_its_phases_start_and_parameters(capitals, slow_config):
    import_pool(capitals)
    job_id = jobs.submit("stage1", slow_config)
    try:
        wait_for(lambda: jobs.get(job_id)["stage"] == "answers" and jobs.get(job_id)["done"] >= 1)
        at = open_page("jobs")
        bar = progress_texts(at)
        assert len(bar) == 1 and bar[0].startswith("Whole job: ") and "left" in bar[0], bar
        shown = texts(at)
        assert f"Job {job_id} · stage1 · pool caps" in shown
        assert "Started " in shown and "running for " in shown
        phases = next(m.value for m in at.markdown if "hidden states" in m.value)
        assert "hidden states · 80/80" in phases and "semantic entropy" in phases and "threshold robustness" in phases
        answers = next(line for line in phases.splitlines() if "answers" in line)
        assert "/80" in answers
        if jobs.get(job_id)["stage"] == "answers":  # the note shows while its phase runs (it may have ended on a fast machine)
            assert "reports after every batch of 1 questions" in answers
        params = next(e for e in at.expander if e.label == "Parameters")
        listed = "\n".join(m.value for m in params.markdown)
        assert "pool: `caps`" in listed and "k: `40`" in listed and "probe: `logistic`" in listed
    finally:
        jobs.cancel(job_id, wait=True)


def test_a_finished_job_card_links_to_its_results_and_shows_how_long_it_took(memo_model, capitals):
    import_pool(capitals)
    job_id = jobs.submit("stage1", {"pool": "caps", "stage1": to_dict(stage1_cfg(memo_model, kind="logistic"))})
    wait_for(lambda: jobs.get(job_id)["status"] in ("done", "failed"))
    assert jobs.get(job_id)["status"] == "done", jobs.get(job_id)["error"]
    at = open_page("jobs")
    shown = texts(at)
    assert "Done: run 1." in shown and " took " in shown and "ended " in shown
    assert any(e.label == "Phases (100% done)" for e in at.expander)
    log = next(c.value for c in at.code if "stage answers" in c.value)
    assert "\r" not in log
    opener = next(b for b in at.button if b.label == "Open run 1 in Scores")
    opener.click().run()
    assert not at.exception, at.exception
    assert at.session_state["ka2l.run_id"] == 1
    assert any(s.label == "Stage 1 run" and s.value == 1 for s in at.selectbox), "the Scores page, with the job's run chosen"


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
