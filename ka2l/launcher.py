"""Training in several processes (GPUs, or CPU processes over gloo) through ``accelerate launch``: the part
fine-tunes (``ka2l.finetune.launch``) and decoders (``ka2l.augment.launch``) share.

    the job's process   ``follow``: starts ``python -m accelerate.commands.launch ... -m MODULE ID`` in a session
                        of its own and follows it to the end: the workers' progress (a file rank 0 writes,
                        ``FileProgress``) is replayed onto the job's progress (``Relay``), a cancel (the job's,
                        SIGTERM or Ctrl-C) becomes a stop file, and the workers get ``STOP_GRACE_S`` to reach a
                        step's end and checkpoint before they are signalled
    every worker        ``Worker``: its rank from the launcher's environment, the job's spec, and ``stop_requested``
                        (the stop file exists or the job's process is gone), which the workers agree on at every
                        step's end so a cancelled or killed job leaves one checkpoint and no orphan workers

Files, in the work's ``launch/`` folder: ``config.json`` (the work's config and the job's pid), ``progress.json``,
``stop`` and ``launch.log`` (every worker's output). Without a config file ka2l asks for plain DDP itself
(``--multi_gpu``; on CPU each worker then trains with gloo): a user's default accelerate config is never
read behind the job's back. Nothing here imports torch or accelerate at import time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Cancelled, ConfigError, Ka2lError
from .paths import PROJECT_ROOT, data_dir
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)

SHARDED = ("FSDP", "DEEPSPEED")
STOP_GRACE_S = 60.0  # after a stop request, how long the workers get to reach a step's end and checkpoint
TAIL_LINES = 30


class LaunchError(Ka2lError):
    """``accelerate launch`` could not start the workers, or a worker failed."""


# -- before anything starts ----------------------------------------------------------------------------

def config_kind(path: str) -> str:
    """The ``distributed_type`` of an accelerate config file (``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``, ...), read
    with accelerate's own loader; a missing or unreadable file is a ``ConfigError``."""
    from accelerate.commands.config.config_args import load_config_from_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"accelerate_config {path!r} does not exist. Give an accelerate config file (ka2l ships examples in "
                          f"configs/accelerate/: ddp.yaml, fsdp.yaml, deepspeed-zero3.yaml), or leave it empty for plain DDP.")
    try:
        cfg = load_config_from_file(str(file))
    except Exception as exc:  # accelerate raises ValueError / TypeError / yaml errors for a bad file
        raise ConfigError(f"accelerate_config {path!r} is not a config accelerate can read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                          f"Write it with `accelerate config --config_file {path}` or start from configs/accelerate/.") from exc
    return str(getattr(cfg.distributed_type, "value", cfg.distributed_type))


def shards_weights(path: str) -> bool:
    """Whether the accelerate config in ``path`` splits the weights over its processes: DeepSpeed ZeRO stage 3,
    or FSDP with a sharding strategy that shards parameters (FULL_SHARD, HYBRID_SHARD; FSDP 2 always does).
    ZeRO 1 / 2, SHARD_GRAD_OP and NO_SHARD keep a whole copy of the weights in every process."""
    from accelerate.commands.config.config_args import load_config_from_file

    kind = config_kind(path)
    cfg = load_config_from_file(str(Path(path).expanduser()))
    if kind == "DEEPSPEED":
        return int((cfg.deepspeed_config or {}).get("zero_stage", 0) or 0) == 3
    if kind == "FSDP":
        fsdp = cfg.fsdp_config or {}
        if int(fsdp.get("fsdp_version", 1) or 1) >= 2:
            return True
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        return strategy in ("FULL_SHARD", "HYBRID_SHARD", "1", "4")
    return False


def check(num_processes: int, accelerate_config: str, device: str, gpus: int | None = None, what: str = "fine-tune",
          sharded: bool = True) -> str:
    """Refuse launcher settings that cannot run here, with the fix: a bad config file, a sharded config where
    ``what`` cannot be sharded (``sharded=False``) or on CPU, more CUDA processes than GPUs (``gpus`` overrides the
    count), several processes on MPS. Returns the config's distributed type."""
    from .device import resolve_device

    kind = config_kind(accelerate_config) if accelerate_config else "MULTI_GPU"
    device = resolve_device(device) if device == "auto" else device
    n = num_processes
    if kind in SHARDED and not sharded:
        raise ConfigError(f"accelerate_config {accelerate_config!r} is a {kind} config, but a {what} trains with DDP only (each process "
                          f"holds the whole model). Leave accelerate_config empty, or give a MULTI_GPU config such as configs/accelerate/ddp.yaml.")
    if device == "cpu" and kind in SHARDED:
        raise ConfigError(f"accelerate_config {accelerate_config!r} is a {kind} config, which needs CUDA GPUs, but the {what}'s "
                          f"device is cpu. On CPU leave accelerate_config empty: the {n} processes then train with DDP over gloo.")
    if device == "mps" and n > 1:
        raise ConfigError(f"num_processes={n} on mps: accelerate runs one process per CUDA GPU (or CPU processes). "
                          f"Set num_processes to 1, or device to cpu.")
    if device.startswith("cuda"):
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if n > gpus:
            raise ConfigError(f"num_processes={n} needs {n} CUDA GPUs (one per process), but {gpus} are visible. "
                              f"Set num_processes to at most {gpus}, or make more GPUs visible (CUDA_VISIBLE_DEVICES).")
    return kind


def free_port() -> int:
    """A TCP port nothing listens on now, for the workers' rendezvous (29500, torch's default, may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(module: str, ident: int, num_processes: int, accelerate_config: str, port: int) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m MODULE IDENT`` in ``num_processes`` workers."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), "--num_machines", "1",
           "--main_process_port", str(port)]
    if accelerate_config:
        cmd += ["--config_file", str(Path(accelerate_config).expanduser())]
    else:
        # plain DDP, said explicitly so a default config in ~/.cache/huggingface/accelerate is not read; on CPU
        # '--multi_gpu' still starts torchrun's N workers, which train on the CPU over gloo
        cmd += (["--multi_gpu"] if num_processes > 1 else []) + ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", module, str(ident)]


# -- progress across processes ------------------------------------------------------------------------

class FileProgress:
    """The workers' progress as rank 0 reports it, written to a JSON file the job's process replays
    (``Relay``): the stage, its count (a new stage has a new ``n``), done / total and the last message."""

    def __init__(self, path: Path, every_s: float = 0.5):
        self.path, self.every_s = path, every_s
        self.state: dict[str, Any] = {"n": 0, "stage": None, "total": None, "done": 0, "message": None}
        self._last = 0.0

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        self.state.update(n=self.state["n"] + 1, stage=name, total=total, done=done, message=None)
        self._write()

    def advance(self, n: int = 1, message: str | None = None) -> None:
        self.state["done"] += n
        if message is not None:
            self.state["message"] = message
        total = self.state["total"]
        if time.monotonic() - self._last >= self.every_s or (total and self.state["done"] >= total):
            self._write()

    def close(self) -> None:
        self._write()


class Relay:
    """Replays ``FileProgress``'s file onto the job's own progress (whose ``advance`` raises ``Cancelled``
    when the job is cancelled)."""

    def __init__(self, path: Path, progress: Progress):
        self.path, self.progress = path, progress
        self.n, self.done = 0, 0

    def poll(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # not written yet
        if state["n"] != self.n:
            self.n, self.done = state["n"], state["done"]
            self.progress.stage(state["stage"], total=state["total"], done=state["done"])
        elif state["done"] > self.done:
            step, self.done = state["done"] - self.done, state["done"]
            self.progress.advance(step, state["message"])


# -- the job's side -----------------------------------------------------------------------------------

@contextmanager
def stop_requests(stop: dict[str, Any]) -> Iterator[None]:
    """While work runs, SIGTERM / SIGINT only ask to stop at the next step's end (``stop['signal']``); a second
    one interrupts at once. Outside the main thread signals cannot be caught, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def follow(where: Path, module: str, ident: int, config: dict[str, Any], num_processes: int, accelerate_config: str,
           progress: Progress | None = None, poll_s: float = 0.5) -> tuple[int, bool]:
    """Write ``config`` (with this process's pid) to ``where/config.json``, run ``python -m MODULE IDENT`` in
    ``num_processes`` workers under ``accelerate launch`` and follow them to the end. Returns (the launcher's exit
    code, whether a stop was asked for); the caller reads from its own rows how the work ended."""
    progress = progress or NullProgress()
    where.mkdir(parents=True, exist_ok=True)
    _retire_earlier_workers(where)
    for name in ("stop", "progress.json"):
        (where / name).unlink(missing_ok=True)
    (where / "config.json").write_text(json.dumps({"config": config, "parent": os.getpid()}, indent=1))
    log_file = where / "launch.log"
    cmd = command(module, ident, num_processes, accelerate_config, free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "KA2L_DATA_DIR": str(data_dir())}
    log.info("%s %d: %s (log: %s)", module, ident, " ".join(cmd), log_file)
    relay = Relay(where / "progress.json", progress)
    stop: dict[str, Any] = {"signal": 0}
    asked_at: float | None = None
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=str(PROJECT_ROOT))
    (where / "launcher.pid").write_text(str(proc.pid))
    try:
        with stop_requests(stop):
            while proc.poll() is None:
                try:
                    relay.poll()
                except Cancelled:
                    stop["signal"] = stop["signal"] or signal.SIGTERM
                if stop["signal"] and asked_at is None:
                    (where / "stop").touch()  # every worker sees it at its step's end; they checkpoint and leave together
                    asked_at = time.monotonic()
                    log.info("%s %d: stop requested; the workers checkpoint at their step's end", module, ident)
                if asked_at is not None and time.monotonic() - asked_at > STOP_GRACE_S:
                    signal_group(proc.pid, signal.SIGTERM)
                    asked_at = float("inf")
                time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # this process is being interrupted: take the launcher with it
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
    try:
        relay.poll()
    except Cancelled:
        pass
    return int(proc.returncode), bool(stop["signal"])


def _retire_earlier_workers(where: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Workers of an earlier launch of the same work may still be finishing (their job was killed before they
    saw the stop file): two sets must never write one checkpoint. They are asked to stop, given ``grace_s`` to
    checkpoint, then killed."""
    try:
        pid = int((where / "launcher.pid").read_text())
    except (OSError, ValueError):
        return
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not alive(pid) or (cmdline.exists() and b"accelerate.commands.launch" not in cmdline.read_bytes()):
        return  # gone, or the pid now belongs to another program
    log.warning("workers of an earlier launch (pid %d) are still running: asking them to stop first", pid)
    (where / "stop").touch()
    deadline = time.monotonic() + grace_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if alive(pid):
        signal_group(pid, signal.SIGKILL)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` leads; gone or not ours is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process: a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- the workers' side ---------------------------------------------------------------------------------

def weights_checksum(model) -> str:
    """A short hash of ``model``'s trainable weights, parameter by parameter (never a second copy of them):
    equal on every worker while DDP keeps them in sync, so each worker logs it."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Worker:
    """One worker's place: its rank, local rank and world size (set by ``accelerate launch``), the spec the job
    wrote, its progress (rank 0 writes the file the job replays) and whether to stop."""

    def __init__(self, where: Path):
        self.where = where
        self.rank, self.local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        spec = json.loads((where / "config.json").read_text())
        self.config, self.parent = spec["config"], int(spec["parent"])
        self.progress: Progress = FileProgress(where / "progress.json") if self.rank == 0 else NullProgress()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def stop_requested(self) -> bool:
        return (self.where / "stop").exists() or not alive(self.parent)


def worker_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
