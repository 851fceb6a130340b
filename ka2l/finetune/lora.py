"""The LoRA fine-tune as resumable work, and loading a tuned model. With ``ka2l.finetune.trainer`` (the
SFTTrainer set-up) the only modules that import ``peft`` and ``trl`` (both lazily, inside functions).

    data        ``ka2l.finetune.data.build``: pairs, the held-out split, the dataset hash; stored in finetune_data
    preflight   the memory estimate against the device (``ka2l.finetune.preflight``); a config that cannot fit is refused
    training    TRL's SFTTrainer on pre-tokenised pairs: the prompt is the one Stage 1 put to the model
                (``build_prompt`` with the run's PromptConfig), the completion the answer and EOS; a
                ``completion_mask`` makes TRL set every prompt label to -100 (loss on answer tokens only).
                LoRA on every linear layer by default. A callback writes the train loss, lr and tokens/s
                every step and the held-out loss every ``eval_every`` steps to ``finetune_log``, reports the
                steps to the job, keeps the adapter with the lowest held-out loss and stops early after
                ``patience`` evaluations without improvement (keeping the best adapter; with patience 0,
                early stopping is off and the adapter is the one training ended with).
    checkpoints every ``checkpoint_every`` steps and on cancel (SIGTERM / SIGINT or the job's cancel flag are
                honoured at the next step's end): written under ``.partial`` and renamed into place, so a
                checkpoint folder is complete or absent. Resume continues from the newest one: its step, its
                optimizer, scheduler, RNG and data position (Trainer's ``resume_from_checkpoint``).
    processes   with ``launcher='accelerate'`` the job starts ``accelerate launch`` (``ka2l.finetune.launch``) and
                every worker runs ``train`` here: the Trainer shards the data and syncs the gradients; the
                workers agree on stopping at each step's end (an all-reduce), and only rank 0 writes rows,
                the shared checkpoint files, the best adapter and the final one.
    adapter     the best adapter (safetensors + adapter_config.json) with a sidecar ``ka2l-finetune.json``:
                dataset hash, config, model, prompt, versions

Nothing here names a device: the run's device setting is resolved by ``ka2l.device`` (under
``accelerate launch``, each worker takes the GPU of its local rank, see ``ka2l.finetune.launch``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, ModelSpec, PromptConfig, Stage1Config, config_hash, from_dict, to_dict
from ..errors import Cancelled, ConfigError, ModelLoadError
from ..launcher import stop_requests, weights_checksum
from ..models.llm import LoadedLM, load_model, resolve_source
from ..paths import data_dir
from ..progress import NullProgress, Progress, marks_status
from ..store import finetune as S
from ..store import queries as Q
from ..store.db import connect
from . import data as D
from .trainer import any_rank, checkpoints, encode_pairs, make_trainer, replace_dir, save_adapter, sharded, total_steps

log = logging.getLogger(__name__)

SIDECAR = "ka2l-finetune.json"


def finetunes_dir() -> Path:
    return data_dir() / "finetunes"


def folder_of(finetune_id: int) -> Path:
    return finetunes_dir() / f"finetune-{finetune_id}"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    from .. import __version__

    return {"ka2l": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


# -- what the training loop records ---------------------------------------------------------------

def _callback_class():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Losses to the store, steps to the job, early stopping, the best adapter, stop requests. Under
        ``accelerate launch`` every process runs it: the decisions (stop, early stop) come out the same on all of
        them (the losses it sees are gathered over the processes), the writes are rank 0's."""

        def __init__(self, run: "_Run"):
            self.run = run
            self.trainer = None  # set once the trainer exists: the best adapter is saved through it
            self.pending: list[dict[str, Any]] = []
            self.last_flush = self.t_last = time.monotonic()
            self.tokens_last = 0
            self.cancelled = False  # this process's job asked to stop
            self.stopped = False  # every process stopped at this step's end

        def on_train_begin(self, args, state, control, **kw):
            self.run.progress.stage("training", total=state.max_steps, done=state.global_step)
            self.t_last, self.tokens_last = time.monotonic(), state.num_input_tokens_seen or 0

        def on_step_end(self, args, state, control, **kw):
            last = self.pending[-1]["loss"] if self.pending else None
            try:
                self.run.progress.advance(1, f"step {state.global_step}/{state.max_steps}" + (f" · loss {last:.3f}" if last is not None else ""))
            except Cancelled:
                self.cancelled = True
            asked = self.cancelled or bool(self.run.stop["signal"]) or self.run.stop_requested()
            if any_rank(asked, args.device):
                self.stopped = True
                control.should_save = True  # a checkpoint at this step, then out
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if self.run.main and "loss" in logs and not any(k.startswith("eval_") for k in logs):
                t, tokens = time.monotonic(), state.num_input_tokens_seen or 0
                rate = (tokens - self.tokens_last) / (t - self.t_last) if t > self.t_last and tokens > self.tokens_last else None
                self.t_last, self.tokens_last = t, tokens
                self.pending.append({"step": state.global_step, "split": "train", "loss": float(logs["loss"]),
                                     "lr": logs.get("learning_rate"), "tokens_per_s": rate})
                if time.monotonic() - self.last_flush >= 1.0:
                    self.flush(state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = float((metrics or {})["eval_loss"])
            if self.run.main:
                self.pending.append({"step": state.global_step, "split": "eval", "loss": loss})
            self.run.evaluated(state.global_step, loss, self.trainer, control)
            self.flush(state.global_step)
            self.t_last = time.monotonic()  # tokens/s counts training time only

        def on_save(self, args, state, control, **kw):
            self.flush(state.global_step, checkpoint=True)

        def on_train_end(self, args, state, control, **kw):
            self.flush(state.global_step)

        def flush(self, step: int, checkpoint: bool = False) -> None:
            if self.run.main:
                self.run.flush(self.pending, step, checkpoint)
            self.pending.clear()
            self.last_flush = time.monotonic()

    return Recorder


class _Run:
    """One fine-tune's state while it trains: its row, folder, early stopping and the best adapter. Every
    training process keeps the early-stopping state (so all stop together); only rank 0 (``main``) writes."""

    def __init__(self, finetune_id: int, cfg: FinetuneConfig, progress: Progress, rank: int = 0,
                 stop_requested: Callable[[], bool] | None = None):
        self.id, self.cfg, self.progress = finetune_id, cfg, progress
        self.main = rank == 0
        self.stop_requested = stop_requested or (lambda: False)
        self.folder = folder_of(finetune_id)
        self.ckpt_dir, self.best_dir, self.adapter_dir = self.folder / "checkpoints", self.folder / "best", self.folder / "adapter"
        self.stop: dict[str, Any] = {"signal": 0}
        self.best: float | None = None
        self.bad = 0
        self.best_saved = False
        self.stopped_early = False
        self.last_eval_step = -1
        self.t_flush = time.monotonic()

    def restore(self, step: int) -> None:
        """Early-stopping state as it was at the checkpoint ``step``; log rows and a best adapter from after it are dropped."""
        with connect() as db:
            if self.main:
                S.trim_log(db, self.id, step)
            evals = [r for r in S.log(db, self.id, "eval") if r["step"] <= step]
        for row in evals:
            self._track(row["step"], row["loss"])
        best_step = json.loads((self.best_dir / SIDECAR).read_text())["step"] if (self.best_dir / SIDECAR).is_file() else None
        self.best_saved = best_step is not None and best_step <= step
        if self.main:
            if best_step is not None and best_step > step:
                shutil.rmtree(self.best_dir, ignore_errors=True)
            with connect() as db:
                S.update_finetune(db, self.id, step=step, best_eval_loss=self.best, stopped_early=0)

    def _track(self, step: int, loss: float) -> bool:
        """Early-stopping bookkeeping; True when ``loss`` is a new best."""
        self.last_eval_step = step
        if self.best is None or loss < self.best:
            self.best, self.bad = loss, 0
            return True
        self.bad += 1
        return False

    def evaluated(self, step: int, loss: float, trainer, control) -> None:
        if self._track(step, loss) and trainer is not None and self.cfg.patience:
            tmp = self.folder / ".best-partial"
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(trainer, tmp)
            if self.main:
                (tmp / SIDECAR).write_text(json.dumps({"step": step, "eval_loss": loss}))
                replace_dir(tmp, self.best_dir)
            self.best_saved = True
        if self.cfg.patience and self.bad >= self.cfg.patience:
            self.stopped_early = True
            control.should_training_stop = True
        if self.main:
            with connect() as db:
                S.update_finetune(db, self.id, best_eval_loss=self.best, stopped_early=int(self.stopped_early))

    def flush(self, rows: list[dict[str, Any]], step: int, checkpoint: bool) -> None:
        t = time.monotonic()
        with connect() as db:
            if rows:
                S.add_log(db, self.id, rows)
            S.add_seconds(db, self.id, t - self.t_flush)
            S.update_finetune(db, self.id, step=step)
        self.t_flush = t
        if checkpoint:
            log.info("fine-tune %d: checkpoint at step %d", self.id, step)


# -- the job's library call -------------------------------------------------------------------------

def finetune_key(cfg: FinetuneConfig) -> str:
    """A fine-tune's settings' identity (its data is matched apart, by content): the config's hash, without the
    path of a data file, so the same pairs in another file (an experiment's cell in another experiment) find
    the same fine-tune.

    >>> a, b = FinetuneConfig(source="file", file="x/a.jsonl"), FinetuneConfig(source="file", file="y/b.jsonl")
    >>> finetune_key(a) == finetune_key(b), finetune_key(a) == finetune_key(replace(a, lr=1e-3))
    (True, False)
    """
    same = "data" + Path(cfg.file).suffix.lower()  # any file's name: its rows are the dataset hash's business
    return config_hash(replace(cfg, file=same) if cfg.source == "file" else cfg)


def stored_key(row: dict[str, Any]) -> str | None:
    try:
        return finetune_key(from_dict(FinetuneConfig, row["config"]))
    except ConfigError:  # a row written by an older ka2l whose config no longer validates
        return None


def _start(pool: str | int, cfg: FinetuneConfig, ds: D.Dataset, spec: ModelSpec) -> tuple[int, str]:
    with connect() as db:
        h = finetune_key(cfg)
        # fine-tunes stored before the key left out the file's path carry the whole config's hash: their stored
        # config, keyed anew, finds them
        row = S.find_finetune(db, ds.pool_id, h, ds.hash) or next(
            (r for r in S.finetunes_with_data(db, ds.pool_id, ds.hash) if stored_key(r) == h), None)
        if row is not None and row["status"] == "done" and row["adapter_dir"] and Path(row["adapter_dir"]).is_dir():
            return int(row["id"]), "done"
        if row is not None:
            S.update_finetune(db, row["id"], status="training", error=None)
            return int(row["id"]), "resumed"
        with db.atomic():
            fid = S.create_finetune(db, {"pool_id": ds.pool_id, "run_id": ds.run_id, "config": to_dict(cfg), "config_hash": h,
                                         "model": spec.name_or_path, "data_source": cfg.source, "dataset_hash": ds.hash,
                                         "n_train": len(ds.train), "n_eval": len(ds.eval), "status": "training", "versions": versions()})
            S.save_data(db, fid, ds.rows())
        return fid, "new"


def run_model(run_id: int, cfg: FinetuneConfig) -> tuple[ModelSpec, PromptConfig]:
    """The model (with the fine-tune's device and dtype) and the prompt of Stage 1 run ``run_id``."""
    with connect() as db:
        stage1 = from_dict(Stage1Config, Q.get_run(db, run_id)["config"])
    return replace(stage1.model, device=cfg.device, dtype=cfg.dtype), stage1.prompt


def check_launch(pool: str | int, cfg: FinetuneConfig, available: int | None = None):
    """What a launch checks before it queues: the data builds, the model fits the device and, under the
    accelerate launcher, its settings can run here. Returns (dataset, preflight verdict); raises
    ``ConfigError`` saying what to change."""
    from . import launch, preflight

    ds = D.build(pool, cfg)
    spec, _ = run_model(ds.run_id, cfg)
    source, _ = resolve_source(spec)
    verdict = preflight.require(source, cfg, spec.revision, available)
    if cfg.launcher == "accelerate":
        launch.check(cfg)
    return ds, verdict


def finetune(pool: str | int, cfg: FinetuneConfig, progress: Progress | None = None, available: int | None = None) -> int:
    """Fine-tune the model of the pool's Stage 1 run (``cfg.run_id``) on ``cfg``'s data; returns the fine-tune's id.
    The same pool, config and data continue the unfinished fine-tune from its last checkpoint, or return the
    finished one. A cancel (the job's, SIGTERM or Ctrl-C) stops at the next step's end with a checkpoint and
    raises ``Cancelled``. ``available`` (bytes) overrides the preflight's measurement of free memory. With
    ``cfg.launcher == 'accelerate'`` the training runs in ``cfg.num_processes`` workers started by
    ``accelerate launch`` (``ka2l.finetune.launch``); this process follows them and relays their progress."""
    from . import launch, preflight

    progress = progress or NullProgress()
    progress.stage("preparing data")
    ds = D.build(pool, cfg)
    spec, prompt = run_model(ds.run_id, cfg)
    source, _ = resolve_source(spec)
    verdict = preflight.require(source, cfg, spec.revision, available)  # refused before anything is stored or loaded
    if cfg.launcher == "accelerate":
        launch.check(cfg)
    finetune_id, state = _start(pool, cfg, ds, spec)
    if state == "done":
        return finetune_id

    def update(**fields: Any) -> None:
        with connect() as db:
            S.update_finetune(db, finetune_id, **fields)

    with marks_status(update, progress):
        log.info("fine-tune %d (%s): %s", finetune_id, state, verdict.message)
        if cfg.launcher == "accelerate":
            launch.launch(finetune_id, cfg, progress)
            late_stop = False
        else:
            late_stop = train(finetune_id, cfg, progress)
    if late_stop:
        # SIGTERM / SIGINT came after the last step's check (final evaluation, saving): the fine-tune is finished and
        # stored, and whoever runs it (an experiment's next cell, a job) must still stop rather than never hear of it
        raise KeyboardInterrupt
    return finetune_id


def _process_devices(spec: ModelSpec, cfg: FinetuneConfig, local_rank: int) -> tuple[ModelSpec, str, str]:
    """(spec to load, device to load on, device to train on) for this training process. Under the accelerate
    launcher a CUDA run trains on the GPU of its local rank; FSDP and ZeRO-3 workers load the weights on the
    CPU (in the dtype CUDA would get) and the wrapper places each shard on the GPU."""
    from ..device import resolve_device, resolve_dtype_name

    device = resolve_device(spec.device)
    if cfg.launcher != "accelerate" or not device.startswith("cuda"):
        return spec, device, device
    device = f"cuda:{local_rank}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return replace(spec, dtype=resolve_dtype_name(spec.dtype, device)), "cpu", device
    return spec, device, device


def train(finetune_id: int, cfg: FinetuneConfig, progress: Progress | None = None, rank: int = 0, local_rank: int = 0,
          stop_requested: Callable[[], bool] | None = None) -> bool:
    """Train the stored fine-tune ``finetune_id`` (its pairs and split, stored by ``finetune``) from its newest
    checkpoint to its adapter, and mark it done. The job's own process runs it, or every worker under
    ``accelerate launch``: ``rank`` / ``local_rank`` name the process (only rank 0 writes rows and files),
    ``stop_requested`` is polled at every step's end besides SIGTERM / SIGINT and ``progress``'s cancel. Returns whether a stop was asked for after the last step's check."""
    progress = progress or NullProgress()
    main = rank == 0
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
        rows = S.load_data(db, finetune_id)
    spec, prompt = run_model(row["run_id"], cfg)
    source, _ = resolve_source(spec)

    def update(**fields: Any) -> None:
        if main:
            with connect() as db:
                S.update_finetune(db, finetune_id, **fields)

    run = _Run(finetune_id, cfg, progress, rank, stop_requested)
    train = [D.Pair(r["item_key"], r["question"], r["answer"], r["origin"]) for r in rows if r["split"] == "train"]
    evals = [D.Pair(r["item_key"], r["question"], r["answer"], r["origin"]) for r in rows if r["split"] == "eval"]
    progress.stage("loading model")
    load_spec, load_on, train_on = _process_devices(spec, cfg, local_rank)
    from ..device import resolve_dtype_name

    lm = load_model(load_spec, load_on)
    train_rows = encode_pairs(lm.tokenizer, train, prompt, cfg.max_length)
    eval_rows = encode_pairs(lm.tokenizer, evals, prompt, cfg.max_length)
    steps = total_steps(len(train_rows), cfg)
    if main:
        shutil.rmtree(run.ckpt_dir / ".partial", ignore_errors=True)  # a save killed half-way
    found = checkpoints(run.ckpt_dir)
    ckpt = found[-1] if found else None
    start = int(ckpt.name.split("-")[-1]) if ckpt else 0
    run.restore(start)
    update(total_steps=steps, step=start)
    recorder = _callback_class()(run)
    trainer = make_trainer(lm, train_rows, eval_rows, cfg, run.ckpt_dir, steps, [recorder], eval_on_start=ckpt is None, device=train_on)
    recorder.trainer = trainer
    trainer._ka2l_before_commit = lambda: recorder.flush(trainer.state.global_step)
    world = trainer.args.world_size
    with stop_requests(run.stop):
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if recorder.stopped:
            raise Cancelled(f"fine-tune {finetune_id} stopped at step {trainer.state.global_step}; its checkpoint resumes it")
        if run.last_eval_step != trainer.state.global_step:
            trainer.evaluate()
    if not sharded(trainer):
        log.info("rank %d of %d: %d steps, LoRA weights %s", rank, world, trainer.state.global_step, weights_checksum(trainer.model))
    progress.stage("saving adapter")
    # early stopping keeps the adapter with the lowest held-out loss; without it, the weights training ended with
    best = cfg.patience and run.best_saved
    tmp = run.folder / ".adapter-partial"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if best:
        if main:
            shutil.copytree(run.best_dir, tmp)
    else:
        save_adapter(trainer, tmp)
    if not main:
        return False
    best_step = json.loads((tmp / SIDECAR).read_text())["step"] if (tmp / SIDECAR).is_file() else trainer.state.global_step
    sidecar = {"finetune_id": finetune_id, "pool_id": row["pool_id"], "run_id": row["run_id"], "dataset_hash": row["dataset_hash"],
               "data_source": cfg.source, "n_train": len(train), "n_eval": len(evals), "config": to_dict(cfg),
               "config_hash": finetune_key(cfg), "model": to_dict(spec), "model_source": source, "prompt": to_dict(prompt),
               "step": best_step, "steps_trained": trainer.state.global_step, "total_steps": steps, "best_eval_loss": run.best,
               "stopped_early": run.stopped_early, "world_size": world, "device": train_on,
               "dtype": resolve_dtype_name(load_spec.dtype, train_on), "versions": versions()}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    replace_dir(tmp, run.adapter_dir)
    shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    shutil.rmtree(run.best_dir, ignore_errors=True)
    update(status="done", adapter_dir=str(run.adapter_dir), step=trainer.state.global_step, best_eval_loss=run.best,
           stopped_early=int(run.stopped_early), error=None)
    return bool(run.stop["signal"])


# -- using a tuned model --------------------------------------------------------------------------

def read_sidecar(adapter_dir: str | Path) -> dict[str, Any]:
    """The sidecar of an adapter folder: dataset hash, config, model (a ModelSpec dict), prompt, versions."""
    path = Path(adapter_dir) / SIDECAR
    if not path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no {SIDECAR}: it is not an adapter ka2l saved. Give the adapter folder of a finished fine-tune.")
    return json.loads(path.read_text())


def load_tuned(model_spec: ModelSpec, adapter_dir: str | Path, device: str | None = None, merge: bool = True) -> LoadedLM:
    """The base model of ``model_spec`` with the LoRA adapter in ``adapter_dir`` applied, as a ka2l ``LoadedLM``
    (so Stage 1's generation and hidden-state code use it unchanged). ``merge`` folds the adapter into the
    weights (a plain transformers model); otherwise the model is peft's wrapper."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json. Give the adapter folder of a finished fine-tune "
                             f"(`python -m ka2l finetunes` lists them).")
    lm = load_model(model_spec, device)
    try:
        tuned = PeftModel.from_pretrained(lm.model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"Could not apply the adapter in {adapter_dir} to {model_spec.name_or_path!r}: {str(exc).splitlines()[0]}. "
                             f"Was it trained on this model? Its sidecar names the model it was trained on.") from exc
    model = tuned.merge_and_unload() if merge else tuned
    model.eval()
    return replace(lm, model=model, source=f"{lm.source} + adapter {adapter_dir}")


def load_finetuned(finetune_id: int, device: str | None = None, merge: bool = True) -> tuple[LoadedLM, PromptConfig]:
    """A finished fine-tune's tuned model and the prompt its Stage 1 run used."""
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
    if row["status"] != "done" or not row["adapter_dir"]:
        raise ConfigError(f"Fine-tune {finetune_id} is {row['status']}; finish it (resume its job) before using the tuned model.")
    side = read_sidecar(row["adapter_dir"])
    spec = from_dict(ModelSpec, side["model"])
    if device is not None:
        spec = replace(spec, device=device)
    return load_tuned(spec, row["adapter_dir"], merge=merge), from_dict(PromptConfig, side["prompt"])
