"""A fine-tune on several processes (GPUs, or CPU processes over gloo) through ``accelerate launch``.

    the job's process   ``launch``: ``ka2l.launcher.follow`` starts ``accelerate launch ... -m ka2l.finetune.launch ID``
                        and follows it (progress relayed, a cancel becomes a stop file); a launch that fails raises
                        ``LaunchError`` with the error and the log's tail
    every worker        ``main``: ``lora.train`` (the same code as a one-process fine-tune); the Trainer shards the
                        data and syncs the gradients (DDP), or shards the weights (an FSDP or DeepSpeed ZeRO-3
                        ``accelerate_config``); only rank 0 writes rows, checkpoints' shared files and the adapter.
                        At every step's end the workers agree (an all-reduce) on stopping when the stop file
                        exists or the job's process is gone, so a cancelled or killed job leaves a checkpoint
                        and no orphan workers.

Files, under the fine-tune's folder: ``launch/`` (see ``ka2l.launcher``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, from_dict, to_dict
from ..errors import Cancelled, Ka2lError
from ..launcher import SHARDED, LaunchError, Worker, config_kind, follow, tail, worker_logging
from ..launcher import check as check_settings
from ..progress import NullProgress, Progress

__all__ = ["SHARDED", "LaunchError", "check", "config_kind", "folder", "launch", "main"]

log = logging.getLogger("ka2l.finetune.launch")  # by name: the workers run this module as __main__


def folder(finetune_id: int) -> Path:
    from .lora import folder_of

    return folder_of(finetune_id) / "launch"


def check(cfg: FinetuneConfig, gpus: int | None = None) -> None:
    """Refuse launcher settings that cannot run here, with the fix (``ka2l.launcher.check``)."""
    if cfg.launcher == "accelerate":
        check_settings(cfg.num_processes, cfg.accelerate_config, cfg.device, gpus, what="fine-tune")


def launch(finetune_id: int, cfg: FinetuneConfig, progress: Progress | None = None, poll_s: float = 0.5) -> None:
    """Train the stored fine-tune ``finetune_id`` in ``cfg.num_processes`` workers under ``accelerate launch`` and
    follow them to the end. Raises ``Cancelled`` when a cancel stopped them (their checkpoint resumes the
    fine-tune), ``LaunchError`` when the launch or a worker failed."""
    where = folder(finetune_id)
    code, stopped = follow(where, "ka2l.finetune.launch", finetune_id, to_dict(cfg), cfg.num_processes, cfg.accelerate_config,
                           progress or NullProgress(), poll_s)
    row = _row(finetune_id)
    if row["status"] == "done":
        return
    if stopped:
        raise Cancelled(f"fine-tune {finetune_id} stopped; its checkpoint resumes it")
    log_file = where / "launch.log"
    raise LaunchError(f"accelerate launch of fine-tune {finetune_id} ended with exit code {code} before training finished"
                      f"{': ' + row['error'] if row['error'] else ''}.\nLast lines of {log_file}:\n{tail(log_file)}\n"
                      f"Fix what the log names and resume the job: it continues from the last checkpoint.")


def _row(finetune_id: int) -> dict[str, Any]:
    from ..store import finetune as S
    from ..store.db import connect

    with connect() as db:
        return S.get_finetune(db, finetune_id)


# -- the workers' side ---------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """One worker: ``python -m ka2l.finetune.launch FINETUNE_ID``, started by ``accelerate launch`` (which sets
    RANK, LOCAL_RANK and WORLD_SIZE). Exit code 0 done or stopped (the row says which), 1 failed."""
    from ..progress import marks_status
    from ..store import finetune as S
    from ..store.db import connect
    from .lora import train

    args = list(sys.argv[1:] if argv is None else argv)
    finetune_id = int(args[0])
    worker = Worker(folder(finetune_id))
    worker_logging(worker.rank)
    cfg = from_dict(FinetuneConfig, worker.config)

    def update(**fields: Any) -> None:
        if worker.main:
            with connect() as db:
                S.update_finetune(db, finetune_id, **fields)

    try:
        with marks_status(update, worker.progress):
            train(finetune_id, cfg, worker.progress, rank=worker.rank, local_rank=worker.local_rank,
                  stop_requested=worker.stop_requested)
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
