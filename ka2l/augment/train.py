"""Training a hidden-state decoder (Stage 2) as resumable work.

    vectors   the probed model's states of every training question at the decoder's layer
              (mean-pooled question tokens, or the last prompt token), cached in the decoder folder
    baseline  reconstruction BLEU / ROUGE-L of the untrained decoder (held-out and training questions)
    training  AdamW over (vector, question) pairs; loss per step in ``decoder_losses``; a checkpoint
              every few minutes and on cancel; stops after ``epochs`` or the ``max_minutes`` budget
    report    the same reconstruction metrics after training; the decoder saved with its config

The pool's questions are split into training and held-out (never trained on); extra corpora only
add training questions. A re-run with the same config continues from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import T5_SCRATCH, DecoderConfig, Stage1Config, config_hash, from_dict, to_dict
from ..errors import Cancelled, ConfigError
from ..models.llm import LoadedLM, build_prompt, load_model, question_states
from ..metrics import bleu, exact_match, rouge_l
from ..paths import decoders_dir
from ..progress import NullProgress, Progress, marks_status
from ..store import queries as Q
from ..store import augment as S
from ..store.db import connect

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


def evaluate(decoder, vectors: np.ndarray, texts: list[str], rows: np.ndarray, batch_size: int = 16) -> dict[str, Any]:
    """Greedy reconstruction of ``texts[rows]`` from their own vectors."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return {"n": 0}
    was_training = decoder.training
    decoder.eval()
    hyps: list[str] = []
    for b in range(0, len(rows), batch_size):
        hyps += decoder.generate(vectors[rows[b : b + batch_size]], temperature=0.0)
    decoder.train(was_training)
    refs = [texts[i] for i in rows]
    return {"n": len(rows), "bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs), "exact": exact_match(hyps, refs),
            "examples": [{"question": r, "decoded": h} for r, h in list(zip(refs, hyps))[:8]]}


def _start(db, cfg: DecoderConfig, resume: bool) -> tuple[int, str]:
    probe = Q.get_probe(db, cfg.probe_id)
    run = Q.get_run(db, probe["run_id"])
    for name in cfg.extra_pools:
        Q.get_pool(db, name)  # fail now, with the pool named, rather than mid-job
    h = config_hash(cfg)
    row = S.find_decoder(db, h) if resume else None
    if row is not None and row["status"] == "done" and row["path"] and Path(row["path"]).is_dir():
        return int(row["id"]), "done"
    if row is not None:
        S.update_decoder(db, row["id"], status="training", error=None)
        return int(row["id"]), "resumed"
    layer = cfg.layer if cfg.layer >= 0 else int(probe["layer"])
    from ..probing.stage1 import versions

    return S.create_decoder(db, {"probe_id": probe["id"], "run_id": run["id"], "pool_id": run["pool_id"], "layer": layer,
                                 "pooling": cfg.pooling, "backbone": cfg.backbone, "config": to_dict(cfg), "config_hash": h,
                                 "status": "training", "versions": versions()}), "new"


class _Trainer:
    """One decoder's training state, so a cancel at any point can checkpoint it."""

    def __init__(self, decoder_id: int, cfg: DecoderConfig, progress: Progress, lm: LoadedLM | None):
        self.id, self.cfg, self.progress, self.lm = decoder_id, cfg, progress, lm
        self.folder = decoders_dir() / f"decoder-{decoder_id}"
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
        self.progress.stage("question vectors", total=len(self.texts))
        mean, last = encode_questions(self._model(), self.texts, self.stage1.prompt, [self.layer],
                                      self.stage1.sampling.hidden_batch_size, self.progress)
        vec = decoder_vectors(mean, last, self.cfg.pooling)
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

    def eval_rows(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.cfg.eval_size
        rng = np.random.default_rng(self.cfg.seed + 1)
        train = self.train_rows if len(self.train_rows) <= n else np.sort(rng.choice(self.train_rows, n, replace=False))
        return self.heldout[:n], train

    def report(self, decoder, vectors: np.ndarray) -> dict[str, Any]:
        held, train = self.eval_rows()
        return {"heldout": evaluate(decoder, vectors, self.texts, held), "train": evaluate(decoder, vectors, self.texts, train)}


def train_decoder(cfg: DecoderConfig, progress: Progress | None = None, resume: bool = True, lm: LoadedLM | None = None) -> int:
    """Train (or resume, or reuse) a decoder for ``cfg``; returns its id. A cancel keeps a checkpoint."""
    import torch

    progress = progress or NullProgress()
    with connect() as db:
        decoder_id, state = _start(db, cfg, resume)
    if state == "done":
        return decoder_id
    def update(**fields: Any) -> None:
        with connect() as db:
            S.update_decoder(db, decoder_id, **fields)

    with marks_status(update, progress):
        t = _Trainer(decoder_id, cfg, progress, lm)
        vectors = t.vectors()
        decoder, opt, st = t.build(vectors)
        with connect() as db:
            S.update_decoder(db, decoder_id, n_train=len(t.train_rows), n_heldout=len(t.heldout), path=None)
            S.trim_losses(db, decoder_id, st["step"])  # steps after the checkpoint are trained again
        if "before" not in st["metrics"]:
            progress.stage("baseline reconstruction", total=1)
            st["metrics"]["before"] = t.report(decoder, vectors)
            progress.advance(1)
        bs = cfg.batch_size
        per_epoch = math.ceil(len(t.train_rows) / bs)
        total = cfg.epochs * per_epoch
        budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        progress.stage("training", total=total, done=st["step"])
        with connect() as db:
            S.update_decoder(db, decoder_id, total_steps=total, step=st["step"])
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if t.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
        pending: list[tuple[int, int, float]] = []
        last_write = last_ckpt = time.time()
        try:
            while st["step"] < total and st["seconds"] < budget:
                epoch, b = divmod(st["step"], per_epoch)
                order = np.random.default_rng(cfg.seed * 7919 + epoch).permutation(t.train_rows)
                rows = order[b * bs : (b + 1) * bs]
                t0 = time.perf_counter()
                with autocast:
                    loss = decoder.loss(torch.as_tensor(vectors[rows]), [t.texts[i] for i in rows], cfg.max_length)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
                opt.step()
                st["seconds"] += time.perf_counter() - t0
                st["step"] += 1
                pending.append((st["step"], epoch, float(loss.detach())))
                if time.time() - last_write >= 1.0 or st["step"] >= total:
                    _flush(decoder_id, pending, st)
                    last_write = time.time()
                progress.advance(1, f"epoch {epoch + 1}/{cfg.epochs} · loss {pending[-1][2] if pending else float(loss.detach()):.3f}")
                if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
                    t.checkpoint(decoder, opt, st)
                    last_ckpt = time.time()
        except (Cancelled, KeyboardInterrupt):
            _flush(decoder_id, pending, st)
            t.checkpoint(decoder, opt, st)
            raise
        _flush(decoder_id, pending, st)
        progress.stage("held-out reconstruction", total=1)
        metrics = {**st["metrics"], "after": t.report(decoder, vectors), "steps": st["step"], "train_seconds": st["seconds"],
                   "stopped": "time budget" if st["step"] < total else "epochs", "n_train": len(t.train_rows), "n_heldout": len(t.heldout)}
        progress.advance(1)
        from .decoder import save_decoder

        path = save_decoder(decoder, t.folder / "model", t.meta(metrics))
        shutil.rmtree(t.folder / "checkpoint", ignore_errors=True)
        with connect() as db:
            S.update_decoder(db, decoder_id, status="done", path=str(path), metrics=metrics)
    return decoder_id


def _flush(decoder_id: int, pending: list[tuple[int, int, float]], st: dict[str, Any]) -> None:
    with connect() as db:
        if pending:
            S.add_losses(db, decoder_id, pending)
        S.update_decoder(db, decoder_id, step=st["step"], train_seconds=st["seconds"])
    pending.clear()
