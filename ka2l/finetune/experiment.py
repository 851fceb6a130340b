"""The RQ1-RQ3 experiment: does fine-tuning on what the model does not know buy as much as all the data
(RQ1), more than other selections at the same budget (RQ2), and do decoded questions help (RQ3)?

    test split    a fixed share of the pool's questions with gold answers (by a hash of seed and item key,
                  as fine-tune splits), never selected by any strategy; every cell's fine-tune holds it
                  out and is evaluated on it, so all cells answer the same questions (paired comparisons)
    inputs        the run's hidden states at the chosen layer, BiSE labels, the probe's P(unknown), the
                  prompts' next-token entropies (one forward pass, stored per question and resumable;
                  Stage 1 keeps no logits), approved decoded questions whose source and nearest pool
                  question are outside the test split
    cells         strategy x budget x seed: select (``ka2l.finetune.selection``), write the (question, gold
                  answer) pairs of the selection plus the test split as a JSONL with a fixed ``split``
                  column, fine-tune on it (``lora.finetune``: resumable from its checkpoint, and a finished
                  one with the same data and config is reused), evaluate the tuned model on the test split
                  (``evaluate.evaluate``), store the metrics. A decoded question is answered with its source
                  question's gold answer (the simulated annotator assumes a paraphrase keeps the answer).
    base          once the cells are done, the untuned model answers the test split (stored with the first cell's
                  fine-tune): the report's reference row
    state         one ``experiments`` row, one ``experiment_cells`` row per cell: a kill loses at most the
                  unfinished part of one cell; finished cells are never redone
    cost          seconds per cell (selection, fine-tune, evaluation) and the run's one-off seconds each
                  strategy depends on (hidden states; SE sampling, clustering and probes for the KA2L ones;
                  the entropy pass for entropy and badge), from Stage 1's timings

The report (comparisons with paired bootstrap intervals) lives in ``ka2l.finetune.experiment_report``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExperimentConfig, config_hash, from_dict, to_dict
from ..errors import Cancelled, ConfigError
from ..paths import data_dir
from ..progress import NullProgress, Progress
from ..store import augment as SA
from ..store import evaluation as E
from ..store import experiment as SX
from ..store import finetune as SF
from ..store import queries as Q
from ..store.annotate import item_key
from ..store.db import connect, now
from . import selection as SEL
from .data import resolve_run, split_share

log = logging.getLogger(__name__)

NEEDS_ENTROPY = ("entropy", "badge")


def experiments_dir() -> Path:
    return data_dir() / "experiments"


# -- inputs ----------------------------------------------------------------------------------------

def next_token_entropy(lm, prompts: list[str]) -> np.ndarray:
    """Entropy (nats) of the next-token distribution at T = 1.0 after each prompt, from one forward pass.

    H = -sum_v p_v log p_v with log p = log_softmax(logits of the last real prompt token)."""
    import torch

    from ..models.llm import _encode, _position_ids, last_token_index

    enc = _encode(lm, prompts)
    with torch.no_grad():
        logits = lm.model(**enc, position_ids=_position_ids(enc["attention_mask"]), use_cache=False).logits  # (batch, seq, vocab)
    last = logits[torch.arange(logits.shape[0]), last_token_index(enc["attention_mask"])].float()  # (batch, vocab)
    logp = torch.log_softmax(last, dim=-1)  # (batch, vocab)
    return (-(logp.exp() * logp).sum(-1)).cpu().numpy().astype(np.float64)  # (batch,)


def ensure_prompt_entropies(run_id: int, questions: list[dict[str, Any]], batch_size: int = 16, device: str | None = None,
                            progress: Progress | None = None) -> dict[int, float]:
    """The next-token entropy of every question's prompt under run ``run_id``'s model and prompt, computing
    (and storing, batch by batch) those not stored yet; the seconds spent go to the run's timings."""
    from ..config import Stage1Config
    from ..models.llm import build_prompt, load_model

    progress = progress or NullProgress()
    with connect() as db:
        stored = SX.prompt_entropies(db, run_id)
        stage1 = from_dict(Stage1Config, Q.get_run(db, run_id)["config"])
    todo = [q for q in questions if q["id"] not in stored]
    progress.stage("prompt entropy", total=len(questions), done=len(questions) - len(todo))
    if not todo:
        return stored
    spec = stage1.model if device is None else replace(stage1.model, device=device)
    lm = load_model(spec)
    for b in range(0, len(todo), batch_size):
        t0 = time.perf_counter()
        chunk = todo[b : b + batch_size]
        h = next_token_entropy(lm, [build_prompt(lm.tokenizer, q["question"], stage1.prompt) for q in chunk])
        values = {q["id"]: float(v) for q, v in zip(chunk, h)}
        with connect() as db:
            SX.add_prompt_entropies(db, run_id, values)
            Q.add_timing(db, run_id, "prompt_entropy", time.perf_counter() - t0, len(chunk))
        stored.update(values)
        progress.advance(len(chunk))
    return stored


def test_split(keys: list[str], share: float, seed: int) -> set[str]:
    """The keys held out as the test split: those whose hash falls under ``share``; at least one, never all."""
    ranked = sorted(keys, key=lambda k: split_share(k, seed))
    held = [k for k in ranked if split_share(k, seed) < share] or ranked[:1]
    if len(held) >= len(keys):
        held = held[:-1]
    return set(held)


def _probe(db, run_id: int, probe_id: int) -> dict[str, Any]:
    if probe_id:
        probe = Q.get_probe(db, probe_id)
        if probe["run_id"] != run_id:
            raise ConfigError(f"Probe {probe_id} belongs to run {probe['run_id']}, not to run {run_id}. Pick one of run {run_id}'s probes or leave probe_id at 0.")
        return probe
    probes = [p for p in Q.list_probes(db, run_id) if p["target"] == "bise"]
    if not probes:
        raise ConfigError(f"Run {run_id} has no probe yet; finish its Stage 1 (the probes are its last step).")
    return probes[-1]


def load_inputs(pool_id: int, run: dict[str, Any], cfg: ExperimentConfig, progress: Progress) -> tuple[SEL.SelectionPool, dict[str, Any]]:
    """The selection pool (every pool question with a gold answer and the approved decoded questions) and
    the pairs' texts and answers by key."""
    from ..probing.probes import layer_features, load_probe, predict_unknown
    from ..store.hidden import HiddenStates

    with connect() as db:
        questions = [q for q in Q.pool_questions(db, pool_id) if q["answers"]]
        scores = {s["question_id"]: s for s in Q.load_scores(db, run["id"])}
        probe = _probe(db, run["id"], cfg.probe_id)
        approved = SA.candidates(db, pool_id, status="kept", decision="approved") if "ka2l-augmented" in cfg.strategies else []
    if len(questions) < 4:
        raise ConfigError(f"The pool has {len(questions)} question(s) with a gold answer; the experiment needs gold answers to play "
                          f"the annotator and at least 4 questions (a test split and something to select). Use a pool with answers.")
    missing = [q["id"] for q in questions if q["id"] not in scores or scores[q["id"]]["bise"] is None]
    if missing:
        raise ConfigError(f"Run {run['id']} has no BiSE label for {len(missing)} of the pool's questions; finish its Stage 1 first.")
    with connect() as db:
        all_ids = [q["id"] for q in Q.pool_questions(db, pool_id)]
    row_of = {qid: i for i, qid in enumerate(all_ids)}  # hidden states are stored in pool order
    rows = np.array([row_of[q["id"]] for q in questions])
    net, meta = load_probe(probe["path"])
    layer = meta["layer"] if cfg.layer < 0 else cfg.layer
    hidden = HiddenStates.open(run["hidden_path"])
    if layer not in hidden.layers:
        raise ConfigError(f"layer {cfg.layer} is outside the run's layers 0-{hidden.shape[1] - 1}; use -1 for the probe's layer ({meta['layer']}).")
    vectors = layer_features(hidden, layer, rows)  # (n, hidden)
    p_unknown = predict_unknown(net, layer_features(hidden, meta["layer"], rows))  # (n,)
    entropy = None
    if any(s in NEEDS_ENTROPY for s in cfg.strategies):
        h = ensure_prompt_entropies(run["id"], questions, cfg.eval_batch_size, cfg.finetune.device, progress)
        entropy = np.array([h[q["id"]] for q in questions])
    keys = tuple(item_key("question", q["id"]) for q in questions)
    texts = {k: (q["question"], str(q["answers"][0])) for k, q in zip(keys, questions)}
    gold = {q["id"]: str(q["answers"][0]) for q in questions}
    extras = [c for c in approved if c["source_question_id"] in gold]
    for c in extras:
        texts[item_key("candidate", c["id"])] = (c["edited_text"] or c["text"], gold[c["source_question_id"]])
    pool = SEL.SelectionPool(keys=keys, vectors=vectors, entropy=entropy, bise=np.array([scores[q["id"]]["bise"] for q in questions]),
                             p_unknown=p_unknown, extra_keys=tuple(item_key("candidate", c["id"]) for c in extras),
                             extra_p_unknown=np.array([np.nan if c["p_unknown"] is None else c["p_unknown"] for c in extras]),
                             extra_share=cfg.augmented_share)
    by_text = {q["question"]: item_key("question", q["id"]) for q in questions}
    sources = {item_key("candidate", c["id"]): {item_key("question", c["source_question_id"])}
               | ({by_text[c["nearest_question"]]} if c.get("nearest_question") in by_text else set()) for c in extras}
    return pool, {"texts": texts, "sources": sources, "layer": layer, "probe_id": probe["id"]}


def check_launch(pool: str | int, cfg: ExperimentConfig) -> dict[str, Any]:
    """What a launch checks before it queues (no model loaded): the pool has gold answers, the run is a
    finished Stage 1 run with a probe. Returns the pool, run and probe ids and the number of cells."""
    with connect() as db:
        pool_row = Q.get_pool(db, pool)
        if not pool_row["has_answers"]:
            raise ConfigError(f"Pool {pool_row['name']!r} has no gold answers; the experiment needs them to play the annotator and to "
                              f"score the test split. Use a pool with an answer column.")
        run = resolve_run(db, int(pool_row["id"]), cfg.run_id)
        probe = _probe(db, int(run["id"]), cfg.probe_id)
    return {"pool_id": int(pool_row["id"]), "run_id": int(run["id"]), "probe_id": int(probe["id"]),
            "cells": len(cfg.strategies) * len(cfg.budgets) * len(cfg.seeds)}


# -- the grid ----------------------------------------------------------------------------------------

def budget_size(share: float, n_available: int) -> int:
    """Items a budget share buys: rounded half up, at least 1, at most the pool.

    >>> budget_size(0.5, 9), budget_size(0.01, 9), budget_size(1.0, 9)
    (5, 1, 9)
    """
    return max(1, min(n_available, int(math.floor(share * n_available + 0.5))))


def _start(pool_id: int, run_id: int, cfg: ExperimentConfig, test_keys: set[str], n_pool: int) -> dict[str, Any]:
    h = config_hash(cfg)
    with connect() as db:
        row = SX.find_experiment(db, pool_id, run_id, h)
        if row is None:
            eid = SX.create_experiment(db, {"pool_id": pool_id, "run_id": run_id, "config": to_dict(cfg), "config_hash": h,
                                            "test_keys": sorted(test_keys), "n_pool": n_pool, "status": "running"})
            row = SX.get_experiment(db, eid)
        elif set(row["test_keys"]) != test_keys:
            raise ConfigError(f"Experiment {row['id']} was started on a test split of {len(row['test_keys'])} questions, but the pool "
                              f"now gives {len(test_keys)}: the pool changed. Start a new experiment (change test_seed) to compare afresh.")
        grid = [{"strategy": s, "budget": float(b), "seed": int(seed), "n": budget_size(float(b), n_pool)}
                for s in cfg.strategies for b in sorted(cfg.budgets) for seed in cfg.seeds]
        SX.ensure_cells(db, row["id"], grid)
    return row


def _cell_file(experiment_id: int, rows: list[dict[str, str]]) -> Path:
    """The cell's pairs as JSONL, in (split, item key) order and named by their content: cells that select the
    same items, in whatever order their strategy ranked them (every strategy at 100 %), share a file and so, with
    the same seed, one fine-tune. The order a strategy ranks in buys nothing in training: the trainer shuffles."""
    rows = sorted(rows, key=lambda r: (r["split"], r["item_key"]))
    body = "\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows) + "\n"
    folder = experiments_dir() / f"experiment-{experiment_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"data-{hashlib.sha256(body.encode()).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".partial")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(path)
    return path


def select_cell(cell: dict[str, Any], sel_pool: SEL.SelectionPool, inputs: dict[str, Any], test: set[str]) -> list[str]:
    """What the cell's strategy picks at its budget and seed, never a test question nor a decoded question
    whose source (or nearest pool question) is one: a paraphrase of a test question would leak it."""
    leaking = {k for k, src in inputs["sources"].items() if src & test}
    return SEL.select(cell["strategy"], sel_pool, int(cell["n"]), int(cell["seed"]), exclude=test | leaking)


def cell_label(cell: dict[str, Any]) -> str:
    """How a cell's stages are named (``random @ 0.5 seed 0: training``); a job plan matches on it."""
    return f"{cell['strategy']} @ {float(cell['budget']):g} seed {int(cell['seed'])}"


class _CellProgress:
    """Passes a cell's stages on, named after the cell, so a job shows which cell trains."""

    def __init__(self, inner: Progress, label: str):
        self.inner, self.label = inner, label

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        self.inner.stage(f"{self.label}: {name}", total, done)

    def advance(self, n: int = 1, message: str | None = None) -> None:
        self.inner.advance(n, message)

    def close(self) -> None:
        pass


def _run_cell(cell: dict[str, Any], exp: dict[str, Any], pool_id: int, sel_pool: SEL.SelectionPool, inputs: dict[str, Any],
              cfg: ExperimentConfig, progress: Progress) -> None:
    from .evaluate import evaluate
    from .lora import finetune

    test = set(exp["test_keys"])
    label = cell_label(cell)
    progress = _CellProgress(progress, label)
    progress.stage("selecting")  # a job's cancel is checked here, before the cell starts
    with connect() as db:
        SX.update_cell(db, cell["id"], status="running", started_at=cell["started_at"] or now(), error=None)
    selected = cell["selected"]
    if not selected:
        t0 = time.perf_counter()
        selected = select_cell(cell, sel_pool, inputs, test)
        with connect() as db:
            SX.update_cell(db, cell["id"], selected=selected)
            SX.add_cell_seconds(db, cell["id"], "select_seconds", time.perf_counter() - t0)
    texts = inputs["texts"]
    rows = ([{"item_key": k, "question": texts[k][0], "answer": texts[k][1], "split": "train"} for k in selected]
            + [{"item_key": k, "question": texts[k][0], "answer": texts[k][1], "split": "eval"} for k in sorted(test)])
    path = _cell_file(exp["id"], rows)
    ft_cfg = replace(cfg.finetune, source="file", file=str(path), run_id=int(exp["run_id"]), seed=int(cell["seed"]))
    t0 = time.perf_counter()
    finetune_id = finetune(pool_id, ft_cfg, progress=progress)
    with connect() as db:
        SX.update_cell(db, cell["id"], finetune_id=finetune_id)
        SX.add_cell_seconds(db, cell["id"], "finetune_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    summary = evaluate(finetune_id, progress, seed=int(cell["seed"]), batch_size=cfg.eval_batch_size,
                       bootstrap=cfg.bootstrap, models=("tuned",), bertscore_model=cfg.bertscore_model or None)
    with connect() as db:
        SX.add_cell_seconds(db, cell["id"], "eval_seconds", time.perf_counter() - t0)
        ft = SF.get_finetune(db, finetune_id)
        SX.update_cell(db, cell["id"], status="done", finished_at=now(),
                       metrics={"tuned": {m: e.get("tuned") for m, e in summary["metrics"].items()}, "finetune_seconds": ft["seconds"],
                                "steps": ft["step"], "n_train": ft["n_train"], "n_test": ft["n_eval"]})


def run_experiment(pool: str | int, cfg: ExperimentConfig, progress: Progress | None = None) -> int:
    """Run (or continue) the experiment ``cfg`` describes on ``pool``; returns its id. Finished cells are
    kept; a cancel (``Cancelled``) or a kill leaves the current cell to resume at its fine-tune's checkpoint."""
    progress = progress or NullProgress()
    progress.stage("preparing the experiment")
    with connect() as db:
        pool_id = int(Q.get_pool(db, pool)["id"])
        run = resolve_run(db, pool_id, cfg.run_id)
    sel_pool, inputs = load_inputs(pool_id, run, cfg, progress)
    test = test_split(list(sel_pool.keys), cfg.test_share, cfg.test_seed)
    n_pool = len(sel_pool) - len(test)
    exp = _start(pool_id, int(run["id"]), cfg, test, n_pool)
    with connect() as db:
        SX.update_experiment(db, exp["id"], status="running", error=None,
                             inputs={"layer": inputs["layer"], "probe_id": inputs["probe_id"], "n_questions": len(sel_pool),
                                     "n_decoded": len(sel_pool.extra_keys), "device": cfg.finetune.device})
        grid = SX.cells(db, exp["id"])
    try:
        for cell in grid:
            if cell["status"] == "done":
                continue
            try:
                _run_cell(cell, exp, pool_id, sel_pool, inputs, cfg, progress)
            except (Cancelled, KeyboardInterrupt):
                with connect() as db:
                    SX.update_cell(db, cell["id"], status="interrupted")
                raise
            except Exception as exc:
                with connect() as db:
                    SX.update_cell(db, cell["id"], status="failed", error=f"{type(exc).__name__}: {exc}")
                raise
        ensure_base(int(exp["id"]), cfg, progress)  # the report's reference: what fine-tuning changed at all
    except (Cancelled, KeyboardInterrupt):
        with connect() as db:
            SX.update_experiment(db, exp["id"], status="interrupted")
        raise
    except Exception as exc:
        with connect() as db:
            SX.update_experiment(db, exp["id"], status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    with connect() as db:
        SX.update_experiment(db, exp["id"], status="done", error=None)
    return int(exp["id"])


def base_cell(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished cell whose fine-tune also holds the untuned model's answers (the report's base row): the
    first one. Every cell's fine-tune holds out the same test split, so any one of them serves."""
    done = [c for c in cells if c["status"] == "done" and c["finetune_id"]]
    return min(done, key=lambda c: c["id"]) if done else None


def ensure_base(experiment_id: int, cfg: ExperimentConfig, progress: Progress) -> int | None:
    """Answer the test split with the untuned model once (stored with ``base_cell``'s fine-tune, beside its tuned
    answers, so its evaluation summary gets the paired tuned - base difference too); resumable like any
    evaluation. Returns that fine-tune's id, None before any cell finished."""
    from .evaluate import evaluate

    with connect() as db:
        cell = base_cell(SX.cells(db, experiment_id))
        test = set(SX.get_experiment(db, experiment_id)["test_keys"])
        if cell is None:
            return None
        answered = {r["item_key"] for r in E.answers(db, cell["finetune_id"], "base")}
    if test <= answered:
        return int(cell["finetune_id"])
    t0 = time.perf_counter()
    evaluate(int(cell["finetune_id"]), _CellProgress(progress, "untuned base"), seed=int(cell["seed"]), batch_size=cfg.eval_batch_size,
             bootstrap=cfg.bootstrap, models=("base", "tuned"), bertscore_model=cfg.bertscore_model or None)
    log.info("experiment %d: the untuned model answered the test split in %.1f s", experiment_id, time.perf_counter() - t0)
    return int(cell["finetune_id"])
