"""Stage 1 and triage on a real local Ray cluster (``ExecutorConfig.kind == 'ray'``, ``ka2l.scale``), with the
tiny Llama that memorised half of its questions: the Ray executor stores what the local one stores, and a
job killed half-way resumes without redoing or duplicating a question.

One cluster per module (``ray.init(num_cpus=4)``: with fewer logical CPUs Ray Data's checkpointed resume
can starve). Skipped when Ray is not installed, unless KA2L_REQUIRE_RAY=1 (CI), where it fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from ka2l.config import ExecutorConfig, TriageConfig
from ka2l.errors import Cancelled, ConfigError
from ka2l.paths import PROJECT_ROOT
from ka2l.scale import run_stage1, run_triage
from ka2l.scale.blocks import WorkDir
from ka2l.store import queries as Q
from ka2l.store.db import connect
from ka2l.store.hidden import HiddenStates
from helpers import CancelAfter, import_pool, stage1_cfg

N = 40  # 20 memorised and 20 unknown capitals


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        message = "Ray Data is not installed: pip install 'ka2l[ray]' (or make setup)"
        if os.environ.get("KA2L_REQUIRE_RAY") == "1":
            pytest.fail(message + " (KA2L_REQUIRE_RAY=1 requires it)")
        pytest.skip(message)
    return ray


@pytest.fixture(scope="module")
def ray_local():
    ray = _require_ray()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _pool(capitals):
    import_pool(capitals, rows=capitals[:20] + capitals[40:60])


def _on_ray(cfg, **ex):
    return replace(cfg, executor=ExecutorConfig(kind="ray", **ex))


def _stored(run_id):
    with connect() as db:
        run = Q.get_run(db, run_id)
        questions = Q.pool_questions(db, run["pool_id"])
        answers = Q.load_answers(db, run_id)
        scores = {s["question_id"]: s for s in Q.load_scores(db, run_id)}
        counts = db.execute("SELECT question_id, kind, COUNT(*) FROM answers WHERE run_id = ? GROUP BY question_id, kind",
                            [run_id]).fetchall()
    hidden = HiddenStates.open(run["hidden_path"])
    states = np.stack([hidden.layer(l) for l in hidden.layers], axis=1)
    return run, questions, answers, scores, counts, states


def test_ray_executor_stores_what_the_local_executor_stores(ray_local, memo_model, capitals):
    _pool(capitals)
    cfg = stage1_cfg(memo_model)
    local = run_stage1("caps", cfg)
    remote = run_stage1("caps", _on_ray(cfg, block_size=8), resume=False)  # a second run of the same config, on Ray
    assert remote != local
    l_run, questions, l_ans, l_scores, _, l_states = _stored(local)
    r_run, _, r_ans, r_scores, counts, r_states = _stored(remote)
    assert r_run["status"] == "done" and (r_run["n_layers"], r_run["hidden_size"]) == (l_run["n_layers"], l_run["hidden_size"])
    # the same states at every layer, in the same pool rows
    assert r_states.shape == l_states.shape == (N, 4, 64)
    np.testing.assert_allclose(r_states.astype(np.float32), l_states.astype(np.float32), rtol=1e-2, atol=2e-3)
    # the same answers: identical texts, drawn with the same per-question seeds, the same log-probs
    assert set(r_ans) == set(l_ans) == {q["id"] for q in questions}
    for qid in l_ans:
        for kind in ("low", "sample"):
            assert [a["text"] for a in r_ans[qid][kind]] == [a["text"] for a in l_ans[qid][kind]], (qid, kind)
            np.testing.assert_allclose([a["seq_logprob"] for a in r_ans[qid][kind]], [a["seq_logprob"] for a in l_ans[qid][kind]],
                                       atol=1e-4)
    assert sorted(c[2] for c in counts) == [1] * N + [6] * N, "one low answer and k samples per question, nothing twice"
    # the same SE, correctness, threshold and BiSE labels
    for qid, s in l_scores.items():
        r = r_scores[qid]
        assert (r["se"], r["n_clusters"], r["judge_calls"], r["correct"], r["bise"]) == \
               (s["se"], s["n_clusters"], s["judge_calls"], s["correct"], s["bise"]), qid
        assert r["se_weighted"] == pytest.approx(s["se_weighted"], abs=1e-4)
    assert r_run["threshold"]["gamma"] == pytest.approx(l_run["threshold"]["gamma"])
    assert len({s["bise"] for s in r_scores.values()}) == 2
    # the run records the execution; its per-question stage times (for the cost meter); the blocks are cleared
    assert [(e["from_earlier"], e["computed"]) for e in r_run["summary"]["ray"]] == [(0, N)]
    assert {k: r_run["timings"][k]["n"] for k in ("hidden", "answers", "scores")} == {"hidden": N, "answers": N, "scores": N}
    assert not WorkDir(remote).root.exists()
    with connect() as db:
        assert Q.list_probes(db, remote), "the run went on to its probes as a local run does"
        probe_id = Q.list_probes(db, local)[0]["id"]
    # triage on Ray: the probe layer's states and the predictions of a local triage
    import_pool(capitals, name="fresh", rows=capitals[:10] + capitals[60:70])
    t_local = run_triage("fresh", TriageConfig(probe_id=probe_id, device="cpu"))
    t_remote = run_triage("fresh", TriageConfig(probe_id=probe_id, device="cpu", executor=ExecutorConfig(kind="ray", block_size=8)),
                          resume=False)
    with connect() as db:
        lp, rp = Q.load_predictions(db, t_local), Q.load_predictions(db, t_remote)
        t_run = Q.get_run(db, t_remote)
    assert [p["question_id"] for p in rp] == [p["question_id"] for p in lp] and len(rp) == 20
    np.testing.assert_allclose([p["p_unknown"] for p in rp], [p["p_unknown"] for p in lp], atol=1e-3)
    assert [p["label"] for p in rp] == [p["label"] for p in lp]
    layer = lp[0]["layer"]
    np.testing.assert_allclose(_layer(t_remote, layer), _layer(t_local, layer), atol=2e-3)
    assert t_run["timings"]["hidden"]["n"] == 20 and not WorkDir(t_remote).root.exists()
    with connect() as db:
        assert Q.answered_ids(db, t_remote) == set(), "triage never samples"


def _layer(run_id, layer):
    with connect() as db:
        run = Q.get_run(db, run_id)
    return HiddenStates.open(run["hidden_path"]).layer(layer).astype(np.float32)


def _check_complete(run_id, k=6):
    """Every question exactly once in every table of a finished run."""
    with connect() as db:
        run = Q.get_run(db, run_id)
        n = len(Q.pool_questions(db, run["pool_id"]))
        per_table = {t: db.execute(f"SELECT COUNT(*), COUNT(DISTINCT question_id) FROM {t} WHERE run_id = ?", [run_id]).fetchone()
                     for t in ("hidden_done", "scores", "clusters")}
        answers = db.execute("SELECT COUNT(*), COUNT(DISTINCT question_id) FROM answers WHERE run_id = ?", [run_id]).fetchone()
    assert run["status"] == "done" and n == N
    assert per_table == {t: (N, N) for t in per_table}
    assert answers == (N * (1 + k), N)
    return run


def test_a_cancelled_ray_run_resumes_without_redoing_finished_questions(ray_local, memo_model, capitals):
    _pool(capitals)
    cfg = _on_ray(stage1_cfg(memo_model), block_size=4)
    with pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter("ray: hidden states, answers, SE", 4))
    with connect() as db:
        (run,) = Q.list_runs(db)
    assert run["status"] == "interrupted"
    done_before = len(WorkDir(run["id"]).committed())
    assert done_before >= 1, "the cancel came after a block was written"
    resumed = run_stage1("caps", cfg)
    assert resumed == run["id"]
    run = _check_complete(resumed)
    (execution,) = run["summary"]["ray"]  # the cancelled execution was not recorded: it ended before its ingest
    assert execution["from_earlier"] >= 4 and execution["from_earlier"] + execution["computed"] == N, execution


KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from dataclasses import replace
from ka2l.config import ExecutorConfig
from ka2l.progress import NullProgress
from ka2l.scale import run_stage1
from helpers import stage1_cfg
from pathlib import Path

class KillAfter(NullProgress):
    # SIGKILL this driver once a block is written: no cleanup, no ingest, no status update
    def advance(self, n=1, message=None):
        if n > 0:
            os.kill(os.getpid(), signal.SIGKILL)

cfg = replace(stage1_cfg(Path({model!r})), executor=ExecutorConfig(kind="ray", address={address!r}, block_size=2))
run_stage1("caps", cfg, progress=KillAfter())
"""


def test_a_killed_ray_job_resumes_every_question_exactly_once(ray_local, memo_model, capitals, tmp_path):
    """The job's driver is killed outright (SIGKILL) half-way, on a cluster it connected to by address; the
    resumed run stores every question once and computes only the questions no committed block holds."""
    _pool(capitals)
    address = ray_local.get_runtime_context().gcs_address
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(PROJECT_ROOT / "tests"), model=str(memo_model), address=address))
    proc = subprocess.run([sys.executable, str(script)], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    with connect() as db:
        (run,) = Q.list_runs(db)
        assert Q.answered_ids(db, run["id"]) == set(), "the killed driver stored nothing itself"
    assert run["status"] == "running", "killed outright: never marked"
    committed = len(WorkDir(run["id"]).committed())
    assert committed >= 1
    resumed = run_stage1("caps", _on_ray(stage1_cfg(memo_model), block_size=2))
    assert resumed == run["id"]
    run = _check_complete(resumed)
    (execution,) = run["summary"]["ray"]
    assert 2 <= execution["from_earlier"] <= N, "the driver was killed after a block was committed"
    assert execution["from_earlier"] + execution["computed"] == N, f"questions redone or lost: {execution}"


def test_the_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    from ka2l.scale.cluster import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'ka2l\[ray\]'"):
        require_ray()


def test_cli_flags_put_the_executor_in_the_config_and_the_job(capitals, monkeypatch):
    from ka2l import jobs

    monkeypatch.setattr(jobs, "_spawn", lambda job_id: None)  # the job stays queued: its stored config is what is checked
    from ka2l.cli.main import build_parser, main
    from ka2l.cli.probing import stage1_config

    args = build_parser().parse_args(["probe", "--pool", "caps", "--executor", "ray", "--ray-address", "auto", "--ray-cpus", "8",
                                      "--ray-actors", "3"])
    assert stage1_config(args).executor == ExecutorConfig(kind="ray", address="auto", num_cpus=8, num_actors=3)
    assert stage1_config(build_parser().parse_args(["probe", "--pool", "caps"])).executor == ExecutorConfig()
    with pytest.raises(ConfigError, match="only apply to --executor ray"):
        stage1_config(build_parser().parse_args(["probe", "--pool", "caps", "--executor", "local", "--ray-actors", "2"]))
    import_pool(capitals[:4])
    assert main(["probe", "--pool", "caps", "--executor", "ray", "--ray-actors", "2", "--background"]) == 0
    job = jobs.list_jobs()[0]
    assert job["kind"] == "stage1" and job["config"]["stage1"]["executor"]["kind"] == "ray"
    assert job["config"]["stage1"]["executor"]["num_actors"] == 2
    jobs.cancel(job["id"], wait=True)
