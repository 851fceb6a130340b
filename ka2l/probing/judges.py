"""Semantic-equivalence judges behind one interface, used to cluster sampled answers.

- ``lexical``: normalised answers equal or contained in one another (offline default; sees past
  phrasing such as 'The capital of France is Paris.' vs 'Paris', not past synonyms), keeping negation
  and sign apart ('Not Paris' vs 'Paris', '-5' vs '5'); see ``entropy.lexically_equivalent``.
- ``nli``: any Hugging Face sequence-classification NLI model; label ids are read from the
  model's ``config.label2id``, never assumed; bidirectional entailment, batched.
- ``embedding``: cosine similarity of mean-pooled sentence embeddings >= threshold.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from ..config import JudgeConfig
from ..device import resolve_device
from .entropy import Clustering, cluster_answers, lexically_equivalent, normalize_answer, tokens
from ..errors import JudgeError, ModelLoadError

log = logging.getLogger(__name__)

ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"


def equivalent_from_relations(ab: str, ba: str, strict: bool) -> bool:
    """Strict: each entails the other. Non-strict: no contradiction either way and not both neutral."""
    if strict:
        return ab == ENTAILMENT and ba == ENTAILMENT
    return CONTRADICTION not in (ab, ba) and not (ab == NEUTRAL and ba == NEUTRAL)


class Judge:
    """Base: subclasses implement ``equivalent``; ``cluster`` does exact-duplicate merging + greedy clustering."""

    name = "judge"
    calls_per_comparison = 2  # directional judgements per pair (naive total: k * (k - 1))

    def key(self, question: str, answer: str) -> tuple[str, ...]:
        """Exact-duplicate key: answers with equal keys share a cluster without a judge call ('-5' and '5' differ)."""
        return tuple(tokens(answer))

    def equivalent(self, question: str, answer: str, others: Sequence[str]) -> list[bool]:
        raise NotImplementedError

    def cluster(self, question: str, answers: Sequence[str]) -> Clustering:
        keys = [self.key(question, a) for a in answers]
        return cluster_answers(
            answers,
            lambda i, reps: self.equivalent(question, answers[i], [answers[r] for r in reps]),
            keys=keys,
            calls_per_comparison=self.calls_per_comparison,
        )


class LexicalJudge(Judge):
    name = "lexical"

    def key(self, question: str, answer: str) -> tuple[str, ...]:
        return normalize_answer(answer, question)

    def equivalent(self, question: str, answer: str, others: Sequence[str]) -> list[bool]:
        a = self.key(question, answer)
        return [lexically_equivalent(a, self.key(question, o)) for o in others]


def _label_ids(config) -> dict[str, int]:
    """Map entailment / neutral / contradiction to the model's own label ids (case-insensitive prefixes)."""
    found: dict[str, int] = {}
    for label, idx in (config.label2id or {}).items():
        low = str(label).lower()
        for rel in (ENTAILMENT, NEUTRAL, CONTRADICTION):
            if low.startswith(rel[:7]):
                found[rel] = int(idx)
    missing = [r for r in (ENTAILMENT, NEUTRAL, CONTRADICTION) if r not in found]
    if missing:
        raise JudgeError(
            f"The NLI model's labels {dict(config.label2id or {})} do not name {', '.join(missing)}. "
            "Use a model fine-tuned on MNLI/SNLI whose config.label2id has entailment, neutral and contradiction."
        )
    return found


def _load(cls_name: str, model: str, device: str):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(model)
        net = getattr(transformers, cls_name).from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load judge model {model!r} (tried a local folder, then a hub id): {str(exc).splitlines()[0]}") from exc
    return tok, net.to(device).eval()


class NLIJudge(Judge):
    name = "nli"

    def __init__(self, model: str, strict: bool = True, condition_on_question: bool = True, batch_size: int = 32, device: str = "auto"):
        self.device = resolve_device(device)
        self.tokenizer, self.model = _load("AutoModelForSequenceClassification", model, self.device)
        self.labels = _label_ids(self.model.config)
        self._rel_of_id = {v: k for k, v in self.labels.items()}
        self.strict, self.condition, self.batch_size = strict, condition_on_question, batch_size

    def relations(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[str]:
        """NLI relation for each (premise, hypothesis) pair, in batches."""
        import torch

        out: list[str] = []
        with torch.no_grad():
            for s in range(0, len(premises), self.batch_size):
                enc = self.tokenizer(list(premises[s : s + self.batch_size]), list(hypotheses[s : s + self.batch_size]),
                                     return_tensors="pt", padding=True, truncation=True).to(self.device)
                logits = self.model(**enc).logits  # (batch, n_labels)
                out += [self._rel_of_id.get(int(i), NEUTRAL) for i in logits.argmax(-1).tolist()]
        return out

    def equivalent(self, question: str, answer: str, others: Sequence[str]) -> list[bool]:
        text = (lambda a: f"{question} {a}") if self.condition else (lambda a: a)
        a, bs = text(answer), [text(o) for o in others]
        rels = self.relations([a] * len(bs) + bs, bs + [a] * len(bs))  # a->b for all b, then b->a
        n = len(bs)
        return [equivalent_from_relations(rels[j], rels[n + j], self.strict) for j in range(n)]


class EmbeddingJudge(Judge):
    name = "embedding"
    calls_per_comparison = 1  # cosine similarity is symmetric

    def __init__(self, model: str, threshold: float = 0.85, condition_on_question: bool = False, batch_size: int = 32, device: str = "auto",
                 cache_size: int = 10_000):
        if cache_size < 1:
            raise JudgeError(f"EmbeddingJudge cache_size must be >= 1, got {cache_size}.")
        self.device = resolve_device(device)
        self.tokenizer, self.model = _load("AutoModel", model, self.device)
        self.threshold, self.condition, self.batch_size = threshold, condition_on_question, batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()  # text -> embedding, least recently used first

    def embed(self, texts: Sequence[str]):
        """L2-normalised mean-pooled embeddings, (n, hidden).

        Embeddings are cached per text in a least-recently-used cache of ``cache_size`` texts; the
        result is assembled before anything is evicted, so a call may ask for more texts than fit.
        """
        import torch

        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        with torch.no_grad():
            for s in range(0, len(todo), self.batch_size):
                chunk = todo[s : s + self.batch_size]
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # (batch, seq, hidden)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
                pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)  # (batch, hidden)
                found.update(zip(chunk, pooled.cpu()))
        result = torch.stack([found[t] for t in texts]) if texts else torch.empty(0)  # (n, hidden)
        for t in texts:  # refresh in order of use, then evict the least recently used
            self._cache[t] = found[t]
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def equivalent(self, question: str, answer: str, others: Sequence[str]) -> list[bool]:
        text = (lambda a: f"{question} {a}") if self.condition else (lambda a: a)
        vecs = self.embed([text(answer)] + [text(o) for o in others])
        sims = (vecs[1:] @ vecs[0]).tolist()
        return [s >= self.threshold for s in sims]


def make_judge(cfg: JudgeConfig) -> Judge:
    if cfg.kind == "lexical":
        return LexicalJudge()
    if cfg.kind == "nli":
        return NLIJudge(cfg.model, cfg.strict, cfg.conditions_on_question, cfg.batch_size, cfg.device)
    return EmbeddingJudge(cfg.model, cfg.threshold, cfg.conditions_on_question, cfg.batch_size, cfg.device)
