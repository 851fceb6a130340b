"""Stage 1 and triage end to end on a tiny Llama that memorised half of its questions, through the
project's real loader, store and resume logic."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ka2l.config import ThresholdConfig, TriageConfig
from ka2l.errors import Cancelled, ProbeError
from ka2l.paths import PROJECT_ROOT
from ka2l.probing.stage1 import run_stage1, run_triage
from ka2l.probing.probes import auroc, bootstrap_auroc, load_probe, predict_unknown
from ka2l.probing.rejection import bootstrap_prr, prediction_rejection_ratio
from ka2l.probing.report import build_report, format_report
from ka2l.store import queries as Q
from ka2l.store.arrays import open_array
from ka2l.store.db import connect
from helpers import CancelAfter, N_KNOWN, Recorder, import_pool, stage1_cfg

def test_stage1_end_to_end_finds_the_memorised_questions(memo_model, capitals):
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    with connect() as db:
        run = Q.get_run(db, run_id)
        scores = Q.load_scores(db, run_id)
        rep = build_report(db, run_id)
        answers = Q.load_answers(db, run_id)
    assert run["status"] == "done" and run["n_layers"] == 3 and run["hidden_size"] == 64
    hidden = open_array(run["hidden_path"])
    assert hidden.shape == (80, 4, 64) and hidden.dtype == np.float16 and np.isfinite(hidden).all()
    assert all(len(a["low"]) == 1 and len(a["sample"]) == 6 for a in answers.values())
    se = np.array([s["se"] for s in scores])
    assert se[:N_KNOWN].mean() < se[N_KNOWN:].mean() - 0.5, "memorised questions must have lower SE"
    correct = np.array([s["correct"] for s in scores])
    assert correct[:N_KNOWN].mean() > 0.6 and correct[N_KNOWN:].mean() < 0.1
    bise = np.array([s["bise"] for s in scores])
    assert bise[N_KNOWN:].mean() > bise[:N_KNOWN].mean()
    # Judge calls: identical samples merge with no call; every other distinct answer is compared with
    # each cluster representative so far, 2 directional calls per comparison (the stored verdicts).
    unanimous = {q for q, a in answers.items() if len({x["text"] for x in a["sample"]}) == 1}
    assert len(unanimous) >= 10, "memorised answers are sampled identically"
    with connect() as db:
        clusterings = {s["question_id"]: Q.get_clustering(db, run_id, s["question_id"]) for s in scores}
    for s in scores:
        c = clusterings[s["question_id"]]
        assert s["judge_calls"] == c["judge_calls"] == 2 * len(c["verdicts"])
        if s["question_id"] in unanimous:
            assert (s["judge_calls"], s["n_clusters"], s["se"]) == (0, 1, 0.0)
        judged = {i for i, _, _ in c["verdicts"]}
        founders = [i for i in judged if not any(eq for j, _, eq in c["verdicts"] if j == i)]
        assert s["n_clusters"] == 1 + len(founders), "each cluster after the first is an answer the judge matched to none"
    assert sum(s["judge_calls"] for s in scores) > 0
    p = rep["probe"]
    assert [L["layer"] for L in p["layers"]] == [1, 2, 3]
    assert p["best_layer"] == max(p["layers"], key=lambda L: L["val_auroc"])["layer"]
    # The reported test AUROC and its interval are the saved probe's, on the stored test split.
    with connect() as db:
        split = {k: np.array(v) for k, v in Q.list_probes(db, run_id)[0]["metrics"]["split"].items()}
    test = split["test"]
    assert (len(split["train"]), len(split["val"]), len(test)) == (56, 16, 8)
    assert not set(test) & (set(split["train"]) | set(split["val"]))
    net, meta = load_probe(p["path"])
    assert meta["layer"] == p["best_layer"]
    p_test = predict_unknown(net, hidden[test, p["best_layer"]].astype(np.float32))
    assert p["test_auroc"] == pytest.approx(auroc(bise[test], p_test))
    assert p["test_ci"] == pytest.approx(list(bootstrap_auroc(bise[test], p_test, 100, 0)))
    # Probe quality is proven on planted signals (test_probes.py); a 3-layer toy with 56 training rows
    # is too small for it. What must hold here is that the run's uncertainty scores carry the real
    # signal: the memorised questions are answered confidently and correctly.
    base = {b["method"].split(" (")[0]: b for b in p["baselines"]}
    assert {"KA2L probe", "SE probe", "Accuracy probe", "Mean log-likelihood", "Regular", "Semantic entropy"} <= set(base)
    # On all 80 questions (the 8-row test split swings from 0.47 to 1.0 with the sampling seed alone).
    neg_loglik = -np.array([s["mean_loglik"] for s in scores])
    assert auroc(1 - correct, se) > 0.75 and auroc(1 - correct, neg_loglik) > 0.7
    assert base["Semantic entropy"]["auroc_incorrect"] == pytest.approx(auroc(1 - correct[test], se[test]))
    # PRR against correctness of the low-temperature answer, on the test rows, for every method
    assert all({"prr", "prr_lo", "prr_hi"} <= set(b) for b in p["baselines"])
    for method, u in [("KA2L probe", p_test), ("Semantic entropy", se[test]),
                      ("Mean log-likelihood", -np.array([s["mean_loglik"] for s in scores])[test])]:
        assert base[method]["prr"] == pytest.approx(prediction_rejection_ratio(u, correct[test])), method
        assert [base[method]["prr_lo"], base[method]["prr_hi"]] == pytest.approx(list(bootstrap_prr(u, correct[test], 100, 0)))
    assert prediction_rejection_ratio(se, correct) > 0.3, "SE rejects the wrong answers first (all 80 questions)"
    assert [r["delta"] for r in p["robustness"]] == [-0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2]
    text = format_report(rep)
    assert "Known / unknown split" in text and "<- chosen" in text and "Threshold robustness" in text
    se_line = next(line for line in text.splitlines() if line.strip().startswith("Semantic entropy (discrete)"))
    b = base["Semantic entropy"]
    assert f"{b['prr']:.3f}  [{b['prr_lo']:.3f}, {b['prr_hi']:.3f}]" in se_line, se_line
    assert Path(p["path"]).is_file() and Path(p["path"]).with_suffix(".json").is_file()


def test_triage_uses_one_forward_pass_and_agrees_with_the_probe(memo_model, capitals):
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    import_pool(capitals, name="fresh", rows=capitals[:20] + capitals[60:])
    with connect() as db:
        probe_id = Q.list_probes(db, run_id)[0]["id"]
    t_id = run_triage("fresh", TriageConfig(probe_id=probe_id, device="cpu"))
    with connect() as db:
        preds = Q.load_predictions(db, t_id)
        run = Q.get_run(db, t_id)
        assert Q.answered_ids(db, t_id) == set(), "triage never samples"
        assert "Triage:" in format_report(build_report(db, t_id))
    assert len(preds) == 40 and run["timings"]["hidden"]["n"] == 40
    # only the probe's layer is computed and stored: the same states Stage 1 stored at that layer
    with connect() as db:
        source = Q.get_run(db, run_id)
        layer = Q.list_probes(db, run_id)[0]["layer"]
    stored = open_array(run["hidden_path"])
    assert stored.shape == (40, 1, 64)
    np.testing.assert_allclose(stored[:20, 0].astype(np.float32), open_array(source["hidden_path"])[:20, layer].astype(np.float32), atol=2e-2)
    p = np.array([x["p_unknown"] for x in preds])
    assert p[:20].mean() < p[20:].mean(), "memorised questions should look more 'known' to the probe"
    assert run["summary"]["shift"]["available"] and not run["summary"]["shift"]["warning"], run["summary"]


def test_triage_warns_when_the_pool_is_unlike_the_training_pool(memo_model, capitals):
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    gibberish = [(f"zq{i} xv{i * 7} kk wrr {i}? " * 3, ["x"]) for i in range(30)]
    import_pool(capitals, name="odd", rows=gibberish)
    with connect() as db:
        probe_id = Q.list_probes(db, run_id)[0]["id"]
    t_id = run_triage("odd", TriageConfig(probe_id=probe_id, device="cpu"))
    with connect() as db:
        shift = Q.get_run(db, t_id)["summary"]["shift"]
        text = format_report(build_report(db, t_id))
    # about 5% is expected for a pool like the training one; the exact share depends on the probe, so on the sampled labels
    assert shift["warning"] and shift["share_beyond_heldout_q95"] > 0.4
    assert "WARNING: this pool looks unlike" in text


def test_cancelled_run_resumes_without_recomputing(memo_model, capitals):
    import_pool(capitals)
    cfg = stage1_cfg(memo_model)
    with pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter("answers", 16))
    with connect() as db:
        run = Q.list_runs(db)[0]
        assert run["status"] == "interrupted"
        first = Q.load_answers(db, run["id"])
    assert len(first) == 16 and run["timings"]["hidden"]["n"] == 80
    rec = Recorder()
    run_id = run_stage1("caps", cfg, progress=rec)
    assert run_id == run["id"]
    assert rec.stages["hidden states"] == (80, 80), "hidden states were not recomputed"
    assert rec.stages["answers"] == (16, 80), "the 16 stored questions were not sampled again"
    with connect() as db:
        after = Q.load_answers(db, run_id)
        assert Q.get_run(db, run_id)["status"] == "done"
    assert all(after[q] == first[q] for q in first), "stored answers are kept as they were"
    # a different config is a different run
    other = run_stage1("caps", stage1_cfg(memo_model, kind="logistic"))
    assert other != run_id


def start_cli_and_signal(cmd, env, sig, min_stored=6):
    """Start the CLI, wait until some questions are answered, send ``sig``; returns (stored, returncode)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, stored = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        with connect() as db:
            stored = len(Q.answered_ids(db, 1)) if Q.list_runs(db) else 0
        if stored >= min_stored:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.2)
    return stored, proc.wait(timeout=30)


def test_terminated_cli_run_is_marked_interrupted(memo_model, capitals):
    import_pool(capitals)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "ka2l", "probe", "--pool", "caps", "--model", str(memo_model), "--device", "cpu", "--k", "6",
           "--max-new-tokens", "8", "--batch-size", "2", "-q"]
    stored, code = start_cli_and_signal(cmd, env, signal.SIGTERM)
    assert 6 <= stored < 80 and code == 130
    with connect() as db:
        assert Q.get_run(db, 1)["status"] == "interrupted"


def test_killed_cli_run_resumes(memo_model, capitals, tmp_path):
    """SIGKILL mid-sampling through the real CLI; the next call continues and finishes."""
    import_pool(capitals)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "ka2l", "probe", "--pool", "caps", "--model", str(memo_model), "--device", "cpu", "--k", "6",
           "--max-new-tokens", "8", "--batch-size", "2", "-q"]
    stored, _ = start_cli_and_signal(cmd, env, signal.SIGKILL)
    assert 6 <= stored < 80, f"the run was not caught mid-sampling (stored {stored})"
    with connect() as db:
        assert Q.get_run(db, 1)["status"] == "running", "a killed run cannot mark itself"
        kept = len(Q.answered_ids(db, 1))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Layer-wise AUROC" in out.stdout
    with connect() as db:
        runs = Q.list_runs(db)
        assert len(runs) == 1 and runs[0]["status"] == "done"
        assert runs[0]["timings"]["answers"]["n"] >= 80 - kept


def test_a_finished_run_is_reused_not_recomputed(memo_model, capitals):
    import_pool(capitals[:40] + capitals[60:], name="small")
    cfg = stage1_cfg(memo_model, kind="logistic")
    first = run_stage1("small", cfg)
    rec = Recorder()
    assert run_stage1("small", cfg, progress=rec) == first and rec.stages == {}
    assert run_stage1("small", cfg, resume=False) != first


def test_equal_semantic_entropy_is_refused_before_any_label_is_stored(memo_model, capitals):
    """Nucleus sampling that keeps one token makes every sample the greedy answer: SE is 0 for every
    question, gamma* would be the minimum and every question 'unknown'. The run must refuse at the
    labels stage, write no label and no threshold, and keep the hidden states and answers."""
    import_pool(capitals)
    base = stage1_cfg(memo_model)
    cfg = replace(base, sampling=replace(base.sampling, top_p=1e-6))
    with pytest.raises(ProbeError, match="same semantic entropy") as err:
        run_stage1("caps", cfg)
    assert "--temperature" in str(err.value) and "--k" in str(err.value) and "larger or more varied pool" in str(err.value)
    with connect() as db:
        run = Q.list_runs(db)[0]
        scores = Q.load_scores(db, run["id"])
        assert run["status"] == "failed" and "same semantic entropy" in run["error"]
        assert run["threshold"] is None, "no threshold is stored for a run that could not be labelled"
        assert len(scores) == 80 and {s["se"] for s in scores} == {0.0}
        assert all(s["bise"] is None for s in scores), "no question may be labelled"
        assert Q.list_probes(db, run["id"]) == []
        assert len(Q.answered_ids(db, run["id"])) == 80 and len(Q.hidden_done_ids(db, run["id"])) == 80
    rec = Recorder()
    with pytest.raises(ProbeError, match="same semantic entropy"):
        run_stage1("caps", cfg, progress=rec)
    assert "answers" not in rec.stages and rec.stages["semantic entropy"] == (80, 80), "a re-run resumes, it does not resample"
    with connect() as db:
        assert [r["id"] for r in Q.list_runs(db)] == [run["id"]]


def test_a_threshold_that_leaves_too_few_of_one_label_stores_no_label(memo_model, capitals):
    """8 questions (4 memorised, 4 unseen) can never give the probes 5 of each label to split 7:2:1,
    whatever gamma* is: the run stops at the labels stage with the counts, before writing any label."""
    import_pool(capitals, rows=capitals[:4] + capitals[40:44])
    with pytest.raises(ProbeError, match=r"need at least 5 of each") as err:
        run_stage1("caps", stage1_cfg(memo_model))
    assert "too few for 5 of each label, whatever the threshold: import a larger pool" in str(err.value)
    with connect() as db:
        run = Q.list_runs(db)[0]
        scores = Q.load_scores(db, run["id"])
    assert len({s["se"] for s in scores}) > 1, "SE varies: this is not the equal-SE refusal"
    assert run["threshold"] is None and len(scores) == 8 and all(s["bise"] is None for s in scores)


def test_a_pool_beyond_the_model_says_so_and_suggests_steadier_samples_not_more_varied_ones(memo_model, capitals):
    """FanOutQA with the embedded 135M model: almost every question's samples all differ. The advice for a pool
    with too few known questions is the opposite of the one for too few unknown ones (a higher temperature would
    only make it worse), and it says how many questions sit at the highest SE the samples allow."""
    import_pool(capitals, rows=capitals[:3] + capitals[40:80])  # 3 memorised, 40 the model never saw
    cfg = replace(stage1_cfg(memo_model), threshold=ThresholdConfig(rule="paper-mse"))  # unknown = SE above about 0.5
    with pytest.raises(ProbeError, match=r"need at least 5 of each") as err:
        run_stage1("caps", cfg)
    with connect() as db:
        se = np.array([s["se"] for s in Q.load_scores(db, Q.list_runs(db)[0]["id"])])
    at_max = int((se >= np.log(cfg.sampling.k) - 1e-6).sum())
    msg = str(err.value)
    assert re.search(r"labels [0-4] questions known and \d+ unknown", msg), msg
    assert "unsure of almost every question" in msg and "lower --temperature" in msg and "higher --k" not in msg
    assert at_max > 0 and f"({at_max} of 43 have all {cfg.sampling.k} samples in different meanings)" in msg


@pytest.mark.parametrize("cancel_stage, n", [("answers", 16), ("semantic entropy", 32)])
def test_a_lost_hidden_state_file_is_recomputed_not_probed_as_zeros(memo_model, capitals, cancel_stage, n):
    """The run's hidden-state folder is deleted after its rows were marked done (mid-sampling, or after all model
    work): the resumed run recomputes the states, identical to the lost ones, and never probes zeros."""
    import_pool(capitals)
    cfg = stage1_cfg(memo_model)
    with pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter(cancel_stage, n))
    with connect() as db:
        run = Q.list_runs(db)[0]
        answered = len(Q.answered_ids(db, run["id"]))
    lost = np.array(open_array(run["hidden_path"]))
    assert np.abs(lost).sum(axis=(1, 2)).min() > 0
    shutil.rmtree(run["hidden_path"])  # the run's per-layer folder
    rec = Recorder()
    assert run_stage1("caps", cfg, progress=rec) == run["id"]
    assert rec.stages["hidden states"] == (0, 80), "every state is recomputed"
    assert rec.stages["answers"] == (answered, 80), "stored answers are kept"
    with connect() as db:
        done = Q.get_run(db, run["id"])
    assert done["status"] == "done"
    again = open_array(done["hidden_path"])
    np.testing.assert_array_equal(again, lost)


def test_threshold_robustness_trains_on_the_probe_device(memo_model, capitals, monkeypatch):
    """Every probe of a run (the main sweep, the baselines and the 7 robustness retrainings) trains on
    the device resolved for the probes. A spy records the device each training was given and then
    trains on the CPU, so the test needs no GPU."""
    import ka2l.probing.baselines as baselines
    import ka2l.probing.probes as probes
    import ka2l.probing.stage1 as stage1

    real = probes.train_probe
    seen = {"probes": [], "baselines": []}

    def spy(where):
        def train(kind, xtr, ytr, xva, yva, cfg, device="cpu", **kw):
            seen[where].append((kind, device))
            return real(kind, xtr, ytr, xva, yva, cfg, "cpu", **kw)
        return train

    monkeypatch.setattr(probes, "train_probe", spy("probes"))
    monkeypatch.setattr(baselines, "train_probe", spy("baselines"))
    monkeypatch.setattr(stage1, "_probe_device", lambda cfg: "cuda:3")
    import_pool(capitals)
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    with connect() as db:
        robust = Q.list_probes(db, run_id)[0]["metrics"]["robustness"]
    trained = [r for r in robust if r["note"] == ""]
    assert len(seen["baselines"]) == len(trained) >= 5, (seen["baselines"], robust)
    assert {d for _, d in seen["baselines"]} == {"cuda:3"}, "robustness probes train where the main probe did"
    assert ("mlp", "cuda:3") in seen["probes"] and {d for _, d in seen["probes"]} == {"cuda:3"}


@pytest.fixture
def bf16_machine():
    """Inside ``with bf16_machine:`` dtype 'auto' resolves to bfloat16, as on a CUDA GPU, for the
    project's resolver and loader; outside it is this CPU machine again (where 'auto' is float32).
    Its own MonkeyPatch: undoing the test's would also undo the isolated data folder."""
    import torch

    import ka2l.device
    import ka2l.models.llm

    real = ka2l.device.resolve_dtype

    def resolve(name, device):
        return torch.bfloat16 if name == "auto" else real(name, device)

    class Machine:
        def __enter__(self):
            self.patch = pytest.MonkeyPatch()
            self.patch.setattr(ka2l.device, "resolve_dtype", resolve)
            self.patch.setattr(ka2l.models.llm, "resolve_dtype", resolve)

        def __exit__(self, *exc):
            self.patch.undo()

    return Machine()


def test_a_run_is_not_resumed_in_another_dtype(memo_model, capitals, bf16_machine):
    """Half a run computed where 'auto' means bfloat16, resumed where it means float32: refused with
    both dtypes and the two ways out, nothing stored changes; --dtype bfloat16 then resumes it."""
    from ka2l import __version__
    from ka2l.errors import ConfigError

    import_pool(capitals)
    cfg = stage1_cfg(memo_model)  # dtype 'auto'
    with bf16_machine, pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter("answers", 16))
    with connect() as db:
        run = Q.list_runs(db)[0]
        first = Q.load_answers(db, run["id"])
    assert run["versions"]["dtype"] == "bfloat16" and run["versions"]["ka2l"] == __version__
    with pytest.raises(ConfigError, match=rf"Run {run['id']} .* bfloat16, but .* float32") as err:
        run_stage1("caps", cfg)
    assert f"--dtype bfloat16 to resume run {run['id']}" in str(err.value) and "--no-resume" in str(err.value)
    with connect() as db:
        assert Q.get_run(db, run["id"])["status"] == "interrupted" and Q.load_answers(db, run["id"]) == first
    rec = Recorder()
    as_stored = replace(cfg, model=replace(cfg.model, dtype="bfloat16"))
    assert run_stage1("caps", as_stored, progress=rec) == run["id"]
    assert rec.stages["answers"] == (16, 80), "the bfloat16 answers were kept and the rest sampled in bfloat16"
    fresh = run_stage1("caps", cfg, resume=False)
    with connect() as db:
        assert Q.get_run(db, fresh)["versions"]["dtype"] == "float32"
    assert run_stage1("caps", cfg) == fresh, "the float32 run of this config is found; the bfloat16 one is not refused"


def test_triage_runs_in_the_dtype_of_the_stage1_run(memo_model, capitals, bf16_machine, monkeypatch):
    """A probe trained on bfloat16 states scores a new pool in bfloat16, also on a machine where 'auto'
    means float32; a model in another dtype handed to triage is refused."""
    import ka2l.probing.stage1 as stage1
    from ka2l.errors import ConfigError
    from ka2l.models.llm import load_model

    import_pool(capitals)
    with bf16_machine:
        run_id = run_stage1("caps", stage1_cfg(memo_model))
    import_pool(capitals, name="fresh", rows=capitals[30:50])
    loaded = []
    monkeypatch.setattr(stage1, "load_model", lambda *a, **kw: loaded.append(load_model(*a, **kw)) or loaded[-1])
    with connect() as db:
        probe_id = Q.list_probes(db, run_id)[0]["id"]
    t_id = run_triage("fresh", TriageConfig(probe_id=probe_id, device="cpu"))
    with connect() as db:
        assert Q.get_run(db, t_id)["versions"]["dtype"] == "bfloat16"
    assert [str(lm.model.dtype) for lm in loaded] == ["torch.bfloat16"]
    fp32 = load_model(stage1_cfg(memo_model).model)
    with pytest.raises(ConfigError, match=r"float32.*bfloat16"):
        run_triage("fresh", TriageConfig(probe_id=probe_id, device="cpu"), resume=False, lm=fp32)


def test_judge_calls_for_a_known_answer_set():
    """Six answers with three meanings through the default (lexical) judge: answers equal after
    normalisation (question words dropped) cost no call; 'Lyon' is compared with 'Paris' (2 directional
    calls) and 'Nice' with both representatives (4): 6 calls, where the naive k(k-1) is 30."""
    from ka2l.config import JudgeConfig
    from ka2l.probing.judges import make_judge
    from ka2l.probing.stage1 import score_question

    question = {"id": 7, "question": "What is the capital of France?", "answers": ["Paris"]}
    texts = ["Paris", "Paris.", "Lyon", "The capital of France is Paris", "Nice", "Lyon"]
    answers = {"sample": [{"text": t, "seq_logprob": -1.0} for t in texts], "low": [{"text": "Paris.", "token_logprobs": [-0.1, -0.2]}]}
    r = score_question(make_judge(JudgeConfig()), question, answers)
    assert r["judge_calls"] == 6 and r["n_clusters"] == 3
    assert r["cluster_ids"] == [0, 0, 1, 0, 2, 1]
    assert r["verdicts"] == [[2, 0, False], [4, 0, False], [4, 2, False]]
    p = np.array([3, 2, 1]) / 6
    assert r["se"] == pytest.approx(float(-(p * np.log(p)).sum()))  # 1.0114 nats
    assert r["correct"] == 1
