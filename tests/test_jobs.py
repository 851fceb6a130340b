"""Background jobs: real worker processes, queue, cancel, dead-worker detection and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ka2l import jobs
from ka2l.views import jobs as job_views
from ka2l.config import to_dict
from ka2l.errors import ConfigError
from ka2l.paths import PROJECT_ROOT
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import import_pool, stage1_cfg, wait_for




def job_config(memo_model, batch_size=8):
    cfg = to_dict(stage1_cfg(memo_model, kind="logistic"))
    cfg["sampling"]["batch_size"] = batch_size
    return {"pool": "caps", "stage1": cfg}


def answered(run_pool="caps"):
    with connect() as db:
        runs = Q.list_runs(db)
        return len(Q.answered_ids(db, runs[0]["id"])) if runs else 0


def test_job_runs_in_its_own_process_and_records_progress(memo_model, capitals):
    import_pool(capitals)
    job_id = jobs.submit("stage1", job_config(memo_model))
    job = jobs.get(job_id)
    assert job["status"] in ("starting", "running") and job["pid"] != os.getpid()
    wait_for(lambda: jobs.get(job_id)["status"] == "done")
    job = jobs.get(job_id)
    assert job["result"]["run_id"] >= 1 and job["stage"] == "threshold robustness" and job["done"] == job["total"]
    with connect() as db:
        assert Q.get_run(db, job["result"]["run_id"])["status"] == "done"
    assert "stage answers" in job_views.tail(job_id, 200)
    # a second client (another process) sees the same state
    out = subprocess.run([sys.executable, "-m", "ka2l", "jobs"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.stdout.split()[:3] == [str(job_id), "stage1", "done"], out.stdout


def test_cancel_really_ends_the_process_and_the_run_resumes(memo_model, capitals):
    import_pool(capitals)
    job_id = jobs.submit("stage1", job_config(memo_model, batch_size=2))
    wait_for(lambda: answered() >= 4)
    pid = jobs.get(job_id)["pid"]
    jobs.cancel(job_id, wait=True)
    job = jobs.get(job_id)
    assert job["status"] == "cancelled"
    assert _gone(pid), "the worker process must have ended"
    with connect() as db:
        run = Q.list_runs(db)[0]
        assert run["status"] == "interrupted"
        kept = len(Q.answered_ids(db, run["id"]))
    again = jobs.resume(job_id)
    wait_for(lambda: jobs.get(again)["status"] == "done")
    with connect() as db:
        runs = Q.list_runs(db)
        assert len(runs) == 1 and runs[0]["status"] == "done"
        assert runs[0]["timings"]["answers"]["n"] >= 80 - kept


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped (it has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_killed_worker_is_detected_as_failed_and_resumes(memo_model, capitals):
    import_pool(capitals)
    job_id = jobs.submit("stage1", job_config(memo_model, batch_size=2))
    wait_for(lambda: answered() >= 4)
    os.killpg(jobs.get(job_id)["pid"], signal.SIGKILL)
    wait_for(lambda: jobs.get(job_id)["status"] == "failed", timeout=30)
    assert "ended without finishing" in jobs.get(job_id)["error"]
    again = jobs.resume(job_id)
    wait_for(lambda: jobs.get(again)["status"] == "done")
    with connect() as db:
        assert [r["status"] for r in Q.list_runs(db)] == ["done"]


def test_jobs_queue_one_at_a_time(memo_model, capitals):
    import_pool(capitals)
    first = jobs.submit("stage1", job_config(memo_model))
    cfg = job_config(memo_model)
    cfg["stage1"]["sampling"]["k"] = 4
    second = jobs.submit("stage1", cfg)
    assert jobs.get(second)["status"] == "queued"
    third = jobs.submit("stage1", {**cfg, "stage1": {**cfg["stage1"], "sampling": {**cfg["stage1"]["sampling"], "k": 5}}})
    jobs.cancel(third)
    assert jobs.get(third)["status"] == "cancelled"
    wait_for(lambda: jobs.get(second)["status"] == "done", timeout=300)
    assert jobs.get(first)["status"] == "done"
    assert jobs.get(first)["finished_at"] <= jobs.get(second)["started_at"]


def test_bad_job_config_fails_in_the_caller():
    with pytest.raises(ConfigError, match="Unknown job kind"):
        jobs.submit("dance", {})
    with pytest.raises(ConfigError, match="k must be >= 2"):
        jobs.submit("stage1", {"pool": "x", "stage1": {"sampling": {"k": 1}}})
    assert jobs.list_jobs() == []


def test_cli_background_submits_once(memo_model, capitals, tmp_path):
    import json as _json

    import_pool(capitals)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(_json.dumps(job_config(memo_model)["stage1"]))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "ka2l", "probe", "--pool", "caps", "--config", str(cfg), "--background"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert "submitted job 1" in first.stdout, first.stderr
    assert "already job 1" in second.stdout, second.stderr
    wait_for(lambda: jobs.get(1)["status"] == "done")
    assert len(jobs.list_jobs()) == 1


# -- whole-job progress ------------------------------------------------------------------------------

def _rows(job):
    return [(p["name"], r["name"], r["done"], r["total"], r["status"]) for p in job["phases"] for r in p["rows"]]


def test_a_job_reports_its_whole_progress_with_every_phase_under_it(memo_model, capitals):
    import_pool(capitals)  # gold answers, mlp probe: both baselines train logistic probes, one stage name twice
    job_id = jobs.submit("stage1", {**job_config(memo_model), "stage1": to_dict(stage1_cfg(memo_model, kind="mlp", epochs=5))})
    seen = []  # (overall fraction, {row: done}) as a polling page sees them

    def finished():
        job = jobs.get(job_id)
        seen.append((job["fraction"], {name: done for _, name, done, _, _ in _rows(job)}))
        return job["status"] in ("done", "failed")

    wait_for(finished, every=0.05)
    job = jobs.get(job_id)
    assert job["status"] == "done", job["error"]
    assert [p["name"] for p in job["phases"]] == ["hidden states", "answers", "semantic entropy", "probes", "baselines", "threshold robustness"]
    assert all(p["status"] == "done" for p in job["phases"]) and job["fraction"] == 1.0
    rows = _rows(job)
    assert [r[1] for r in rows if r[0] == "baselines"] == ["SE probe (logistic)", "accuracy probe (logistic)"]
    assert all(done == total and status == "done" for _, _, done, total, status in rows), rows
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions), "the whole job's progress never goes back"
    assert len(set(fractions)) >= 3, "it moves during the job, not only at its end"
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert all(after.get(name, 0) >= done for name, done in before.items()), (before, after)
    view = job_views.progress_view(job)
    assert view["eta_s"] is None and view["elapsed_s"] > 0 and view["fraction"] == 1.0


def test_the_eta_is_for_the_whole_job_not_the_current_phase():
    from ka2l.progress import PhaseSpec, PhaseTracker, overall_eta

    now = [0.0]
    tracker = PhaseTracker([PhaseSpec("load", 1.0), PhaseSpec("work", 3.0)], clock=lambda: now[0])
    tracker.stage("load", total=10)
    now[0] = 10.0
    tracker.advance(10)  # the first phase is over after 10 s: a quarter of the job
    assert tracker.fraction == 0.25
    assert overall_eta(tracker.fraction, tracker.credited, now[0] - tracker.started_at) == 30.0  # not 0 s "left"
    tracker.stage("work", total=4)
    now[0] = 25.0
    tracker.advance(2)  # half the second phase: (1 + 3 * 0.5) / 4 done
    assert tracker.fraction == 0.625
    assert overall_eta(tracker.fraction, tracker.credited, now[0]) == pytest.approx(15.0)


def test_work_stored_before_a_resume_does_not_speed_up_the_eta():
    from ka2l.progress import PhaseSpec, PhaseTracker, overall_eta

    now = [0.0]
    tracker = PhaseTracker([PhaseSpec("hidden states", 1.0), PhaseSpec("answers", 1.0)], clock=lambda: now[0])
    tracker.stage("answers", total=10, done=6)  # hidden states and 6 answers were stored by an earlier run
    assert [p["status"] for p in tracker.phases] == ["skipped", "running"]
    assert tracker.fraction == pytest.approx(0.8) and tracker.credited == pytest.approx(0.8)
    now[0] = 20.0
    tracker.advance(2)  # 2 answers in 20 s, 2 left
    assert overall_eta(tracker.fraction, tracker.credited, now[0]) == pytest.approx(20.0)


def test_a_stage_that_runs_again_gets_its_own_row_and_no_counter_goes_back():
    from ka2l.progress import PhaseSpec, PhaseTracker

    tracker = PhaseTracker([PhaseSpec("probes", 1.0, match="probes (")])
    tracker.stage("probes (logistic)", total=30)
    tracker.advance(27)
    before = tracker.fraction
    tracker.advance(3)
    tracker.stage("probes (logistic)", total=30)  # not in the plan a second time
    tracker.advance(22)
    rows = [(r["name"], r["done"]) for p in tracker.phases for r in p["rows"]]
    assert rows == [("probes (logistic)", 30), ("probes (logistic) (2)", 22)]
    assert tracker.fraction >= before


def test_the_job_row_shows_the_plan_while_the_model_loads_and_the_rate_of_the_running_phase():
    from ka2l.progress import PhaseSpec

    with connect() as db:
        job_id = int(db["jobs"].insert({"kind": "stage1", "config": "{}", "status": "running", "created_at": "2025-01-01T00:00:00+00:00",
                                        "started_at": "2025-01-01T00:00:00+00:00"}).last_pk)
    now = [1000.0]
    progress = jobs.JobProgress(job_id, [PhaseSpec("hidden states", 1.0), PhaseSpec("answers", 9.0, note="reports after every batch of 16 questions")],
                                clock=lambda: now[0])
    job = jobs.get(job_id)
    assert [p["name"] for p in job["phases"]] == ["hidden states", "answers"] and job["fraction"] == 0
    progress.stage("hidden states", total=10)
    now[0] += 10
    progress.advance(10)
    progress.stage("answers", total=10)
    now[0] += 30
    progress.advance(0, "sampling the first batch")  # a note between batches is written at once
    job = jobs.get(job_id)
    assert job["message"] == "sampling the first batch"
    view = job_views.progress_view({**job, "status": "running"}, clock=lambda: now[0])
    answers = view["phases"][1]
    assert answers["rows"][0]["elapsed_s"] == 30 and answers["note"].startswith("reports after every batch")
    assert view["fraction"] == pytest.approx(0.1) and view["eta_s"] == pytest.approx(40 * 0.9 / 0.1)


# -- one job per piece of work -------------------------------------------------------------------------

def test_the_same_job_is_not_queued_twice_and_the_caller_learns_which_it_is(memo_model, capitals):
    import_pool(capitals)
    config = job_config(memo_model, batch_size=2)
    first = jobs.submit("stage1", config)
    pool_id = jobs.get(first)["config"]["pool"]
    with connect() as db:
        pool_id = Q.get_pool(db, pool_id)["id"]
    same = {**config, "pool": str(pool_id), "stage1": {**config["stage1"], "model": {**config["stage1"]["model"], "device": "auto"}}}
    with pytest.raises(jobs.JobPending, match=f"already job {first}") as raised:
        jobs.submit("stage1", same)  # the pool by id, another device: the same run
    assert raised.value.job_id == first and "Jobs page" in str(raised.value)
    other = {**config, "stage1": {**config["stage1"], "sampling": {**config["stage1"]["sampling"], "k": 3}}}
    second = jobs.submit("stage1", other)  # different work is queued behind it
    with pytest.raises(jobs.JobPending, match=f"already job {second} \\(queued\\)"):
        jobs.submit("stage1", other)
    jobs.cancel(second)
    jobs.cancel(first, wait=True)
    assert len(jobs.list_jobs()) == 2
    again = jobs.resume(first)  # once it has stopped, the same work may be queued again
    assert again not in (first, second)
    jobs.cancel(again, wait=True)


# -- the log as a person reads it ------------------------------------------------------------------

def test_the_log_tail_keeps_only_the_last_drawing_of_each_progress_bar(tmp_path):
    from tqdm import tqdm

    path = jobs.log_path(7)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write("INFO stage hidden states: 0/80\n")
        for _ in tqdm(range(272), desc="Loading weights", file=f, mininterval=0):
            pass
        f.write("\nINFO stage answers: 0/80\n")
    assert b"\r" in path.read_bytes()
    lines = job_views.tail(7, 12).splitlines()
    assert lines[0] == "INFO stage hidden states: 0/80" and lines[-1] == "INFO stage answers: 0/80"
    assert len(lines) == 3 and lines[1].startswith("Loading weights: 100%") and "272/272" in lines[1]


def test_cancelling_a_job_that_is_still_starting_ends_it_at_once(memo_model, capitals):
    import_pool(capitals)
    job_id = jobs.submit("stage1", job_config(memo_model))
    assert jobs.get(job_id)["status"] == "starting"  # the worker is still importing
    jobs.cancel(job_id, wait=True)
    assert jobs.get(job_id)["status"] == "cancelled", "not 'starting' for another 30 s"


def test_a_label_studio_job_runs_beside_a_model_job_not_behind_it(memo_model, capitals):
    """Push and pull need no model: they run in their own lane while Stage 1 runs, and a second model
    job still waits. With no Label Studio connection stored, the pull ends at once with the message
    saying how to connect (never a traceback, never 'queued' until Stage 1 is done)."""
    import_pool(capitals)
    model_job = jobs.submit("stage1", job_config(memo_model))
    cfg = job_config(memo_model)
    cfg["stage1"]["sampling"]["k"] = 4
    waiting = jobs.submit("stage1", cfg)
    pull = jobs.submit("pull", {"pool": "caps", "pull": {}})
    assert wait_for(lambda: jobs.get(pull)["status"] in ("done", "failed", "cancelled"), timeout=120)
    assert jobs.get(model_job)["status"] in jobs.ACTIVE, "the pull should have finished while Stage 1 still ran"
    assert jobs.get(waiting)["status"] == "queued"
    row = jobs.get(pull)
    assert row["status"] == "failed" and "Label Studio" in row["error"], row["error"]
    assert "Traceback" not in row["error"]
    jobs.cancel(waiting)
    jobs.cancel(model_job, wait=True)


def test_a_decoder_jobs_eta_never_exceeds_its_time_budget():
    """Early in a budgeted decoder job the measured rate extrapolates to an hour ("about 59 min left" on a
    5-min budget, issue 11 item 3); the job ends by its budget, so the ETA says at most what is left of it."""
    job = {"kind": "decoder", "config": {"decoder": {"max_minutes": 5}}, "status": "running", "started_at": "2026-01-01T00:00:00+00:00",
           "finished_at": None, "fraction": 0.006, "credited": 0.0, "phases": []}
    start = jobs.timestamp(job["started_at"])
    job["progress_started_at"] = start
    view = job_views.progress_view(job, clock=lambda: start + 22.0)
    assert view["eta_s"] == pytest.approx(300 - 22.0)
    unbounded = job_views.progress_view({**job, "config": {"decoder": {"max_minutes": 0}}}, clock=lambda: start + 22.0)
    assert unbounded["eta_s"] > 3000  # without a budget the rate's extrapolation stands


@pytest.mark.parametrize("stopped_in, fresh_after", [("tuned answers", False), ("base answers", False), ("preparing", True)])
def test_resuming_a_fresh_evaluation_keeps_the_answers_it_already_gave(monkeypatch, stopped_in, fresh_after):
    """'Answer again (fresh)' clears before the first answer phase: a resume after that keeps what the stopped
    job answered (fresh off); one stopped before it still clears."""
    cfg = {"evaluate": {"finetune_id": 7, "models": ["base", "tuned"], "fresh": True}}
    with connect() as db:
        job_id = int(db["jobs"].insert({"kind": "evaluate", "config": json.dumps(cfg), "status": "cancelled", "stage": stopped_in,
                                        "created_at": "2026-12-05T00:00:00", "updated_at": "2026-12-05T00:00:00"}).last_pk)
    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda kind, config: submitted.append((kind, config)) or 99)
    assert jobs.resume(job_id) == 99
    ((kind, config),) = submitted
    assert kind == "evaluate" and config["evaluate"]["fresh"] is fresh_after
    assert {k: v for k, v in config["evaluate"].items() if k != "fresh"} == {"finetune_id": 7, "models": ["base", "tuned"]}
    assert jobs.get(job_id)["config"]["evaluate"]["fresh"] is True  # the stopped job's own row is not rewritten
