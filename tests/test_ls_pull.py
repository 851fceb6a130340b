"""Pulling answers back from a real Label Studio (the session fixture ``label_studio``): annotations
made through the SDK as an annotator would, stored once, updated and deleted as in Label Studio,
one answer per task by pull's documented rule, conflicts flagged, and failures that change nothing."""

from __future__ import annotations

import itertools
import time

import pytest
from helpers import import_pool, wait_for

from ka2l import jobs
from ka2l.annotate import dataset, pull
from ka2l.annotate.labelstudio import Client
from ka2l.annotate.push import LABEL_CONFIG, SAMPLED
from ka2l.annotate.server import free_port
from ka2l.config import PullConfig
from ka2l.errors import ConfigError, LabelStudioUnreachable, NotFound, ProjectGone
from ka2l.store import annotate as A
from ka2l.store import queries as Q
from ka2l.store.db import connect

_titles = itertools.count()


def answer(*texts: str) -> list[dict]:
    """The result Label Studio's editor submits for typed text (one entry per line)."""
    return [{"from_name": pull.ANSWER, "to_name": "question", "type": "textarea", "value": {"text": list(texts)}}]


CANNOT = [{"from_name": pull.FLAG, "to_name": "question", "type": "choices", "value": {"choices": [pull.CANNOT_ANSWER]}}]


class Project:
    """A pool, its Label Studio project and the links ka2l keeps, as a push leaves them."""

    def __init__(self, label_studio, questions: list[str], pool: str | None = None):
        self.client = Client(label_studio.url, label_studio.token)
        n = next(_titles)
        self.pool = pool or f"pull{n}"
        self.pool_id = import_pool(None, name=self.pool, rows=[(q, ["gold"]) for q in questions])
        self.title = f"ka2l test {self.pool} {time.time_ns()}"
        self.ls_id = self.client.create_project(self.title, LABEL_CONFIG)
        with connect() as db:
            qids = [q["id"] for q in Q.pool_questions(db, self.pool_id)]
        self.keys = [f"q:{i}" for i in qids]
        self.tasks = self.client.import_tasks(self.ls_id, [{"data": {"question": q, SAMPLED: "3 x  a guess", "ka2l_key": k}} for q, k in zip(questions, self.keys)])
        with connect() as db:
            self.id = A.add_project(db, self.pool_id, label_studio.url, self.ls_id, self.title, "test")
            A.add_links(db, self.id, [{"item_key": k, "task_id": t, "question": q, "rank": i + 1}
                                      for i, (q, k, t) in enumerate(zip(questions, self.keys, self.tasks))])

    def annotate(self, i: int, result: list[dict], **kw) -> int:
        return self.client.create_annotation(self.tasks[i], result, **kw)


@pytest.fixture
def connected(label_studio, monkeypatch):
    """ka2l's connection points at the test server (as the Settings page or the environment would)."""
    monkeypatch.setenv("KA2L_LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("KA2L_LABEL_STUDIO_TOKEN", label_studio.token)
    return label_studio


def stored(project: int) -> tuple[list[dict], dict]:
    with connect() as db:
        return A.annotations(db, project), A.get_project(db, project)


# -- the rule, on rows shaped as pull stores them ---------------------------------------------------

def vote(text, n, cannot=False, skipped=False):
    return {"annotation_id": n, "annotator": "user 1", "answer": text, "cannot_answer": cannot, "skipped": skipped,
            "updated_at": f"2026-11-25T10:00:{n:02d}.000000Z"}


def test_rule_majority_of_normalised_answers_then_latest_on_a_tie():
    c = pull.choose([vote("Berlin", 1), vote("Bonn", 2), vote("  berlin. ", 3)])
    assert (c["status"], c["answer"], c["conflict"], c["decided_by"], c["votes"]) == ("answered", "berlin.", True, "majority", 3)
    assert c["annotation_id"] == 3 and c["tally"] == "berlin ×2 · bonn ×1"
    tie = pull.choose([vote("Lyon", 1), vote("Marseille", 2)])
    assert (tie["answer"], tie["conflict"], tie["decided_by"]) == ("Marseille", True, "latest (tie)")
    # the order of the rows does not matter: the timestamps do
    assert pull.choose([vote("Marseille", 2), vote("Lyon", 1)])["answer"] == "Marseille"
    same = pull.choose([vote("The Eiffel Tower", 1), vote("eiffel tower", 2)])
    assert (same["conflict"], same["decided_by"]) == (False, "unanimous")


def test_rule_skips_are_no_vote_and_cannot_answer_is_a_verdict():
    assert pull.choose([])["status"] == "pending"
    only_skips = pull.choose([vote(None, 1, skipped=True), vote("", 2)])
    assert (only_skips["status"], only_skips["skipped"], only_skips["votes"]) == ("skipped", 2, 0)
    skip_ignored = pull.choose([vote("Rome", 1), vote(None, 2, skipped=True)])
    assert (skip_ignored["status"], skip_ignored["conflict"], skip_ignored["decided_by"]) == ("answered", False, "single")
    cannot = pull.choose([vote("Oslo", 1), vote("", 2, cannot=True), vote("typed anyway", 3, cannot=True)])
    assert (cannot["status"], cannot["answer"], cannot["cannot_answer"], cannot["conflict"]) == ("cannot answer", None, True, True)
    outvoted = pull.choose([vote("Oslo", 1), vote("oslo", 2), vote(None, 3, cannot=True)])
    assert (outvoted["status"], outvoted["answer"], outvoted["conflict"]) == ("answered", "oslo", True)


# -- against the real server ------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Who wrote the unwritten book?", "What is the capital of Peru?",
             "Which city hosts the festival?", "What is the capital of Germany?", "What is the capital of Chad?",
             "What is the capital of Italy?", "What is the capital of Atlantis?"]


def test_pull_stores_every_annotation_and_chooses_by_the_rule(connected):
    p = Project(connected, QUESTIONS)
    p.annotate(0, answer("Paris"), lead_time=3.5)
    p.annotate(1, CANNOT)
    p.annotate(2, [], was_cancelled=True)
    p.annotate(3, answer("Lyon")), p.annotate(3, answer("Marseille"))
    p.annotate(4, answer("Berlin")), p.annotate(4, answer("Bonn")), p.annotate(4, answer("berlin."))
    # 5: nobody annotated it
    p.annotate(6, answer("Rome")), p.annotate(6, answer("rome"))
    p.annotate(7, CANNOT), p.annotate(7, answer("Poseidonis")), p.annotate(7, CANNOT)

    result = pull.pull(p.pool)  # the saved connection, the pool's newest project
    assert result == {"project": p.id, "ls_project_id": p.ls_id, "tasks": 8, "annotations": 13, "added": 13, "updated": 0,
                      "deleted": 0, "unlinked_tasks": 0, "pending": 1, "skipped": 1, "answered": 4, "cannot_answer": 2,
                      "conflicts": 3}
    rows, project = stored(p.id)
    assert project["pulled_at"] is not None
    first = rows[0]
    assert (first["answer"], first["lead_time"], first["annotator"], first["skipped"], first["item_key"]) == ("Paris", 3.5, "user 1", 0, p.keys[0])
    assert first["created_at"].startswith("20") and first["updated_at"]
    assert [(r["cannot_answer"], r["skipped"]) for r in rows if r["task_id"] in p.tasks[1:3]] == [(1, 0), (0, 1)]

    frame = pull.answers(p.pool)
    assert list(frame.columns) == list(pull.ANSWER_COLUMNS) and frame["rank"].tolist() == list(range(1, 9))
    got = frame.set_index("question")
    assert got.loc[QUESTIONS[0], ["status", "answer", "conflict", "decided_by"]].tolist() == ["answered", "Paris", False, "single"]
    assert got.loc[QUESTIONS[1], "status"] == "cannot answer" and got.loc[QUESTIONS[2], "status"] == "skipped"
    assert got.loc[QUESTIONS[3], ["answer", "conflict", "decided_by"]].tolist() == ["Marseille", True, "latest (tie)"]
    assert got.loc[QUESTIONS[4], ["answer", "conflict", "decided_by", "tally"]].tolist() == ["berlin.", True, "majority", "berlin ×2 · bonn ×1"]
    assert got.loc[QUESTIONS[4], "all_answers"] == "user 1: Berlin | user 1: Bonn | user 1: berlin."
    assert got.loc[QUESTIONS[5], "status"] == "pending" and pd_na(got.loc[QUESTIONS[5], "answer"])
    assert got.loc[QUESTIONS[6], ["answer", "conflict"]].tolist() == ["rome", False]
    assert got.loc[QUESTIONS[7], ["status", "conflict"]].tolist() == ["cannot answer", True]

    pairs = dataset.pairs(p.pool)  # the dataset has the answers, and nothing for cannot-answer / skipped / pending
    assert dict(zip(pairs["question"], pairs["answer"])) == {QUESTIONS[0]: "Paris", QUESTIONS[3]: "Marseille",
                                                             QUESTIONS[4]: "berlin.", QUESTIONS[6]: "rome"}


def pd_na(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def test_pull_again_adds_nothing_twice_and_follows_updates_and_deletions(connected):
    p = Project(connected, QUESTIONS[:3])
    kept = p.annotate(0, answer("Paris"))
    changed = p.annotate(1, answer("Nobody"))
    gone = p.annotate(2, answer("Lima"))
    assert pull.pull(p.pool)["added"] == 3
    again = pull.pull(p.pool)
    assert (again["added"], again["updated"], again["deleted"], again["annotations"]) == (0, 0, 0, 3)
    before = {r["annotation_id"]: r for r in stored(p.id)[0]}

    p.client.update_annotation(changed, answer("Somebody else"))
    p.client.delete_annotation(gone)
    third = pull.pull(p.pool, PullConfig(project=p.id))
    assert (third["added"], third["updated"], third["deleted"]) == (0, 1, 1)
    after = {r["annotation_id"]: r for r in stored(p.id)[0]}
    assert set(after) == {kept, changed}
    assert after[kept] == before[kept]  # untouched, not even re-stamped
    assert after[changed]["answer"] == "Somebody else" and after[changed]["updated_at"] > before[changed]["updated_at"]
    frame = pull.answers(project=p.id).set_index("question")
    assert frame.loc[QUESTIONS[1], "answer"] == "Somebody else" and frame.loc[QUESTIONS[2], "status"] == "pending"


def test_unreachable_server_or_deleted_project_changes_nothing_stored(connected):
    p = Project(connected, QUESTIONS[:2])
    p.annotate(0, answer("Paris"))
    pull.pull(p.pool)
    p.annotate(1, answer("Someone"))  # a pull that got through would add this
    before = stored(p.id)

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: as a stopped server
    with pytest.raises(LabelStudioUnreachable, match="Could not reach Label Studio at .* Check that the server is running"):
        pull.pull(p.pool, client=Client(dead, connected.token, retries=1, backoff=0.01))
    assert stored(p.id) == before

    p.client.delete_project(p.ls_id)
    with pytest.raises(ProjectGone, match=f"project {p.ls_id} no longer exists"):
        pull.pull(p.pool)
    assert stored(p.id) == before


def test_a_project_read_under_another_url_must_be_the_same_project(connected, monkeypatch):
    p = Project(connected, QUESTIONS[:1])
    p.annotate(0, answer("Paris"))
    with connect() as db:  # the local server restarted on another port: its projects keep id and title
        db["ls_projects"].update(p.id, {"url": "http://127.0.0.1:9"})
    assert pull.pull(p.pool)["added"] == 1
    with connect() as db:
        db["ls_projects"].update(p.id, {"title": "some other project"})
    with pytest.raises(ConfigError, match="was made on http://127.0.0.1:9, but the connection points at"):
        pull.pull(p.pool)


def test_progress_counts_pushed_and_annotated_tasks_from_the_server(connected):
    p = Project(connected, QUESTIONS[:4])
    p.annotate(0, answer("Paris")), p.annotate(0, answer("Paris"))
    p.annotate(1, CANNOT)
    p.annotate(2, [], was_cancelled=True)
    now = pull.progress(p.pool)
    assert {k: now[k] for k in ("pushed", "tasks", "annotated", "skipped", "annotations", "pulled")} == \
        {"pushed": 4, "tasks": 4, "annotated": 2, "skipped": 1, "annotations": 3, "pulled": 0}
    assert now["url"] == f"{connected.url}/projects/{p.ls_id}/data" and now["pulled_at"] is None
    pull.pull(p.pool)
    assert pull.progress(project=p.id)["pulled"] == 2


def test_which_project_is_pulled_is_checked(connected):
    p = Project(connected, QUESTIONS[:1])
    other = Project(connected, QUESTIONS[:1])
    with pytest.raises(ConfigError, match="belongs to another pool"):
        pull.pull(p.pool, PullConfig(project=other.id))
    import_pool(None, name="never-pushed", rows=[("Q?", ["a"])])
    with pytest.raises(NotFound, match="has no Label Studio project yet: push it first"):
        pull.answers("never-pushed")


def test_pull_runs_as_a_job_beside_the_model_lane(connected):
    p = Project(connected, QUESTIONS[:2])
    p.annotate(0, answer("Paris"))
    job_id = jobs.submit("pull", {"pool": p.pool, "pull": {}})
    assert wait_for(lambda: jobs.get(job_id)["status"] in ("done", "failed"), timeout=120)
    job = jobs.get(job_id)
    assert job["status"] == "done", job["error"]
    assert (job["result"]["added"], job["result"]["answered"], job["result"]["pending"]) == (1, 1, 1)
    assert job["stage"] == "storing annotations"
