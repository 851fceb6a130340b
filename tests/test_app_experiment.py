"""The Experiment page through Streamlit's AppTest over a real store: a real Stage 1 run of the memorising
tiny model and an experiment whose cells are stored as the experiment stores them. Guidance without a run,
the settings refusing bad input, Launch queueing the form's job once, and the report with RQ1-RQ3."""

from __future__ import annotations

import pytest

from ka2l import jobs
from ka2l.finetune.experiment_report import build_report
from ka2l.probing.stage1 import run_stage1
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import N_KNOWN, data_dir, import_pool, open_page, private_copy, select_caps, stage1_cfg
from test_experiment import planted_experiment

P = "ka2l.experiment."  # the form's widget keys (ka2l.ui.experiment.PREFIX)


@pytest.fixture(scope="module")
def store(tmp_path_factory, memo_model, capitals):
    """Pool 'caps' (30 capitals with gold answers) with a finished Stage 1 run and an experiment of three
    strategies at two budgets; pool 'bare' without a run."""
    import numpy as np

    folder = tmp_path_factory.mktemp("app-experiment")
    with data_dir(folder):
        import_pool(capitals[N_KNOWN - 15 : N_KNOWN + 15])
        run_stage1("caps", stage1_cfg(memo_model))
        rng = np.random.default_rng(1)
        scores = {("random", 0.5): 30 + rng.normal(0, 2, 12), ("random", 1.0): 40 + rng.normal(0, 2, 12),
                  ("ka2l-unknown", 0.5): 45 + rng.normal(0, 2, 12), ("ka2l-unknown", 1.0): 41 + rng.normal(0, 2, 12)}
        eid = planted_experiment({k: list(v) for k, v in scores.items()}, {0.5: 9, 1.0: 18}, {"random": 1.0, "ka2l-unknown": 1.0})
        import_pool(capitals[:3], name="bare")
    return {"folder": folder, "experiment_id": eid}


@pytest.fixture
def data(store, tmp_path, monkeypatch):
    private_copy(store["folder"], tmp_path, monkeypatch)
    return store


def _texts(at, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


def _launch(at):
    return next(b for b in at.button if b.label == "Launch experiment")


def test_without_a_run_the_page_says_what_to_do(data, tmp_path, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "empty"))
    assert "Pool page" in _texts(open_page("experiment"), "info")
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "store"))
    at = open_page("experiment")  # the newest pool, 'bare', has no Stage 1 run
    assert "Probe page" in _texts(at, "info") and not at.get("vega_lite_chart")


def test_the_report_shows_rq1_to_rq3_computed_from_the_cells(data):
    at = select_caps(open_page("experiment"))
    rep = build_report(data["experiment_id"])
    shown = _texts(at, "markdown")
    assert f"Difference {rep['rq1']['delta']['value']:.2f}" in shown and "## RQ2" in shown
    for row in rep["table"]:
        assert f"| {row['strategy']} | {row['budget']:g} | {row['n']} | {row['value']:.2f} |" in shown
    assert len(at.get("vega_lite_chart")) == 1  # metric against budget per strategy
    at.selectbox(key=f"{P}report-metric-{data['experiment_id']}").set_value("correct").run()
    assert not at.exception
    rep = build_report(data["experiment_id"], metric="correct")
    assert f"Difference {rep['rq1']['delta']['value']:.2f}" in _texts(at, "markdown") and "correct %" in _texts(at, "markdown")


def test_bad_settings_are_refused_and_launch_queues_the_forms_job_once(data):
    at = select_caps(open_page("experiment"))
    at.text_input(key=P + "budgets").input("0 2").run()
    assert "budgets must be distinct shares in (0, 1]" in _texts(at, "error") and _launch(at).disabled
    at.text_input(key=P + "budgets").input("half").run()
    assert "not a list of numbers" in _texts(at, "error")
    at.text_input(key=P + "budgets").input("0.5 1")
    at.multiselect(key=P + "strategies").set_value(["random", "ka2l-unknown"])
    at.text_input(key=P + "seeds").input("0 1")
    at.selectbox(key=P + "device").set_value("cpu")
    at.run()
    assert not at.exception and not at.error and "8 cells" in _texts(at, "caption")
    _launch(at).click().run()
    (job,) = [j for j in jobs.list_jobs() if j["kind"] == "experiment"]
    try:
        cfg = job["config"]["experiment"]
        assert job["config"]["pool"] == "caps" and cfg["strategies"] == ["random", "ka2l-unknown"]
        assert cfg["budgets"] == [0.5, 1.0] and cfg["seeds"] == [0, 1] and cfg["finetune"]["patience"] == 0
        assert cfg["finetune"]["device"] == "cpu" and f"Job {job['id']} queued" in _texts(at, "success")
        _launch(at).click().run()  # the same settings again: named, not queued twice
        assert f"already job {job['id']}" in _texts(at, "info")
        assert len([j for j in jobs.list_jobs() if j["kind"] == "experiment"]) == 1
    finally:
        jobs.cancel(job["id"], wait=True)
