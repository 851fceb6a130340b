"""The Fine-tune page (Stage 3b) through Streamlit's AppTest over a real store: a pool with gold answers,
a real Stage 1 run of the memorising tiny model, and a real (short) LoRA fine-tune of it, evaluated by
ka2l's own evaluation. Guidance without data, presets filling the form, Launch queueing exactly the
form's job (once), a preflight refusal naming the fix, the loss chart (live while training) and the
evaluation tables."""

from __future__ import annotations

import json

import pytest

from ka2l import jobs
from ka2l.config import FINETUNE_PRESETS, FinetuneConfig
from ka2l.finetune.evaluate import evaluate
from ka2l.finetune.lora import finetune
from ka2l.finetune.reprobe import reprobe
from ka2l.probing.stage1 import run_stage1
from ka2l.store import finetune as S
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import N_KNOWN, data_dir, import_pool, open_page, private_copy, select_caps, stage1_cfg
from test_app import _rerun_fragments

F = "ka2l.finetune.f."  # the form's widget keys (ka2l.ui.finetune.PREFIX)
TRAINED = dict(source="gold", gold_set="all", device="cpu", dtype="float32", epochs=3.0, batch_size=4, grad_accum=1, max_length=96,
               eval_share=0.3, lr=5e-3, lr_scheduler="constant", eval_every=2, checkpoint_every=50, patience=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, memo_model, capitals):
    """Pool 'caps' (12 questions the tiny model knows, 12 it does not, all with gold answers), a finished Stage 1
    run, a finished fine-tune on every gold answer with its evaluation and its re-probe; pool 'bare' with no run."""
    folder = tmp_path_factory.mktemp("app-finetune")
    with data_dir(folder):
        import_pool(capitals, rows=capitals[N_KNOWN - 12:N_KNOWN + 12])
        run_id = run_stage1("caps", stage1_cfg(memo_model))
        fid = finetune("caps", FinetuneConfig(run_id=run_id, **TRAINED))
        evaluate(fid, batch_size=8, bootstrap=50)
        reprobe(fid)
        import_pool(capitals[:3], name="bare")
    return {"folder": folder, "run_id": run_id, "finetune_id": fid}


@pytest.fixture
def data(store, tmp_path, monkeypatch):
    private_copy(store["folder"], tmp_path, monkeypatch)
    return store


def _widget(at, name: str):
    return at.session_state[F + name]


def _button(at, label: str):
    return next(b for b in at.button if b.label == label)


def _texts(at, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


def _finetune_jobs() -> list[dict]:
    return [j for j in jobs.list_jobs() if j["kind"] == "finetune"]


def _values(v) -> list:
    """A trace's values as a list (plotly writes numpy arrays as base64 'bdata')."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist() if isinstance(v, dict) else list(v)


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _figure(at, trace: str = "train loss") -> dict:
    """The plotly figure on the page that has a trace named ``trace``."""
    (fig,) = [f for f in _figures(at) if any(t.get("name") == trace for t in f["data"])]
    return fig


def test_without_pool_run_or_data_the_page_says_what_to_do(data, tmp_path, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "empty"))
    at = open_page("finetune")
    assert "Pool page" in _texts(at, "info")
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "store"))
    at = open_page("finetune")  # the newest pool, 'bare', has no Stage 1 run
    assert "Probe page" in _texts(at, "info") and not _figures(at)
    at = select_caps(at)
    # the default source is Label Studio, and nothing was pushed or pulled for this pool
    assert at.radio(key=F + "source").value == "labelstudio"
    warning = _texts(at, "warning")
    assert "no answers pulled yet: Annotate page -> Pull" in warning and "gold answers" in warning
    assert _button(at, "Launch fine-tune").disabled
    at.radio(key=F + "source").set_value("file").run()
    assert not at.exception and "Upload a .csv or .jsonl" in _texts(at, "info") and _button(at, "Launch fine-tune").disabled


def test_presets_fill_the_form_and_every_field_has_its_help(data):
    at = select_caps(open_page("finetune"))
    assert at.selectbox(key="ka2l.finetune.preset").value == "cpu-small"
    for name, value in FINETUNE_PRESETS["cpu-small"].items():
        assert _widget(at, name) == value, name
    at.selectbox(key="ka2l.finetune.preset").set_value("gpu-paper").run()
    assert not at.exception
    paper = FINETUNE_PRESETS["gpu-paper"]
    for name, value in paper.items():
        got = _widget(at, name)
        assert (got.split() if name == "targets" else got) == (list(value) if name == "targets" else value), name
    assert at.number_input(key=F + "grad_accum").value == 8 and at.number_input(key=F + "max_length").value == 2048
    assert at.number_input(key=F + "checkpoint_every").value == 100  # an advanced field, in the expander
    from ka2l.config import field_help

    helps = field_help(FinetuneConfig)
    widgets = {w.key: w for kind in ("number_input", "selectbox", "text_input", "radio") for w in getattr(at, kind)}
    for name in set(helps) - {"file", "project", "run_id", "gold_set"}:  # the run is the page's picker; file/project per source
        assert widgets[F + name].help == helps[name], name
    at.selectbox(key="ka2l.finetune.preset").set_value("cpu-small").run()
    assert _widget(at, "grad_accum") == 2 and _widget(at, "max_length") == 256 and _widget(at, "device") == "cpu"


def test_launch_queues_exactly_one_job_with_the_forms_values(data):
    at = select_caps(open_page("finetune"))
    at.radio(key=F + "source").set_value("gold").run()
    at.radio(key=F + "gold_set").set_value("all").run()
    at.number_input(key=F + "epochs").set_value(7.0)
    at.number_input(key=F + "lr").set_value(3e-4)
    at.number_input(key=F + "batch_size").set_value(2)
    at.number_input(key=F + "seed").set_value(11)
    at.text_input(key=F + "targets").input("q_proj v_proj")
    at.selectbox(key=F + "launcher").set_value("accelerate")  # the advanced settings' several-GPU block (on this CPU: 2 processes, gloo)
    at.number_input(key=F + "num_processes").set_value(2)
    at.run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Training pairs"]) + int(metrics["Held out"]) == 24, metrics  # every gold answer of the pool
    assert "It fits." in _texts(at, "success")
    assert not _finetune_jobs()
    _button(at, "Launch fine-tune").click().run()
    assert not at.exception, at.exception
    try:
        (job,) = _finetune_jobs()
        cfg = job["config"]["finetune"]
        assert job["config"]["pool"] == "caps" and job["status"] in jobs.PENDING
        assert (cfg["source"], cfg["gold_set"], cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["seed"], cfg["targets"], cfg["run_id"]) == \
            ("gold", "all", 7.0, 3e-4, 2, 11, ["q_proj", "v_proj"], data["run_id"])
        assert (cfg["launcher"], cfg["num_processes"], cfg["accelerate_config"]) == ("accelerate", 2, "")  # the job starts accelerate launch
        assert cfg["grad_accum"] == FINETUNE_PRESETS["cpu-small"]["grad_accum"]  # the rest from the preset
        assert f"Job {job['id']} queued" in _texts(at, "success")
        _button(at, "Launch fine-tune").click().run()  # the same settings again: information, not a second job
        assert not at.exception and not at.error
        assert f"already job {job['id']}" in _texts(at, "info")
        assert len(_finetune_jobs()) == 1
    finally:
        for j in _finetune_jobs():
            jobs.cancel(j["id"], wait=True)


def test_a_launch_that_cannot_fit_is_refused_with_the_fix(data):
    at = select_caps(open_page("finetune"))
    at.radio(key=F + "source").set_value("gold").run()
    at.number_input(key=F + "batch_size").set_value(64)
    at.number_input(key=F + "max_length").set_value(1 << 20)
    at.run()
    assert not at.exception, at.exception
    error = _texts(at, "error")
    assert "Preflight refuses this launch" in error and "does not fit" in error and "max_length" in error, error
    assert _button(at, "Launch fine-tune").disabled and not _finetune_jobs()
    at.number_input(key=F + "max_length").set_value(256).run()  # the fix: it fits again
    assert "It fits." in _texts(at, "success") and not _button(at, "Launch fine-tune").disabled


def test_a_finished_finetune_shows_its_curve_evaluation_and_adapter(data):
    at = select_caps(open_page("finetune"))
    fid = data["finetune_id"]
    with connect() as db:
        row = S.get_finetune(db, fid)
        log = S.log(db, fid)
    assert at.selectbox(key="ka2l.finetune.selected").value == fid
    traces = {t["name"]: t for t in _figure(at)["data"]}
    assert len(traces["train loss"]["x"]) == sum(r["split"] == "train" for r in log) == row["total_steps"]
    assert len(traces["held-out loss"]["y"]) == sum(r["split"] == "eval" for r in log) >= 2
    assert {m.label: m.value for m in at.metric}["Step"] == f"{row['step']} / {row['total_steps']}"
    frames = {tuple(d.value.columns): d.value for d in at.dataframe}
    metrics = next(v for k, v in frames.items() if k == ("metric", "base", "tuned", "tuned - base"))
    assert {"correct (%)", "BLEU", "ROUGE-L", "METEOR", "BERTScore"} <= set(metrics["metric"])
    assert metrics["base"].str.match(r"^\d+\.\d \[\d+\.\d, \d+\.\d\]$").all()
    questions = next(v for k, v in frames.items() if "tuned_answer" in k)
    assert len(questions) == row["n_eval"] and questions["gold"].notna().all() and questions["tuned_answer"].notna().all()
    assert "BERTScore model: **" in _texts(at, "caption")
    assert row["adapter_dir"] in [c.value for c in at.code]
    assert any(b.label.startswith("Download the adapter's sidecar") for b in at.get("download_button"))


def test_the_chart_follows_a_finetune_in_training_without_a_reload(data):
    """A fine-tune the worker is training: its chart gains points as the log grows, redrawn by the fragment alone."""
    with connect() as db:
        done = S.get_finetune(db, data["finetune_id"])
        fid = S.create_finetune(db, {**{k: done[k] for k in ("pool_id", "run_id", "config", "model", "data_source", "dataset_hash",
                                                              "n_train", "n_eval", "versions")},
                                     "config_hash": "live", "status": "training", "total_steps": 40, "step": 3, "seconds": 6.0})
        S.add_log(db, fid, [{"step": i, "split": "train", "loss": 3.0 - 0.1 * i, "lr": 1e-3, "tokens_per_s": 50.0} for i in range(1, 4)])
    at = select_caps(open_page("finetune"))
    assert at.selectbox(key="ka2l.finetune.selected").value == fid, "the newest fine-tune is shown"
    assert len(_figure(at)["data"][0]["x"]) == 3
    with connect() as db:  # the worker trains on
        S.add_log(db, fid, [{"step": i, "split": "train", "loss": 3.0 - 0.1 * i, "lr": 1e-3, "tokens_per_s": 50.0} for i in range(4, 9)]
                  + [{"step": 8, "split": "eval", "loss": 2.5}])
        S.update_finetune(db, fid, step=8, seconds=16.0)
    at = _rerun_fragments(at)
    assert not at.title, "only the fragment ran, not the page"
    traces = {t["name"]: t for t in _figure(at)["data"]}
    assert traces["train loss"]["x"] == list(range(1, 9)) and traces["held-out loss"]["x"] == [8]
    assert {m.label: m.value for m in at.metric}["Step"] == "8 / 40"
    with connect() as db:
        S.update_finetune(db, fid, status="interrupted")
    at = _rerun_fragments(at)  # it stopped: the whole page is redrawn
    assert at.title and any("is interrupted" in c.value for c in at.caption)


def test_the_boundary_shift_shows_the_moved_questions_and_one_map(data):
    from ka2l.ui.charts import hover_text
    from ka2l.views.shift import shift_summary, shift_table

    fid = data["finetune_id"]
    summary, table = shift_summary(fid), shift_table(fid)
    at = select_caps(open_page("finetune"))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Unknown before"] == f"{summary['share_unknown_before']:.0%}"
    assert metrics["Unknown after"] == f"{summary['share_unknown_after']:.0%}"
    assert metrics["Unknown → known"] == str(summary["n_unknown_to_known"])
    assert metrics["Known → unknown (forgetting)"] == str(summary["n_known_to_unknown"])
    assert metrics["Mean P(unknown) after"] == f"{summary['p_unknown_after_mean']:.3f}"
    moved = next(d.value for d in at.dataframe if "moved" in d.value.columns)
    assert len(moved) == summary["n_unknown_to_known"] + summary["n_known_to_unknown"] > 0, summary
    assert set(moved["question"]) == set(table.loc[table["moved"] != "", "question"])
    fig = _figure(at, "after fine-tune")
    traces = {t["name"]: t for t in fig["data"]}
    assert set(traces) == {"before fine-tune", "after fine-tune"} and traces["before fine-tune"]["marker"]["symbol"] != traces["after fine-tune"]["marker"]["symbol"]
    assert len(_values(traces["before fine-tune"]["x"])) == len(_values(traces["after fine-tune"]["y"])) == len(table) == 24
    questions = dict(zip(table["question_id"], table["question"]))
    assert all(c[1] == hover_text(questions[c[0]]) for c in traces["after fine-tune"]["customdata"])


def test_evaluate_and_reprobe_buttons_queue_their_jobs(data):
    fid = data["finetune_id"]
    at = select_caps(open_page("finetune"))
    try:
        at.number_input(key=f"finetune-eval-boot-{fid}").set_value(200)
        _button(at, "Evaluate").click().run()
        assert not at.exception, at.exception
        (job,) = [j for j in jobs.list_jobs() if j["kind"] == "evaluate"]
        assert job["config"]["evaluate"]["finetune_id"] == fid and job["config"]["evaluate"]["models"] == ["base", "tuned"]
        assert job["config"]["evaluate"]["bootstrap"] == 200 and f"Job {job['id']} evaluates fine-tune {fid}" in _texts(at, "success")
        _button(at, "Re-probe with the adapter").click().run()
        assert not at.exception, at.exception
        (job,) = [j for j in jobs.list_jobs() if j["kind"] == "reprobe"]
        assert job["config"]["reprobe"]["finetune_id"] == fid and job["status"] in jobs.PENDING  # queued behind the evaluation, or already started if it was quick
        _button(at, "Re-probe with the adapter").click().run()
        assert "already job" in _texts(at, "info") and len([j for j in jobs.list_jobs() if j["kind"] == "reprobe"]) == 1
    finally:
        for j in jobs.list_jobs():
            jobs.cancel(j["id"], wait=True)


def test_export_writes_the_adapter_and_the_llamafactory_recipe_and_offers_them(data):
    import io
    import zipfile

    from ka2l.views.finetune import exported, zip_folder

    fid = data["finetune_id"]
    at = select_caps(open_page("finetune"))
    assert exported(fid) is None and not any(b.label.startswith("Download the adapter (zip)") for b in at.get("download_button"))
    _button(at, "Export").click().run()
    assert not at.exception and not at.error, (at.exception, _texts(at, "error"))
    done = exported(fid)
    labels = {b.label for b in at.get("download_button")}
    assert {"Download the adapter (zip)", "Download the LLaMA-Factory dataset and recipe (zip)"} <= labels
    names = {n.split("/", 1)[1] for n in zipfile.ZipFile(io.BytesIO(zip_folder(done["adapter"]))).namelist()}
    assert {"adapter_model.safetensors", "adapter_config.json", "ka2l-finetune.json"} <= names
    names = {n.split("/", 1)[1] for n in zipfile.ZipFile(io.BytesIO(zip_folder(done["dataset"]))).namelist()}
    assert {"dataset_info.json", "llamafactory_train.yaml", "llamafactory_train.sh"} <= names
    assert "llamafactory-cli train" in "\n".join(c.value for c in at.code) and done["merged"] is None
