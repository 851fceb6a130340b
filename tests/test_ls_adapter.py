"""The Label Studio adapter: tokens of both kinds against the real server (the session fixture
``label_studio``), errors that name cause and fix, and retries on transient failures only (against a
small local HTTP server that counts what it is asked)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ka2l.annotate.labelstudio import Client
from ka2l.errors import LabelStudioAuthError, LabelStudioError, LabelStudioTimeout, LabelStudioUnreachable, ProjectGone

CONFIG = '<View><Text name="question" value="$question"/><TextArea name="answer" toName="question"/></View>'


def test_legacy_token_round_trip(label_studio):
    c = Client(label_studio.url, label_studio.token)
    assert c.whoami()["id"] >= 1
    pid = c.create_project("adapter round trip", CONFIG)
    ids = c.import_tasks(pid, [{"data": {"question": f"q{i}?", "ka2l_key": f"q:{i}"}} for i in range(5)])
    assert len(set(ids)) == 5 and c.task_count(pid) == 5
    assert c.task_keys(pid, page_size=2) == {f"q:{i}": t for i, t in enumerate(ids)}  # paged, in import order
    aid = c.create_annotation(ids[1], [{"from_name": "answer", "to_name": "question", "type": "textarea", "value": {"text": ["x"]}}],
                              lead_time=2.5)
    exported = {t["id"]: t for t in c.export(pid)}
    assert [a["id"] for a in exported[ids[1]]["annotations"]] == [aid] and exported[ids[0]]["annotations"] == []
    assert c.project_url(pid) == f"{label_studio.url.rstrip('/')}/projects/{pid}/data"


def test_personal_access_token_works_and_legacy_tokens_can_be_refused(label_studio):
    legacy = Client(label_studio.url, label_studio.token, retries=0)
    pat = legacy.create_access_token()
    assert pat.count(".") == 2 and pat != label_studio.token  # a JWT refresh token
    personal = Client(label_studio.url, pat, retries=0)
    assert personal.whoami() == legacy.whoami()
    pid = personal.create_project("adapter personal token", CONFIG)
    assert personal.import_tasks(pid, [{"data": {"question": "a?", "ka2l_key": "q:1"}}]) and personal.task_count(pid) == 1
    personal.set_legacy_tokens(False)
    try:
        with pytest.raises(LabelStudioAuthError, match="legacy token authentication has been disabled") as err:
            legacy.whoami()
        assert "personal access token" in str(err.value) and label_studio.token not in str(err.value)
    finally:
        personal.set_legacy_tokens(True)
    assert legacy.whoami()["id"] == personal.whoami()["id"]


def test_errors_name_the_cause_and_the_fix(label_studio):
    good = Client(label_studio.url, label_studio.token, retries=0)
    with pytest.raises(LabelStudioAuthError, match="401"):
        Client(label_studio.url, "f" * 40, retries=0).whoami()
    with pytest.raises(LabelStudioUnreachable, match="not Label Studio's API"):
        Client(label_studio.url.rstrip("/") + "/not/the/root", label_studio.token, retries=0).whoami()
    with pytest.raises(LabelStudioUnreachable, match="must start with http"):
        Client("127.0.0.1:8080", label_studio.token)
    pid = good.create_project("adapter deleted", CONFIG)
    good.delete_project(pid)
    for call in (good.project, good.task_count, good.task_keys, good.export):
        with pytest.raises(ProjectGone, match=f"project {pid} no longer exists"):
            call(pid)
    with pytest.raises(ProjectGone):
        good.import_tasks(pid, [{"data": {"question": "a?"}}])
    assert "f" * 40 not in repr(Client(label_studio.url, "f" * 40))


class _Counting:
    """A local HTTP server answering every request with one status (or never, until released)."""

    def __init__(self, status: int | None):
        self.hits, self.release = 0, threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                outer.hits += 1
                if status is None:
                    outer.release.wait(30)
                    return
                body = b'{"detail": "busy"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def counting():
    made = []

    def make(status):
        made.append(_Counting(status))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_transient_errors_are_retried_and_others_are_not(counting):
    busy = counting(503)
    with pytest.raises(LabelStudioError, match="answered 503"):
        Client(busy.url, "t" * 40, retries=2, backoff=0).whoami()
    assert busy.hits == 3  # once plus two retries
    refused = counting(401)
    with pytest.raises(LabelStudioAuthError):
        Client(refused.url, "t" * 40, retries=2, backoff=0).whoami()
    assert refused.hits == 1
    broken = counting(500)  # an import that failed on the server may have half-happened: never repeated
    with pytest.raises(LabelStudioError, match="answered 500"):
        Client(broken.url, "t" * 40, retries=2, backoff=0).import_tasks(1, [{"data": {"question": "a?"}}])
    assert broken.hits == 1


def test_a_server_that_does_not_answer_times_out(counting):
    silent = counting(None)
    with pytest.raises(LabelStudioTimeout, match="did not answer within 0.3 s"):
        Client(silent.url, "t" * 40, timeout=0.3, retries=1, backoff=0).whoami()
    assert silent.hits == 2  # a read is retried after a timeout
    with pytest.raises(LabelStudioTimeout):
        Client(silent.url, "t" * 40, timeout=0.3, retries=1, backoff=0).create_project("x", CONFIG)
    assert silent.hits == 3  # a create is not: it may have happened
