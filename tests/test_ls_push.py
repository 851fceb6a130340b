"""Push to a real Label Studio (the session fixture ``label_studio``): the project and its label config,
one task per approved item with ids, scores and the low-temperature prediction, idempotence, a push that
died half-way, untrusted text, and the failures that must leave ka2l's store as it was."""

from __future__ import annotations

import shutil
import socket

import pytest

from ka2l.annotate import push as P
from ka2l.annotate.labelstudio import Client
from ka2l.augment import review
from ka2l.augment.candidates import generate_candidates
from ka2l.augment.train import train_decoder
from ka2l.config import DecoderConfig, GenerateConfig, PushConfig
from ka2l.errors import LabelStudioAuthError, LabelStudioUnreachable, ProjectGone
from ka2l.probing.stage1 import run_stage1
from ka2l.store import annotate as A
from ka2l.store import augment as S
from ka2l.store import curation
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import data_dir, import_pool, stage1_cfg

SCRIPT = '<script>alert(1)</script> What is the capital of =HYPERLINK("http://x","y")?'
COPIES = ("What is the capital of the Republic of Zorblatt?", "What is the capital of the Republic of Zorblatt ?")


@pytest.fixture(scope="module")
def store(tmp_path_factory, memo_model, capitals):
    """A pool with a Stage 1 run, a decoder and its candidates; 8 curated originals (the hostile question
    and two near-copies among them) and 2 approved candidates; one more candidate left to approve."""
    folder = tmp_path_factory.mktemp("pushdata")
    rows = capitals[:30] + [(SCRIPT, ["nowhere"]), (COPIES[0], ["Zorb"]), (COPIES[1], ["Zorb"])]
    with data_dir(folder):
        pool = import_pool(capitals, rows=rows)
        run_id = run_stage1("caps", stage1_cfg(memo_model))
        with connect() as db:
            probe_id = Q.list_probes(db, run_id)[0]["id"]
            qids = [q["id"] for q in Q.pool_questions(db, pool)]
        decoder_id = train_decoder(DecoderConfig(probe_id=probe_id, backbone=str(memo_model), epochs=4, lr=3e-3, eval_size=8, device="cpu"))
        generate_candidates(GenerateConfig(decoder_id=decoder_id, per_question=2, noise=0.2, device="cpu"))
        curation.add(pool, qids[:3] + qids[28:], "test")
        with connect() as db:
            kept = [c["id"] for c in S.candidates(db, pool)]
        assert len(kept) >= 3, "the fixture needs three kept candidates"
        review.decide(pool, kept[:2], "approved")
    return folder, pool, kept


@pytest.fixture
def data(store, tmp_path, monkeypatch):
    """A private copy of the module's store for this test."""
    folder, pool, kept = store
    copy = tmp_path / "store"
    shutil.copytree(folder, copy)
    monkeypatch.setenv("KA2L_DATA_DIR", str(copy))
    return pool, kept


@pytest.fixture
def client(label_studio):
    return Client(label_studio.url, label_studio.token, retries=1, backoff=0.01)


def _cfg(request, **kw) -> PushConfig:
    return PushConfig(title=f"push {request.node.name}", batch_size=3, **kw)


def _table_counts() -> dict[str, int]:
    with connect() as db:
        return {t: db[t].count for t in db.table_names()}


def test_push_creates_the_project_with_one_task_per_approved_item(data, client, request):
    pool, _ = data
    size = len(review.approved_set(pool))
    result = P.push(pool, _cfg(request), client=client)
    info = client.project(result["project_id"])
    assert info["label_config"] == P.LABEL_CONFIG and "HyperText" not in info["label_config"]
    assert result["pushed"] == size == info["task_number"] == result["linked"]
    with connect() as db:
        row = A.get_project(db, result["project"])
        assert row["project_id"] == result["project_id"] and row["pushed_at"]
        links = {r["item_key"]: r for r in A.links(db, result["project"])}
    exported = {t["data"]["ka2l_key"]: t for t in client.export(result["project_id"])}
    assert set(exported) == set(links)
    ranked = P.items(pool)
    for item in ranked.to_dict("records"):
        task = exported[item["item_key"]]
        d = task["data"]
        assert links[item["item_key"]]["task_id"] == task["id"]
        assert d["kind"] == item["kind"] and d["pool"] == "caps" and d["rank"] == item["rank"]
        assert d["p_unknown"] == pytest.approx(float(item["p_unknown"]))
        if item["kind"] == "original":
            assert d["question_id"] == int(item["question_id"]) and d["se"] == pytest.approx(float(item["se"]))
            assert d["sampled_answers"] == P.sampled_text(item["clusters"])
            assert len(task["predictions"]) == 1  # the low-temperature answer, as a prediction
        else:
            assert d["candidate_id"] == int(item["candidate_id"]) and d["source_question_id"] == int(item["source_question_id"])
    with connect() as db:
        run = Q.latest_run(db, "stage1", pool)
        low = Q.load_answers(db, run["id"])
    original = next(i for i in ranked.to_dict("records") if i["kind"] == "original")
    task = client._sdk.tasks.get(str(exported[original["item_key"]]["id"]))
    prediction = task.predictions[0]
    assert prediction.result[0]["value"]["text"] == [low[int(original["question_id"])]["low"][0]["text"]]
    assert prediction.result[0]["from_name"] == P.ANSWER
    # tasks were created in rank order
    assert [links[k]["task_id"] for k in ranked["item_key"]] == sorted(links[k]["task_id"] for k in ranked["item_key"])


def test_pushing_again_sends_nothing_and_one_more_approval_sends_one(data, client, request):
    pool, kept = data
    first = P.push(pool, _cfg(request), client=client)
    again = P.push(pool, _cfg(request), client=client)
    assert again["pushed"] == 0 and again["project"] == first["project"] and again["skipped"] == first["pushed"]
    assert client.task_count(first["project_id"]) == first["pushed"]
    review.decide(pool, [kept[2]], "approved")
    before = P.preview(pool, _cfg(request), url=client.url)
    assert before["pushed"].sum() == first["pushed"] and (~before["pushed"]).sum() == 1
    third = P.push(pool, _cfg(request), client=client)
    assert third["pushed"] == 1
    assert client.task_count(first["project_id"]) == first["pushed"] + 1
    new = client.task_keys(first["project_id"])[f"c:{kept[2]}"]
    with connect() as db:
        link = next(r for r in A.links(db, first["project"]) if r["item_key"] == f"c:{kept[2]}")
    assert link["task_id"] == new and link["rank"] == first["pushed"] + 1 == int(before.loc[~before["pushed"], "rank"].iloc[0])


def test_a_server_answering_at_a_new_url_keeps_its_project_and_gets_nothing_twice(data, client, label_studio, request):
    """The local server restarted on another port: the same server, another URL. Push must find the project
    (same id, same title there) instead of creating a second one and sending every task again; a
    different project under that id on the new server is not taken for it."""
    pool, _ = data
    first = P.push(pool, _cfg(request), client=client)
    moved = Client(label_studio.url.replace("127.0.0.1", "localhost"), label_studio.token, retries=1, backoff=0.01)
    assert moved.url != client.url
    again = P.push(pool, _cfg(request), client=moved)
    assert again["pushed"] == 0 and again["project"] == first["project"] and again["project_id"] == first["project_id"]
    assert client.task_count(first["project_id"]) == first["pushed"]
    with connect() as db:
        assert [r["url"] for r in A.projects(db, pool_id=pool)] == [moved.url]  # pull and the next push use it too
        A.move_project(db, first["project"], "http://127.0.0.1:1")  # an old URL again ...
        db.execute("UPDATE ls_projects SET title = 'some other project' WHERE id = ?", [first["project"]])  # ... whose title differs
    third = P.push(pool, _cfg(request), client=client)
    assert third["project"] != first["project"] and third["pushed"] == first["pushed"]  # a new project, not someone else's


def test_a_push_that_died_after_an_import_creates_no_duplicate(data, client, request, monkeypatch):
    pool, _ = data
    real, calls = A.add_links, []

    def dies_on_second_batch(db, project, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the second batch's import")
        return real(db, project, rows)

    monkeypatch.setattr(A, "add_links", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        P.push(pool, _cfg(request), client=client)
    monkeypatch.setattr(A, "add_links", real)
    project = _push_again_after_a_death_in_batch_two(pool, client, request)
    keys = client.task_keys(project["project_id"])
    with connect() as db:
        links = A.links(db, project["id"])
    assert {r["item_key"]: r["task_id"] for r in links} == keys
    assert sorted(r["rank"] for r in links) == list(range(1, len(links) + 1))


def _push_again_after_a_death_in_batch_two(pool, client, request) -> dict:
    """After a push died once batch 2 (of 3 tasks each) reached Label Studio but before its links were
    stored: 3 links, 6 tasks. Pushing again rebuilds 3 links from the server and sends only the rest."""
    size = len(review.approved_set(pool))
    with connect() as db:
        project = A.projects(db, pool_id=pool)[0]
        assert A.link_count(db, project["id"]) == 3  # the first batch only
    assert client.task_count(project["project_id"]) == 6  # two batches reached Label Studio
    result = P.push(pool, _cfg(request), client=client)
    assert result["reconciled"] == 3 and result["pushed"] == size - 6
    assert client.task_count(project["project_id"]) == size == result["linked"]
    return project


KILLED_PUSH = """
import json, os, signal, sys
from ka2l.annotate import push as P
from ka2l.config import PushConfig, from_dict
from ka2l.store import annotate as A

real, calls = A.add_links, []

def killed_on_second_batch(db, project, rows):  # the second batch reached Label Studio; its links never will
    calls.append(len(rows))
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(db, project, rows)

A.add_links = killed_on_second_batch
P.push("caps", from_dict(PushConfig, json.loads(sys.argv[1])))
"""


def test_a_push_process_killed_half_way_and_run_again_creates_no_duplicate(data, client, label_studio, request):
    """The worst moment for a real kill: SIGKILL right after Label Studio accepted a batch and before ka2l
    wrote its links. The next push finds the orphan tasks by their ka2l_key instead of sending them again."""
    import json
    import os
    import subprocess
    import sys

    from ka2l.annotate import connection
    from ka2l.config import to_dict

    pool, _ = data
    env = {**os.environ, connection.ENV_URL: label_studio.url, connection.ENV_TOKEN: label_studio.token}
    proc = subprocess.run([sys.executable, "-c", KILLED_PUSH, json.dumps(to_dict(_cfg(request)))], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _push_again_after_a_death_in_batch_two(pool, client, request)


def test_hostile_text_reaches_label_studio_byte_identical_and_inert(data, client, request):
    pool, _ = data
    result = P.push(pool, _cfg(request), client=client)
    tasks = {t["data"]["question"]: t for t in client.export(result["project_id"])}
    assert SCRIPT in tasks  # byte-identical: nothing escaped, stripped or prefixed on the way
    config = client.project(result["project_id"])["label_config"]
    assert '<Text name="question" value="$question"' in config and "HyperText" not in config


def test_unreachable_server_fails_clearly_and_changes_nothing(data, label_studio, request):
    pool, _ = data
    with socket.socket() as s:  # a loopback port nobody listens on: a stopped server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = _table_counts()
    with pytest.raises(LabelStudioUnreachable, match="Could not reach Label Studio at http://127.0.0.1:%d" % port) as err:
        P.push(pool, _cfg(request), client=Client(f"http://127.0.0.1:{port}", label_studio.token, retries=1, backoff=0.01))
    assert "annotate serve" in str(err.value) and label_studio.token not in str(err.value)
    assert _table_counts() == before


def test_bad_token_says_401(data, label_studio, request):
    pool, _ = data
    before = _table_counts()
    with pytest.raises(LabelStudioAuthError, match="refused the token \\(401") as err:
        P.push(pool, _cfg(request), client=Client(label_studio.url, "0123456789abcdef" * 2))
    assert "0123456789abcdef" not in str(err.value) and "Personal Access Token" in str(err.value)
    assert _table_counts() == before


def test_a_project_deleted_in_label_studio_is_named_and_a_new_one_can_follow(data, client, request):
    pool, _ = data
    first = P.push(pool, _cfg(request), client=client)
    client.delete_project(first["project_id"])
    before = _table_counts()
    with pytest.raises(ProjectGone, match=f"project {first['project_id']} no longer exists"):
        P.push(pool, _cfg(request), client=client)
    assert _table_counts() == before
    row = P.new_project(pool, f"push {request.node.name} again", client=client)
    second = P.push(pool, _cfg(request), client=client)
    assert second["project"] == row["id"] != first["project"] and second["pushed"] == first["pushed"]


def test_items_split_two_near_copies(data):
    pool, _ = data
    order = list(P.items(pool, diversity=0.5)["question"])
    first, second = sorted(order.index(q) for q in COPIES)
    plain = list(P.items(pool, diversity=0.0)["question"])
    later = order[second]
    assert first < 3 and second - first > 1, order
    assert order.index(later) > plain.index(later) + 1, (order, plain)  # the diversity term, not P(unknown), moved it down
