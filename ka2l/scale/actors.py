"""The model stages of Stage 1 and triage as Ray Data actors: each loads its model once and then maps
blocks of the pool (pandas frames, one row per question) to the same block with its results added.

    HiddenActor    question -> prompt, last-prompt-token states of every layer (or the probe's layer)
    SamplingActor  prompt -> the low-temperature answer and the k samples (any sampling backend)
    JudgeActor     answers -> clustering and every score (``score_question``), on CPU

Each reuses the local code path (``extract_hidden_states``, ``make_sampler``, ``score_question``) with the
same seeds, so a question's results do not depend on the executor, its block or its actor. Nothing here
imports Ray: the classes are plain callables that ``ka2l.scale.ray_stage1`` hands to ``map_batches``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import JudgeConfig, ModelSpec, PromptConfig, SamplingConfig
from ..models.llm import Generation, build_prompt, extract_hidden_states, extract_layer_states, load_model

INPUT_COLUMNS = ("question_id", "row", "question", "golds")


def sample_seeds(s: SamplingConfig, rows: list[int]) -> list[int]:
    """The seed of each question's low-temperature answer (its samples use seed + 1): the formula of
    ``ka2l.probing.stage1._stage_answers``, from the question's row in the pool alone, so a Ray run draws
    the answers a local run draws."""
    return [2 * (s.seed * 1_000_003 + i) for i in rows]


def generation_to_json(g: Generation) -> dict[str, Any]:
    return {"text": g.text, "token_logprobs": [float(x) for x in g.token_logprobs], "token_ids": [int(x) for x in g.token_ids]}


def generation_from_json(d: dict[str, Any]) -> Generation:
    return Generation(d["text"], tuple(d["token_logprobs"]), tuple(d["token_ids"]))


def answer_row(d: dict[str, Any]) -> dict[str, Any]:
    """An answer as ``queries.load_answers`` gives it back (what ``score_question`` reads)."""
    g = generation_from_json(d)
    return {"text": g.text, "token_logprobs": list(g.token_logprobs), "seq_logprob": g.seq_logprob}


class HiddenActor:
    """HF forward pass: the last prompt token's hidden state at every layer, float16 (L+1, hidden) per question,
    or with ``layer`` (triage) at that layer alone, (1, hidden), from a pass that stops there."""

    def __init__(self, spec: ModelSpec, prompt: PromptConfig, batch_size: int, layer: int | None = None):
        self.lm = load_model(spec)
        self.prompt, self.batch_size, self.layer = prompt, batch_size, layer

    def __call__(self, block):
        t0 = time.perf_counter()
        prompts = [build_prompt(self.lm.tokenizer, q, self.prompt) for q in block["question"]]
        if self.layer is None:
            parts = [states for _, states in extract_hidden_states(self.lm, prompts, self.batch_size)]
        else:
            parts = [states[:, None] for _, states in extract_layer_states(self.lm, prompts, self.layer, self.batch_size)]
        states = np.concatenate(parts).astype(np.float16)
        block = block.copy()
        block["prompt"] = prompts
        block["hidden"] = [np.ascontiguousarray(s).tobytes() for s in states]
        block["n_layers"] = self.lm.n_layers  # the model's decoder layers (the store's dimensions)
        block["source"] = self.lm.source
        block["n_layers_stored"] = states.shape[1]
        block["hidden_size"] = states.shape[2]
        block["t_hidden"] = (time.perf_counter() - t0) / max(len(block), 1)
        return block


class SamplingActor:
    """The low-temperature answer and k samples of each question from the sampler ``sampling.backend`` names
    (``ka2l.models.sampling.make_sampler``, as the local run), batched by ``sampling.batch_size``. A prompt the
    engine refuses gets its reason in ``left_out`` and no answers."""

    def __init__(self, spec: ModelSpec, sampling: SamplingConfig):
        from ..models.sampling import make_sampler

        self.s = sampling
        self.sampler = make_sampler(sampling, model_spec=spec)

    def __call__(self, block):
        t0 = time.perf_counter()
        s, n = self.s, len(block)
        prompts, rows, questions = list(block["prompt"]), [int(r) for r in block["row"]], list(block["question"])
        low, samples, left_out = [""] * n, [""] * n, [""] * n
        for b in range(0, n, s.batch_size):
            idx = list(range(b, min(b + s.batch_size, n)))
            refused = self.sampler.refusals([prompts[i] for i in idx])
            for j, why in refused.items():
                q = int(block["question_id"].iloc[idx[j]])
                left_out[idx[j]] = f"question {q} ({questions[idx[j]][:80]!r}) was left out: {why}"
            idx = [i for j, i in enumerate(idx) if j not in refused]
            if not idx:
                continue
            batch = [prompts[i] for i in idx]
            seeds = sample_seeds(s, [rows[i] for i in idx])
            lows = self.sampler.generate(batch, s.low_temperature, 1, seeds)
            draws = self.sampler.generate(batch, s.temperature, s.k, [x + 1 for x in seeds])
            for j, i in enumerate(idx):
                low[i] = json.dumps(generation_to_json(lows[j][0]))
                samples[i] = json.dumps([generation_to_json(g) for g in draws[j]])
        block = block.copy()
        block["low"], block["samples"], block["left_out"] = low, samples, left_out
        block["t_answers"] = (time.perf_counter() - t0) / max(n, 1)
        return block


class JudgeActor:
    """Clustering (the judge ``judge.kind`` names) and SE / weighted SE / regular entropy / log-likelihood /
    correctness of each answered question: ``ka2l.probing.stage1.score_question``, as the local run."""

    def __init__(self, judge: JudgeConfig):
        from ..probing.judges import make_judge

        self.judge = make_judge(judge)

    def __call__(self, block):
        from ..probing.stage1 import score_question

        t0 = time.perf_counter()
        scores = []
        for qid, question, golds, low, samples in zip(block["question_id"], block["question"], block["golds"], block["low"],
                                                      block["samples"]):
            if not low:  # left out by the sampler
                scores.append("")
                continue
            q = {"id": int(qid), "question": question, "answers": json.loads(golds)}
            answers = {"low": [answer_row(json.loads(low))], "sample": [answer_row(d) for d in json.loads(samples)]}
            scores.append(json.dumps(score_question(self.judge, q, answers)))
        block = block.copy()
        block["score"] = scores
        block["t_scores"] = (time.perf_counter() - t0) / max(len(block), 1)
        return block


def model_spec(spec: ModelSpec, dtype: str) -> ModelSpec:
    """The run's model in the dtype the run records, whatever 'auto' would resolve to on an actor's device."""
    return replace(spec, dtype=dtype)
