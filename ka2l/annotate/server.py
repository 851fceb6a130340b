"""A local Label Studio for the embedded default: installed into its own venv, run on loopback with its
own data folder under ka2l's data folder, its user and API token created headlessly, stopped by its pid.

    install()   .venv-ls (or ``KA2L_LABEL_STUDIO_VENV``) with the label-studio pinned in
                requirements-labelstudio.txt; its dependency pins never touch ka2l's own venv
    start()     ``label-studio start`` on 127.0.0.1 and a free port, in its own process group, waits for
                /health, writes ``server.json`` {pid, port, url, folder} and saves the connection
                (ka2l.annotate.connection). A second start while one runs returns the running one.
    status()    what server.json says, and whether that process is alive and healthy
    stop()      SIGTERM to the process group, SIGKILL if it lingers, waits until the pid is gone

The folder (default ``<data folder>/labelstudio``) holds ``data/`` (Label Studio's database and media),
``home/`` (its HOME: it writes ~/.config/label-studio), ``server.log``, ``server.json`` and
``credentials.json`` (0600: the generated user, password and token, so a restart reuses them). Label Studio
itself does not fail on a busy port (it moves to the next one), so the port is checked here first.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Ka2lError
from ..launcher import alive
from ..paths import PROJECT_ROOT, data_dir
from ..progress import NullProgress, Progress
from . import connection

log = logging.getLogger(__name__)

ENV_VENV = "KA2L_LABEL_STUDIO_VENV"
REQUIREMENTS = PROJECT_ROOT / "requirements-labelstudio.txt"
HOST = "127.0.0.1"
USERNAME = "ka2l@localhost.local"
START_TIMEOUT = 300.0  # a first start runs ~45 s of migrations on an idle machine; a busy one takes longer
STOP_TIMEOUT = 30.0

# keep every byte on loopback: no error reports, no version check, no analytics, no remote feature flags
QUIET_ENV = {
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "FEATURE_FLAGS_OFFLINE": "true",
}

_children: dict[int, subprocess.Popen] = {}  # servers this process started, so stop() can reap them


class ServerError(Ka2lError):
    """The local Label Studio could not be installed, started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ServerInfo:
    """A running local server. The token and password never show in ``repr``."""

    pid: int
    port: int
    url: str
    folder: str
    username: str = USERNAME
    token: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    def public(self) -> dict:
        """What server.json holds and what may be shown or logged: no token, no password."""
        return {"pid": self.pid, "port": self.port, "url": self.url, "folder": self.folder, "username": self.username}


# -- installing ---------------------------------------------------------------------------------------


def venv_dir() -> Path:
    return Path(os.environ.get(ENV_VENV) or PROJECT_ROOT / ".venv-ls")


def executable() -> Path:
    return venv_dir() / "bin" / "label-studio"


def installed() -> bool:
    return executable().is_file() and os.access(executable(), os.X_OK)


def install_commands() -> list[list[str]]:
    """The commands install() runs: a venv, then pip with the pinned requirements (quiet)."""
    venv = venv_dir()
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
    ]


def install(progress: Progress | None = None) -> Path:
    """Create the Label Studio venv with the pinned label-studio (~1 minute); nothing to do if it is there."""
    progress = progress or NullProgress()
    if installed():
        return venv_dir()
    commands = install_commands()
    progress.stage("installing Label Studio", total=len(commands))
    for cmd in commands:
        log.info("running %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "is ignored" not in ln]
            tail = "\n".join(lines[-15:])
            raise ServerError(
                f"Installing Label Studio into {venv_dir()} failed (`{' '.join(cmd)}` exited with {done.returncode}). "
                f"pip said:\n{tail}\nCheck the network / package index, or install it yourself with the same command."
            )
        progress.advance(1)
    if not installed():
        raise ServerError(f"pip finished but {executable()} is missing. Delete {venv_dir()} and install again.")
    return venv_dir()


# -- health and ports ---------------------------------------------------------------------------------


def health(url: str, timeout: float = 2.0) -> bool:
    """True if Label Studio at ``url`` answers /health with status UP."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"{}").get("status") == "UP"
    except (OSError, ValueError):
        return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex((host, port)) == 0:  # something listens (Label Studio's own test; it probes localhost)
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as servers do: the connections of a server that just stopped (TIME_WAIT) do not make its port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------------


def default_folder() -> Path:
    return data_dir() / "labelstudio"


def _state_path(folder: Path) -> Path:
    return folder / "server.json"


def _last_port(folder: Path) -> int | None:
    """The port this folder's server used last (kept across stops, unlike server.json)."""
    try:
        return int((folder / "last_port").read_text())
    except (OSError, ValueError):
        return None


def _credentials_path(folder: Path) -> Path:
    return folder / "credentials.json"


def _alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone); reaps it if this process started it."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
            return False
        return True
    return alive(pid)


def _is_label_studio(pid: int) -> bool:
    """Guards against a recycled pid: the process must be a label-studio server."""
    try:
        return b"label-studio" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _alive(pid)


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads(_state_path(folder).read_text())
    except (OSError, ValueError):
        return None


def _credentials(folder: Path) -> dict:
    """The user, password and token for this folder's server: generated once, then reused (0600 file)."""
    path = _credentials_path(folder)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    creds = {"username": USERNAME, "password": secrets.token_urlsafe(18), "token": secrets.token_hex(20)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh)
    return creds


def _info(state: dict, folder: Path) -> ServerInfo:
    creds = _credentials(folder)
    return ServerInfo(
        pid=int(state["pid"]),
        port=int(state["port"]),
        url=state["url"],
        folder=str(folder),
        username=creds["username"],
        token=creds["token"],
        password=creds["password"],
    )


def _log_tail(folder: Path, secret: str, lines: int = 15) -> str:
    try:
        text = (folder / "server.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]).replace(secret, connection.mask(secret))


def status(folder: str | Path | None = None) -> dict | None:
    """server.json's {pid, port, url, folder, username} plus ``running`` and ``healthy``; None if never started."""
    folder = Path(folder) if folder else default_folder()
    state = _read_state(folder)
    if state is None:
        return None
    pid = int(state.get("pid", 0))
    running = pid > 0 and _alive(pid) and _is_label_studio(pid)
    return {**state, "running": running, "healthy": running and health(state["url"])}


def start(
    port: int | None = None,
    folder: str | Path | None = None,
    timeout: float = START_TIMEOUT,
    save_connection: bool = True,
    progress: Progress | None = None,
) -> ServerInfo:
    """Start the local Label Studio (or return the one already running for ``folder``).

    ``port`` None picks a free loopback port; a busy port fails at once. On the first start the user and
    its token are created headlessly (legacy tokens enabled); ``save_connection`` stores URL + token
    with connection.save() for the rest of ka2l."""
    progress = progress or NullProgress()
    folder = Path(folder) if folder else default_folder()
    folder = folder.resolve()
    if not installed():
        raise ServerError(
            f"Label Studio is not installed (no {executable()}). Run `make setup`, "
            "or `python -m ka2l annotate serve --install`, or press Start local server on the Annotate page (it installs first)."
        )
    current = status(folder)
    if current and current["running"]:
        if current["healthy"] or _wait_healthy(current["url"], current["pid"], folder, timeout, progress):
            info = _info(current, folder)
            if save_connection:
                connection.save(info.url, info.token)
            return info
        raise ServerError(
            f"Label Studio (pid {current['pid']}) is running for {folder} but does not answer at {current['url']}/health. "
            "Stop it (`python -m ka2l annotate serve --stop`, or Stop on the Annotate page) and start it again."
        )
    if current:
        _state_path(folder).unlink(missing_ok=True)  # a stale file: that server is gone

    if port is None:  # the last port again when it is free, so the saved connection and project URLs stay valid
        last = _last_port(folder)
        port = last if last and port_free(last) else free_port()
    elif not port_free(port):
        raise ServerError(
            f"Port {port} on {HOST} is already in use. Stop what runs there, or choose another port "
            "(or leave the port empty to let ka2l pick a free one)."
        )
    for sub in ("data", "home"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    creds = _credentials(folder)
    env = {
        **os.environ,
        **QUIET_ENV,
        "HOME": str(folder / "home"),
        "LABEL_STUDIO_BASE_DATA_DIR": str(folder / "data"),
        "LABEL_STUDIO_USERNAME": creds["username"],
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_USER_TOKEN": creds["token"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "PYTHONUNBUFFERED": "1",
    }
    for key in (connection.ENV_TOKEN, connection.ENV_URL, "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    cmd = [str(executable()), "start", "--no-browser", "--port", str(port), "--internal-host", HOST, "--enable-legacy-api-token"]
    url = f"http://{HOST}:{port}"
    progress.stage("starting Label Studio", total=None)
    if (folder / "server.log").exists():
        os.replace(folder / "server.log", folder / "server.log.1")  # this start's log alone: _moved_port reads it
    with open(folder / "server.log", "wb") as logfile:
        proc = subprocess.Popen(
            cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
    _children[proc.pid] = proc
    state = {"pid": proc.pid, "port": port, "url": url, "folder": str(folder), "username": creds["username"]}
    tmp = _state_path(folder).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, _state_path(folder))
    (folder / "last_port").write_text(str(state["port"]))
    log.info("Label Studio starting at %s (pid %d, folder %s)", url, proc.pid, folder)
    try:
        if not _wait_healthy(url, proc.pid, folder, timeout, progress):
            raise ServerError(
                f"Label Studio did not answer at {url}/health within {timeout:.0f} s. The end of its log "
                f"({folder / 'server.log'}):\n{_log_tail(folder, creds['token'])}"
            )
    except BaseException:
        stop(folder)
        raise
    info = _info(state, folder)
    if save_connection:
        connection.save(info.url, info.token)
    return info


def _wait_healthy(url: str, pid: int, folder: Path, timeout: float, progress: Progress) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not _alive(pid):
            raise ServerError(
                f"Label Studio exited while starting. The end of its log ({folder / 'server.log'}):\n"
                f"{_log_tail(folder, _credentials(folder)['token'])}"
            )
        if _moved_port(folder):
            raise ServerError(
                f"The port of {url} was taken while Label Studio started, and it moved to another port. "
                "Start it again (ka2l picks a free port when none is given)."
            )
        if health(url) and _serves(pid, int(url.rsplit(":", 1)[1])):
            return True
        progress.advance(0, f"waiting for {url}/health ({time.monotonic() - started:.0f} s)")
        time.sleep(1.0)
    return False


def _serves(pid: int, port: int) -> bool:
    """True if the loopback socket listening on ``port`` belongs to ``pid``'s process group, so a /health
    answer comes from this server and not from another one that took the port. True where /proc cannot tell."""
    try:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return True
    inodes = {f"socket:[{r.split()[9]}]" for r in rows if r.split()[3] == "0A" and int(r.split()[1].split(":")[1], 16) == port}
    if not inodes:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pid:
                continue
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def _moved_port(folder: Path) -> bool:
    """Label Studio's own busy-port handling moves to the next port ("Port N is in use") instead of failing."""
    try:
        return "is in use" in (folder / "server.log").read_text(errors="replace")[-4000:]
    except OSError:
        return False


def stop(folder: str | Path | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the server started for ``folder`` by its pid (its whole process group), and wait until it is
    gone. True if one was running."""
    folder = Path(folder).resolve() if folder else default_folder()
    state = _read_state(folder)
    if state is None:
        return False
    pid = int(state.get("pid", 0))
    was_running = pid > 0 and _alive(pid) and _is_label_studio(pid)
    if was_running:
        _signal_group(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _signal_group(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10.0):
                raise ServerError(f"Label Studio (pid {pid}) did not stop, even after SIGKILL. Stop it by hand: kill -9 {pid}")
        log.info("Label Studio (pid %d) stopped", pid)
    _state_path(folder).unlink(missing_ok=True)
    return was_running


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int, timeout: float) -> bool:
    child = _children.get(pid)
    if child is not None:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        _children.pop(pid, None)
        return True
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def info_dict(info: ServerInfo) -> dict:
    """For JSON output (CLI): everything but the secrets, plus the masked token."""
    return {**info.public(), "token": connection.mask(info.token)}


__all__ = [
    "ServerError",
    "ServerInfo",
    "venv_dir",
    "installed",
    "install",
    "install_commands",
    "health",
    "start",
    "status",
    "stop",
    "free_port",
    "port_free",
]
