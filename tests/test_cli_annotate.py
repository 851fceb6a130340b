"""``python -m ka2l annotate push|pull|status|export|serve`` against a real Label Studio (the session
fixture ``label_studio``): the round trip from the command line, a background push as a job whose row
holds no token, and the messages a user gets without a connection or a project."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ka2l import jobs, paths
from ka2l.annotate import connection
from ka2l.annotate import push as P
from ka2l.annotate.connection import mask
from ka2l.annotate.labelstudio import Client
from ka2l.cli.main import main
from ka2l.probing.stage1 import run_stage1
from ka2l.store import annotate as A
from ka2l.store import curation
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import data_dir, import_pool, private_copy, stage1_cfg, wait_for

HOSTILE = '=HYPERLINK("http://x","y") <script>alert(1)</script> What is the capital of nowhere?'
N_CURATED = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory, memo_model, capitals):
    """A pool with a finished Stage 1 run and N_CURATED curated questions (the hostile one among them)."""
    folder = tmp_path_factory.mktemp("cli-annotate")
    with data_dir(folder):
        pool = import_pool(capitals, rows=capitals[:24] + [(HOSTILE, ["nowhere"])])
        run_stage1("caps", stage1_cfg(memo_model))
        with connect() as db:
            qids = [q["id"] for q in Q.pool_questions(db, pool)]
        curation.add(pool, qids[:N_CURATED - 1] + qids[-1:], "test")
    return folder


@pytest.fixture
def data(store, tmp_path, monkeypatch):
    """A private copy of the module's store for this test."""
    return private_copy(store, tmp_path, monkeypatch)


@pytest.fixture
def connected(label_studio, monkeypatch):
    monkeypatch.setenv("KA2L_LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("KA2L_LABEL_STUDIO_TOKEN", label_studio.token)
    return Client(label_studio.url, label_studio.token)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _annotate(client: Client, task_id: int, answer: str | None = None, cannot: bool = False) -> int:
    result = []
    if answer is not None:
        result.append({"from_name": P.ANSWER, "to_name": P.QUESTION, "type": "textarea", "value": {"text": [answer]}})
    if cannot:
        result.append({"from_name": P.CANNOT, "to_name": P.QUESTION, "type": "choices", "value": {"choices": [P.CANNOT_CHOICE]}})
    return client.create_annotation(task_id, result, lead_time=3.5)


def test_push_status_pull_and_export_from_the_command_line(data, connected, label_studio, capsys, tmp_path, request):
    outputs = []
    rc, out, _ = _run(capsys, "annotate", "push", "--pool", "caps", "--dry-run")
    outputs.append(out)
    assert rc == 0 and out.startswith(f"{N_CURATED} item(s) in annotation order")
    lines = out.splitlines()[1:]
    assert [int(line.split()[0]) for line in lines] == list(range(1, N_CURATED + 1)), "printed in rank order, rank 1 first"
    assert all(line.split()[2] == "P(unknown)" and line.split()[4] == "new" for line in lines)

    title = "cli round trip"
    rc, out, err = _run(capsys, "annotate", "push", "--pool", "caps", "--title", title, "--batch-size", "4", "-q")
    outputs.append(out)
    assert rc == 0, err
    assert out.startswith(f"pushed {N_CURATED} new task(s) to project {title!r} ({label_studio.url}/projects/")
    with connect() as db:
        (project,) = A.projects(db)
        links = A.links(db, project["id"])
    assert project["title"] == title and len(links) == N_CURATED
    assert client_tasks(connected, project["project_id"]) == N_CURATED

    rc, out, _ = _run(capsys, "annotate", "push", "--pool", "caps", "-q")  # again: nothing new, nothing twice
    assert rc == 0 and out.startswith("pushed 0 new task(s)") and f"{N_CURATED} already there" in out
    assert client_tasks(connected, project["project_id"]) == N_CURATED

    hostile = next(link for link in links if link["question"] == HOSTILE)
    first = min((link for link in links if link is not hostile), key=lambda link: link["rank"])
    _annotate(connected, first["task_id"], "=cmd|'/c calc'!A0")  # an answer a spreadsheet would run
    _annotate(connected, hostile["task_id"], cannot=True)

    rc, out, _ = _run(capsys, "annotate", "status", "--pool", "caps")
    outputs.append(out)
    assert rc == 0
    assert f"connection: {label_studio.url}" in out and "signed in as" in out
    assert f"{N_CURATED} pushed" in out and "2 annotated" in out and "0 pulled" in out

    rc, out, _ = _run(capsys, "annotate", "pull", "--pool", "caps", "-q")
    outputs.append(out)
    assert rc == 0 and out.startswith("pulled 2 annotation(s)") and "2 added" in out and "answered 1, cannot answer 1" in out
    rc, out, _ = _run(capsys, "annotate", "pull", "--pool", "caps", "-q")
    assert "0 added, 0 updated, 0 deleted" in out, "pulling again adds none twice"

    sft = tmp_path / "sft"
    rc, out, _ = _run(capsys, "annotate", "export", "--pool", "caps", "--format", "alpaca", "--out", str(sft / "caps.json"))
    outputs.append(out)
    assert rc == 0 and "wrote 1 pair(s)" in out
    records = json.loads((sft / "caps.json").read_text())
    assert records == [{"instruction": first["question"], "input": "", "output": "=cmd|'/c calc'!A0"}]
    info = json.loads((sft / "dataset_info.json").read_text())
    assert info["caps"]["file_name"] == "caps.json" and info["caps"]["formatting"] == "alpaca"

    rc, _, _ = _run(capsys, "annotate", "export", "--pool", "caps", "--format", "jsonl", "--out", str(sft / "caps.jsonl"))
    (row,) = [json.loads(line) for line in (sft / "caps.jsonl").read_text().splitlines()]
    assert rc == 0 and row["question"] == first["question"] and row["answer"] == "=cmd|'/c calc'!A0"
    assert row["question_id"] == first["question_id"] and row["task_id"] == first["task_id"] and row["pool"] == "caps"

    rc, _, _ = _run(capsys, "annotate", "export", "--pool", "caps", "--format", "csv", "--out", str(sft / "caps.csv"))
    (cell,) = list(csv.DictReader(io.StringIO((sft / "caps.csv").read_text())))
    assert rc == 0 and cell["answer"] == "'=cmd|'/c calc'!A0", "formula-safe CSV"

    rc, _, err = _run(capsys, "annotate", "export", "--pool", "caps", "--format", "csv", "--out", str(sft / "caps.txt"))
    assert rc == 2 and "must end in .csv" in err
    assert not any(label_studio.token in text for text in outputs), "the token is never printed"
    assert f"token {mask(label_studio.token)}" in outputs[2], "status shows the token masked"


def client_tasks(client: Client, project_id: int) -> int:
    return client.task_count(project_id)


def test_background_push_is_a_job_whose_row_holds_no_token(data, connected, label_studio, capsys, request):
    rc, out, _ = _run(capsys, "annotate", "push", "--pool", "caps", "--title", "background push", "--background")
    assert rc == 0 and "submitted job" in out
    (job,) = [j for j in jobs.list_jobs() if j["kind"] == "push"]
    assert job["config"]["pool"] == "caps" and job["config"]["push"]["title"] == "background push"
    assert label_studio.token not in json.dumps(job["config"]) and label_studio.url not in json.dumps(job["config"])
    wait_for(lambda: jobs.get(job["id"])["status"] in ("done", "failed"), timeout=240)
    done = jobs.get(job["id"])
    assert done["status"] == "done", done["error"]
    assert done["result"]["pushed"] == N_CURATED and label_studio.token not in json.dumps(done["result"])
    rc, out, _ = _run(capsys, "annotate", "push", "--pool", "caps", "--background")
    assert rc == 0
    wait_for(lambda: all(j["status"] in ("done", "failed") for j in jobs.list_jobs() if j["kind"] == "push"), timeout=240)
    second = [j for j in jobs.list_jobs() if j["kind"] == "push"][0]
    assert second["status"] == "done" and second["result"]["pushed"] == 0 and second["result"]["linked"] == N_CURATED
    _assert_token_in_no_file(label_studio.token)


def _assert_token_in_no_file(token: str) -> None:
    """The token is in no file of the data folder but the 0600 ones kept for it (the connection file and the local
    server's credentials): not in the database, its WAL, or a job's log."""
    kept_for_it = {connection.secrets_file().resolve()}
    scanned = [p for p in paths.data_dir().rglob("*") if p.is_file() and p.resolve() not in kept_for_it and "labelstudio" not in p.parts]
    assert any(p.name.startswith("ka2l.db") for p in scanned) and any(p.suffix == ".log" for p in scanned), scanned
    leaked = [str(p) for p in scanned if token.encode() in p.read_bytes()]
    assert not leaked, f"the Label Studio token is written in {leaked}"


def test_without_a_connection_or_a_project_the_messages_say_what_to_do(data, capsys, monkeypatch):
    monkeypatch.delenv("KA2L_LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("KA2L_LABEL_STUDIO_TOKEN", raising=False)
    rc, _, err = _run(capsys, "annotate", "push", "--pool", "caps")
    assert rc == 2 and "No Label Studio connection is set" in err and "annotate serve" in err and "Settings page" in err
    rc, _, err = _run(capsys, "annotate", "pull", "--pool", "caps")
    assert rc == 2 and "has no Label Studio project yet: push it first" in err
    rc, _, err = _run(capsys, "annotate", "push", "--pool", "nothing-here")
    assert rc == 2 and "nothing-here" in err
    rc, _, err = _run(capsys, "annotate", "push", "--pool", "caps", "--diversity", "2")
    assert rc == 2 and "diversity must be between 0 and 1" in err
    rc, out, _ = _run(capsys, "annotate", "status")
    assert rc == 0 and "connection: none" in out and "annotate serve" in out
    with connect() as db:
        assert not A.projects(db), "nothing stored by the failed commands"
