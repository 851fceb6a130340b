"""What a new curator hits in the first hour (issue 11), page by page through AppTest, over a real
store with a finished Stage 1 run of the memorising tiny model. Stage 2 is not needed here."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from streamlit.elements.arrow import DataframeSelectionState, DataframeState
from streamlit.elements.plotly_chart import PlotlySelectionState, PlotlyState
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from ka2l.paths import PROJECT_ROOT
from ka2l.probing.stage1 import run_stage1
from ka2l.store import curation
from helpers import data_dir, import_pool, open_page, stage1_cfg

APP = str(PROJECT_ROOT / "app.py")


@pytest.fixture(scope="module")
def stage1_data(tmp_path_factory, memo_model, capitals):
    folder = tmp_path_factory.mktemp("curator")
    with data_dir(folder):
        import_pool(capitals)
        run_stage1("caps", stage1_cfg(memo_model))
    return folder


@pytest.fixture
def app(stage1_data, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(stage1_data))
    return open_page


@pytest.fixture
def media(monkeypatch):
    """The bytes behind every media URL the app hands out (download buttons), by file id."""
    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def keep(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        files[file_id] = path_or_data if isinstance(path_or_data, bytes) else open(path_or_data, "rb").read()
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    return files


def _button(at: AppTest, start: str):
    return next(b for b in at.button if b.label.startswith(start))


def _selectbox(at: AppTest, label: str):
    return next(s for s in at.selectbox if s.label == label)


# -- item 1: a second pool ------------------------------------------------------------------------

def test_importing_a_second_pool_makes_it_active_without_a_crash():
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.radio[0].set_value("Demo pool").run()
    for demo, name in (("elements", "first"), ("capitals", "second")):
        _selectbox(at, "Demo pool").set_value(demo).run()
        next(t for t in at.text_input if t.label == "Pool name").set_value(name)
        _button(at, "Import pool").click().run()
        assert not at.exception, at.exception
        assert any(f"Imported pool {name!r}" in s.value for s in at.success), [e.value for e in at.error]
        stored = at.dataframe[-1].value
        assert list(stored["name"]) == ["first", "second"][: len(stored)] and name in set(stored["name"])
        active = next(s for s in at.sidebar.selectbox if s.label == "Active pool")
        assert active.value == int(stored.loc[stored["name"] == name, "id"].iloc[0]), "the imported pool is the active one"


# -- items 4 and 8: Scores ------------------------------------------------------------------------

def _select_rows(at: AppTest, rows: list[int]) -> AppTest:
    """Rows picked in the table, as the browser reports them."""
    at.session_state["scores-table"] = DataframeState(selection=DataframeSelectionState(rows=rows, columns=[], cells=[]))
    at.run()
    assert not at.exception, at.exception
    return at


def _downloads(at: AppTest, media: dict[str, bytes]) -> dict[str, bytes]:
    """Every download button's label and its file, which must be ready before the click."""
    found = {}
    for button in at.get("download_button"):
        proto = button.proto
        assert not proto.deferred_file_id, f"{proto.label!r} builds its file only on click (it hung in the browser)"
        assert proto.url, f"{proto.label!r} has no file"
        found[proto.label] = media[proto.url.rsplit("/", 1)[1].split(".")[0]]
    return found


def test_scores_downloads_are_ready_files_of_the_filtered_table(app, media):
    at = app("scores")
    _selectbox(at, "Label").set_value("unknown").run()
    shown = at.dataframe[0].value
    _selectbox(at, "Drill down into").set_value(int(shown["question_id"].iloc[-1])).run()  # where the downloads hung
    assert not at.exception, at.exception
    files = _downloads(at, media)
    assert set(files) == {"Download CSV", "Download JSONL"}
    rows = list(csv.DictReader(io.StringIO(files["Download CSV"].decode("utf-8"))))
    assert [r["question"] for r in rows] == list(shown["question"]) and {r["bise"] for r in rows} == {"1"}
    lines = [json.loads(line) for line in files["Download JSONL"].decode("utf-8").splitlines()]
    assert [r["question"] for r in lines] == list(shown["question"]) and {r["bise"] for r in lines} == {1}
    assert all(b.proto.ignore_rerun for b in at.get("download_button")), "a download must not rerun the page"


def test_scores_table_shows_the_curation_set_and_removes_from_it(app):
    at = app("scores")
    table = at.dataframe[0].value
    assert "in_set" in table.columns and not table["in_set"].any()
    at = _select_rows(at, [0, 1, 2])
    _button(at, "Add 3 selected").click().run()
    assert any("the curation set has 3" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert table["in_set"].tolist()[:3] == [True, True, True] and int(table["in_set"].sum()) == 3
    at = _select_rows(at, [1, 2, 3])
    remove = _button(at, "Remove")
    assert remove.label.startswith("Remove 2 selected"), "only the selected rows that are in the set"
    remove.click().run()
    assert not at.exception, at.exception
    assert any("the curation set has 1" in s.value for s in at.success)
    assert at.dataframe[0].value["in_set"].tolist()[:4] == [True, False, False, False]
    pool_id = at.session_state["ka2l.pool_id"]
    curation.remove(pool_id, [m["question_id"] for m in curation.members(pool_id)])  # leave the module's store as found


def test_map_says_the_curation_set_total(app):
    at = app("map")
    from ka2l.views.tables import scores_frame

    ids = scores_frame(1)["question_id"].tolist()[:4]
    assert not curation.members(at.session_state["ka2l.pool_id"]), "tests leave the curation set empty"
    at.session_state["map"] = PlotlyState(selection=PlotlySelectionState(points=[{"customdata": [i]} for i in ids], point_indices=[], box=[], lasso=[]))
    at.run()
    assert not at.exception, at.exception
    _button(at, "Add 4 selected").click().run()
    assert not at.exception, at.exception
    assert any("Added 4 new question(s); the curation set now has 4." in s.value for s in at.success), [s.value for s in at.success]
    pool_id = at.session_state["ka2l.pool_id"]
    curation.remove(pool_id, ids)


# -- item 9: small samples ------------------------------------------------------------------------

def test_probes_page_says_when_a_split_is_too_small_and_what_would_do(app):
    at = app("probes")
    test_split = next(w.value for w in at.warning if w.value.startswith("The test split holds"))
    from ka2l.ui.data import split_counts

    counts, shares = split_counts(1)
    assert counts["test"]["n"] < 30 and f"holds {counts['test']['n']} questions" in test_split
    assert "too few to conclude" in test_split and "a pool of about" in test_split and "(this one has 80)" in test_split
    assert "too few to conclude" in next(m.value for m in at.metric if m.label.startswith("Probe test AUROC"))
    frames = [t.value for t in at.dataframe]  # baselines, threshold robustness and the cost meter, picked by their columns
    baselines = next(f for f in frames if "Method" in f.columns)
    robustness = next(f for f in frames if "Unknown share" in f.columns)
    assert {"Method", "AUROC vs BiSE"} <= set(baselines.columns) and "auroc_bise" not in baselines.columns
    assert {"Threshold τ (nats)", "Unknown share"} <= set(robustness.columns)
    assert not any(len(c.dataframe) for c in at.columns), "tables take the page's width, not half of it in a column"


# -- item 10: upload messages and settings --------------------------------------------------------

def _pool_page_upload(filename: str, content: bytes) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.get("file_uploader")[0].upload(filename, content, "text/csv")
    at.run()
    assert not at.exception, at.exception
    return at


def test_upload_without_a_question_column_names_the_users_file_and_maps_a_column():
    at = _pool_page_upload("my questions.csv", b"prompt,answer\nCapital of Peru?,Lima\nCapital of Chad?,N'Djamena\n")
    message = at.error[0].value
    assert "my questions.csv" in message and "/tmp" not in message and "upload.csv" not in message, message
    mapping = _selectbox(at, "Column holding the questions")
    assert list(mapping.options) == ["prompt", "answer"]
    mapping.set_value("prompt").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert next(m for m in at.metric if m.label == "Questions").value == "2"
    assert next(m for m in at.metric if m.label == "With gold answers").value == "2"
    _button(at, "Import pool").click().run()
    assert any("Imported pool 'my questions'" in s.value for s in at.success)
    stored = at.dataframe[-1].value
    assert stored.iloc[0]["file"] == "my questions.csv" and stored.iloc[0]["gold answers"] == "yes", stored.iloc[0].to_dict()


def test_upload_messages_name_the_pages_controls_not_cli_flags():
    at = _pool_page_upload("gaps.csv", b"question,answer\nCapital of Peru?,Lima\n,Paris\n")
    message = at.error[0].value
    assert "gaps.csv" in message and "Leave out invalid rows" in message and "--skip-invalid" not in message, message
    next(c for c in at.checkbox if c.label.startswith("Leave out invalid rows")).check().run()
    assert next(m for m in at.metric if m.label == "Questions").value == "1"
    for _ in range(2):  # the second import of the same name is refused
        next(t for t in at.text_input if t.label == "Pool name").set_value("gaps")
        _button(at, "Import pool").click().run()
    message = at.error[0].value
    assert "already exists" in message and "Pool name" in message and "--name" not in message, message


def test_a_txt_file_is_refused_in_a_visible_message():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.get("file_uploader")[0].proto.type, "the widget takes any file, so a wrong one is explained, not hidden in a tooltip"
    at = _pool_page_upload("notes.txt", b"Capital of Peru?\nCapital of Chad?\n")
    message = at.error[0].value
    assert "notes.txt" in message and "CSV" in message, message


def test_settings_refuse_a_device_this_machine_lacks_and_the_sidebar_follows_a_save(tmp_path):
    torch = pytest.importorskip("torch")
    missing = "cuda" if not torch.cuda.is_available() else "mps" if not torch.backends.mps.is_available() else None
    if missing is None:
        pytest.skip("this machine has every device")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/settings.py").run()
    _selectbox(at, "Device").set_value(missing)
    _button(at, "Save").click().run()
    assert any(missing in e.value and "auto" in e.value for e in at.error), [e.value for e in at.error]
    assert "device `auto`" in at.sidebar.caption[-2].value, "nothing stored"
    _selectbox(at, "Device").set_value("cpu")
    _button(at, "Save").click().run()
    assert not at.exception and any("Saved" in s.value for s in at.success)
    assert "device `cpu`" in at.sidebar.caption[-2].value, [c.value for c in at.sidebar.caption]
