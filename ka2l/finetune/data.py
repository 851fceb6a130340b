"""The fine-tune's data: (question, answer) pairs from one source, a held-out eval split training never
sees, and optionally k known questions with the model's own answers.

Sources (``FinetuneConfig.source``):

- ``labelstudio``: the answers pulled from the pool's Label Studio project (``ka2l.annotate.dataset.pairs``:
  one chosen answer per item; cannot-answer and skipped items give none), keyed by the item (``q:12`` / ``c:3``);
- ``gold``: the pool's own gold answers (the first one of each question), for the unknown questions of the
  run (BiSE = 1) or all of them (``gold_set``), keyed ``q:<question id>``;
- ``file``: a CSV or JSONL with ``question`` and ``answer`` columns, keyed by the question's text
  (``f:`` + a hash), so the same question keeps its key and its split when the file grows. Two optional
  columns: ``item_key`` keys a row instead (``q:12``: evaluation then also accepts the pool's other gold
  answers), and ``split`` (``train`` / ``eval`` on every row) fixes the split instead of the hash, as the
  RQ experiment does to hold out its own test split.

The split is decided per item by a hash of (seed, item key): an item is held out when its hash falls under
``eval_share``. It does not depend on the other items, so adding annotations never moves an eval item into
training. At least one pair lands on each side. Known pairs (``mix_known``) only ever go to training.

The dataset hash covers every pair with its split and origin: the same data gives the same hash, and a
fine-tune is identified by (pool, config hash, dataset hash).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig
from ..errors import ConfigError, NotFound
from ..store import queries as Q
from ..store.db import connect

MIN_PAIRS = 2  # one to train on, one held out


@dataclass(frozen=True)
class Pair:
    item_key: str
    question: str
    answer: str
    origin: str  # 'labelstudio' | 'gold' | 'file' | 'known'
    split: str = ""  # 'train' | 'eval' when the source fixes it (a file's split column); '' = by hash


@dataclass
class Dataset:
    pool_id: int
    run_id: int
    source: str
    train: list[Pair]
    eval: list[Pair]
    hash: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Rows for ``finetune_data``."""
        return [{"item_key": p.item_key, "split": split, "question": p.question, "answer": p.answer, "origin": p.origin}
                for split, pairs in (("train", self.train), ("eval", self.eval)) for p in pairs]


def resolve_run(db, pool_id: int, run_id: int = 0) -> dict[str, Any]:
    """The Stage 1 run whose model is tuned: ``run_id``, or the pool's newest finished run."""
    if run_id:
        run = Q.get_run(db, run_id)
        if run["pool_id"] != pool_id:
            raise ConfigError(f"Run {run_id} belongs to another pool; pick one of this pool's runs (see `python -m ka2l runs`) or leave run_id at 0.")
        if run["kind"] != "stage1" or run["status"] != "done":
            raise ConfigError(f"Run {run_id} is a {run['kind']} run that is {run['status']}; fine-tuning needs a finished Stage 1 run. "
                              f"Finish it (resume its job) or pick another.")
        if tuned_adapter(run):
            raise ConfigError(f"Run {run_id} is a re-probe: its model already carries the adapter {tuned_adapter(run)}, and a second "
                              f"adapter trained on top of it could not be re-probed or evaluated against the base. Fine-tune from the "
                              f"base model's Stage 1 run instead (leave run_id at 0 for the newest one).")
        return run
    base_runs = [r for r in reversed(Q.list_runs(db, pool_id)) if r["kind"] == "stage1" and r["status"] == "done" and not tuned_adapter(r)]
    if not base_runs:
        Q.latest_run(db, "stage1", pool_id)  # NotFound with its message when the pool has no finished run at all
        raise NotFound("The pool's finished Stage 1 runs are all re-probes of fine-tuned models; run Stage 1 on the base model first.")
    return base_runs[0]


def tuned_adapter(run: dict[str, Any]) -> str | None:
    """The adapter a run's model carried (a re-probe of a fine-tune), or None for a plain model's run."""
    config = run["config"] if isinstance(run["config"], dict) else {}
    return (config.get("model") or {}).get("adapter")


def split_share(item_key: str, seed: int) -> float:
    """Where ``item_key`` falls in [0, 1) for ``seed``: held out when below the eval share.

    >>> split_share("q:1", 0) == split_share("q:1", 0) and split_share("q:1", 0) != split_share("q:1", 1)
    True
    """
    digest = hashlib.sha256(f"{seed}\0{item_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(pairs: list[Pair], share: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) by each item's own hash; at least one pair on each side."""
    if len(pairs) < MIN_PAIRS:
        raise ConfigError(f"Only {len(pairs)} (question, answer) pair(s): a fine-tune needs at least {MIN_PAIRS}, one to train on "
                          f"and one held out. Annotate more answers (or use the pool's gold answers, or a larger file).")
    ranked = sorted(pairs, key=lambda p: split_share(p.item_key, seed))
    held = [p for p in ranked if split_share(p.item_key, seed) < share]
    if not held:
        held = ranked[:1]
    if len(held) == len(ranked):
        held = held[:-1]
    keys = {p.item_key for p in held}
    return [p for p in pairs if p.item_key not in keys], [p for p in pairs if p.item_key in keys]


def dataset_hash(train: list[Pair], eval_: list[Pair]) -> str:
    rows = sorted([("train", p.item_key, p.question, p.answer, p.origin) for p in train]
                  + [("eval", p.item_key, p.question, p.answer, p.origin) for p in eval_])
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def _clean(pairs: list[Pair]) -> tuple[list[Pair], dict[str, int]]:
    """Drop pairs with an empty question or answer and repeated keys (the first one kept)."""
    out, seen, dropped = [], set(), {"empty": 0, "duplicate": 0}
    for p in pairs:
        if not p.question.strip() or not p.answer.strip():
            dropped["empty"] += 1
        elif p.item_key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(p.item_key)
            out.append(Pair(p.item_key, p.question.strip(), p.answer.strip(), p.origin, p.split))
    return out, dropped


def file_key(question: str) -> str:
    return "f:" + hashlib.sha256(" ".join(question.casefold().split()).encode()).hexdigest()[:16]


def read_file(path: str | Path) -> list[Pair]:
    """Pairs from a CSV or JSONL file with ``question`` and ``answer`` columns (other columns ignored)."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"Fine-tune file {str(path)!r} does not exist. Give a .csv or .jsonl with question and answer columns.")
    try:
        frame = (pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix.lower() == ".csv"
                 else pd.read_json(path, lines=True, dtype=False))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read {path.name} as {path.suffix.lstrip('.').upper()}: {str(exc).splitlines()[0]}. "
                          f"Save it as UTF-8 CSV (with a header row) or JSON Lines (one object per line).") from exc
    columns = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in ("question", "answer") if c not in columns]
    if missing:
        raise ConfigError(f"{path.name} has no {' and no '.join(repr(m) for m in missing)} column (it has: "
                          f"{', '.join(map(str, frame.columns)) or 'none'}). Name the columns 'question' and 'answer'.")
    qs, ans = frame[columns["question"]], frame[columns["answer"]]
    keys = frame[columns["item_key"]] if "item_key" in columns else [None] * len(frame)
    splits = frame[columns["split"]] if "split" in columns else [""] * len(frame)
    bad = [i + 1 for i, s in enumerate(splits) if "split" in columns and str(s).strip().lower() not in SPLITS]
    if bad:
        raise ConfigError(f"{path.name}: row(s) {', '.join(map(str, bad[:10]))} have a split other than {' or '.join(SPLITS)}. "
                          f"With a split column every row says train or eval; drop the column to split by hash.")
    return [Pair(str(k).strip() if k is not None and str(k).strip() else file_key(str(q)), "" if q is None else str(q),
                 "" if a is None else str(a), "file", str(s).strip().lower())
            for q, a, k, s in zip(qs, ans, keys, splits)]


SPLITS = ("train", "eval")


def fixed_split(pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) as the pairs' own ``split`` says; each side needs at least one pair."""
    train, eval_ = [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "eval"]
    if not train or not eval_:
        raise ConfigError(f"The file's split column puts {len(train)} pair(s) in train and {len(eval_)} in eval; a fine-tune needs "
                          f"at least one on each side. Mark some rows eval (held out) and some train.")
    return train, eval_


def gold_pairs(db, pool_id: int, run_id: int, gold_set: str) -> list[Pair]:
    if not Q.get_pool(db, pool_id)["has_answers"]:
        raise ConfigError("This pool has no gold answers; use source 'labelstudio' (annotated answers) or 'file'.")
    questions = Q.pool_questions(db, pool_id)
    if gold_set == "unknown":
        unknown = {s["question_id"] for s in Q.load_scores(db, run_id) if s["bise"] == 1}
        questions = [q for q in questions if q["id"] in unknown]
    from ..store.annotate import item_key

    return [Pair(item_key("question", q["id"]), q["question"], str(q["answers"][0]), "gold") for q in questions if q["answers"]]


def labelstudio_pairs(pool_id: int, project: int) -> list[Pair]:
    from ..annotate.dataset import pairs

    frame = pairs(pool_id, project)
    return [Pair(str(k), str(q), str(a), "labelstudio") for k, q, a in zip(frame["item_key"], frame["question"], frame["answer"])]


def known_pairs(db, run_id: int, k: int, seed: int, exclude: set[str]) -> list[Pair]:
    """``k`` known questions of the run (BiSE = 0), chosen by seed, with the model's own low-temperature answer."""
    import numpy as np

    from ..store.annotate import item_key

    known = [s for s in Q.load_scores(db, run_id) if s["bise"] == 0 and item_key("question", s["question_id"]) not in exclude]
    low = Q.load_answers(db, run_id, [s["question_id"] for s in known])
    known = [s for s in known if low.get(s["question_id"], {}).get("low") and low[s["question_id"]]["low"][0]["text"].strip()]
    if not known:
        raise ConfigError(f"mix_known = {k}, but run {run_id} has no known question (BiSE = 0) with an answer. Set mix_known to 0.")
    pick = np.random.default_rng(seed).permutation(len(known))[:k]
    return [Pair(item_key("question", known[i]["question_id"]), known[i]["question"],
                 low[known[i]["question_id"]]["low"][0]["text"], "known") for i in sorted(pick)]


def build(pool: str | int, cfg: FinetuneConfig) -> Dataset:
    """The dataset ``cfg`` describes for ``pool``: cleaned pairs, split, known mix, hash."""
    with connect() as db:
        pool_id = int(Q.get_pool(db, pool)["id"])
        run = resolve_run(db, pool_id, cfg.run_id)
        if cfg.source == "gold":
            raw = gold_pairs(db, pool_id, run["id"], cfg.gold_set)
        elif cfg.source == "file":
            raw = read_file(cfg.file)
        else:
            raw = None
    if raw is None:
        raw = labelstudio_pairs(pool_id, cfg.project)
    pairs, dropped = _clean(raw)
    if not pairs:
        how = {"labelstudio": "Pull the project's answers (Annotate page, or `python -m ka2l annotate pull`) or choose source 'gold' or 'file'",
               "gold": "Use gold_set 'all', or another source" if cfg.gold_set == "unknown" else "Choose another source",
               "file": "Fill the question and answer columns"}[cfg.source]
        raise ConfigError(f"The {cfg.source} source gave no (question, answer) pair"
                          f"{' (' + ', '.join(f'{n} {w}' for w, n in dropped.items() if n) + ' dropped)' if any(dropped.values()) else ''}. {how}.")
    train, eval_ = fixed_split(pairs) if any(p.split for p in pairs) else split(pairs, cfg.eval_share, cfg.seed)
    if cfg.mix_known:
        with connect() as db:
            train = train + known_pairs(db, run["id"], cfg.mix_known, cfg.seed, {p.item_key for p in pairs})
    ds = Dataset(pool_id, int(run["id"]), cfg.source, train, eval_, notes={"dropped": dropped, "n_source": len(pairs),
                                                                           "n_known": sum(p.origin == "known" for p in train)})
    ds.hash = dataset_hash(train, eval_)
    return ds
