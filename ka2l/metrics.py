"""Text-overlap metrics, thin wrappers over the standard libraries: corpus BLEU from sacrebleu (the
reference implementation, 0-100) and ROUGE-L F1 from Google's rouge-score (0-100, averaged).

>>> round(bleu(["What is the capital of France?"], ["What is the capital of France?"]), 1)
100.0
>>> rouge_l(["capital of France"], ["What is the capital of France?"]) > 50
True
"""

from __future__ import annotations

from collections.abc import Sequence


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up.")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing off), 0-100."""
    import sacrebleu

    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs (Porter stemming), 0-100."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)) / len(hypotheses)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after trimming and case folding, 0-100."""
    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    return 100.0 * sum(h.strip().casefold() == r.strip().casefold() for h, r in zip(hypotheses, references)) / len(hypotheses)
