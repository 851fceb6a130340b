"""Decoder training (Stage 2) on several processes (GPUs, or CPU processes over gloo) through ``accelerate launch``.

    the job's process   ``train.train_decoder`` computes the vectors and the baseline report, leaves a checkpoint,
                        and calls ``launch``: ``ka2l.launcher.follow`` runs ``-m ka2l.augment.launch ID`` in
                        ``num_processes`` workers (progress relayed, a cancel becomes a stop file); it then loads the
                        workers' checkpoint, decodes the final report and saves the decoder
    every worker        ``main``: ``train_in_worker``, the same training steps as one process, each worker
                        taking its share of every batch, DDP averaging the gradients; rank 0 writes the loss rows and
                        the checkpoint and says how training ended in ``launch/outcome.json``

The decoder is trained with DDP only: every process holds the whole decoder (its backbone included), so an
FSDP or ZeRO-3 accelerate config is refused (``check``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import DecoderConfig, from_dict, to_dict
from ..errors import Cancelled
from ..launcher import LaunchError, Worker, follow, tail, weights_checksum, worker_logging
from ..launcher import check as check_settings
from ..paths import decoders_dir
from ..progress import NullProgress, Progress

log = logging.getLogger("ka2l.augment.launch")  # by name: the workers run this module as __main__


def folder(decoder_id: int) -> Path:
    return decoders_dir() / f"decoder-{decoder_id}" / "launch"


def check(cfg: DecoderConfig, gpus: int | None = None) -> None:
    """Refuse launcher settings that cannot run here, with the fix (``ka2l.launcher.check``; DDP only)."""
    if cfg.launcher == "accelerate":
        check_settings(cfg.num_processes, cfg.accelerate_config, cfg.device, gpus, what="decoder", sharded=False)


def launch(decoder_id: int, cfg: DecoderConfig, deadline: float | None, job_seconds: float, progress: Progress | None = None,
           poll_s: float = 0.5) -> None:
    """Run decoder ``decoder_id``'s training steps in ``cfg.num_processes`` workers, from its checkpoint, until its
    last step or ``deadline`` (a ``time.time()``); they leave their checkpoint in its place. Raises ``Cancelled``
    when a cancel stopped them, ``LaunchError`` when the launch or a worker failed."""
    where = folder(decoder_id)
    outcome_file = where / "outcome.json"
    outcome_file.unlink(missing_ok=True)
    spec = {"config": to_dict(cfg), "deadline": deadline, "job_seconds": job_seconds, "launched_at": time.time()}
    code, stopped = follow(where, "ka2l.augment.launch", decoder_id, spec, cfg.num_processes, cfg.accelerate_config,
                           progress or NullProgress(), poll_s)
    outcome = json.loads(outcome_file.read_text()) if outcome_file.is_file() else {}
    if outcome.get("outcome") == "trained":  # rank 0 saved the finished checkpoint; a worker failing after that loses nothing
        if code != 0:
            log.warning("decoder %d: trained, but the launcher exited with code %d (see %s)", decoder_id, code, where / "launch.log")
        return
    log_file = where / "launch.log"
    if outcome.get("outcome") != "failed" and (outcome.get("outcome") == "stopped" or stopped):
        raise Cancelled(f"decoder {decoder_id} stopped; its checkpoint resumes it")
    raise LaunchError(f"accelerate launch of decoder {decoder_id}'s training ended with exit code {code} before training finished"
                      f"{': ' + outcome['error'] if outcome.get('error') else ''}.\nLast lines of {log_file}:\n{tail(log_file)}\n"
                      f"Fix what the log names and resume the job: it continues from the last checkpoint.")


def train_in_worker(decoder_id: int, cfg: DecoderConfig, worker) -> str:
    """One ``accelerate launch`` worker's part of ``train_decoder`` (``worker``: a ``ka2l.launcher.Worker``): the
    training steps from the checkpoint the job's process left, until the last step or the job's deadline, in
    DDP with the other workers; rank 0 then leaves its checkpoint for the job's process (which decodes the
    final report and saves the decoder). Returns 'trained' or 'stopped'."""
    from accelerate import Accelerator

    from ..device import resolve_device
    from .steps import total_steps, train_steps
    from .train import Budget, Trainer

    spec = worker.config
    deadline, launched, spent = spec["deadline"], float(spec["launched_at"]), float(spec["job_seconds"])
    accelerator = Accelerator(cpu=resolve_device(cfg.device) == "cpu")
    t = Trainer(decoder_id, cfg, worker.progress, None, Budget(None))
    t.device = str(accelerator.device)
    vectors = t.vectors()  # cached by the job's process
    decoder, opt, st = t.build(vectors)
    model, opt = accelerator.prepare(decoder, opt)
    total = total_steps(cfg, len(t.train_rows))
    worker.progress.stage("training", total=total, done=st["step"])
    stop = train_steps(t, model, opt, st, vectors, total, lambda step_s: deadline is None or time.time() + step_s <= deadline,
                       lambda: spent + time.time() - launched, accelerator, worker.stop_requested)
    st["job_seconds"] = spent + time.time() - launched
    trained = accelerator.unwrap_model(model)
    log.info("rank %d of %d: %d steps, %d questions, weights %s", accelerator.process_index, accelerator.num_processes, st["step"],
             t.rows_seen, weights_checksum(trained))
    if accelerator.is_main_process:
        t.checkpoint(trained, opt, st)
    accelerator.wait_for_everyone()
    return "stopped" if stop else "trained"


def main(argv: Sequence[str] | None = None) -> int:
    """One worker: ``python -m ka2l.augment.launch DECODER_ID``, started by ``accelerate launch``. Exit code 0
    trained or stopped (``outcome.json`` says which), 1 failed."""
    args = list(sys.argv[1:] if argv is None else argv)
    decoder_id = int(args[0])
    worker = Worker(folder(decoder_id))
    worker_logging(worker.rank)
    cfg = from_dict(DecoderConfig, worker.config["config"])

    def say(**outcome: str) -> None:
        if worker.main:
            tmp = worker.where / "outcome.tmp"
            tmp.write_text(json.dumps(outcome))
            tmp.replace(worker.where / "outcome.json")

    try:
        say(outcome=train_in_worker(decoder_id, cfg, worker))
    except Exception as exc:  # the job's process reports it, with the log's tail
        log.exception("training failed")
        say(outcome="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        worker.progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
