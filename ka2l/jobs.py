"""Background jobs: long work runs in its own process, the UI polls the ``jobs`` row.

    submit(kind, config) -> job id     row 'queued'; the queue starts it when no job is running. The
                                       same kind and config already queued or running is not queued
                                       twice: JobPending names that job
    python -m ka2l job run ID          the worker: runs the library call with a progress adapter that
                                       writes the whole job's progress to the row: its phases (planned
                                       per kind in ``ka2l.job_plans``), each stage's done / total, the
                                       overall fraction; ``ka2l.views.jobs`` turns it into an ETA
    cancel(id)                         flag + SIGTERM to the worker's process group (SIGKILL after a
                                       grace period): stored work is kept, the run resumes later
    refresh()                          a 'running' row whose process is gone becomes 'failed' (never
                                       'running' forever) and the next queued job starts
    resume(id)                         submits the same job again; the pipeline continues its run

One model job runs at a time (they all need the model); a Label Studio push or pull runs in its own
lane beside it (``LANES``). Statuses: queued, starting, running, done,
failed, cancelled. State lives only in the database and the log files, so a reload, a second
browser tab or a restarted app sees the same jobs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import Cancelled, ConfigError, Ka2lError, NotFound
from .launcher import signal_group as _signal
from .paths import PROJECT_ROOT, data_dir
from .job_plans import plan
from .progress import PhaseSpec, PhaseTracker
from .store.db import connect, now

log = logging.getLogger(__name__)

KINDS = ("stage1", "triage", "decoder", "generate", "push", "pull", "finetune", "evaluate", "reprobe", "experiment")
# Jobs in one lane run one at a time; lanes run side by side. Model jobs share the CPU / GPU and the
# model; a Label Studio push or pull needs neither and must not wait an hour behind a Stage 1 run.
LANES = {"push": "annotate", "pull": "annotate"}
ACTIVE = ("starting", "running")  # a worker process exists (or is being started)
PENDING = ("queued",) + ACTIVE
CANCEL_GRACE_S = 10.0
KIND_NAMES = {"stage1": "Stage 1", "triage": "Triage", "decoder": "Decoder training", "generate": "Candidate generation",
              "push": "Push to Label Studio", "pull": "Pull from Label Studio",
              "finetune": "Fine-tune", "experiment": "RQ1-RQ3 experiment", "evaluate": "Fine-tune evaluation", "reprobe": "Re-probe with the adapter"}


def lane(kind: str) -> str:
    """The lane a kind of job runs in.

    >>> lane("stage1"), lane("push")
    ('model', 'annotate')
    """
    return LANES.get(kind, "model")


class JobPending(Ka2lError):
    """The same job (kind and config) is already queued or running; ``job_id`` names it."""

    def __init__(self, job: dict[str, Any]):
        self.job_id, self.status = int(job["id"]), job["status"]
        pool = job["config"].get("pool")
        what = KIND_NAMES.get(job["kind"], job["kind"]) + (f" on pool {pool!r}" if pool else "")
        super().__init__(f"{what} with these settings is already job {self.job_id} ({self.status}); it was not queued again. "
                         f"Follow job {self.job_id} on the Jobs page, or change a setting to launch a different job.")


def _decode(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {**row, "config": json.loads(row["config"]), "result": json.loads(row["result"]) if row["result"] else None,
            "phases": json.loads(row.get("phases") or "[]")}


def get(job_id: int) -> dict[str, Any]:
    with connect() as db:
        rows = list(db.query("SELECT * FROM jobs WHERE id = ?", [job_id]))
    if not rows:
        raise NotFound(f"No job {job_id}.")
    return _decode(rows[0])


def list_jobs(limit: int = 50) -> list[dict[str, Any]]:
    with connect() as db:
        return [_decode(r) for r in db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", [limit])]


def _update(job_id: int, **fields: Any) -> None:
    with connect() as db:
        db["jobs"].update(job_id, {**fields, "updated_at": now()})


def submit(kind: str, config: dict[str, Any]) -> int:
    """Queue a job and start it if nothing else runs. Returns at once.

    Raises ``JobPending`` (with the job's id) when the same kind and config, on the same pool, is
    already queued or running: a second copy would only wait to find the first one's work done."""
    if kind not in KINDS:
        raise ConfigError(f"Unknown job kind {kind!r}. Allowed: {', '.join(KINDS)}.")
    _validate(kind, config)
    refresh()  # a job whose worker died is not pending any more
    with connect() as db:
        key = _identity(db, kind, config)
        db.conn.execute("BEGIN IMMEDIATE")  # two clicks at once must not both find no twin and both insert
        try:
            twin = _pending_twin(db, key)
            if twin is not None:
                raise JobPending(twin)
            job_id = int(db["jobs"].insert({"kind": kind, "config": json.dumps(config), "status": "queued", "created_at": now(),
                                            "updated_at": now(), "message": "waiting for the running job to finish"}).last_pk)
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
    refresh()
    return job_id


def _pending_twin(db, key: tuple[str, int | None, str]) -> dict[str, Any] | None:
    rows = list(db.query(f"SELECT * FROM jobs WHERE kind = ? AND status IN ({', '.join('?' * len(PENDING))}) ORDER BY id", [key[0], *PENDING]))
    for job in map(_decode, rows):
        try:
            if _identity(db, job["kind"], job["config"]) == key:
                return job
        except Ka2lError:  # a job whose pool was deleted since is nobody's twin
            continue
    return None


def _identity(db, kind: str, config: dict[str, Any]) -> tuple[str, int | None, str]:
    """What makes two jobs the same work: kind, pool (by id, so a name and an id agree) and the
    config's hash (defaults filled in, the device left out, as for runs)."""
    from .config import config_hash, from_dict

    pool_id = None
    if kind in ("stage1", "triage", "push", "pull", "finetune", "experiment"):
        from .store import queries as Q

        pool_id = int(Q.get_pool(db, config["pool"])["id"])
    return kind, pool_id, config_hash(from_dict(config_class(kind), config.get(kind, {})))


def config_class(kind: str):
    from .config import ExperimentConfig

    if kind == "experiment":
        return ExperimentConfig
    from .config import (DecoderConfig, EvaluateConfig, FinetuneConfig, GenerateConfig, PullConfig, PushConfig, ReprobeConfig,
                         Stage1Config, TriageConfig)

    return {"stage1": Stage1Config, "triage": TriageConfig, "decoder": DecoderConfig, "generate": GenerateConfig,
            "push": PushConfig, "pull": PullConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig, "reprobe": ReprobeConfig}[kind]


def _validate(kind: str, config: dict[str, Any]) -> None:
    """Build the configs now, so a bad setting fails in the page, not later in the worker."""
    from .config import from_dict

    if kind in ("stage1", "triage", "push", "pull", "finetune", "experiment") and "pool" not in config:
        raise ConfigError("A job needs a pool.")
    cfg = from_dict(config_class(kind), config.get(kind, {}))
    if kind == "finetune":  # the data must exist and the run fit the device now, not only when the worker starts
        from .finetune.lora import check_launch

        check_launch(config["pool"], cfg)
    if kind == "experiment":  # the pool, its answers, run and probe must exist now
        from .finetune.experiment import check_launch as check_experiment

        check_experiment(config["pool"], cfg)
    if kind in ("evaluate", "reprobe"):  # the fine-tune must exist, and be finished for what needs its adapter
        _validate_finetune_job(kind, cfg)
    if kind == "decoder" and cfg.launcher == "accelerate":  # launcher settings that cannot run here are refused before queueing
        from .augment.launch import check as check_decoder_launch

        check_decoder_launch(cfg)
    if kind in ("decoder", "generate"):  # what they build on must exist now, not only when the worker starts
        from .store import queries as Q
        from .store import augment as S

        with connect() as db:
            if kind == "decoder":
                Q.get_probe(db, cfg.probe_id)
                for name in cfg.extra_pools:
                    Q.get_pool(db, name)
            elif (status := S.get_decoder(db, cfg.decoder_id)["status"]) != "done":
                raise ConfigError(f"Decoder {cfg.decoder_id} is {status}; finish training it (resume its job) before generating.")


def _validate_finetune_job(kind: str, cfg) -> None:
    from .store import finetune as S

    with connect() as db:
        row = S.get_finetune(db, cfg.finetune_id)
    if kind == "reprobe":
        from .finetune.reprobe import reprobe_config

        reprobe_config(cfg.finetune_id, cfg.device)  # refuses an unfinished fine-tune, a deleted run, a run without a probe
    elif "tuned" in cfg.models and (row["status"] != "done" or not row["adapter_dir"]):
        raise ConfigError(f"Fine-tune {cfg.finetune_id} is {row['status']}, so it has no tuned model to evaluate yet. Finish it first "
                          f"(resume its job), or evaluate the base model alone meanwhile (models: base).")


def _alive(pid: int | None, job_id: int) -> bool:
    """The worker process for ``job_id`` exists (checked by its command line, so a reused pid does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        parts = cmdline.read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        if len(stat) > 2 and stat[2] == "Z":  # a zombie has finished
            return False
        return b"job" in parts and str(job_id).encode() in parts
    return True


def refresh() -> None:
    """Mark jobs whose worker died as failed, then start the oldest queued job of each lane that has no
    active job (one model job at a time; a Label Studio push or pull beside it). The transaction reads, then
    writes: when another process commits in between, SQLite refuses the stale snapshot at once ("database is
    locked", no busy wait), so it is tried again on a fresh snapshot."""
    import sqlite3

    for attempt in range(5):
        try:
            return _refresh_once()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))


def _refresh_once() -> None:
    with connect() as db:
        with db.atomic():
            for row in db.query("SELECT * FROM jobs WHERE status IN (?, ?)", ACTIVE):
                started = row["started_at"] or row["created_at"]
                # 'starting' with no pid yet: the worker is being spawned. Once its pid is known, a
                # missing process means it ended (e.g. cancelled before it got going).
                young = row["status"] == "starting" and not row["pid"] and time.time() - timestamp(started) < 30
                if not young and not _alive(row["pid"], row["id"]):
                    status = "cancelled" if row["cancel_requested"] else "failed"
                    error = None if row["cancel_requested"] else "The worker process ended without finishing (killed or crashed). Resume to continue where it stopped."
                    db["jobs"].update(row["id"], {"status": status, "error": error, "finished_at": now(), "updated_at": now()})
            busy = {lane(r["kind"]) for r in db.query("SELECT kind FROM jobs WHERE status IN (?, ?)", ACTIVE)}
            start = []
            for row in db.query("SELECT id, kind FROM jobs WHERE status = 'queued' ORDER BY id"):
                if lane(row["kind"]) not in busy:  # the oldest queued job of each idle lane
                    busy.add(lane(row["kind"]))
                    start.append(row["id"])
            for job_id in start:
                db["jobs"].update(job_id, {"status": "starting", "started_at": now(), "updated_at": now(), "message": "starting"})
    for job_id in start:
        _spawn(job_id)


def timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def log_path(job_id: int) -> Path:
    return data_dir() / "logs" / f"job-{job_id}.log"


def _spawn(job_id: int) -> None:
    path = log_path(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "KA2L_DATA_DIR": str(data_dir())}
    with path.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ka2l", "job", "run", str(job_id)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=str(PROJECT_ROOT))
    _update(job_id, pid=proc.pid, log_path=str(path))


def cancel(job_id: int, wait: bool = False) -> None:
    """Ask a job to stop. Queued jobs are cancelled at once; a running worker gets SIGTERM (it marks
    its run interrupted and exits), and SIGKILL if it is still there after the grace period."""
    job = get(job_id)
    if job["status"] in ("done", "failed", "cancelled"):
        return
    _update(job_id, cancel_requested=1)
    if job["status"] == "queued":
        _update(job_id, status="cancelled", finished_at=now(), message="cancelled before it started")
        return
    if job["pid"]:
        _signal(job["pid"], signal.SIGTERM)
        if wait:
            deadline = time.time() + CANCEL_GRACE_S
            while time.time() < deadline and _alive(job["pid"], job_id):
                time.sleep(0.2)
            if _alive(job["pid"], job_id):
                _signal(job["pid"], signal.SIGKILL)
                time.sleep(0.5)
    refresh()


def resume(job_id: int) -> int:
    """Submit a failed or cancelled job again; its run continues where it stopped."""
    job = get(job_id)
    if job["status"] not in ("failed", "cancelled"):
        raise Ka2lError(f"Job {job_id} is {job['status']}; only failed or cancelled jobs can be resumed.")
    return submit(job["kind"], _resumed_config(job))


def _resumed_config(job: dict[str, Any]) -> dict[str, Any]:
    """The config a resume runs with. An evaluation asked to answer afresh forgets the stored answers before
    its first answer phase; once the stopped job got that far, the answers stored since are the fresh ones,
    so the resume keeps them (fresh off) instead of clearing them a second time."""
    config = job["config"]
    evaluate = config.get("evaluate") if job["kind"] == "evaluate" else None
    if evaluate and evaluate.get("fresh") and str(job.get("stage") or "").endswith(" answers"):
        return {**config, "evaluate": {**evaluate, "fresh": False}}
    return config


class JobProgress:
    """Progress adapter for a worker: tracks the whole job's phases (``PhaseTracker``), writes them to
    the job row (at most every 0.5 s, and at every stage change and note) and honours cancel."""

    def __init__(self, job_id: int, phases: list[PhaseSpec] | None = None, clock: Callable[[], float] = time.time):
        self.job_id, self.clock = job_id, clock
        self.tracker = PhaseTracker(phases or [], clock)
        self.done, self.total, self._last = 0, None, 0.0
        self._write(stage=None, message=None)

    def _check_cancel(self) -> None:
        if get(self.job_id)["cancel_requested"]:
            raise Cancelled(f"job {self.job_id} cancelled")

    def _write(self, **fields: Any) -> None:
        snap = self.tracker.snapshot()
        _update(self.job_id, phases=json.dumps(snap["phases"]), fraction=snap["fraction"], credited=snap["credited"],
                progress_started_at=snap["started_at"], **fields)

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        row = self.tracker.stage(name, total, done)
        self.done, self.total = done, total
        self._write(stage=row["name"], done=done, total=total, message=None)  # stage timing lives in the phases JSON
        self._last = self.clock()
        log.info("stage %s: %s/%s", row["name"], done, total)
        self._check_cancel()

    def advance(self, n: int = 1, message: str | None = None) -> None:
        """``n`` more items done; ``advance(0, note)`` reports what the stage is doing between items."""
        self.done += n
        self.tracker.advance(n)
        t = self.clock()
        if n == 0 or t - self._last >= 0.5 or (self.total and self.done >= self.total):
            self._last = t
            self._write(done=self.done, message=message)
            self._check_cancel()

    def finish(self) -> None:
        self.tracker.finish()
        self._write()

    def close(self) -> None:
        pass


def _run(kind: str, cfg: dict[str, Any], progress: JobProgress) -> dict[str, Any]:
    """Run one job's library call; returns what the job row records as its result."""
    from .config import from_dict

    config = from_dict(config_class(kind), cfg.get(kind, {}))
    if kind == "stage1":
        from .scale import run_stage1  # the local run_stage1, or its model stages on Ray (config.executor)

        return {"run_id": run_stage1(cfg["pool"], config, progress=progress)}
    if kind == "triage":
        from .scale import run_triage

        return {"run_id": run_triage(cfg["pool"], config, progress=progress)}
    if kind == "decoder":
        from .augment.train import train_decoder

        return {"decoder_id": train_decoder(config, progress=progress)}
    if kind == "push":
        from .annotate.push import push

        return push(cfg["pool"], config, progress=progress)
    if kind == "pull":
        from .annotate.pull import pull

        return pull(cfg["pool"], config, progress=progress)
    if kind == "finetune":
        from .finetune.lora import finetune

        return {"finetune_id": finetune(cfg["pool"], config, progress=progress)}
    if kind == "experiment":
        from .finetune.experiment import run_experiment

        return {"experiment_id": run_experiment(cfg["pool"], config, progress=progress)}
    if kind == "evaluate":
        from .finetune.evaluate import evaluate

        evaluate(config.finetune_id, progress, temperature=config.temperature, seed=config.seed, batch_size=config.batch_size,
                 bootstrap=config.bootstrap, models=config.models, bertscore_model=config.bertscore_model, device=config.device,
                 fresh=config.fresh)
        return {"finetune_id": config.finetune_id}
    if kind == "reprobe":
        from .finetune.reprobe import reprobe

        return {"finetune_id": config.finetune_id, "run_id": reprobe(config.finetune_id, progress=progress, device=config.device)}
    from .augment.candidates import generate_candidates

    return {"generation_id": generate_candidates(config, progress=progress)}


def run_worker(job_id: int) -> int:
    """Body of ``python -m ka2l job run ID``. Exit code 0 done, 1 failed, 130 cancelled."""
    job = get(job_id)
    _update(job_id, status="running", pid=os.getpid(), started_at=job["started_at"] or now())
    try:
        phases = plan(job["kind"], job["config"])
    except Exception:  # the plan is only an estimate: the job itself says what is wrong, its phases show as they start
        log.warning("job %d: no phase plan", job_id, exc_info=True)
        phases = []
    progress = JobProgress(job_id, phases)
    try:
        result = _run(job["kind"], job["config"], progress)
    except (Cancelled, KeyboardInterrupt):
        _update(job_id, status="cancelled", finished_at=now(), message="cancelled; stored work is kept and resumes")
        code = 130
    except Ka2lError as exc:
        _update(job_id, status="failed", finished_at=now(), error=str(exc))
        code = 1
    except Exception as exc:  # a bug: keep the traceback in the log, the short form in the row
        log.exception("job %d failed", job_id)
        _update(job_id, status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc} (see the log)")
        code = 1
    else:
        progress.finish()
        _update(job_id, status="done", finished_at=now(), result=json.dumps(result), message="done")
        code = 0
    refresh()  # start the next queued job
    return code
