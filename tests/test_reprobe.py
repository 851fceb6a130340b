"""Stage 3b "the boundary moved": a fine-tune teaches the memorising tiny model answers it did not know, the
re-probe runs Stage 1 again with the adapter (cancelled once and resumed), and the shift views compare."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ka2l import job_plans, jobs
from ka2l.config import FinetuneConfig, ModelSpec, ReprobeConfig, Stage1Config, config_hash, from_dict, to_dict
from ka2l.errors import Cancelled, ConfigError, ModelLoadError, NotFound
from ka2l.finetune.lora import finetune, load_tuned
from ka2l.finetune.reprobe import STAGE, reprobe
from ka2l.models.llm import load_model
from ka2l.probing.stage1 import run_stage1
from ka2l.store import finetune as S
from ka2l.store import queries as Q
from ka2l.store.arrays import open_array
from ka2l.store.db import connect
from ka2l.views import maps, shift
from helpers import CancelAfter, Recorder, data_dir, import_pool, private_copy, stage1_cfg, wait_for


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, memo_model, capitals):
    """A store with a Stage 1 run on 16 memorised + 16 unknown capitals, a fine-tune on the unknown ones' gold
    answers, and its re-probe: cancelled in the answers stage, then resumed to the end."""
    folder = tmp_path_factory.mktemp("reprobe")
    with data_dir(folder):
        import_pool(capitals, rows=capitals[:16] + capitals[40:56])
        base_run = run_stage1("caps", stage1_cfg(memo_model, kind="logistic"))
        fid = finetune("caps", FinetuneConfig(source="gold", gold_set="unknown", device="cpu", batch_size=4, grad_accum=1, max_length=96,
                                              eval_share=0.2, lora_r=16, lora_alpha=32.0, lr=3e-3, lr_scheduler="constant", patience=0,
                                              epochs=40.0, eval_every=1000, checkpoint_every=1000))
        with pytest.raises(Cancelled):
            reprobe(fid, progress=CancelAfter("answers", 8))
        with connect() as db:
            interrupted = [r for r in Q.list_runs(db) if r["id"] != base_run]
            stored_before_resume = len(Q.answered_ids(db, interrupted[0]["id"]))
        rec = Recorder()
        run_id = reprobe(fid, progress=rec)
    return {"folder": folder, "base_run": base_run, "fid": fid, "run_id": run_id, "interrupted": interrupted,
            "stored_before_resume": stored_before_resume, "stages": rec.stages}


@pytest.fixture
def store(tuned, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(tuned["folder"]))
    return tuned


def test_the_reprobe_is_a_stage1_run_of_the_same_config_with_the_adapter(store):
    with connect() as db:
        base, run = Q.get_run(db, store["base_run"]), Q.get_run(db, store["run_id"])
        row = S.get_finetune(db, store["fid"])
        probe = Q.list_probes(db, base["id"])[-1]
        preds = Q.load_predictions(db, run["id"])
        n = len(Q.pool_questions(db, base["pool_id"]))
    assert row["reprobe_run_id"] == run["id"] and run["kind"] == "stage1" and run["pool_id"] == base["pool_id"]
    cfg, base_cfg = from_dict(Stage1Config, run["config"]), from_dict(Stage1Config, base["config"])
    assert cfg.model.adapter == row["adapter_dir"] and base_cfg.model.adapter is None
    assert replace(cfg, model=replace(cfg.model, adapter=None)) == base_cfg  # nothing else differs
    before, after = open_array(base["hidden_path"]), open_array(run["hidden_path"])
    assert before.shape == after.shape == (n, 4, 64)
    assert np.array_equal(before[:, 0], after[:, 0])  # the embeddings are not LoRA targets ...
    assert np.abs(before[:, -1].astype(np.float32) - after[:, -1].astype(np.float32)).max() > 1e-2  # ... the layers are
    # the saved probe scored the tuned states at its own layer
    assert len(preds) == n and {p["probe_id"] for p in preds} == {probe["id"]} and {p["layer"] for p in preds} == {probe["layer"]}


def test_resume_after_a_cancel_continues_the_same_run_without_duplicating(store):
    assert [r["id"] for r in store["interrupted"]] == [store["run_id"]] and store["interrupted"][0]["status"] == "interrupted"
    assert 8 <= store["stored_before_resume"] < 32
    assert store["stages"]["hidden states"] == (32, 32), "hidden states were computed again"
    assert store["stages"]["answers"] == (store["stored_before_resume"], 32), "stored answers were sampled again"
    assert store["stages"][STAGE] == (0, 32)
    with connect() as db:
        answers = Q.load_answers(db, store["run_id"])
        runs = [r for r in Q.list_runs(db) if r["kind"] == "stage1"]
        n_rows = db.execute("SELECT COUNT(*) FROM answers WHERE run_id = ?", [store["run_id"]]).fetchone()[0]
    assert len(runs) == 2 and len(answers) == 32 and n_rows == 32 * (1 + 6)
    assert reprobe(store["fid"]) == store["run_id"]  # a finished re-probe is returned as it is


def test_the_boundary_moved_for_the_questions_the_fine_tune_taught(store):
    table = shift.shift_table(store["fid"])
    summary = shift.shift_summary(store["fid"])
    assert list(table.columns[:12]) == ["question_id", "ext_id", "question", "gold", "bise_before", "bise_after", "moved", "correct_before",
                                        "correct_after", "p_unknown_before", "p_unknown_after", "in_training"]
    assert len(table) == summary["n"] == 32
    with connect() as db:
        trained = {d["question"] for d in S.load_data(db, store["fid"], "train")}
        base_scores = Q.load_scores(db, store["base_run"])
        after_scores = Q.load_scores(db, store["run_id"])
    assert set(table.loc[table["in_training"], "question"]) == trained
    assert table["bise_before"].tolist() == [s["bise"] for s in base_scores]
    gamma = summary["gamma"]
    assert table["bise_after"].tolist() == [int(s["se"] >= gamma) for s in after_scores]  # the base run's threshold on the tuned SE
    moved_up = table[table["moved"] == shift.UNKNOWN_TO_KNOWN]
    assert summary["n_unknown_to_known"] == len(moved_up) and summary["n_known_to_unknown"] == int((table["moved"] == shift.KNOWN_TO_UNKNOWN).sum())
    # the fine-tune taught most of its training questions: they moved to known and are answered correctly now
    taught = table[table["in_training"]]
    assert (taught["moved"] == shift.UNKNOWN_TO_KNOWN).mean() >= 0.6 and moved_up["in_training"].mean() >= 0.8
    assert taught["correct_before"].mean() <= 0.2 and taught["correct_after"].mean() >= 0.6
    assert summary["share_unknown_before"] == pytest.approx(table["bise_before"].mean())
    assert summary["share_unknown_after"] == pytest.approx(table["bise_after"].mean())
    assert summary["correct_before"] == pytest.approx(table["correct_before"].mean())
    assert summary["correct_after"] == pytest.approx(table["correct_after"].mean())
    assert summary["p_unknown_before_mean"] == pytest.approx(table["p_unknown_before"].mean())
    assert summary["p_unknown_after_mean"] == pytest.approx(table["p_unknown_after"].mean())
    by = summary["moved_by_training"]
    assert by["trained"][shift.UNKNOWN_TO_KNOWN] + by["not trained"][shift.UNKNOWN_TO_KNOWN] == len(moved_up)
    assert by["trained"]["n"] == len(trained)


def test_before_and_after_share_one_projection_fitted_on_the_base_run(store):
    frame = shift.shift_projection(store["fid"])
    summary = shift.shift_summary(store["fid"])
    layer = summary["layer"]
    before, after = frame[frame["when"] == "before"], frame[frame["when"] == "after"]
    assert list(frame.columns) == ["x", "y", "when", "question_id", "question", "bise", "moved"] and len(before) == len(after) == 32
    alone = maps.run_projection(store["base_run"], layer, "pca")  # the base run's own map
    assert np.allclose(before[["x", "y"]].to_numpy(), alone, atol=1e-5)
    with connect() as db:
        base, run = Q.get_run(db, store["base_run"]), Q.get_run(db, store["run_id"])
    _, place = maps.fit_projection(open_array(base["hidden_path"])[:, layer])
    assert np.allclose(after[["x", "y"]].to_numpy(), place(open_array(run["hidden_path"])[:, layer]), atol=1e-4)
    assert not np.allclose(after[["x", "y"]].to_numpy(), alone, atol=1e-2)  # the tuned states sit elsewhere in the same map
    assert after["bise"].tolist() == shift.shift_table(store["fid"])["bise_after"].tolist()
    assert np.array_equal(shift.shift_projection(store["fid"]).to_numpy(), frame.to_numpy())  # read back from the cache
    with pytest.raises(ConfigError, match="Layer 9 does not exist"):
        shift.shift_projection(store["fid"], layer=9)


def test_a_model_spec_with_an_adapter_loads_the_tuned_model(store, memo_model):
    with connect() as db:
        adapter = S.get_finetune(db, store["fid"])["adapter_dir"]
    base = load_model(ModelSpec(name_or_path=str(memo_model), device="cpu"))
    tuned = load_model(ModelSpec(name_or_path=str(memo_model), device="cpu", adapter=adapter))
    reference = load_tuned(ModelSpec(name_or_path=str(memo_model), device="cpu"), adapter)  # peft's own PeftModel, merged
    import torch

    ids = base.tokenizer(["What is the capital of Peru?"], return_tensors="pt")
    with torch.no_grad():
        a, b, c = (lm.model(**ids).logits for lm in (base, tuned, reference))
    assert (a - b).abs().max() > 1e-2 and torch.allclose(b, c, atol=1e-5)
    assert "adapter" in tuned.source
    assert tuned.model.state_dict().keys() == base.model.state_dict().keys()  # merged and unloaded: a plain model again
    with pytest.raises(ModelLoadError, match="has no adapter_config.json"):
        load_model(ModelSpec(name_or_path=str(memo_model), device="cpu", adapter=str(store["folder"] / "nowhere")))


def test_a_reprobe_run_is_never_taken_for_the_base_run(store, tmp_path, monkeypatch):
    """The finished re-probe is the pool's newest Stage 1 run, but 'the newest run' of a fine-tune (run 0) stays the
    base model's; a fine-tune or re-probe on the tuned model's run is refused with the fix."""
    from ka2l.finetune import data as D
    from ka2l.finetune.reprobe import reprobe_config

    private_copy(store["folder"], tmp_path, monkeypatch)
    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
        assert Q.latest_run(db, "stage1", pool_id)["id"] == store["run_id"]  # newest indeed
        assert D.resolve_run(db, pool_id, 0)["id"] == store["base_run"]
        with pytest.raises(ConfigError, match="is a re-probe: its model already carries the adapter"):
            D.resolve_run(db, pool_id, store["run_id"])
        S.update_finetune(db, store["fid"], run_id=store["run_id"])  # a row made before that check existed
    with pytest.raises(ConfigError, match="already carried the adapter"):
        reprobe_config(store["fid"])


def test_an_old_stage1_configs_hash_is_unchanged():
    # a default Stage 1 config as runs stored it before ModelSpec had an adapter, and the hash they were stored under
    stored = json.loads('{"model": {"name_or_path": "embedded:smollm2-135m-instruct", "gguf_file": null, "revision": null, "device": "auto", '
                        '"dtype": "auto"}, "prompt": {"instruction": "Answer the following question as briefly as possible.", "few_shot": [], '
                        '"chat_template": true}, "sampling": {"k": 10, "temperature": 1.0, "low_temperature": 0.1, "max_new_tokens": 32, '
                        '"top_p": 1.0, "stop": ["\\n", "Question:"], "batch_size": 16, "hidden_batch_size": 16, "seed": 0}, "judge": '
                        '{"kind": "lexical", "model": null, "strict": true, "condition_on_question": null, "threshold": 0.85, "batch_size": 32, '
                        '"device": "auto"}, "threshold": {"rule": "two-means", "n_candidates": 100}, "probe": {"kind": "mlp", "split": '
                        '[0.7, 0.2, 0.1], "seed": 0, "hidden_size": 256, "intermediate_size": 14336, "epochs": 0, "lr": 0.0, "batch_size": 32, '
                        '"weight_decay": 0.01, "bootstrap": 1000, "device": "auto"}}')
    cfg = from_dict(Stage1Config, stored)
    assert config_hash(cfg) == "aa32b3573f8f9c6d"
    assert to_dict(cfg)["model"]["adapter"] is None
    assert config_hash(replace(cfg, model=replace(cfg.model, adapter="data/finetunes/finetune-1/adapter"))) != "aa32b3573f8f9c6d"


def test_a_tuned_model_too_sure_for_probes_of_its_own_is_still_compared(store, tmp_path, monkeypatch):
    """Its own SE split leaves too few known or unknown questions: the re-probe run ends failed with the reason,
    its states, answers and SE are kept, and the comparison (base threshold, base probe) goes on."""
    from ka2l.errors import ProbeError
    from ka2l.probing import stage1

    private_copy(store["folder"], tmp_path, monkeypatch)
    with connect() as db:
        Q.update_run(db, store["run_id"], status="interrupted")
        db.execute("DELETE FROM predictions WHERE run_id = ?", [store["run_id"]])

    def too_sure(db, run_id, cfg):
        raise ProbeError("labels 31 questions known and 1 unknown, but the probes need at least 5 of each")

    monkeypatch.setattr(stage1, "_stage_labels", too_sure)
    assert reprobe(store["fid"]) == store["run_id"]
    summary = shift.shift_summary(store["fid"])
    assert summary["reprobe_status"] == "failed" and "probes need at least 5" in summary["reprobe_error"]
    assert summary["n"] == 32 and summary["p_unknown_after_mean"] is not None


def test_a_pool_without_gold_answers_has_no_correctness_shares(store, tmp_path, monkeypatch):
    private_copy(store["folder"], tmp_path, monkeypatch)
    with connect() as db:
        db.execute("UPDATE scores SET correct = NULL")
        db.execute("UPDATE questions SET answers = '[]'")
    summary, table = shift.shift_summary(store["fid"]), shift.shift_table(store["fid"])
    assert summary["correct_before"] is None and summary["correct_after"] is None
    assert table["correct_before"].isna().all() and (table["gold"] == "").all()
    assert summary["share_unknown_before"] == pytest.approx(table["bise_before"].mean())


def test_unfinished_fine_tunes_and_missing_reprobes_are_refused_with_the_fix(store, tmp_path, monkeypatch):
    private_copy(store["folder"], tmp_path, monkeypatch)
    with connect() as db:
        S.update_finetune(db, store["fid"], reprobe_run_id=None)
    with pytest.raises(NotFound, match=f"python -m ka2l reprobe --finetune {store['fid']}"):
        shift.shift_summary(store["fid"])
    with pytest.raises(NotFound, match="no re-probe yet"):
        shift.shift_table(store["fid"])
    with connect() as db:
        S.update_finetune(db, store["fid"], status="training")
    with pytest.raises(ConfigError, match="is training.*Finish it first"):
        reprobe(store["fid"])
    with pytest.raises(ConfigError, match="is training"):
        jobs.submit("reprobe", {"reprobe": to_dict(ReprobeConfig(finetune_id=store["fid"]))})
    with pytest.raises(ConfigError, match="evaluate the base model alone"):
        jobs.submit("evaluate", {"evaluate": {"finetune_id": store["fid"]}})
    with pytest.raises(NotFound, match="No fine-tune 99"):
        jobs.submit("reprobe", {"reprobe": {"finetune_id": 99}})


def test_reprobe_and_evaluate_jobs_plan_the_stages_their_code_reports(store):
    phases = job_plans.plan("reprobe", {"reprobe": {"finetune_id": store["fid"]}})
    assert [p.name for p in phases][:3] == ["hidden states", "answers", "semantic entropy"] and phases[-1].name == STAGE
    assert all(any(p.covers(stage) for p in phases) for stage in store["stages"]), store["stages"]  # every stage it reported
    evaluate_phases = [p.name for p in job_plans.plan("evaluate", {"evaluate": {"finetune_id": store["fid"], "models": ["tuned"]}})]
    assert evaluate_phases == ["preparing", "tuned answers", "BERTScore", "summary"]


def test_the_reprobe_job_and_command(store, tmp_path, monkeypatch, capsys):
    from ka2l.cli.main import main

    private_copy(store["folder"], tmp_path, monkeypatch)
    job_id = jobs.submit("reprobe", {"reprobe": to_dict(ReprobeConfig(finetune_id=store["fid"], device="cpu"))})
    with pytest.raises(jobs.JobPending):  # the same re-probe is not queued twice, whatever the device
        jobs.submit("reprobe", {"reprobe": {"finetune_id": store["fid"]}})
    wait_for(lambda: jobs.get(job_id)["status"] in ("done", "failed"), timeout=120)
    job = jobs.get(job_id)
    assert job["status"] == "done", job["error"]
    assert job["result"] == {"finetune_id": store["fid"], "run_id": store["run_id"]}
    assert main(["reprobe", "--finetune", str(store["fid"]), "--table", "-q"]) == 0
    out = capsys.readouterr().out
    summary = shift.shift_summary(store["fid"])
    assert f"{summary['n_unknown_to_known']} unknown -> known" in out and f"re-probe run {store['run_id']}" in out
    assert out.count("[unknown → known]") == summary["n_unknown_to_known"]
    # evaluate --background queues an 'evaluate' job with the command's settings, once
    args = ["evaluate", "--finetune", str(store["fid"]), "--model", "base", "--seed", "3", "--background"]
    assert main(args) == 0 and main(args) == 0
    out = capsys.readouterr().out
    evaluate_jobs = [j for j in jobs.list_jobs() if j["kind"] == "evaluate"]
    assert len(evaluate_jobs) == 1 and "already job" in out
    cfg = evaluate_jobs[0]["config"]["evaluate"]
    assert cfg["finetune_id"] == store["fid"] and cfg["models"] == ["base"] and cfg["seed"] == 3 and cfg["temperature"] == 0.1
    jobs.cancel(evaluate_jobs[0]["id"], wait=True)
