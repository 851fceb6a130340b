"""Training a hidden-state decoder (Stage 2) as resumable work.

    vectors   the probed model's states of every training question at the decoder's layer
              (mean-pooled question tokens, or the last prompt token), cached in the decoder folder
    baseline  reconstruction BLEU / ROUGE-L of the untrained decoder (held-out and training questions)
    training  AdamW over (vector, question) pairs; loss per step in ``decoder_losses``; a checkpoint
              every few minutes and on cancel; stops after ``epochs`` or when the time budget says so
    report    the same reconstruction metrics after training, on the same questions; the decoder saved
              with its config

The pool's questions are split into training and held-out (never trained on); extra corpora only
add training questions. A re-run with the same config continues from the last checkpoint.

The time budget (``max_minutes``) bounds the whole job, not only training: from the job's start
(earlier attempts of the same decoder included), vectors may take at most half of it (the job fails
early, with an estimate, when they would take more); the baseline report decodes only as many
questions as fit in a share of what is left, the final report decodes the same ones, and training
stops early enough to leave time for that report and for saving. Each phase reports its own
progress: questions encoded, questions decoded, training steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import T5_SCRATCH, DecoderConfig, Stage1Config, config_hash, from_dict, to_dict
from ..errors import Cancelled, ConfigError
from ..device import free_memory
from ..models.llm import LoadedLM, build_prompt, load_model, question_states
from ..metrics import bleu, exact_match, rouge_l
from ..paths import decoders_dir
from ..progress import NullProgress, Progress, marks_status
from ..store import queries as Q
from ..store import augment as S
from ..store.db import connect
from .steps import total_steps, train_steps

log = logging.getLogger(__name__)


def encode_questions(lm: LoadedLM, texts: list[str], prompt, layers: list[int], batch_size: int = 16,
                     progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, last) float32 (n, len(layers), hidden) for ``texts`` put to the model with ``prompt``."""
    progress = progress or NullProgress()
    prompts = [build_prompt(lm.tokenizer, t, prompt) for t in texts]
    mean = np.zeros((len(texts), len(layers), lm.hidden_size), dtype=np.float32)
    last = np.zeros_like(mean)
    for start, m, l in question_states(lm, prompts, texts, layers, batch_size):
        mean[start : start + len(m)], last[start : start + len(m)] = m, l
        progress.advance(len(m))
    return mean, last


def decoder_vectors(mean: np.ndarray, last: np.ndarray, pooling: str, index: int = 0) -> np.ndarray:
    return (mean if pooling == "mean" else last)[:, index]


def _heldout(n: int, share: float, seed: int) -> np.ndarray:
    if share <= 0 or n < 5:
        return np.array([], dtype=np.int64)
    k = max(1, int(round(share * n)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Reconstruction metrics of decoded ``hyps`` against their source questions ``refs``."""
    if not refs:
        return {"n": 0}
    return {"n": len(refs), "bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs), "exact": exact_match(hyps, refs),
            "examples": [{"question": r, "decoded": h} for r, h in list(zip(refs, hyps))[:8]]}


class Budget:
    """A job's wall-clock budget in seconds (None: no limit), read from an injectable clock. ``spent``
    is time earlier attempts of the same work used (a cancelled job that is resumed).

    >>> t = [100.0]; b = Budget(60, lambda: t[0], spent=15); t[0] += 5
    >>> b.elapsed(), b.left()
    (20.0, 40.0)
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic, spent: float = 0.0):
        self.seconds, self.clock = seconds, clock
        self.start = clock() - spent

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()


def reconstruct(decoder, vectors: np.ndarray, rows: np.ndarray, budget: Budget, until: float = math.inf,
                progress: Progress | None = None, batch_size: int = 16) -> list[str]:
    """Greedy decodes of ``rows`` (in order) from their own vectors, batch by batch, stopping before a
    batch that would end after ``until`` seconds of the budget's elapsed time (the rate is measured as
    it goes; the first batch is one question, to measure it). Returns the decodes made: a prefix of ``rows``."""
    progress = progress or NullProgress()
    rows = np.asarray(rows, dtype=np.int64)
    was_training = decoder.training
    decoder.eval()
    hyps: list[str] = []
    per_question = None  # seconds, measured
    while len(hyps) < len(rows):
        size = min(batch_size if per_question is not None else 1, len(rows) - len(hyps))
        room = until - budget.elapsed()
        if per_question is not None and room < math.inf:
            size = min(size, int(room // per_question) if per_question > 0 else size)
        if size <= 0 or room <= 0:
            break
        t0 = budget.clock()
        hyps += decoder.generate(vectors[rows[len(hyps) : len(hyps) + size]], temperature=0.0)
        took = budget.clock() - t0
        per_question = took / size if per_question is None else max(per_question, took / size)
        progress.advance(size, f"{len(hyps)} of {len(rows)} questions decoded · {per_question:.1f} s per question")
    decoder.train(was_training)
    return hyps


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a0 b0 a1 b1 ... (then the longer one's rest): a report cut short keeps both kinds of question."""
    out = [x for pair in zip(a, b) for x in pair]
    n = min(len(a), len(b))
    return np.array(out + list(a[n:]) + list(b[n:]), dtype=np.int64)


def decoder_key(cfg: DecoderConfig) -> str:
    """The decoder's identity: its config without the device, the time budget and the launcher, so raising the
    budget (or moving to a GPU, or to several) resumes the same decoder, its vectors and checkpoint, instead of
    starting anew: every process count takes the same batches in the same order."""
    import dataclasses

    return config_hash(dataclasses.replace(cfg, max_minutes=0.0, launcher="none", num_processes=1, accelerate_config=""))


def _start(db, cfg: DecoderConfig, resume: bool) -> tuple[int, str]:
    probe = Q.get_probe(db, cfg.probe_id)
    run = Q.get_run(db, probe["run_id"])
    for name in cfg.extra_pools:
        Q.get_pool(db, name)  # fail now, with the pool named, rather than mid-job
    h = decoder_key(cfg)
    row = S.find_decoder(db, h) if resume else None
    if row is not None and row["status"] == "done" and row["path"] and Path(row["path"]).is_dir():
        return int(row["id"]), "done"
    if row is not None:
        S.update_decoder(db, row["id"], status="training", error=None)
        return int(row["id"]), "resumed"
    layer = cfg.layer if cfg.layer >= 0 else int(probe["layer"])
    from ..probing.runs import versions

    return S.create_decoder(db, {"probe_id": probe["id"], "run_id": run["id"], "pool_id": run["pool_id"], "layer": layer,
                                 "pooling": cfg.pooling, "backbone": cfg.backbone, "config": to_dict(cfg), "config_hash": h,
                                 "status": "training", "versions": versions()}), "new"


class Trainer:
    """One decoder's training state, so a cancel at any point can checkpoint it."""

    def __init__(self, decoder_id: int, cfg: DecoderConfig, progress: Progress, lm: LoadedLM | None, budget: Budget):
        self.id, self.cfg, self.progress, self.lm, self.budget = decoder_id, cfg, progress, lm, budget
        self.folder = decoders_dir() / f"decoder-{decoder_id}"
        self.rows_seen = 0  # training questions this process took (in this attempt)
        with connect() as db:
            self.row = S.get_decoder(db, decoder_id)
            probe = Q.get_probe(db, self.row["probe_id"])
            run = Q.get_run(db, self.row["run_id"])
            self.stage1 = from_dict(Stage1Config, run["config"])
            pool_q = Q.pool_questions(db, run["pool_id"])
            extra = [q["question"] for name in cfg.extra_pools for q in Q.pool_questions(db, Q.get_pool(db, name)["id"])]
        self.probe_layer, self.layer = int(probe["layer"]), int(self.row["layer"])
        self.pool_ids = [q["id"] for q in pool_q]
        self.texts = [q["question"] for q in pool_q]
        held = _heldout(len(self.texts), cfg.heldout_share, cfg.seed)
        held_keys = {self.texts[i].casefold() for i in held}
        seen = {t.casefold() for t in self.texts}
        for t in extra:  # extra corpora add training questions, never copies of held-out ones
            if t.casefold() not in seen:
                seen.add(t.casefold())
                self.texts.append(t)
        self.heldout = held
        held_rows = set(held.tolist())
        self.train_rows = np.array([i for i, t in enumerate(self.texts) if i not in held_rows and t.casefold() not in held_keys], dtype=np.int64)
        if len(self.train_rows) < 2:
            raise ConfigError(f"Only {len(self.train_rows)} training question(s): a decoder needs more. Add an extra corpus or lower heldout_share.")
        from ..device import resolve_device

        self.device = resolve_device(cfg.device)

    # -- vectors ---------------------------------------------------------------------------------
    def _model(self) -> LoadedLM:
        if self.lm is None:
            self.lm = load_model(self.stage1.model, device=self.device)
        return self.lm

    def vectors(self) -> np.ndarray:
        """Decoder inputs for every text (pool first, then extra), computed once and cached."""
        path, side = self.folder / "vectors.npy", self.folder / "vectors.json"
        key = {"layer": self.layer, "pooling": self.cfg.pooling, "n": len(self.texts),
               "texts": hashlib.sha256("\n".join(self.texts).encode()).hexdigest()[:16]}
        if path.is_file() and side.is_file() and json.loads(side.read_text()).get("key") == key:
            return np.load(path)
        lm = self._model()
        self.progress.stage("question vectors", total=len(self.texts))
        batch, parts = self.stage1.sampling.hidden_batch_size, []
        t0 = self.budget.elapsed()
        for b in range(0, len(self.texts), batch):
            mean, last = encode_questions(lm, self.texts[b : b + batch], self.stage1.prompt, [self.layer], batch, self.progress)
            parts.append(decoder_vectors(mean, last, self.cfg.pooling))
            done = b + len(parts[-1])
            projected = t0 + (self.budget.elapsed() - t0) * len(self.texts) / done  # when encoding would end
            if self.budget.seconds is not None and done < len(self.texts) and projected > ENCODE_SHARE * self.budget.seconds:
                raise ConfigError(
                    f"Encoding the {len(self.texts)} training questions would take about {_minutes(projected - t0)} at this rate "
                    f"and end {_minutes(projected)} into the job, over half of the {_minutes(self.budget.seconds)} time budget. "
                    f"Raise the time budget (0 = none) and start it again: the same decoder resumes. Or train with fewer extra questions.")
        vec = np.concatenate(parts)
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(path, vec)
        side.write_text(json.dumps({"key": key, "question_ids": self.pool_ids}))
        return vec

    # -- model -----------------------------------------------------------------------------------
    def meta(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"decoder_id": self.id, "probe_id": self.row["probe_id"], "run_id": self.row["run_id"], "layer": self.layer,
                "probe_layer": self.probe_layer, "pooling": self.cfg.pooling, "backbone": self.cfg.backbone,
                "model": to_dict(self.stage1.model), "prompt": to_dict(self.stage1.prompt), "config": to_dict(self.cfg),
                "metrics": metrics or {}}

    def build(self, vectors: np.ndarray):
        import torch

        from .decoder import HiddenStateDecoder, load_backbone, load_decoder

        ckpt = self.folder / "checkpoint"
        if (ckpt / "decoder.json").is_file() and (ckpt / "state.json").is_file():
            decoder, _ = load_decoder(ckpt, self.device)
            state = json.loads((ckpt / "state.json").read_text())
            opt = self._optimizer(decoder)
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True))
            log.info("decoder %d resumes at step %d", self.id, state["step"])
            return decoder.train(), opt, state
        tok = self._model().tokenizer if self.cfg.backbone == T5_SCRATCH else None
        backbone, tokenizer, kind = load_backbone(self.cfg.backbone, fallback_tokenizer=tok, seed=self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        decoder = HiddenStateDecoder(backbone, tokenizer, kind, vectors.shape[1], self.cfg.n_pseudo)
        decoder.fit_standardisation(vectors[self.train_rows])
        decoder.to(self.device)
        return decoder.train(), self._optimizer(decoder), {"step": 0, "seconds": 0.0, "metrics": {}}

    def _optimizer(self, decoder):
        import torch

        for p in decoder.backbone.parameters():
            p.requires_grad_(self.cfg.train_backbone)
        return torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=self.cfg.lr)

    def checkpoint(self, decoder, opt, state: dict[str, Any]) -> None:
        import torch

        def extra(tmp: Path) -> None:
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state))

        from .decoder import save_decoder

        save_decoder(decoder, self.folder / "checkpoint", self.meta(state.get("metrics")), extra)
        log.info("decoder %d checkpoint at step %d", self.id, state["step"])

    def eval_rows(self) -> np.ndarray:
        """Questions the reports decode: up to ``eval_size`` held-out and as many training ones, interleaved."""
        n = self.cfg.eval_size
        rng = np.random.default_rng(self.cfg.seed + 1)
        train = self.train_rows if len(self.train_rows) <= n else np.sort(rng.choice(self.train_rows, n, replace=False))
        return _interleave(self.heldout[:n], train)

    def saved_state(self) -> dict[str, Any]:
        """The checkpoint's training state, if there is one (read before anything else, for the time already spent)."""
        path = self.folder / "checkpoint" / "state.json"
        return json.loads(path.read_text()) if path.is_file() and (self.folder / "checkpoint" / "decoder.json").is_file() else {}

    def metrics(self, baseline: dict[str, Any], after_rows: list[int], after_hyps: list[str]) -> dict[str, Any]:
        """Before / after reports by split, on the questions both decoded (the final report may be cut short)."""
        held = set(self.heldout.tolist())
        before_of = dict(zip(baseline["rows"], baseline["hyps"]))
        rows = [r for r in after_rows if r in before_of]
        after_of = dict(zip(after_rows, after_hyps))
        out: dict[str, Any] = {}
        for when, hyp in (("before", before_of), ("after", after_of)):
            out[when] = {split: score([hyp[r] for r in rows if (r in held) == (split == "heldout")],
                                      [self.texts[r] for r in rows if (r in held) == (split == "heldout")])
                         for split in ("heldout", "train")}
        return out


ENCODE_SHARE = 0.5     # vectors may take at most this share of a time budget
BASELINE_SHARE = 0.2   # the baseline report may take this share of the time left after the vectors
SAVE_SHARE = 0.05      # kept back for saving the decoder at the end
REPORT_MARGIN = 1.25   # the final report is given this much more time than the baseline took


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def train_decoder(cfg: DecoderConfig, progress: Progress | None = None, resume: bool = True, lm: LoadedLM | None = None,
                  clock: Callable[[], float] = time.monotonic) -> int:
    """Train (or resume, or reuse) a decoder for ``cfg``; returns its id. A cancel keeps a checkpoint.
    ``clock`` (seconds) measures the time budget; tests pass a fake one. With ``cfg.launcher == 'accelerate'`` the
    training steps run in ``cfg.num_processes`` workers (``ka2l.augment.launch``); the rest stays in this process."""
    if cfg.launcher == "accelerate":
        from .launch import check

        check(cfg)  # before anything is stored
    progress = progress or NullProgress()
    with connect() as db:
        decoder_id, state = _start(db, cfg, resume)
    if state == "done":
        return decoder_id

    def update(**fields: Any) -> None:
        with connect() as db:
            S.update_decoder(db, decoder_id, **fields)

    with marks_status(update, progress):
        budget = Budget(cfg.max_minutes * 60 if cfg.max_minutes else None, clock)
        t = Trainer(decoder_id, cfg, progress, lm, budget)
        budget.start -= float(t.saved_state().get("job_seconds", 0.0))  # time earlier attempts spent counts too
        vectors = t.vectors()
        decoder, opt, st = t.build(vectors)
        with connect() as db:
            S.update_decoder(db, decoder_id, n_train=len(t.train_rows), n_heldout=len(t.heldout), path=None)
            S.trim_losses(db, decoder_id, st["step"])  # steps after the checkpoint are trained again
        limit = budget.seconds if budget.seconds is not None else math.inf
        save_reserve = SAVE_SHARE * limit if budget.seconds is not None else 0.0
        if budget.left() <= save_reserve:
            raise ConfigError(f"The {_minutes(limit)} time budget was used up before training could start (vectors and models "
                              f"took {_minutes(budget.elapsed())}). Raise the time budget (0 = none) and resume; the vectors are kept.")
        if "baseline" not in st:
            rows = t.eval_rows()
            progress.stage("baseline reconstruction", total=len(rows))
            t0 = budget.elapsed()
            until = t0 + BASELINE_SHARE * (limit - save_reserve - t0)
            hyps = reconstruct(decoder, vectors, rows, budget, until, progress)
            st["baseline"] = {"rows": rows[: len(hyps)].tolist(), "hyps": hyps, "seconds": budget.elapsed() - t0}
        report_reserve = REPORT_MARGIN * st["baseline"]["seconds"]
        train_until = limit - save_reserve - report_reserve
        total = total_steps(cfg, len(t.train_rows))
        with connect() as db:
            S.update_decoder(db, decoder_id, total_steps=total, step=st["step"])
        if cfg.launcher == "accelerate":
            from .launch import launch

            st["job_seconds"] = budget.elapsed()
            t.checkpoint(decoder, opt, st)  # the workers start from it, and leave theirs in its place
            del decoder, opt  # the workers need the memory (rank 0 shares this process's GPU)
            t.lm = None
            free_memory()
            deadline = None if math.isinf(train_until) else time.time() + (train_until - budget.elapsed())
            launch(decoder_id, cfg, deadline=deadline, job_seconds=budget.elapsed(), progress=progress)  # its stages are the workers'
            decoder, opt, st = t.build(vectors)
        else:
            progress.stage("training", total=total, done=st["step"])
            try:
                train_steps(t, decoder, opt, st, vectors, total, lambda step_s: budget.elapsed() + step_s <= train_until,
                            lambda: budget.elapsed())
            except (Cancelled, KeyboardInterrupt):
                st["job_seconds"] = budget.elapsed()
                t.checkpoint(decoder, opt, st)
                raise
        rows = np.array(st["baseline"]["rows"], dtype=np.int64)
        progress.stage("held-out reconstruction", total=len(rows))
        hyps = reconstruct(decoder, vectors, rows, budget, limit - save_reserve, progress)
        metrics = {**t.metrics(st["baseline"], rows[: len(hyps)].tolist(), hyps), "steps": st["step"], "train_seconds": st["seconds"],
                   "stopped": "time budget" if st["step"] < total else "epochs", "n_train": len(t.train_rows), "n_heldout": len(t.heldout),
                   "budget_seconds": budget.seconds}
        from .decoder import save_decoder

        path = save_decoder(decoder, t.folder / "model", t.meta(metrics))
        metrics["job_seconds"] = budget.elapsed()
        shutil.rmtree(t.folder / "checkpoint", ignore_errors=True)
        with connect() as db:
            S.update_decoder(db, decoder_id, status="done", path=str(path), metrics=metrics)
    return decoder_id
