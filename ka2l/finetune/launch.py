"""A fine-tune on several processes (GPUs, or CPU processes over gloo) through ``accelerate launch``.

    the job's process   ``launch``: starts ``python -m accelerate.commands.launch ... -m ka2l.finetune.launch ID``
                        in a session of its own, then follows it: the workers' progress (a file rank 0 writes)
                        is replayed to the job's progress, a cancel (the job's, SIGTERM or Ctrl-C) becomes a stop
                        file, and a launch that fails raises ``LaunchError`` with the error and the log's tail
    every worker        ``main``: ``lora.train`` (the same code as a one-process fine-tune); the Trainer shards the
                        data and syncs the gradients (DDP), or shards the weights (an FSDP or DeepSpeed ZeRO-3
                        ``accelerate_config``); only rank 0 writes rows, checkpoints' shared files and the adapter.
                        At every step's end the workers agree (an all-reduce) on stopping when the stop file
                        exists or the job's process is gone, so a cancelled or killed job leaves a checkpoint
                        and no orphan workers.

Files, under the fine-tune's folder: ``launch/config.json`` (the config and the job's pid), ``launch/progress.json``,
``launch/stop`` and ``launch/launch.log`` (every worker's output). Without a config file ka2l asks for plain
DDP itself (``--multi_gpu``; on CPU each worker then trains with gloo): a user's default accelerate config
is never read behind the job's back.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, from_dict, to_dict
from ..errors import Cancelled, ConfigError, Ka2lError
from ..paths import PROJECT_ROOT, data_dir
from ..progress import NullProgress, Progress

log = logging.getLogger("ka2l.finetune.launch")  # by name: the workers run this module as __main__

SHARDED = ("FSDP", "DEEPSPEED")
STOP_GRACE_S = 60.0  # after a stop request, how long the workers get to reach a step's end and checkpoint
TAIL_LINES = 30


class LaunchError(Ka2lError):
    """``accelerate launch`` could not start the workers, or a worker failed."""


def folder(finetune_id: int) -> Path:
    from .lora import folder_of

    return folder_of(finetune_id) / "launch"


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


def check(cfg: FinetuneConfig, gpus: int | None = None) -> None:
    """Refuse launcher settings that cannot run here, with the fix: a bad config file, more CUDA processes than
    GPUs (``gpus`` overrides the count), FSDP / ZeRO-3 on CPU, several processes on MPS."""
    from ..device import resolve_device

    if cfg.launcher != "accelerate":
        return
    kind = config_kind(cfg.accelerate_config) if cfg.accelerate_config else "MULTI_GPU"
    device = resolve_device(cfg.device) if cfg.device == "auto" else cfg.device
    n = cfg.num_processes
    if device == "cpu" and kind in SHARDED:
        raise ConfigError(f"accelerate_config {cfg.accelerate_config!r} is a {kind} config, which needs CUDA GPUs, but the fine-tune's "
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


def free_port() -> int:
    """A TCP port nothing listens on now, for the workers' rendezvous (29500, torch's default, may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(finetune_id: int, cfg: FinetuneConfig, port: int) -> list[str]:
    """The ``accelerate launch`` command line of a fine-tune's workers."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes), "--num_machines", "1",
           "--main_process_port", str(port)]
    if cfg.accelerate_config:
        cmd += ["--config_file", str(Path(cfg.accelerate_config).expanduser())]
    else:
        # plain DDP, said explicitly so a default config in ~/.cache/huggingface/accelerate is not read; on CPU
        # '--multi_gpu' still starts torchrun's N workers, which train on the CPU (use_cpu) over gloo
        cmd += (["--multi_gpu"] if cfg.num_processes > 1 else []) + ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "ka2l.finetune.launch", str(finetune_id)]


# -- the job's side -----------------------------------------------------------------------------------

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


def launch(finetune_id: int, cfg: FinetuneConfig, progress: Progress | None = None, poll_s: float = 0.5) -> None:
    """Train the stored fine-tune ``finetune_id`` in ``cfg.num_processes`` workers under ``accelerate launch`` and
    follow them to the end. Raises ``Cancelled`` when a cancel stopped them (their checkpoint resumes the
    fine-tune), ``LaunchError`` when the launch or a worker failed."""
    from .lora import _stop_requests

    progress = progress or NullProgress()
    where = folder(finetune_id)
    where.mkdir(parents=True, exist_ok=True)
    for name in ("stop", "progress.json"):
        (where / name).unlink(missing_ok=True)
    (where / "config.json").write_text(json.dumps({"config": to_dict(cfg), "parent": os.getpid()}, indent=1))
    log_file = where / "launch.log"
    cmd = command(finetune_id, cfg, free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "KA2L_DATA_DIR": str(data_dir())}
    log.info("fine-tune %d: %s (log: %s)", finetune_id, " ".join(cmd), log_file)
    relay = Relay(where / "progress.json", progress)
    stop: dict[str, Any] = {"signal": 0}
    asked_at: float | None = None
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=str(PROJECT_ROOT))
    try:
        with _stop_requests(stop):
            while proc.poll() is None:
                try:
                    relay.poll()
                except Cancelled:
                    stop["signal"] = stop["signal"] or signal.SIGTERM
                if stop["signal"] and asked_at is None:
                    (where / "stop").touch()  # every worker sees it at its step's end; they checkpoint and leave together
                    asked_at = time.monotonic()
                    log.info("fine-tune %d: stop requested; the workers checkpoint at their step's end", finetune_id)
                if asked_at is not None and time.monotonic() - asked_at > STOP_GRACE_S:
                    _signal(proc.pid, signal.SIGTERM)
                    asked_at = float("inf")
                time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # this process is being interrupted: take the launcher with it
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
    try:
        relay.poll()
    except Cancelled:
        pass
    done = _status(finetune_id) == "done"
    if done:
        return
    if stop["signal"]:
        raise Cancelled(f"fine-tune {finetune_id} stopped; its checkpoint resumes it")
    raise LaunchError(f"accelerate launch of fine-tune {finetune_id} ended with exit code {proc.returncode} before training finished"
                      f"{': ' + _error(finetune_id) if _error(finetune_id) else ''}.\nLast lines of {log_file}:\n{tail(log_file)}\n"
                      f"Fix what the log names and resume the job: it continues from the last checkpoint.")


def _status(finetune_id: int) -> str:
    from ..store import finetune as S
    from ..store.db import connect

    with connect() as db:
        return S.get_finetune(db, finetune_id)["status"]


def _error(finetune_id: int) -> str | None:
    from ..store import finetune as S
    from ..store.db import connect

    with connect() as db:
        return S.get_finetune(db, finetune_id)["error"]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the workers' side ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """One worker: ``python -m ka2l.finetune.launch FINETUNE_ID``, started by ``accelerate launch`` (which sets
    RANK, LOCAL_RANK and WORLD_SIZE). Exit code 0 done or stopped (the row says which), 1 failed."""
    from ..progress import marks_status
    from ..store import finetune as S
    from ..store.db import connect
    from .lora import train

    args = list(sys.argv[1:] if argv is None else argv)
    finetune_id = int(args[0])
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    where = folder(finetune_id)
    spec = json.loads((where / "config.json").read_text())
    cfg, parent = from_dict(FinetuneConfig, spec["config"]), int(spec["parent"])
    stop_file = where / "stop"

    def stop_requested() -> bool:
        return stop_file.exists() or not _alive(parent)

    progress = FileProgress(where / "progress.json") if rank == 0 else NullProgress()

    def update(**fields: Any) -> None:
        if rank == 0:
            with connect() as db:
                S.update_finetune(db, finetune_id, **fields)

    try:
        with marks_status(update, progress):
            train(finetune_id, cfg, progress, rank=rank, local_rank=local_rank, stop_requested=stop_requested)
    except (Cancelled, KeyboardInterrupt) as exc:
        # exit 0: a failed worker makes torchrun SIGTERM the others, maybe before rank 0 recorded the stop;
        # the job's process reads how it ended from the fine-tune's row ('interrupted')
        log.info("stopped: %s", exc)
        return 0
    except Ka2lError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
