from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import require_label_studio  # noqa: E402
from tiny import save_memorising_llama, save_tiny_llama, save_tiny_nli  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own data folder; nothing touches the real data/. A job a test left queued or
    running (an assert failed before its cancel) is cancelled, so no worker outlives its test and
    starves the next ones of the CPU."""
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path / "data"))
    # A developer's own Label Studio connection (environment or the checkout's .streamlit/secrets.toml)
    # must never reach a test: tests connect only to the servers they start.
    from ka2l.annotate import connection

    monkeypatch.delenv(connection.ENV_URL, raising=False)
    monkeypatch.delenv(connection.ENV_TOKEN, raising=False)
    monkeypatch.setattr(connection, "secrets_toml_path", lambda: tmp_path / "no-secrets.toml")
    yield
    folders = {tmp_path / "data", Path(os.environ.get("KA2L_DATA_DIR") or tmp_path / "data")}
    for folder in folders:
        if (folder / "ka2l.db").exists():
            _cancel_leftover_jobs(folder, monkeypatch)


def _cancel_leftover_jobs(folder: Path, monkeypatch) -> None:
    from ka2l import jobs

    with monkeypatch.context() as m:
        m.setenv("KA2L_DATA_DIR", str(folder))
        for job in jobs.list_jobs():
            if job["status"] in jobs.PENDING:
                jobs.cancel(job["id"], wait=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_plain_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat=False)


@pytest.fixture(scope="session")
def tiny_nli_dir(tmp_path_factory) -> Path:
    return save_tiny_nli(tmp_path_factory.mktemp("tiny-nli"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_llama_dir):
    from ka2l.config import ModelSpec
    from ka2l.models.llm import load_model

    return load_model(ModelSpec(name_or_path=str(tiny_llama_dir), device="cpu"))


@pytest.fixture(scope="session")
def capitals():
    """The first 80 capitals demo questions with their gold answers."""
    import csv
    import json

    from ka2l.paths import PROJECT_ROOT

    rows = list(csv.DictReader(open(PROJECT_ROOT / "data" / "demo" / "capitals.csv", encoding="utf-8")))[:80]
    return [(r["question"], json.loads(r["answer"])) for r in rows]


@pytest.fixture(scope="session")
def memo_model(tmp_path_factory, capitals) -> Path:
    """A tiny chat Llama that memorised the first 40 of ``capitals`` (see helpers.N_KNOWN)."""
    known = [(q, answers[0] + ".") for q, answers in capitals[:40]]
    return save_memorising_llama(tmp_path_factory.mktemp("memo"), known)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio for the whole session (ka2l.annotate.server.start): loopback, a free port, a
    temporary data folder and HOME, its user and token created headlessly. Yields the ServerInfo (.url,
    .token, .username, .password, .pid); stopped by pid at the end, and checked gone. Without .venv-ls the
    tests that use it skip, unless KA2L_REQUIRE_LABEL_STUDIO=1 (CI), where they fail."""
    from ka2l.annotate import server

    require_label_studio()
    folder = tmp_path_factory.mktemp("labelstudio")
    info = server.start(folder=folder, save_connection=False)
    try:
        yield info
    finally:
        server.stop(folder)
        assert not server._alive(info.pid), f"Label Studio (pid {info.pid}) is still running after stop()"
