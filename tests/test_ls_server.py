"""ka2l.annotate.server against a real Label Studio: the session fixture's server (health, the headless
user's token, a second start returning the running one, a busy port refused at once) and one server of
this module's own, stopped by pid. Installing is checked without reinstalling."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from ka2l.annotate import connection, server
from ka2l.paths import PROJECT_ROOT
from helpers import require_label_studio


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A second real server (on a port chosen up front), for the test that stops it."""
    require_label_studio()
    folder = tmp_path_factory.mktemp("own-labelstudio")
    info = server.start(port=server.free_port(), folder=folder, save_connection=False)
    yield info
    server.stop(folder)


# -- the session server ---------------------------------------------------------------------------


def test_the_server_is_up_on_loopback_and_its_token_authenticates(label_studio):
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    assert label_studio.url == f"http://127.0.0.1:{label_studio.port}"
    assert server.health(label_studio.url)
    me = LabelStudio(base_url=label_studio.url, api_key=label_studio.token).users.whoami()
    assert me.email == label_studio.username == server.USERNAME
    with pytest.raises(ApiError) as err:  # the server really checks tokens
        LabelStudio(base_url=label_studio.url, api_key="0" * 40).users.whoami()
    assert err.value.status_code == 401


def test_state_files_keep_the_secrets_to_their_owner(label_studio):
    folder = Path(label_studio.folder)
    state = json.loads((folder / "server.json").read_text())
    assert state == label_studio.public()
    assert label_studio.token not in (folder / "server.json").read_text()
    assert label_studio.token not in (folder / "server.log").read_text(errors="replace")
    assert label_studio.token not in repr(label_studio) and label_studio.password not in repr(label_studio)
    assert stat.S_IMODE((folder / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "home").is_dir() and (folder / "data").is_dir()  # HOME and Label Studio's data inside it
    assert server.info_dict(label_studio)["token"] == connection.mask(label_studio.token)


def test_status_reports_the_running_server(label_studio):
    found = server.status(label_studio.folder)
    assert found["pid"] == label_studio.pid and found["running"] and found["healthy"]
    assert server.status(Path(label_studio.folder) / "never-started") is None


def test_a_second_start_returns_the_running_server_and_saves_the_connection(label_studio):
    assert connection.load() is None  # this test's own data folder has no connection yet
    again = server.start(folder=label_studio.folder)
    assert again == label_studio  # same pid, port, url and token: no second server
    assert [p for p in group_members(label_studio.pid)]  # the original is still running
    saved = connection.require()
    assert (saved.url, saved.token) == (label_studio.url, label_studio.token)
    assert stat.S_IMODE(connection.secrets_file().stat().st_mode) == 0o600


def test_a_busy_port_fails_at_once_with_the_fix(label_studio, tmp_path):
    other = tmp_path / "other"
    with pytest.raises(server.ServerError) as err:
        server.start(port=label_studio.port, folder=other, save_connection=False)
    message = str(err.value)
    assert f"Port {label_studio.port}" in message and "already in use" in message and "another port" in message
    assert not other.exists()  # nothing was started, nothing written
    assert server.health(label_studio.url)


def test_a_port_taken_between_the_check_and_the_start_is_not_mistaken_for_ours(label_studio, tmp_path, monkeypatch):
    """Label Studio moves to the next port when its port is busy, and the server already there answers
    /health: the start must notice instead of returning the other server as its own."""
    monkeypatch.setattr(server, "port_free", lambda port, host=server.HOST: True)  # the race: seen free, then taken
    other = tmp_path / "other"
    with pytest.raises(server.ServerError, match="was taken while Label Studio started"):
        server.start(port=label_studio.port, folder=other, save_connection=False, timeout=120)
    assert server.status(other) is None  # the stray process was stopped and its state removed
    assert server.health(label_studio.url)


# -- a server of this module's own: stopped by pid ----------------------------------------------


def test_stop_leaves_no_process(own_server):
    assert server.health(own_server.url)
    assert own_server.pid in group_members(own_server.pid)
    assert server.stop(own_server.folder) is True
    assert group_members(own_server.pid) == []  # the server and every child of its process group are gone
    assert not Path(f"/proc/{own_server.pid}").exists()  # reaped too, not a zombie
    assert not server.health(own_server.url)
    assert server.status(own_server.folder) is None  # server.json removed
    assert server.stop(own_server.folder) is False  # stopping again is a no-op


# -- installing, without reinstalling --------------------------------------------------------------


def test_annotate_serve_restarts_on_the_last_port_saves_the_connection_and_stops(own_server, capsys):
    """`python -m ka2l annotate serve` after a stop: the last port again when it is free (so the saved connection and
    the projects recorded on that URL stay valid), the connection saved with the token masked in what it prints;
    `serve --stop` stops that process group."""
    from ka2l.cli.main import main

    folder = own_server.folder
    server.stop(folder)  # a no-op when the test above already stopped it
    if not server.port_free(own_server.port):  # an outgoing connection took it as its local port meanwhile: rare
        pytest.skip(f"port {own_server.port} was taken by another socket since the stop")
    try:
        assert main(["annotate", "serve", "--folder", folder, "-q"]) == 0
        out = capsys.readouterr().out
        state = server.status(folder)
        assert state["healthy"] and state["port"] == own_server.port and f"Label Studio runs at {own_server.url}" in out
        saved = connection.load()
        assert saved.url == own_server.url and saved.token == own_server.token and own_server.token not in out
    finally:
        assert main(["annotate", "serve", "--stop", "--folder", folder]) == 0
    assert f"stopped the local Label Studio at {own_server.url} (pid {state['pid']})" in capsys.readouterr().out
    assert group_members(state["pid"]) == [] and not server.health(own_server.url)


def test_install_uses_the_one_pin_that_the_makefile_uses_too(monkeypatch, tmp_path):
    pins = [ln for ln in server.REQUIREMENTS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins == ["label-studio==1.23.*"]
    assert "requirements-labelstudio.txt" in (PROJECT_ROOT / "Makefile").read_text()
    monkeypatch.setenv(server.ENV_VENV, str(tmp_path / "ls-venv"))
    venv, pip = server.install_commands()
    assert venv == [sys.executable, "-m", "venv", str(tmp_path / "ls-venv")]
    assert pip[:4] == [str(tmp_path / "ls-venv" / "bin" / "python"), "-m", "pip", "install"]
    assert pip[-2:] == ["-r", str(server.REQUIREMENTS)]


def test_the_installed_server_matches_the_pin():
    if not server.installed():
        pytest.skip("Label Studio is not installed: run `make setup`")
    versions = [p.name for p in (server.venv_dir() / "lib").glob("python*/site-packages/label_studio-*.dist-info")]
    assert len(versions) == 1 and re.fullmatch(r"label_studio-1\.23\.\d+\.dist-info", versions[0]), versions


def test_install_does_nothing_when_installed(monkeypatch):
    if not server.installed():
        pytest.skip("Label Studio is not installed: run `make setup`")

    def refuse(*args, **kwargs):
        raise AssertionError(f"install() ran {args} although Label Studio is installed")

    monkeypatch.setattr(server.subprocess, "run", refuse)
    assert server.install() == server.venv_dir()


def test_a_failed_install_shows_pips_tail_without_its_noise(monkeypatch, tmp_path):
    monkeypatch.setenv(server.ENV_VENV, str(tmp_path / "ls-venv"))
    script = (
        "import sys; print('WARNING: Location /opt/wheels is ignored'); "
        "print('ERROR: No matching distribution found for label-studio==1.23.*', file=sys.stderr); sys.exit(1)"
    )
    monkeypatch.setattr(server, "install_commands", lambda: [[sys.executable, "-c", script]])
    with pytest.raises(server.ServerError) as err:
        server.install()
    message = str(err.value)
    assert "exited with 1" in message
    said = message.split("pip said:")[1]
    assert "No matching distribution found" in said and "is ignored" not in said


def test_start_without_an_install_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(server.ENV_VENV, str(tmp_path / "missing-venv"))
    assert not server.installed()
    with pytest.raises(server.ServerError, match="make setup"):
        server.start(folder=tmp_path / "ls", save_connection=False)
    assert not (tmp_path / "ls").exists()


def test_the_token_in_the_environment_does_not_reach_the_server(label_studio):
    """The server gets its own token by the headless user creation; ka2l's connection variables are dropped."""
    env = Path(f"/proc/{label_studio.pid}/environ").read_bytes().split(b"\0")
    names = {item.split(b"=", 1)[0].decode() for item in env if item}
    assert connection.ENV_TOKEN not in names and connection.ENV_URL not in names
    assert os.environ.get("HOME") != str(Path(label_studio.folder) / "home")
    assert f"HOME={Path(label_studio.folder) / 'home'}".encode() in env
