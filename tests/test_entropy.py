"""SE maths against worked examples; clustering with an injected equivalence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ka2l.probing.entropy import (binarize, cluster_answers, discrete_semantic_entropy, find_threshold, is_correct, lexically_equivalent,
                          mean_log_likelihood, normalize_answer, regular_entropy, tokens, weighted_semantic_entropy)
from ka2l.errors import ConfigError, ScoreError


def test_discrete_se_worked_example():
    assert discrete_semantic_entropy([0, 1, 2, 1]) == pytest.approx(1.0397, abs=1e-4)
    assert discrete_semantic_entropy([3, 3, 3]) == 0.0
    assert discrete_semantic_entropy(list(range(10))) == pytest.approx(math.log(10))


def test_weighted_se_matches_discrete_with_equal_likelihoods_and_follows_weights():
    assert weighted_semantic_entropy([0, 1, 2, 1], [-1.0] * 4) == pytest.approx(1.0397, abs=1e-4)
    # one cluster carries almost all probability mass -> entropy near 0
    assert weighted_semantic_entropy([0, 1], [0.0, -20.0]) < 1e-6
    # hand value: p = softmax([-1, -2]) over two clusters
    p = np.exp([-1, -2]) / np.exp([-1, -2]).sum()
    assert weighted_semantic_entropy([0, 1], [-1, -2]) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_regular_entropy_and_mean_loglik():
    assert regular_entropy([-1.0, -3.0]) == pytest.approx(2.0)
    assert mean_log_likelihood([-0.5, -1.5]) == pytest.approx(-1.0)
    with pytest.raises(ScoreError, match="no token log-probs"):
        mean_log_likelihood([])


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_logprobs_are_refused_naming_the_answer(bad):
    """NaN / -inf log-probs (e.g. float16 overflow) used to make weighted SE NaN, which failed the whole
    run later inside roc_auc_score with no hint of where it came from."""
    where = "question 7 ('Who wrote Hamlet?')"
    with pytest.raises(ScoreError, match=rf"Sampled answer 2 of 3 to question 7 \('Who wrote Hamlet\?'\) has log-probability {bad}"):
        weighted_semantic_entropy([0, 1, 0], [-1.0, bad, -2.0], where=where)
    with pytest.raises(ScoreError, match=rf"Sampled answer 3 of 3 to question 7 .* {bad}.*float32 or bfloat16"):
        regular_entropy([-1.0, -2.0, bad], where=where)
    with pytest.raises(ScoreError, match=rf"Token 2 of 2 of the answer to question 7 .* {bad}"):
        mean_log_likelihood([-0.5, bad], where=where)
    with pytest.raises(ScoreError, match=rf"^Sampled answer 1 of 2 has log-probability {bad}"):
        weighted_semantic_entropy([0, 1], [bad, -1.0])


def test_scoring_a_question_with_a_broken_logprob_names_the_question():
    from ka2l.probing.judges import LexicalJudge
    from ka2l.probing.stage1 import score_question

    question = {"id": 41, "question": "What is the capital of Italy?", "answers": ["Rome"]}
    answers = {"low": [{"text": "Rome", "token_logprobs": [-0.1]}],
               "sample": [{"text": t, "seq_logprob": lp} for t, lp in [("Rome", -0.2), ("Milan", float("-inf")), ("Rome", -0.3)]]}
    with pytest.raises(ScoreError, match=r"Sampled answer 2 of 3 to question 41 \('What is the capital of Italy\?'\) has log-probability -inf"):
        score_question(LexicalJudge(), question, answers)
    answers["sample"][1]["seq_logprob"] = -4.0
    assert score_question(LexicalJudge(), question, answers)["se_weighted"] > 0


def test_clustering_merges_exact_duplicates_before_calling_the_judge():
    calls = []

    def equivalent(i, reps):
        calls.append((i, tuple(reps)))
        return [ANS[i][0].lower() == ANS[r][0].lower() for r in reps]

    ANS = ["Paris", "paris!", "Lyon", "Paris, France", "Lyon", "Nice"]
    c = cluster_answers(ANS, equivalent)
    assert c.ids == (0, 0, 1, 0, 1, 2)
    # 'paris!' and the second 'Lyon' are exact duplicates after normalisation: no judge call for them
    assert [i for i, _ in calls] == [2, 3, 5]
    assert c.judge_calls == 2 * (1 + 2 + 2)
    # each new answer is compared with every representative (answers 0 and 2) so far, each comparison recorded
    assert [(i, r) for i, r, _ in c.verdicts] == [(2, 0), (3, 0), (3, 2), (5, 0), (5, 2)]
    assert cluster_answers(ANS, equivalent, calls_per_comparison=1).judge_calls == 5
    assert (3, 0, True) in c.verdicts and (2, 0, False) in c.verdicts


def test_clustering_greedy_joins_first_equivalent_cluster():
    # answer 2 is equivalent to both cluster reps 0 and 1: it joins the first
    rel = {(1, 0): False, (2, 0): True, (2, 1): True}
    c = cluster_answers(["a", "b", "c"], lambda i, reps: [rel[(i, r)] for r in reps])
    assert c.ids == (0, 1, 0)


def test_normalisation_and_lexical_equivalence():
    q = "What is the capital of France?"
    assert normalize_answer("The capital of France is Paris.", q) == ("paris",)
    assert normalize_answer("Paris", q) == ("paris",)
    assert normalize_answer("Quebec", "What is the capital of Quebec?") == ("quebec",)
    assert lexically_equivalent(("paris",), ("paris", "france"))
    assert not lexically_equivalent(("paris",), ("lyon",))
    assert not lexically_equivalent(("1",), ("10",))


def test_correctness_with_aliases():
    q = "What is the capital of the United States?"
    assert is_correct("It is Washington, D.C.", ["Washington DC", "Washington"], q)
    assert is_correct("washington", ["Washington DC", "Washington"], q)
    assert not is_correct("New York", ["Washington"], q)
    assert not is_correct("", ["Washington"], q)
    assert not is_correct("102", ["10"], "What is the atomic number of Neon?")


def test_lexical_rules_keep_sign_and_negation():
    q = "What is the capital of France?"
    assert tokens("-5 degrees") == ["-5", "degrees"] and tokens("\u22125") == ["-5"] and tokens("5-3, Côte-d'Ivoire") == ["5", "3", "cote", "divoire"]
    assert not is_correct("-5", ["5"]) and not is_correct("5", ["-5"]) and is_correct("It is -5.", ["-5"])
    assert normalize_answer("Not Paris", q) == ("\u00acparis",)
    assert not lexically_equivalent(normalize_answer("Not Paris", q), normalize_answer("Paris", q))
    assert not is_correct("Not Paris", ["Paris"], q)
    assert not is_correct("Lyon, not Paris", ["Paris"], q) and is_correct("Lyon, not Paris", ["Lyon"], q)
    assert not is_correct("It's not Paris, it's Lyon", ["Paris"], q)
    assert not is_correct("Paris or Lyon", ["Paris"], q) and not is_correct("Neither Paris nor Lyon", ["Paris"], q)
    # what must keep working: phrasing, hedges in their own clause, negated golds, excluded alternatives
    assert is_correct("The capital of France is Paris.", ["Paris"], q)
    assert is_correct("I'm not sure, but I think it is Paris", ["Paris"], q)
    assert is_correct("Paris, not Lyon", ["Paris"], q)
    assert is_correct("He was found not guilty.", ["Not guilty"]) and not is_correct("Guilty", ["Not guilty"])
    assert lexically_equivalent(normalize_answer("Paris, not Lyon", q), normalize_answer("Paris", q))
    assert not lexically_equivalent(normalize_answer("Paris or Lyon", q), normalize_answer("Paris", q))
    assert not lexically_equivalent(normalize_answer("Lyon, not Paris", q), normalize_answer("Not Paris", q))


def test_two_means_threshold_splits_two_groups():
    se = [0.0, 0.1, 0.0, 1.9, 2.0, 2.1]
    th = find_threshold(se, "two-means")
    assert 0.1 < th.gamma <= 1.9
    assert binarize(se, th.gamma).tolist() == [0, 0, 0, 1, 1, 1]
    assert len(th.candidates) == len(th.criterion) == 100
    assert min(th.criterion) == th.criterion[th.candidates.index(th.gamma)]


def test_paper_mse_threshold_hand_case():
    # mean (SE - 1[SE >= tau])^2 is 0.59, 0.44, 0.39, 0.94 on the four intervals -> tau in (0.4, 1.6]
    se = [0.2, 0.4, 1.6, 2.0]
    th = find_threshold(se, "paper-mse")
    assert 0.4 < th.gamma <= 1.6
    assert min(th.criterion) == pytest.approx(0.39)
    assert binarize(se, th.gamma).tolist() == [0, 0, 1, 1]


def test_rules_differ_where_the_scale_matters():
    # paper-mse compares SE with 0/1 labels, so any SE above 0.5 leans 'unknown' whatever the scale:
    # the 0.6 group costs (0.6-1)^2 = 0.16 as unknown vs 0.36 as known. two-means instead puts the
    # cut between the groups that are tightest around their own means: {0, 0.6} vs {2.3}.
    se = [0.0] * 5 + [0.6] * 5 + [2.3] * 5
    assert binarize(se, find_threshold(se, "two-means").gamma).sum() == 5
    assert binarize(se, find_threshold(se, "paper-mse").gamma).sum() == 10
    with pytest.raises(ConfigError, match="Choose one of: paper-mse, two-means"):
        find_threshold(se, "median")
