"""Land a Ray run's committed result blocks in ka2l's store exactly as a local run stores them: the same
hidden-state files (``open_run_hidden``, one file per layer), the same answers, clusters and scores rows
(``ka2l.store.queries``), the same 'left_out' summary and stage timings. Idempotent: a question whose
states, answers or scores are already stored is skipped for that table, so ingesting a block twice (a
resume after a kill during the ingest) stores nothing twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import queries as Q
from .actors import generation_from_json
from .blocks import WorkDir

log = logging.getLogger(__name__)


@dataclass
class Ingested:
    hidden: int = 0
    answers: int = 0
    scores: int = 0
    left_out: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, s: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(s)


def ingest(db, run_id: int, questions: list[dict], work: WorkDir, open_store, layer: int | None = None) -> Ingested:
    """Store every committed block of ``work`` not stored yet. ``open_store(n_layers, hidden_size, model)``
    opens the run's hidden-state store (called once, with the model's dimensions from the first block)."""
    pos = {int(q["id"]): i for i, q in enumerate(questions)}
    hidden_done, answered, scored = Q.hidden_done_ids(db, run_id), Q.answered_ids(db, run_id), Q.scored_ids(db, run_id)
    out, store = Ingested(), None
    for name in work.committed():
        for frame in work.read_block(name):
            frame = frame[frame["question_id"].isin(list(pos))]
            if not len(frame):
                continue
            todo = frame[~frame["question_id"].isin(list(hidden_done))]
            if len(todo):
                if store is None:
                    store = open_store(int(todo["n_layers"].iloc[0]), int(todo["hidden_size"].iloc[0]), str(todo["source"].iloc[0]))
                    hidden_done = Q.hidden_done_ids(db, run_id)  # a store made anew forgets the marks of a lost one
                    todo = frame[~frame["question_id"].isin(list(hidden_done))]
                shape = (int(todo["n_layers_stored"].iloc[0]), int(todo["hidden_size"].iloc[0]))
                states = np.stack([np.frombuffer(b, dtype=np.float16).reshape(shape) for b in todo["hidden"]])
                store.write([pos[int(q)] for q in todo["question_id"]], states)
                store.flush()
                ids = [int(q) for q in todo["question_id"]]
                Q.mark_hidden_done(db, run_id, ids)
                hidden_done |= set(ids)
                out.hidden += len(ids)
                out.add_time("hidden", todo["t_hidden"].sum())
            if layer is not None:  # triage: hidden states only
                continue
            for _, r in frame[frame["left_out"] != ""].iterrows():
                out.left_out[str(int(r["question_id"]))] = r["left_out"]
            todo = frame[(frame["low"] != "") & ~frame["question_id"].isin(list(answered))]
            if len(todo):
                Q.insert_answers(db, run_id, {int(r.question_id): (generation_from_json(json.loads(r.low)),
                                                                   [generation_from_json(d) for d in json.loads(r.samples)])
                                              for r in todo.itertuples()})
                answered |= {int(q) for q in todo["question_id"]}
                out.answers += len(todo)
                out.add_time("answers", todo["t_answers"].sum())
            todo = frame[(frame["score"] != "") & ~frame["question_id"].isin(list(scored))]
            if len(todo):
                Q.insert_scores(db, run_id, [json.loads(s) for s in todo["score"]])
                scored |= {int(q) for q in todo["question_id"]}
                out.scores += len(todo)
                out.add_time("scores", todo["t_scores"].sum())
    for stage, n in (("hidden", out.hidden), ("answers", out.answers), ("scores", out.scores)):
        if n:
            Q.add_timing(db, run_id, stage, out.seconds.get(stage, 0.0), n)
    return out
