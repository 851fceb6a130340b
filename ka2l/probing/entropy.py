"""Pure maths of Stage 1: answer normalisation, greedy semantic clustering, semantic entropy
variants and the dynamic thresholds that binarise SE into known (0) / unknown (1).

No model code here: clustering takes an injected ``equivalent`` callable, so it is testable with
hand-written relations.

Worked example (paper Eq. 2): cluster ids [0, 1, 2, 1] -> p = (1/4, 2/4, 1/4) ->
SE = -(0.25 ln 0.25 + 0.5 ln 0.5 + 0.25 ln 0.25) = 1.0397 nats.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, ScoreError

_ARTICLES = {"a", "an", "the"}
NEG = "\u00ac"  # prefix of a token said under a negation: 'not Paris' -> '\u00acparis'
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014\u2212{NEG}]")
_SIGN = re.compile(r"(?<![\w.])[-\u2212](?=\d)")  # the minus of a signed number: '-5', '(-5)', not '5-3'
_NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "cannot", "isnt", "arent", "wasnt", "werent", "dont", "doesnt",
                        "didnt", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "hasnt", "havent", "hadnt", "aint"})
_DISJUNCTIONS = frozenset({"or", "either"})
_CLAUSE_BREAK = re.compile(r"[;:!?()\[\]\u2013\u2014]|,(?!\d)|\.(?=\s|$)|\s-\s|\bbut\b", re.IGNORECASE)


# -- normalisation -------------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    """Lowercase, strip accents and punctuation, drop articles; a number keeps its minus sign.

    >>> tokens("The Côte-d'Ivoire!"), tokens("-5 or 5-3"), tokens("\u22125")
    (['cote', 'divoire'], ['-5', 'or', '5', '3'], ['-5'])
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _SIGN.sub("\x00", text)
    text = _PUNCT.sub(lambda m: "" if m.group() in "'\u2019" else " ", text).replace("\x00", "-")
    return [t for t in text.split() if t not in _ARTICLES]


def _polar_tokens(text: str) -> list[str]:
    """``tokens`` with every token said under a negation marked NEG: a negation word (not, no, never,
    n't, neither, nor, ...) covers the rest of its clause (clauses end at , ; : . ! ? brackets, dashes
    and 'but') and is itself dropped, unless nothing follows it there ('No.' stays 'no')."""
    out: list[str] = []
    for clause in _CLAUSE_BREAK.split(text):
        toks = tokens(clause)
        negated = False
        for j, t in enumerate(toks):
            if t in _NEGATIONS:
                if all(u in _NEGATIONS for u in toks[j + 1 :]):
                    out.append(NEG + t if negated else t)
                    break
                negated = True
            else:
                out.append(NEG + t if negated else t)
    return out


def normalize_answer(answer: str, question: str | None = None) -> tuple[str, ...]:
    """Normalised answer tokens (negated ones marked NEG, see ``_polar_tokens``), without the words
    that also occur in the question.

    >>> q = "What is the capital of France?"
    >>> normalize_answer("The capital of France is Paris.", q), normalize_answer("Lyon, not Paris", q)
    (('paris',), ('lyon', '\u00acparis'))

    If every token occurs in the question ('Quebec' for 'capital of Quebec?'), the tokens are kept
    so the answer does not vanish.
    """
    toks = _polar_tokens(answer)
    if question:
        q = set(tokens(question))
        kept = [t for t in toks if t.removeprefix(NEG) not in q]
        if kept:
            return tuple(kept)
    return tuple(toks)


def _occurrences(big: Sequence[str], small: Sequence[str]) -> list[int]:
    """Start indices of ``small`` as a contiguous run inside ``big``."""
    n = len(small)
    return [i for i in range(len(big) - n + 1) if n and tuple(big[i : i + n]) == tuple(small)]


def _offers_alternatives(rest: Sequence[str]) -> bool:
    return bool(_DISJUNCTIONS & set(rest))


def lexically_equivalent(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Equal normalised answers, or the shorter one a contiguous run inside the longer one, when:

    - the shorter one asserts something (a bare denial such as 'not Paris' equals only itself), and
    - the rest of the longer one offers no alternative ('or', 'either').

    Negated tokens only match negated tokens, so a negation never matches the thing it denies.

    >>> q = "What is the capital of France?"
    >>> same = lambda x, y: lexically_equivalent(normalize_answer(x, q), normalize_answer(y, q))
    >>> same("Paris", "The capital of France is Paris, not Lyon."), same("Paris", "It's Paris, France")
    (True, True)
    >>> same("Paris", "Not Paris"), same("Not Paris", "Lyon, not Paris"), same("Paris", "Paris or Lyon")
    (False, False, False)
    >>> same("Lyon", "Lyon, not Paris"), same("-5", "5")
    (True, False)

    Limits of a lexical rule: 'Not Paris' and 'It is not Paris' differ ('it' is an assertion as far as
    it can tell), and 'Paris, France' equals 'Paris' (it cannot tell a refinement from a rival).
    """
    if not a or not b:
        return a == b
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if all(t.startswith(NEG) for t in short):
        return False
    return any(not _offers_alternatives(long[:i] + long[i + len(short) :]) for i in _occurrences(long, short))


def is_correct(answer: str, golds: Sequence[str], question: str | None = None) -> bool:
    """True when some gold answer (or alias) is asserted by the answer: after normalisation (question
    words dropped, negated tokens marked), the gold's tokens occur as one contiguous run and the rest of
    the answer offers no alternative ('or', 'either'). A gold under a negation is not asserted.

    >>> q = "What is the capital of France?"
    >>> is_correct("The capital of France is Paris.", ["Paris"], q), is_correct("I'm not sure, but it's Paris", ["Paris"], q)
    (True, True)
    >>> is_correct("Lyon, not Paris", ["Paris"], q), is_correct("Not Paris", ["Paris"], q), is_correct("Paris or Lyon", ["Paris"], q)
    (False, False, False)
    >>> is_correct("Paris, not Lyon", ["Paris"], q), is_correct("-5", ["5"]), is_correct("Found not guilty", ["Not guilty"])
    (True, False, True)

    An extra name that is not offered as an alternative is accepted ('Paris, France', 'Washington,
    D.C.' for 'Washington'): a lexical rule cannot tell a refinement from a rival.
    """
    ans = normalize_answer(answer, question)
    if not ans:
        return False
    for gold in golds:
        g = normalize_answer(gold, question)
        if any(not _offers_alternatives(ans[:i] + ans[i + len(g) :]) for i in _occurrences(ans, g)):
            return True
    return False


# -- clustering ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clustering:
    """Cluster id per answer (0..n_clusters-1, in order of first appearance) and the judge's work."""

    ids: tuple[int, ...]
    judge_calls: int  # directional judge evaluations actually made (naive: k*(k-1))
    verdicts: tuple[tuple[int, int, bool], ...] = field(default=())  # (answer i, answer j, equivalent?)

    @property
    def n_clusters(self) -> int:
        return len(set(self.ids))


def cluster_answers(
    answers: Sequence[str],
    equivalent: Callable[[int, list[int]], list[bool]],
    keys: Sequence[Sequence[str]] | None = None,
    calls_per_comparison: int = 2,
) -> Clustering:
    """Greedy semantic clustering.

    Exact duplicates (same normalised ``keys``; defaults to ``tokens(answer)``) are merged first,
    with no judge call. Then each distinct answer joins the first cluster whose representative is
    equivalent; ``equivalent(i, reps)`` answers for answer ``i`` against every representative index
    in ``reps`` at once (so model judges can batch), and is charged ``calls_per_comparison``
    directional calls per representative (2 for a bidirectional NLI check).

    >>> same = lambda i, reps: [answers[i][0] == answers[r][0] for r in reps]
    >>> answers = ["Paris", "paris", "Lyon", "Paris, France"]
    >>> cluster_answers(answers, same).ids
    (0, 0, 1, 0)
    """
    keys = [tuple(k) for k in keys] if keys is not None else [tuple(tokens(a)) for a in answers]
    first_of_key: dict[tuple[str, ...], int] = {}
    rep_of: list[int] = []  # cluster id -> index of its representative answer
    ids: list[int] = [-1] * len(answers)
    calls = 0
    verdicts: list[tuple[int, int, bool]] = []
    for i, key in enumerate(keys):
        if key in first_of_key:  # exact duplicate: same cluster, no judge call
            ids[i] = ids[first_of_key[key]]
            continue
        first_of_key[key] = i
        if rep_of:
            eq = equivalent(i, list(rep_of))
            calls += calls_per_comparison * len(rep_of)
            verdicts.extend((i, r, bool(e)) for r, e in zip(rep_of, eq))
            match = next((c for c, e in enumerate(eq) if e), None)
        else:
            match = None
        if match is None:
            rep_of.append(i)
            ids[i] = len(rep_of) - 1
        else:
            ids[i] = match
    return Clustering(ids=tuple(ids), judge_calls=calls, verdicts=tuple(verdicts))


# -- entropies -----------------------------------------------------------------------------------

def discrete_semantic_entropy(cluster_ids: Sequence[int]) -> float:
    """Paper Eq. 2: -sum_c (|c|/N) ln(|c|/N). [0, 1, 2, 1] -> 1.0397; [3, 3, 3] -> 0.0."""
    if len(cluster_ids) == 0:
        raise ValueError("no answers to compute semantic entropy over")
    _, counts = np.unique(np.asarray(cluster_ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


def _finite(values: Sequence[float], item: str, where: str | None) -> np.ndarray:
    """``values`` as float64, or a ScoreError naming the first NaN / inf one (``item`` i of n ``where``)."""
    arr = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        more = f" ({bad.size} of them are not finite)" if bad.size > 1 else ""
        raise ScoreError(
            f"{item} {i + 1} of {arr.size}{' ' + where if where else ''} has log-probability {arr[i]}{more}. The model produced "
            "non-finite logits, as float16 weights do when they overflow: load it in float32 or bfloat16 (ModelSpec.dtype, "
            "--dtype) and start a new run (--no-resume).")
    return arr


def weighted_semantic_entropy(cluster_ids: Sequence[int], seq_logprobs: Sequence[float], where: str | None = None) -> float:
    """Likelihood-weighted SE (Farquhar et al. 2024): sequence log-probs (length-normalised) are
    normalised over the samples, summed per cluster with logsumexp, then -sum p(c) log p(c).

    Equal log-probs reduce it to the discrete SE: ids [0, 1, 2, 1], lp [0, 0, 0, 0] -> 1.0397.
    A NaN or infinite log-prob is refused (ScoreError), naming the answer and ``where`` (e.g. the question).
    """
    ids = np.asarray(cluster_ids)
    lp = np.asarray(seq_logprobs, dtype=np.float64)
    if ids.shape != lp.shape or ids.size == 0:
        raise ValueError(f"need one log-prob per answer, got {lp.shape} for {ids.shape}")
    lp = _finite(lp, "Sampled answer", f"to {where}" if where else None)
    lp = lp - _logsumexp(lp)
    log_pc = np.array([_logsumexp(lp[ids == c]) for c in np.unique(ids)])
    return float(-(np.exp(log_pc) * log_pc).sum())


def regular_entropy(seq_logprobs: Sequence[float], where: str | None = None) -> float:
    """Naive predictive entropy: Monte-Carlo estimate -mean(log p(s)) over the sampled answers."""
    lp = _finite(seq_logprobs, "Sampled answer", f"to {where}" if where else None)
    return float(-lp.mean())


def mean_log_likelihood(token_logprobs: Sequence[float], where: str | None = None) -> float:
    """Mean token log-probability of an answer (higher = more confident). An answer that stopped at
    once carries its stop token's log-prob; one with no log-probs at all has no likelihood."""
    if not len(token_logprobs):
        raise ScoreError(f"The answer{' to ' + where if where else ''} has no token log-probs, so it has no likelihood. Answers "
                         "sampled by ka2l carry at least their stop token's log-prob; answers stored by an older version do not: "
                         "start a new run (--no-resume).")
    return float(_finite(token_logprobs, "Token", f"of the answer to {where}" if where else None).mean())


# -- thresholds ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    rule: str
    gamma: float
    candidates: tuple[float, ...]
    criterion: tuple[float, ...]  # the curve minimised, one value per candidate (for plotting)


def _paper_mse(se: np.ndarray, tau: float) -> float:
    return float(np.mean((se - (se >= tau)) ** 2))


def _two_means(se: np.ndarray, tau: float) -> float:
    lo, hi = se[se < tau], se[se >= tau]
    return float(sum(((g - g.mean()) ** 2).sum() for g in (lo, hi) if g.size))


_RULES = {"paper-mse": _paper_mse, "two-means": _two_means}


def find_threshold(se: Sequence[float], rule: str = "two-means", n_candidates: int = 100) -> Threshold:
    """Dynamic threshold gamma* = argmin over K candidates in [min SE, max SE] (first minimum wins).

    ``paper-mse`` (paper Eq. 3-5) minimises mean (SE_i - 1[SE_i >= tau])^2, which assumes SE is on a
    0..1 scale; ``two-means`` minimises the within-group squared error of the two groups, which adapts
    to any scale. SE [0, 0, 0, 1, 1, 1] with two-means splits the two groups exactly.
    """
    if rule not in _RULES:
        raise ConfigError(f"Unknown threshold rule {rule!r}. Choose one of: {', '.join(_RULES)}.")
    arr = np.asarray(se, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no semantic entropies to threshold")
    cands = np.linspace(arr.min(), arr.max(), n_candidates)
    crit = np.array([_RULES[rule](arr, float(t)) for t in cands])
    best = int(np.argmin(crit))
    return Threshold(rule=rule, gamma=float(cands[best]), candidates=tuple(map(float, cands)), criterion=tuple(map(float, crit)))


def binarize(se: Sequence[float], gamma: float) -> np.ndarray:
    """BiSE: 1 (unknown) where SE >= gamma, else 0 (known)."""
    return (np.asarray(se, dtype=np.float64) >= gamma).astype(np.int64)
