"""Judges: strict vs non-strict equivalence, NLI label mapping from the model config, embeddings."""

from __future__ import annotations

import pytest

from ka2l.config import JudgeConfig
from ka2l.errors import ConfigError, JudgeError
from ka2l.probing.judges import CONTRADICTION, ENTAILMENT, NEUTRAL, EmbeddingJudge, LexicalJudge, NLIJudge, equivalent_from_relations, make_judge
from tiny import save_tiny_nli


def test_strict_and_non_strict_equivalence():
    E, N, C = ENTAILMENT, NEUTRAL, CONTRADICTION
    assert equivalent_from_relations(E, E, strict=True)
    assert not equivalent_from_relations(E, N, strict=True)
    assert equivalent_from_relations(E, N, strict=False)
    assert not equivalent_from_relations(N, N, strict=False)
    assert not equivalent_from_relations(E, C, strict=False)
    assert not equivalent_from_relations(C, C, strict=False)


def test_lexical_judge_sees_past_phrasing():
    q = "What is the capital of France?"
    c = LexicalJudge().cluster(q, ["Paris", "The capital of France is Paris.", "Lyon", "paris", "It's Lyon, I think"])
    assert c.ids == (0, 0, 1, 0, 1)


def test_lexical_judge_keeps_negation_and_alternatives_apart():
    q = "What is the capital of France?"
    c = LexicalJudge().cluster(q, ["Paris", "Not Paris", "paris", "Lyon, not Paris", "Lyon", "Paris or Lyon", "Paris, not Lyon"])
    assert c.ids == (0, 1, 0, 2, 2, 3, 0)


def test_model_judges_see_the_sign_of_a_number(tmp_path):
    """'-5' and '5' used to share an exact-duplicate key, so no judge was ever asked about them."""
    import torch

    judge = NLIJudge(str(save_tiny_nli(tmp_path / "nli", label_order=("entailment", "neutral", "contradiction"))), device="cpu")
    with torch.no_grad():
        judge.model.classifier.weight.zero_()
        judge.model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # always 'contradiction'
    c = judge.cluster("What is 2 - 7?", ["-5", "5", "\u22125", "-5."])
    assert c.ids == (0, 1, 0, 0) and c.judge_calls == 2


@pytest.mark.parametrize("order,expected", [
    (("contradiction", "neutral", "entailment"), {"contradiction": 0, "neutral": 1, "entailment": 2}),
    (("ENTAILMENT", "NEUTRAL", "CONTRADICTION"), {"entailment": 0, "neutral": 1, "contradiction": 2}),
])
def test_nli_label_ids_come_from_the_model_config(tmp_path, order, expected):
    import torch

    folder = save_tiny_nli(tmp_path / "nli", label_order=order)
    judge = NLIJudge(str(folder), device="cpu")
    assert judge.labels == expected
    for idx, label in enumerate(order):  # make the model predict each label id in turn
        with torch.no_grad():
            judge.model.classifier.weight.zero_()
            judge.model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(idx), 3).float() * 5)
        assert judge.relations(["a b", "c d", "e"], ["b a", "d c", "f"]) == [label.lower()] * 3


def test_nli_judge_maps_argmax_through_the_config(tmp_path, monkeypatch):
    """Force the model to always predict label id 2 and check the relation follows label2id."""
    import torch

    folder = save_tiny_nli(tmp_path / "nli", label_order=("entailment", "neutral", "contradiction"))
    judge = NLIJudge(str(folder), device="cpu", strict=True)
    with torch.no_grad():
        judge.model.classifier.weight.zero_()
        judge.model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    assert set(judge.relations(["x"], ["y"])) == {CONTRADICTION}
    assert judge.cluster("q?", ["a", "b", "c"]).ids == (0, 1, 2)
    with torch.no_grad():
        judge.model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    c = judge.cluster("q?", ["a", "b", "c"])
    assert c.ids == (0, 0, 0) and c.judge_calls == 2 * 2


def test_nli_without_usable_labels_is_refused(tmp_path):
    folder = save_tiny_nli(tmp_path / "nli", label_order=("LABEL_0", "LABEL_1", "LABEL_2"))
    with pytest.raises(JudgeError, match="do not name entailment"):
        NLIJudge(str(folder), device="cpu")


def test_embedding_judge_threshold(tiny_nli_dir):
    judge = EmbeddingJudge(str(tiny_nli_dir), threshold=0.999999, device="cpu")
    c = judge.cluster("q?", ["Paris", "Lyon premise hypothesis", "Paris"])
    assert c.ids == (0, 1, 0) and c.judge_calls == 1
    vecs = judge.embed(["Lyon premise hypothesis", "Paris"])  # as the judge compares them: (2, hidden)
    sim = float((vecs[1:] @ vecs[0])[0])
    assert -1 < sim < 0.999999
    at = EmbeddingJudge(str(tiny_nli_dir), threshold=sim, device="cpu")  # 'at or above the threshold' merges
    assert at.cluster("q?", ["Paris", "Lyon premise hypothesis"]).ids == (0, 0)
    above = EmbeddingJudge(str(tiny_nli_dir), threshold=min(sim + 1e-4, 1.0), device="cpu")
    assert above.cluster("q?", ["Paris", "Lyon premise hypothesis"]).ids == (0, 1)


def test_embedding_cache_is_bounded_and_survives_eviction(tiny_nli_dir):
    """The cache used to be cleared past its bound and then read back: KeyError on a long run."""
    import torch

    unbounded = EmbeddingJudge(str(tiny_nli_dir), device="cpu")
    small = EmbeddingJudge(str(tiny_nli_dir), device="cpu", cache_size=3)
    texts = ["Paris", "Lyon", "Rome", "Madrid", "Au", "Hamlet", "Paris"]
    # one call asking for more texts than the cache holds: the result is built before evicting
    torch.testing.assert_close(small.embed(texts), unbounded.embed(texts))
    assert list(small._cache) == ["Au", "Hamlet", "Paris"]  # the three used last
    # least recently used goes first: Au is refreshed, so Hamlet (now the oldest) is evicted for Lyon
    small.embed(["Au"])
    small.embed(["Lyon"])
    assert list(small._cache) == ["Paris", "Au", "Lyon"]
    # question after question past the bound, clustering agrees with the unbounded judge
    answers = [["Paris", "Lyon", "Paris, France"], ["Rome", "Milan", "Rome"], ["Madrid", "Spain", "Lyon"]] * 3
    for i, ans in enumerate(answers):
        assert small.cluster(f"q{i}?", ans).ids == unbounded.cluster(f"q{i}?", ans).ids
        assert len(small._cache) <= 3
    with pytest.raises(JudgeError, match="cache_size must be >= 1"):
        EmbeddingJudge(str(tiny_nli_dir), device="cpu", cache_size=0)


def test_make_judge_conditions_on_the_question_for_nli_only_unless_asked(tiny_nli_dir, monkeypatch):
    """Embedding 'question + answer' makes every answer to a question share most of its text, so the
    embedding judge embeds answers alone by default; NLI judges the answers in the question's context."""
    q, answers = "What is the capital of France?", ["Paris", "Lyon"]

    def spy(judge, method):
        seen, real = [], getattr(judge, method)
        monkeypatch.setattr(judge, method, lambda *texts: seen.append(texts) or real(*texts))
        return seen

    emb = make_judge(JudgeConfig(kind="embedding", model=str(tiny_nli_dir), device="cpu"))
    seen = spy(emb, "embed")
    emb.cluster(q, answers)
    assert seen == [(["Lyon", "Paris"],)]
    asked = make_judge(JudgeConfig(kind="embedding", model=str(tiny_nli_dir), device="cpu", condition_on_question=True))
    seen = spy(asked, "embed")
    asked.cluster(q, answers)
    assert seen == [([f"{q} Lyon", f"{q} Paris"],)]

    nli = make_judge(JudgeConfig(kind="nli", model=str(tiny_nli_dir), device="cpu"))
    seen = spy(nli, "relations")
    nli.cluster(q, answers)
    assert seen == [([f"{q} Lyon", f"{q} Paris"], [f"{q} Paris", f"{q} Lyon"])]
    bare = make_judge(JudgeConfig(kind="nli", model=str(tiny_nli_dir), device="cpu", condition_on_question=False))
    seen = spy(bare, "relations")
    bare.cluster(q, answers)
    assert seen == [(["Lyon", "Paris"], ["Paris", "Lyon"])]
    with pytest.raises(ConfigError, match="condition_on_question must be true, false or unset"):
        JudgeConfig(condition_on_question="yes")


def test_judge_config_validation():
    with pytest.raises(ConfigError, match="needs JudgeConfig.model"):
        JudgeConfig(kind="nli")
    with pytest.raises(ConfigError, match="lexical, nli, embedding"):
        JudgeConfig(kind="bleu")
    assert isinstance(make_judge(JudgeConfig()), LexicalJudge)
