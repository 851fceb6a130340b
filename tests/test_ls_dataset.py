"""The SFT dataset from pulled answers: (question, answer) pairs with provenance, LLaMA-Factory's alpaca
JSON with its dataset_info.json entry, JSONL for ``datasets`` and formula-safe CSV. The store is filled
the way a pull fills it: ``pull.parse_export`` over tasks shaped like Label Studio 1.23's JSON export
(the round trip against a real server is in test_ls_pull.py)."""

from __future__ import annotations

import json

import pandas as pd
from helpers import import_pool

from ka2l.annotate import dataset, pull
from ka2l.store import annotate as A
from ka2l.store import queries as Q
from ka2l.store.db import connect
from ka2l.views.export import to_safe_csv

URL, LS_PROJECT = "http://127.0.0.1:8080", 7
QUESTIONS = ["What is the capital of France?", 'Which formula is =HYPERLINK("http://evil")?', "Who painted Guernica?",
             "What is the capital of Atlantis?", "Who is nobody?", "Wie heißt die Hauptstadt Österreichs?"]


def annotation(ann_id: int, task_id: int, text: str | None = None, cannot: bool = False, skipped: bool = False) -> dict:
    """One annotation as Label Studio's JSON export writes it."""
    result = []
    if text is not None:
        result.append({"from_name": pull.ANSWER, "to_name": "question", "type": "textarea", "value": {"text": text.split("\n")}})
    if cannot:
        result.append({"from_name": pull.FLAG, "to_name": "question", "type": "choices", "value": {"choices": [pull.CANNOT_ANSWER]}})
    stamp = f"2026-11-25T04:07:{ann_id:02d}.092249Z"
    return {"id": ann_id, "completed_by": 1, "result": result, "was_cancelled": skipped, "ground_truth": False,
            "created_at": stamp, "updated_at": stamp, "lead_time": 2.5, "task": task_id, "project": LS_PROJECT}


def seed(name: str = "ds") -> int:
    """A pool pushed to one project (task ids 100...) and pulled: 0 answered, 1 answered with a formula
    and two lines, 2 conflicting (tie: the later 'Picasso' wins), 3 cannot answer, 4 skipped, 5 unicode."""
    pool_id = import_pool(None, name=name, rows=[(q, [f"gold {i}"]) for i, q in enumerate(QUESTIONS)])
    tasks = [(0, [annotation(1, 100, "Paris")]),
             (1, [annotation(2, 101, '=HYPERLINK("http://evil")\nsecond line')]),
             (2, [annotation(3, 102, "Goya"), annotation(4, 102, "Picasso")]),
             (3, [annotation(5, 103, cannot=True)]),
             (4, [annotation(6, 104, skipped=True)]),
             (5, [annotation(7, 105, "Wien – „die Stadt“")])]
    export = [{"id": 100 + i, "annotations": anns, "data": {"question": QUESTIONS[i]}} for i, anns in tasks]
    with connect() as db:
        qids = [q["id"] for q in Q.pool_questions(db, pool_id)]
        project = A.add_project(db, pool_id, URL, LS_PROJECT, f"ka2l: {name}", "hash")
        A.add_links(db, project, [{"item_key": f"q:{qid}", "task_id": 100 + i, "question": q, "rank": i + 1}
                                  for i, (qid, q) in enumerate(zip(qids, QUESTIONS))])
        A.upsert_annotations(db, project, pull.parse_export(export))
    return project


def test_pairs_are_the_chosen_answers_with_provenance():
    project = seed()
    pairs = dataset.pairs("ds")
    assert list(pairs.columns) == list(dataset.PAIR_COLUMNS)
    assert pairs["question"].tolist() == [QUESTIONS[i] for i in (0, 1, 2, 5)]  # no cannot-answer, no skipped
    assert pairs["answer"].tolist() == ["Paris", '=HYPERLINK("http://evil")\nsecond line', "Picasso", "Wien – „die Stadt“"]
    first = pairs.iloc[0]
    with connect() as db:
        qid = Q.pool_questions(db, Q.get_pool(db, "ds")["id"])[0]["id"]
    assert (first["pool"], first["kind"], first["item_key"], first["question_id"], first["ext_id"], first["source"]) == \
        ("ds", "original", f"q:{qid}", qid, "0", "label studio")
    assert (first["annotation_id"], first["annotator"], first["votes"], first["project"], first["ls_project_id"], first["task_id"]) == \
        (1, "user 1", 1, project, LS_PROJECT, 100)
    assert first["task_url"] == f"{URL}/projects/{LS_PROJECT}/data?task=100"
    assert pairs["conflict"].tolist() == [False, False, True, False] and pairs.loc[2, "decided_by"] == "latest (tie)"
    assert pd.isna(pairs.loc[0, "candidate_id"])
    assert dataset.pairs("ds", conflicts=False)["question"].tolist() == [QUESTIONS[i] for i in (0, 1, 5)]


def test_llamafactory_alpaca_file_and_its_dataset_info_entry(tmp_path):
    seed()
    pairs = dataset.pairs("ds")
    folder = tmp_path / "lf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    name = dataset.dataset_name("ds")
    paths = dataset.write_llamafactory(pairs, folder, name)

    records = json.loads(paths["data"].read_text(encoding="utf-8"))
    assert records == [{"instruction": q, "input": "", "output": a} for q, a in zip(pairs["question"], pairs["answer"])]
    assert paths["data"].read_bytes() == dataset.alpaca_json(pairs)
    info = json.loads(paths["dataset_info"].read_text(encoding="utf-8"))
    assert info["alpaca_en_demo"] == {"file_name": "alpaca_en_demo.json"}  # other datasets' entries are kept
    entry = info[name]
    assert entry["formatting"] == "alpaca" and (folder / entry["file_name"]) == paths["data"]
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    assert set(entry["columns"].values()) == set(records[0])  # the columns named are the file's keys
    assert not list(folder.glob("*.tmp"))


def test_jsonl_round_trips_every_pair_and_its_provenance(tmp_path):
    seed()
    pairs = dataset.pairs("ds")
    path = dataset.write_jsonl(pairs, tmp_path / "out" / "ds.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs)
    rows = [json.loads(line) for line in lines]
    assert [(r["question"], r["answer"]) for r in rows] == list(zip(pairs["question"], pairs["answer"]))
    assert rows[0]["candidate_id"] is None and rows[0]["question_id"] == int(pairs.loc[0, "question_id"])  # null, never NaN
    assert set(rows[0]) == set(dataset.PAIR_COLUMNS)
    back = pd.read_json(path, lines=True, dtype=False)
    pd.testing.assert_frame_equal(back[["question", "answer", "item_key", "task_url"]], pairs[["question", "answer", "item_key", "task_url"]])
    assert "Wien – „die Stadt“" in path.read_text(encoding="utf-8")  # not \u-escaped


def test_csv_download_is_formula_safe():
    seed()
    csv = to_safe_csv(dataset.pairs("ds")).decode("utf-8")
    assert "'=HYPERLINK" in csv and ',=HYPERLINK' not in csv and '"=HYPERLINK' not in csv


def test_a_project_without_answers_gives_an_empty_dataset_not_an_error(tmp_path):
    pool_id = import_pool(None, name="empty", rows=[("Q1?", ["a"])])
    with connect() as db:
        qid = Q.pool_questions(db, pool_id)[0]["id"]
        project = A.add_project(db, pool_id, URL, 9, "ka2l: empty", "hash")
        A.add_links(db, project, [{"item_key": f"q:{qid}", "task_id": 1, "question": "Q1?", "rank": 1}])
    pairs = dataset.pairs("empty")
    assert pairs.empty and list(pairs.columns) == list(dataset.PAIR_COLUMNS)
    assert json.loads(dataset.alpaca_json(pairs)) == [] and dataset.to_jsonl(pairs) == b""
    assert json.loads(dataset.write_llamafactory(pairs, tmp_path, "ka2l_empty")["data"].read_text()) == []
