"""Every page through Streamlit's AppTest, over a real store with a finished Stage 1 run and a triage
run made by the memorising tiny model."""

from __future__ import annotations

import json
import os
import time

import pytest
from streamlit.testing.v1 import AppTest

from ka2l import jobs
from ka2l.augment.candidates import generate_candidates
from ka2l.config import DecoderConfig, GenerateConfig, TriageConfig
from ka2l.augment.train import train_decoder
from ka2l.paths import PROJECT_ROOT
from ka2l.probing.stage1 import run_stage1, run_triage
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import data_dir, import_pool, open_page, private_copy, stage1_cfg

APP = str(PROJECT_ROOT / "app.py")


@pytest.fixture(scope="module")
def app_data(tmp_path_factory, memo_model, capitals):
    folder = tmp_path_factory.mktemp("appdata")
    with data_dir(folder):
        import_pool(capitals)
        run_id = run_stage1("caps", stage1_cfg(memo_model))
        with connect() as db:
            probe_id = Q.list_probes(db, run_id)[0]["id"]
        run_triage("caps", TriageConfig(probe_id=probe_id, device="cpu"))
        decoder_id = train_decoder(DecoderConfig(probe_id=probe_id, backbone=str(memo_model), epochs=10, lr=3e-3, eval_size=8, device="cpu"))
        generate_candidates(GenerateConfig(decoder_id=decoder_id, per_question=2, noise=0.2, device="cpu"))
    return folder


@pytest.fixture
def app(app_data, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(app_data))
    return open_page


def test_empty_store_guides_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "empty"))
    for page in ("scores", "map", "probes", "probe", "augment", "annotate", "finetune", "experiment"):
        at = AppTest.from_file(APP, default_timeout=60).run()
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception
        assert any("Pool page" in i.value or "Probe page" in i.value for i in at.info), page


def test_pool_page_imports_a_demo_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "d"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.radio[0].set_value("Demo pool").run()
    at.selectbox[0].set_value("elements").run()
    assert at.metric[0].value == "206"
    at.text_input[0].set_value("my-elements")
    at.button[0].click().run()
    assert not at.exception
    assert any("Imported pool 'my-elements'" in s.value for s in at.success)
    at.button[0].click().run()  # a second import with the same name is refused, nothing lost
    assert any("already exists" in e.value for e in at.error)


def test_scores_page_filters_drills_down_and_downloads(app):
    at = app("scores")
    table = at.dataframe[0].value
    assert len(table) == 80 and {"se", "bise", "p_unknown", "correct", "gold", "triage_label"} <= set(table.columns)
    assert set(table["triage_label"]) <= {0, 1} and table["triage_label"].notna().all(), "every question has its triage label"
    label = next(s for s in at.selectbox if s.label == "Label")
    label.set_value("unknown").run()
    unknown = at.dataframe[0].value
    assert 0 < len(unknown) < 80 and set(unknown["bise"]) == {1}
    drill = next(s for s in at.selectbox if s.label == "Drill down into")
    assert at.subheader[0].value in set(unknown["question"])
    assert any(m.value.startswith("**Cluster") for m in at.markdown)
    assert drill.value in set(unknown["question_id"])


def test_map_page_builds_pca_and_umap_once(app, app_data):
    at = app("map")
    assert len(at.get("plotly_chart")) == 1
    assert list((app_data / "arrays").glob("run-1-layer*-pca.npy"))
    next(s for s in at.selectbox if s.label == "Projection").set_value("umap").run()
    assert not at.exception
    assert list((app_data / "arrays").glob("run-1-layer*-umap.npy"))


def test_probes_page_shows_the_evidence(app):
    at = app("probes")
    assert [m.label for m in at.metric][:2] == ["Known", "Unknown"]
    assert [s.value for s in at.subheader][:2] == ["Layer-wise AUROC", "Threshold criterion"]
    assert len(at.get("plotly_chart")) == 2 and len(at.dataframe) == 3  # baselines, robustness, cost


def test_settings_refuse_bad_values_and_keep_the_stored_ones(app):
    at = app("settings")
    next(s for s in at.selectbox if s.label == "Judge").set_value("nli")
    at.button[0].click().run()
    assert any("needs JudgeConfig.model" in e.value for e in at.error)
    at = app("settings")
    assert next(s for s in at.selectbox if s.label == "Judge").value == "lexical"


def test_probe_page_launches_a_job_that_finishes(app, memo_model):
    at = app("probe")
    next(t for t in at.text_input if t.label.startswith("Model")).set_value(str(memo_model))
    next(n for n in at.number_input if n.label == "Samples k").set_value(4)
    next(n for n in at.number_input if n.label == "Max new tokens").set_value(6)
    next(b for b in at.button if b.label == "Launch Stage 1").click().run()
    assert not at.exception
    assert any("submitted" in s.value for s in at.success)
    job = jobs.list_jobs()[0]
    deadline = time.time() + 180
    while time.time() < deadline and jobs.get(job["id"])["status"] not in ("done", "failed"):
        jobs.refresh()
        time.sleep(0.5)
    assert jobs.get(job["id"])["status"] == "done", jobs.get(job["id"])
    at = app("jobs")
    assert any(f"Job {job['id']}" in m.value for m in at.markdown)


def test_probe_page_queues_stage1_and_triage_on_the_ray_executor(app_data, tmp_path, monkeypatch):
    import sys

    private_copy(app_data, tmp_path, monkeypatch)
    monkeypatch.setattr(jobs, "_spawn", lambda job_id: None)  # the jobs stay queued: their stored config is what is checked
    at = open_page("probe")
    executors = [s for s in at.selectbox if s.label == "Executor"]
    assert [s.value for s in executors] == ["local", "local"] and list(executors[0].options) == ["local", "ray"]
    executors[0].set_value("ray")
    next(t for t in at.text_input if t.label == "Ray cluster address").set_value("auto")
    next(n for n in at.number_input if n.label == "Ray actors per stage").set_value(2)
    next(b for b in at.button if b.label == "Launch Stage 1").click().run()
    assert not at.exception and any("submitted" in s.value for s in at.success)
    job = jobs.list_jobs()[0]
    assert job["kind"] == "stage1" and job["status"] in ("queued", "starting")  # no worker was spawned
    assert job["config"]["stage1"]["executor"] == {"kind": "ray", "address": "auto", "num_actors": 2}
    [s for s in at.selectbox if s.label == "Executor"][1].set_value("ray")
    next(b for b in at.button if b.label == "Launch triage").click().run()
    job = jobs.list_jobs()[0]
    assert job["kind"] == "triage" and job["config"]["triage"]["executor"]["kind"] == "ray"
    # without Ray installed the page says how to get it and queues nothing
    monkeypatch.setitem(sys.modules, "ray", None)
    n = len(jobs.list_jobs())
    at = open_page("probe")
    [s for s in at.selectbox if s.label == "Executor"][0].set_value("ray")
    next(t for t in at.text_input if t.label.startswith("Model")).set_value("another/model")
    next(b for b in at.button if b.label == "Launch Stage 1").click().run()
    assert any("pip install 'ka2l[ray]'" in e.value for e in at.error) and len(jobs.list_jobs()) == n


def test_data_folder_setting_is_remembered_outside_the_data_folder(tmp_path, monkeypatch):
    from ka2l.errors import ConfigError
    from ka2l.paths import data_dir, set_data_dir

    monkeypatch.delenv("KA2L_DATA_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    set_data_dir(tmp_path / "first")  # never the checkout's own data/ folder
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/settings.py").run()
    assert next(t for t in at.text_input if t.label.startswith("Folder")).value == str((tmp_path / "first").resolve())
    field = next(t for t in at.text_input if t.label.startswith("Folder for the database"))
    field.set_value(str(tmp_path / "elsewhere"))
    next(b for b in at.button if b.label == "Use this folder").click().run()
    assert not at.exception
    assert data_dir() == (tmp_path / "elsewhere").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="Cannot use"):
        set_data_dir(tmp_path / "file" / "sub")
    assert data_dir() == (tmp_path / "elsewhere").resolve(), "a refused folder leaves the setting as it was"


def _section(at: AppTest, name: str) -> AppTest:
    at.get("button_group")[0].set_value(name).run()
    assert not at.exception, at.exception
    return at


def test_augment_page_shows_the_decoder_and_its_evidence(app):
    at = app("augment")
    assert any(s.label == "Decoder" and s.value == 1 for s in at.selectbox)
    tables = [t.value for t in at.dataframe]
    recon = next(t for t in tables if "BLEU" in t.columns)
    assert set(recon["when"]) == {"before", "after"} and set(recon["questions"]) == {"heldout", "train"}
    assert len(at.get("vega_lite_chart")) == 1, "the loss curve"


def test_augment_decoder_form_passes_the_launcher_settings_to_the_job(app):
    """The form's accelerate settings reach the job's config and its check: a sharded config is refused on the page,
    with the fix, and nothing is queued."""
    from ka2l import jobs
    from ka2l.paths import PROJECT_ROOT

    at = app("augment")
    before = len(jobs.list_jobs())
    next(s for s in at.selectbox if s.label == "Launcher").set_value("accelerate")
    next(n for n in at.number_input if n.label == "Processes (GPUs)").set_value(2)
    next(t for t in at.text_input if t.label.startswith("accelerate config file")).set_value(str(PROJECT_ROOT / "configs/accelerate/fsdp.yaml"))
    next(b for b in at.button if b.label == "Train decoder").click().run()
    assert not at.exception, at.exception
    assert any("a decoder trains with DDP only" in e.value for e in at.error), [e.value for e in at.error]
    assert len(jobs.list_jobs()) == before


def test_augment_page_generates_a_new_batch_as_a_job(app):
    at = _section(app("augment"), "generate")
    batches = next(t.value for t in at.dataframe)
    assert list(batches["batch"]) == [1] and batches["kept"].iloc[0] > 0
    assert next(n for n in at.number_input if n.label.startswith("Seed")).value == 1, "the next batch gets a new seed"
    next(b for b in at.button if b.label == "Generate candidates").click().run()
    assert any("submitted" in s.value for s in at.success), [e.value for e in at.error]
    job = jobs.list_jobs()[0]
    assert job["kind"] == "generate"
    deadline = time.time() + 180
    while time.time() < deadline and jobs.get(job["id"])["status"] not in ("done", "failed"):
        jobs.refresh()
        time.sleep(0.5)
    assert jobs.get(job["id"])["status"] == "done", jobs.get(job["id"])
    at = _section(app("augment"), "generate")
    assert list(next(t.value for t in at.dataframe)["batch"]) == [2, 1]


def test_augment_review_queue_approve_edit_reject_undo_and_export(app):
    at = _section(app("augment"), "review")
    pending = int(next(m for m in at.metric if m.label == "Pending").value)
    first = next(t for t in at.text_input if t.label.startswith("Candidate"))
    original = first.value
    next(b for b in at.button if b.label == "Approve").click().run()
    assert int(next(m for m in at.metric if m.label == "Approved").value) == 1
    assert next(t for t in at.text_input if t.label.startswith("Candidate")).value != original, "the next candidate is shown"

    at = _section(app("augment"), "review")  # a reload: the decision is stored, not in the session
    assert int(next(m for m in at.metric if m.label == "Pending").value) == pending - 1
    next(t for t in at.text_input if t.label.startswith("Candidate")).set_value("What is the capital of Atlantis?").run()
    next(b for b in at.button if b.label == "Approve edited").click().run()
    next(b for b in at.button if b.label == "Reject").click().run()
    assert [int(next(m for m in at.metric if m.label == k).value) for k in ("Approved", "Rejected")] == [2, 1]
    next(b for b in at.button if b.label.startswith("Undo last (rejected")).click().run()
    assert [int(next(m for m in at.metric if m.label == k).value) for k in ("Approved", "Rejected")] == [2, 0]

    at = _section(at, "approved")
    frame = at.dataframe[0].value
    assert list(frame["kind"]) == ["decoded", "decoded"] and "What is the capital of Atlantis?" in set(frame["question"])
    assert [d.label for d in at.get("download_button")] == ["Download JSONL", "Download CSV"]
    edited = frame[frame["question"] == "What is the capital of Atlantis?"].iloc[0]
    assert edited["edited"] and edited["source_ext_id"] and str(frame["candidate_id"].dtype) == "Int64", "ids are integers, sources named"
    next(b for b in at.button if b.label.startswith("Add the")).click().run()  # the run's unknown questions join the curation set
    originals = at.dataframe[0].value.query("kind == 'original'")
    assert len(originals) > 0 and originals["ext_id"].notna().all() and originals["answers"].map(len).all(), "pool ids and gold answers"


def _open(folder, page: str, **query) -> AppTest:
    """A fresh session (a reload) of ``page`` over the data in ``folder``, its URL carrying ``query``."""
    os.environ["KA2L_DATA_DIR"] = str(folder)
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.switch_page(f"app_pages/{page}.py")
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def app_copy(app_data, tmp_path, monkeypatch):
    """A copy of the app's store, for tests whose writes the other tests must not see."""
    return private_copy(app_data, tmp_path, monkeypatch)


def test_augment_step_is_kept_in_the_url_so_a_reload_returns_to_it(app_copy):
    at = _open(app_copy, "augment")
    steps = at.get("button_group")[0]
    assert steps.value == "decoder" and steps.proto.query_param_key == "step", "the step is bound to ?step= in the URL"
    at = _open(app_copy, "augment", step="3 · Review")  # what the browser's URL holds after picking step 3, then a reload
    assert at.get("button_group")[0].value == "review" and any(m.label == "Pending" for m in at.metric)
    at = _open(app_copy, "augment", step="4 · Approved set")
    assert any(m.label == "Approved set" for m in at.metric)


def test_review_queue_opens_the_candidate_picked_in_its_table(app_copy):
    at = _section(_open(app_copy, "augment"), "review")
    table = next(t for t in at.dataframe if t.key and t.key.startswith("ka2l.review.table"))
    rows = table.value
    assert next(t for t in at.text_input if t.label.startswith("Candidate")).value == rows.iloc[0]["text"], "the queue's first"
    at.session_state[table.key] = {"selection": {"rows": [5], "columns": []}}  # a click on the sixth row
    at.run()
    assert next(t for t in at.text_input if t.label.startswith("Candidate")).value == rows.iloc[5]["text"]
    assert any(c.value.startswith("picked from the table (6 of") and f"candidate {rows.iloc[5]['id']} " in c.value for c in at.caption)
    next(b for b in at.button if b.label == "Reject").click().run()
    from ka2l.augment import review

    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
    assert {c["id"] for c in review.queue(pool_id, "rejected")} == {int(rows.iloc[5]["id"])}, "the picked candidate was decided"
    assert next(t for t in at.text_input if t.label.startswith("Candidate")).value == rows.iloc[0]["text"], "then the queue goes on"
    assert not any(c.value.startswith("picked from the table") for c in at.caption), "the pick does not stick to another row"


def _rerun_fragments(at: AppTest) -> AppTest:
    """What the browser does every ``run_every`` seconds: rerun only the page's fragments, not the page.
    AppTest has no call for it, so the run is asked for the fragments as Streamlit's runtime asks."""
    import functools

    import streamlit.testing.v1.local_script_runner as runner

    real = runner.RerunData
    runner.RerunData = functools.partial(real, fragment_id_queue=list(at._fragment_storage._fragments), is_auto_rerun=True)
    try:
        at.run()
    finally:
        runner.RerunData = real
    assert not at.exception, at.exception
    return at


def _chart_rows(at: AppTest) -> int:
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    (chart,) = at.get("vega_lite_chart")
    return len(convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data))


def test_augment_loss_chart_updates_live_while_the_decoder_trains(app_copy):
    from ka2l.store import augment as S

    with connect() as db:
        done = S.list_decoders(db)[0]
        training = S.create_decoder(db, {**{k: done[k] for k in ("probe_id", "run_id", "pool_id", "layer", "pooling", "backbone", "config")},
                                         "config_hash": "live", "status": "training"})
        S.update_decoder(db, training, total_steps=100, step=3)
        S.add_losses(db, training, [(i, 0, 5.0 - 0.1 * i) for i in range(1, 4)])
    at = _open(app_copy, "augment")
    assert _chart_rows(at) == 3 and any(c.value.startswith("Training: step 3 of 100") for c in at.caption)
    with connect() as db:  # the worker trains on
        S.add_losses(db, training, [(i, 0, 5.0 - 0.1 * i) for i in range(4, 9)])
        S.update_decoder(db, training, step=8)
    at = _rerun_fragments(at)
    assert _chart_rows(at) == 8 and any(c.value.startswith("Training: step 8 of 100") for c in at.caption), "redrawn without a reload"
    assert not at.title, "only the fragment ran, not the page"
    with connect() as db:
        S.update_decoder(db, training, status="done")
    at = _rerun_fragments(at)  # finished: the page is redrawn with the decoder's report
    assert at.title and not any(c.value.startswith("Training:") for c in at.caption)


def test_augment_shows_a_new_decoders_live_curve_without_a_reload(app_copy):
    """The page was drawn while the decoder job was only queued: its decoder row did not exist yet. When the
    worker creates it and training starts, the page redraws itself so the live curve appears (issue 11 item 3:
    before, it appeared only after a reload)."""
    from ka2l.store import augment as S
    from ka2l.store.db import now

    with connect() as db:
        done = S.list_decoders(db)[0]
        db["jobs"].insert({"kind": "decoder", "config": json.dumps({"decoder": {"probe_id": done["probe_id"]}}), "status": "starting",
                           "created_at": now(), "updated_at": now(), "started_at": now()})  # a worker being spawned (no pid yet)
    at = _open(app_copy, "augment")
    assert not any(c.value.startswith("Training:") for c in at.caption)
    with connect() as db:  # the worker starts: its decoder row appears and trains
        new = S.create_decoder(db, {**{k: done[k] for k in ("probe_id", "run_id", "pool_id", "layer", "pooling", "backbone", "config")},
                                    "config_hash": "new", "status": "training"})
        S.update_decoder(db, new, total_steps=50, step=2)
        S.add_losses(db, new, [(1, 0, 4.0), (2, 0, 3.5)])
    at = _rerun_fragments(at)
    assert at.title, "the page was redrawn"
    assert _chart_rows(at) == 2 and any(c.value.startswith("Training: step 2 of 50") for c in at.caption)
