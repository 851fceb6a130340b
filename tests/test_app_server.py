"""The app server as `make app` starts it (the project's .streamlit/config.toml, run from the checkout):
with a browser tab open and nobody clicking, it must sit still.

Streamlit's default file watcher walks the script's folder recursively, the checkout's .venv and data/
included, and burned a whole core of a 2-core machine for as long as a tab was open (issue 11, item 2).
The check measures the server process's own CPU time (/proc/PID/stat), not wall-clock time, so a busy
machine slows it down but cannot make it fail or pass by accident."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request

import pytest

from ka2l.paths import PROJECT_ROOT

IDLE_S = 10.0
MAX_IDLE_CPU_SHARE = 0.2  # with the watcher on, the server used ~100 % of a core; with it off, under 1 %


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _open_session_and_idle(port: int, pid: int) -> tuple[float, float]:
    """Connect like a browser tab, run the app's script once, then stay connected and idle.
    Returns (server CPU seconds while idle, idle wall seconds)."""
    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None) as ws:
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        await ws.send(msg.SerializeToString())
        while True:  # the first run registers the session's file watchers on the modules it imported
            fwd = ForwardMsg()
            fwd.ParseFromString(await asyncio.wait_for(ws.recv(), timeout=120))
            if fwd.WhichOneof("type") == "script_finished":
                break

        async def drain():
            while True:
                await ws.recv()

        reader = asyncio.create_task(drain())
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(IDLE_S)
        used, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - t0
        reader.cancel()
        return used, wall


def test_project_config_turns_off_the_file_watcher():
    config = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["fileWatcherType"] == "none"
    assert config["server"]["runOnSave"] is False


def test_idle_app_server_leaves_the_cpu_alone(tmp_path):
    pytest.importorskip("websockets")
    port = _free_port()
    env = {**os.environ, "KA2L_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path)}
    # started the way scripts/run_app.sh starts it: from the checkout, so .streamlit/config.toml applies
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "the app server exited at start"
                assert time.monotonic() < deadline, "the app server did not answer its health check within 90 s"
                time.sleep(0.3)
        used, wall = asyncio.run(_open_session_and_idle(port, proc.pid))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert used < MAX_IDLE_CPU_SHARE * wall, (
        f"the idle app server used {used:.2f} s of CPU in {wall:.1f} s with one tab open; "
        "a file watcher walking the checkout would explain it (server.fileWatcherType)")
