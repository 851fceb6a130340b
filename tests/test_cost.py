"""The cost meter: full SE against triage per question from the runs' own stored timings, in the report,
the CLI text and on the Probes page."""

from __future__ import annotations

import pytest

from ka2l.config import TriageConfig
from ka2l.probing.cost import SCALES, cost_meter, duration
from ka2l.probing.report import build_report, format_report
from ka2l.probing.stage1 import run_stage1, run_triage
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import import_pool, open_page, stage1_cfg


def per_q(timings, *stages) -> float:
    return sum(timings[s]["seconds"] / timings[s]["n"] for s in stages)


def test_the_meter_reads_the_runs_timings_estimates_triage_until_one_ran_then_uses_it(memo_model, capitals):
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    with connect() as db:
        run, probe = Q.get_run(db, run_id), Q.list_probes(db, run_id)[0]
        before = cost_meter(db, run_id)
    se = per_q(run["timings"], "hidden", "answers", "scores")
    assert before["se"]["s_per_question"] == pytest.approx(se) and before["se"]["measured"]
    assert set(before["se"]["parts"]) == {"hidden states", "sampling", "judging (clustering, SE)"}
    assert before["se"]["extrapolated_s"] == {n: pytest.approx(se * n) for n in SCALES}
    estimate = run["timings"]["hidden"]["seconds"] / run["timings"]["hidden"]["n"] * max(probe["layer"], 1) / run["n_layers"]
    assert not before["triage"]["measured"] and before["triage"]["s_per_question"] == pytest.approx(estimate)

    import_pool(capitals, name="fresh", rows=capitals[:30])
    t_id = run_triage("fresh", TriageConfig(probe_id=probe["id"], device="cpu"))
    with connect() as db:
        triage_timings = Q.get_run(db, t_id)["timings"]
        after, of_triage = cost_meter(db, run_id), cost_meter(db, t_id)
        text_stage1, text_triage = format_report(build_report(db, run_id)), format_report(build_report(db, t_id))
    tr = per_q(triage_timings, "hidden", "predict")
    for meter in (after, of_triage):  # the same comparison from either run
        assert meter["triage"]["measured"] and meter["triage"]["run_id"] == t_id
        assert meter["triage"]["s_per_question"] == pytest.approx(tr) and meter["se"]["s_per_question"] == pytest.approx(se)
        assert meter["se_over_triage"] == pytest.approx(se / tr)
    for text in (text_stage1, text_triage):
        assert "Cost per question on this device" in text and f"{tr:.3f}" in text and f"{se:.3f}" in text
        assert f"full SE costs {se / tr:.0f}x triage" in text


def test_durations_read_naturally():
    assert [duration(s) for s in (4.2, 42, 300, 7200, 100_000, 864_000)] == ["4.2 s", "42 s", "5.0 min", "2.0 h", "27.8 h", "10.0 days"]


def test_probes_page_shows_the_cost_table(memo_model, capitals):
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    with connect() as db:
        se = cost_meter(db, run_id)["se"]["s_per_question"]
    at = open_page("probes")
    assert not at.exception
    assert "Cost per question" in [s.value for s in at.subheader]
    table = at.dataframe[-1].value
    assert list(table["method"]) == ["Full semantic entropy", "Triage with the saved probe"]
    assert table["s / question"][0] == f"{se:.3f}" and table["1,000 questions"][0] == duration(se * 1000)
    assert "estimated" in table["from"][1]
