"""The decoder's optimiser steps (Stage 2), the same in one process (``train.train_decoder``) and in each of
several ``accelerate launch`` workers (``launch.train_in_worker``): batches by epoch from a seeded order, each
worker's share of a batch, the loss rows, the progress, the periodic checkpoint, and agreeing when to stop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DecoderConfig
from ..store import augment as S
from ..store.db import connect

if TYPE_CHECKING:
    from .train import Trainer


def total_steps(cfg: DecoderConfig, n_train: int) -> int:
    """Optimiser steps of ``cfg.epochs`` over ``n_train`` questions in batches of ``cfg.batch_size`` (whatever the processes).

    >>> total_steps(DecoderConfig(epochs=3, batch_size=4), 10)
    9
    """
    return cfg.epochs * math.ceil(n_train / cfg.batch_size)


def share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Process ``rank``'s rows of a step's batch: every ``world``-th from ``rank``, so the processes together take
    the batch one process takes. A batch smaller than the processes gives each one row (one is seen twice):
    every process must take part in every step.

    >>> share(np.arange(5), 0, 2), share(np.arange(5), 1, 2), share(np.arange(1), 1, 2)
    (array([0, 2, 4]), array([1, 3]), array([0]))
    """
    return batch[rank::world] if len(batch) >= world else batch[[rank % len(batch)]]


def train_steps(t: Trainer, model, opt, st: dict[str, Any], vectors: np.ndarray, total: int, go_on: Callable[[float], bool],
                job_seconds: Callable[[], float], accelerator=None, stop_requested: Callable[[], bool] | None = None) -> bool:
    """Optimiser steps from ``st['step']`` to ``total`` while ``go_on(the slowest step's seconds)``: the loss rows
    (written about every second), the progress, a checkpoint every ``checkpoint_minutes``. Returns whether a
    stop was asked for (``stop_requested``). Under ``accelerate launch`` (an ``accelerator``) every process takes
    its ``share`` of each batch, its loss weighted by its share of the batch's target tokens so that DDP's mean of
    the gradients is the one-process step's; the processes agree at every step's end on going on, and rank 0
    alone writes the rows (the batch's loss: the mean of the weighted shares) and checkpoints."""
    import torch

    cfg, progress, clock = t.cfg, t.progress, t.budget.clock
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = rank == 0
    stop_requested = stop_requested or (lambda: False)

    def agree(stop: bool, go: bool) -> tuple[bool, bool]:
        """(any process was asked to stop, every process may go on): all processes leave at the same step."""
        if accelerator is None:
            return stop, go
        flags = accelerator.reduce(torch.tensor([float(stop), float(not go)], device=accelerator.device), reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] == 0)

    bs = cfg.batch_size
    per_epoch = math.ceil(len(t.train_rows) / bs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if t.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    pending: list[tuple[int, int, float]] = []
    last_write, last_ckpt = time.monotonic(), clock()
    step_seconds = 0.0  # the slowest step so far
    stop = False
    try:
        while st["step"] < total:
            stop, go = agree(stop_requested(), go_on(step_seconds))
            if stop or not go:
                break
            epoch, b = divmod(st["step"], per_epoch)
            order = np.random.default_rng(cfg.seed * 7919 + epoch).permutation(t.train_rows)
            batch = order[b * bs : (b + 1) * bs]
            rows = share(batch, rank, world)
            texts = [t.texts[i] for i in rows]
            t0 = clock()
            with autocast:
                loss = model(torch.as_tensor(vectors[rows]), texts, cfg.max_length)
            if world > 1:  # this share's token mean, weighted so DDP's mean over processes is the batch's token mean
                count = accelerator.unwrap_model(model).target_tokens
                shares = [count([t.texts[i] for i in share(batch, r, world)], cfg.max_length) for r in range(world)]
                loss = loss * (world * shares[rank] / sum(shares))
            opt.zero_grad()
            if accelerator is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach()) if accelerator is None else float(accelerator.reduce(loss.detach().float(), reduction="mean"))
            t.rows_seen += len(rows)
            took = clock() - t0
            step_seconds = max(step_seconds, took)
            st["seconds"] += took
            st["step"] += 1
            if main:
                pending.append((st["step"], epoch, value))
                if time.monotonic() - last_write >= 1.0 or st["step"] >= total:
                    _flush(t.id, pending, st)
                    last_write = time.monotonic()
            progress.advance(1, f"epoch {epoch + 1}/{cfg.epochs} · loss {value:.3f}")
            if clock() - last_ckpt >= cfg.checkpoint_minutes * 60:
                st["job_seconds"] = job_seconds()
                if main:
                    _flush(t.id, pending, st)  # the rows first: a kill after the checkpoint leaves no gap before its step
                    t.checkpoint(accelerator.unwrap_model(model) if accelerator else model, opt, st)
                last_ckpt = clock()
    finally:
        if main:  # also when a cancel interrupts a step: the rows of the steps taken are kept
            _flush(t.id, pending, st)
    return stop


def _flush(decoder_id: int, pending: list[tuple[int, int, float]], st: dict[str, Any]) -> None:
    with connect() as db:
        if pending:
            S.add_losses(db, decoder_id, pending)
        S.update_decoder(db, decoder_id, step=st["step"], train_seconds=st["seconds"])
    pending.clear()
