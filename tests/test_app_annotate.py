"""The Annotate page, the Settings page's Label Studio connection and the Map page's annotation rank,
through Streamlit's AppTest over a real store (Stage 1 on the memorising tiny model, six curated
questions) and a real Label Studio (the session fixture ``label_studio``)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ka2l import jobs
from ka2l.annotate import connection
from ka2l.annotate import push as P
from ka2l.annotate.labelstudio import Client
from ka2l.probing.stage1 import run_stage1
from ka2l.store import annotate as A
from ka2l.store import curation
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import N_KNOWN, data_dir, import_pool, open_page, private_copy, stage1_cfg, wait_for

N_CURATED = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory, memo_model, capitals):
    folder = tmp_path_factory.mktemp("app-annotate")
    with data_dir(folder):
        pool = import_pool(capitals, rows=capitals[N_KNOWN - 12:N_KNOWN + 12])  # 12 the tiny model knows, 12 it does not
        run_id = run_stage1("caps", stage1_cfg(memo_model))
        with connect() as db:
            unknown = [r["question_id"] for r in Q.load_scores(db, run_id) if r["bise"] == 1]
        assert len(unknown) >= N_CURATED, unknown
        curation.add(pool, unknown[:N_CURATED], "test")
    return folder


@pytest.fixture
def data(store, tmp_path, monkeypatch):
    return private_copy(store, tmp_path, monkeypatch)  # the conftest hides any Label Studio connection of the developer's


def _button(at, label: str):
    return next(b for b in at.button if b.label.startswith(label))


def _texts(at) -> str:
    """Everything the page shows as text (to check a secret is not among it)."""
    parts = []
    for kind in ("markdown", "caption", "success", "info", "warning", "error", "text_input", "metric"):
        for el in getattr(at, kind):
            parts.append(str(getattr(el, "value", "")) + str(getattr(el, "label", "")) + str(getattr(el, "placeholder", "")))
    return "\n".join(parts)


def test_page_without_a_connection_previews_the_order_and_says_how_to_connect(data):
    at = open_page("annotate")
    assert any("Not connected to Label Studio" in w.value for w in at.warning)
    preview = at.dataframe[0].value
    assert len(preview) == N_CURATED and list(preview["rank"]) == list(range(1, N_CURATED + 1)), "shown in annotation order"
    assert not preview["pushed"].any()
    assert {m.label: m.value for m in at.metric}["To push"] == str(N_CURATED)
    assert next(b for b in at.button if b.label.startswith("Push ")).disabled, "no push without a connection"
    assert _button(at, "Pull answers").disabled
    assert any("the first push creates one" in c.value for c in at.caption)
    at = open_page("annotate")
    at.slider[0].set_value(1.0).run()  # the diversity changes the preview's order, not what is in it
    assert not at.exception and len(at.dataframe[0].value) == N_CURATED


def test_settings_saves_the_connection_to_a_private_file_and_shows_the_token_masked(data, label_studio):
    at = open_page("settings")
    form_url = next(t for t in at.text_input if t.label == "Label Studio URL")
    form_token = next(t for t in at.text_input if t.label == "Token")
    form_url.input(label_studio.url)
    form_token.input("not-the-token")
    _button(at, "Test connection").click().run()
    assert not at.exception
    assert any("token" in e.value.lower() for e in at.error), "a refused token is a message, not a traceback"
    assert not connection.secrets_file().exists(), "testing saves nothing"

    at = open_page("settings")
    next(t for t in at.text_input if t.label == "Label Studio URL").input(label_studio.url)
    next(t for t in at.text_input if t.label == "Token").input(label_studio.token)
    _button(at, "Test connection").click().run()
    assert any("signs in as" in s.value for s in at.success)
    _button(at, "Save connection").click().run()
    assert not at.exception
    path = connection.secrets_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text())["token"] == label_studio.token
    assert any("Saved the Label Studio connection" in s.value for s in at.success)
    assert any(connection.mask(label_studio.token) in m.value for m in at.markdown), "the stored token, masked"
    assert label_studio.token not in _texts(at), "the token itself is never on the page"

    at = open_page("annotate")  # the page uses the saved connection
    assert any(f"Connected to {label_studio.url}" in s.value for s in at.success)


def test_push_follow_pull_and_download_from_the_page(data, label_studio, monkeypatch):
    monkeypatch.setenv(connection.ENV_URL, label_studio.url)
    monkeypatch.setenv(connection.ENV_TOKEN, label_studio.token)
    at = open_page("annotate")
    assert any(f"Connected to {label_studio.url}" in s.value for s in at.success)
    next(t for t in at.text_input if t.label.startswith("Project title")).input("app round trip")
    _button(at, f"Push {N_CURATED} task(s)").click().run()
    assert any("Job 1 pushes" in s.value for s in at.success), [e.value for e in at.error]
    wait_for(lambda: jobs.get(1)["status"] in ("done", "failed"), timeout=240)
    assert jobs.get(1)["status"] == "done", jobs.get(1)["error"]

    with connect() as db:
        (project,) = A.projects(db)
        links = A.links(db, project["id"])
    client = Client(label_studio.url, label_studio.token)
    first, second = links[0], links[1]
    answer = [{"from_name": P.ANSWER, "to_name": P.QUESTION, "type": "textarea", "value": {"text": ["Ankara"]}}]
    other = [{"from_name": P.ANSWER, "to_name": P.QUESTION, "type": "textarea", "value": {"text": ["Istanbul"]}}]
    client.create_annotation(first["task_id"], answer)
    client.create_annotation(second["task_id"], answer)
    client.create_annotation(second["task_id"], other)  # two annotators disagree

    at = open_page("annotate")
    link = next(b for b in at.get("link_button"))
    assert link.proto.url == f"{label_studio.url}/projects/{project['project_id']}/data"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pushed"] == str(N_CURATED) and metrics["Annotated in Label Studio"] == "2" and metrics["Pulled into ka2l"] == "0"
    assert metrics["To push"] == "0" and metrics["Already pushed"] == str(N_CURATED)
    _button(at, "Pull answers").click().run()
    assert any("pulls the answers" in s.value for s in at.success)
    wait_for(lambda: jobs.get(2)["status"] in ("done", "failed"), timeout=240)
    assert jobs.get(2)["status"] == "done", jobs.get(2)["error"]

    at = open_page("annotate")
    table = next(d for d in at.dataframe if "all_answers" in d.value.columns).value
    assert len(table) == N_CURATED
    row = table[table["question"] == first["question"]].iloc[0]
    assert row["answer"] == "Ankara" and row["status"] == "answered" and not row["conflict"]
    assert table[table["question"] == second["question"]].iloc[0]["conflict"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Conflicts"] == "1" and metrics["Answered"] == "2" and metrics["Pending"] == str(N_CURATED - 2)
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels == ["Alpaca JSON (LLaMA-Factory)", "dataset_info.json", "JSONL (datasets)", "CSV"]
    next(t for t in at.toggle if t.label == "Only conflicts").set_value(True).run()
    only = next(d for d in at.dataframe if "all_answers" in d.value.columns).value
    assert list(only["question"]) == [second["question"]]


def test_map_shows_the_annotation_rank_and_the_unknown_region_it_covers(data):
    at = open_page("map")
    metric = next(m for m in at.metric if m.label.startswith("The first"))
    assert metric.label == f"The first {N_CURATED} tasks cover" and metric.value.endswith("of the map's unknown region")
    share = int(metric.value.split("%")[0])
    assert 0 < share <= 100
    assert any("the order the next push would use" in c.value for c in at.caption)
    box = next(n for n in at.number_input if n.label == "First N tasks")
    box.set_value(1).run()
    fewer = int(next(m for m in at.metric if m.label.startswith("The first")).value.split("%")[0])
    assert fewer <= share
    assert _rank_ring_labels(at, 1) == ["1"]
    box.set_value(N_CURATED).run()
    assert sorted(_rank_ring_labels(at, N_CURATED), key=int) == [str(r) for r in range(1, N_CURATED + 1)]


def _rank_ring_labels(at, n: int) -> list[str]:
    """The rank labels of the map's ring trace for the first ``n`` tasks (the figure as the page sent it)."""
    import json

    figures = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    rings = [t for f in figures for t in f["data"] if t.get("name") == f"first {n} tasks (rank)"]
    assert len(rings) == 1, [t.get("name") for f in figures for t in f["data"]]
    return list(rings[0]["text"])
