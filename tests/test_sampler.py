"""The Stage 1 sampler (one prefill per prompt, a shared key/value cache, finished rows leave the batch)
and the single-layer forward pass of triage, on tiny models loaded through ka2l's own loader.

What must hold: the recorded log-probs are the model's teacher-forced ones; a prompt's samples depend on
its seed alone (not on its batch, nor on which rows finished first); stop strings cut as generating
everything and cutting afterwards would; first tokens follow softmax(logits / T) (top-p filtered); and a
pass stopped at a layer gives that layer's states exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ka2l.config import ModelSpec, PromptConfig, SamplingConfig
from ka2l.errors import ModelLoadError
from ka2l.models.llm import _cut_at_stop, build_prompt, extract_hidden_states, extract_layer_states, generate_answers, load_model

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Capital of Italy, briefly, if you know it please?"]


def teacher_forced(lm, prompt: str, token_ids) -> list[float]:
    """Raw log-probs of ``token_ids`` after ``prompt``: one unpadded forward pass over prompt + answer."""
    prompt_ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, p)
    ids = torch.cat([prompt_ids, torch.tensor([list(token_ids)])], dim=1)  # (1, p + t)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.float(), dim=-1)  # (1, p + t, vocab)
    p = prompt_ids.shape[1]
    return [float(logp[0, p - 1 + j, t]) for j, t in enumerate(token_ids)]


def first_token_distribution(lm, prompt: str, temperature: float) -> np.ndarray:
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**enc).logits[0, -1].float()  # (vocab,)
    return torch.softmax(logits / temperature, -1).numpy()


def ids_of(out) -> list[list[tuple[int, ...]]]:
    return [[g.token_ids for g in gens] for gens in out]


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    out = [build_prompt(tiny_lm.tokenizer, q, PromptConfig()) for q in QUESTIONS]
    assert len({len(tiny_lm.tokenizer(p)["input_ids"]) for p in out}) == 3, "prompts of different lengths: the batch is padded"
    return out


def test_recorded_logprobs_are_the_models_teacher_forced_ones(tiny_lm, prompts):
    cfg = SamplingConfig(k=6, max_new_tokens=8, stop=("e",))
    for temperature in (1.0, 0.5):
        out = generate_answers(tiny_lm, prompts, cfg, temperature=temperature, n=6, seed=[3, 4, 5])
        lengths = {len(g.token_ids) for gens in out for g in gens}
        assert len(lengths) > 1, "rows finished at different steps, so finished rows really left the batch"
        for prompt, gens in zip(prompts, out):
            for g in gens:
                # raw (temperature-1) log-probs, whatever the sampling temperature: the model's own likelihood
                np.testing.assert_allclose(g.token_logprobs, teacher_forced(tiny_lm, prompt, g.token_ids), atol=1e-4)
                assert g.text == tiny_lm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()


def test_a_prompts_samples_depend_on_its_seed_alone(tiny_lm, prompts):
    cfg = SamplingConfig(k=5, max_new_tokens=8, stop=("e",))
    together = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=[11, 12, 13])
    assert ids_of(together) == ids_of(generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=[11, 12, 13]))
    # alone, in another order, or with more samples drawn beside them: the same samples
    for j, seed in enumerate([11, 12, 13]):
        alone = generate_answers(tiny_lm, [prompts[j]], cfg, temperature=1.0, n=5, seed=[seed])[0]
        assert [g.token_ids for g in alone] == [g.token_ids for g in together[j]]
        for a, b in zip(alone, together[j]):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
    reordered = generate_answers(tiny_lm, prompts[::-1], cfg, temperature=1.0, n=5, seed=[13, 12, 11])
    assert ids_of(reordered) == ids_of(together)[::-1]
    more = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=9, seed=[11, 12, 13])
    assert [[g.token_ids for g in gens[:5]] for gens in more] == ids_of(together), \
        "rows that finish early or late beside them do not change a row's sample"
    assert ids_of(generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=[11, 12, 13], max_rows=5)) == ids_of(together), \
        "decoding the prompts one at a time (a bounded cache) changes no answer"
    other = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=[21, 22, 23])
    assert ids_of(other) != ids_of(together), "another seed draws other samples"
    single = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=11)
    assert ids_of(single) == ids_of(together), "one int seed means seed + j for prompt j"
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=5, seed=[1, 2])


def test_stop_strings_cut_as_generating_everything_then_cutting_would(tiny_lm, prompts):
    """A row leaves the batch at its first stop string; the answer is what the full continuation (same
    random numbers) cut at that stop gives, as when generate() ran every row to the end."""
    special = set(tiny_lm.tokenizer.all_special_ids)
    full = generate_answers(tiny_lm, prompts, SamplingConfig(max_new_tokens=12, stop=()), temperature=1.0, n=8, seed=[7, 8, 9])
    for stops in (("e",), ("a", "Question:"), ("\n",)):
        cut = generate_answers(tiny_lm, prompts, SamplingConfig(max_new_tokens=12, stop=stops), temperature=1.0, n=8, seed=[7, 8, 9])
        for gens_full, gens_cut in zip(full, cut):
            for f, c in zip(gens_full, gens_cut):
                text, kept = _cut_at_stop(tiny_lm.tokenizer, list(f.token_ids), stops, special)
                assert c.text == text and c.token_ids == f.token_ids[: max(kept, 1)]
                assert not any(s in c.text for s in stops if s)
    shorter = [len(c.token_ids) < len(f.token_ids) for gf, gc in zip(full, cut) for f, c in zip(gf, gc)]
    assert any(shorter), "the stop strings did cut some answers"


@pytest.fixture(scope="module")
def sharp_lm(tiny_llama_dir):
    """The tiny Llama with its LM head scaled up: a first-token distribution with a few likely tokens, where
    sampling noise is small enough to tell one temperature from another."""
    lm = load_model(ModelSpec(name_or_path=str(tiny_llama_dir), device="cpu"))
    with torch.no_grad():
        lm.model.lm_head.weight *= 12
    return lm


def chi_square(tokens: np.ndarray, p: np.ndarray, top: int = 10) -> float:
    """Pearson's statistic of the drawn first tokens against ``p`` over the ``top`` most likely tokens and
    the rest as one bucket (``top`` degrees of freedom; P(chi2_10 > 40) < 2e-5)."""
    order = np.argsort(-p)[:top]
    counts = np.bincount(tokens, minlength=len(p))
    observed = np.append(counts[order], len(tokens) - counts[order].sum())
    expected = np.append(p[order], 1 - p[order].sum()) * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


def test_first_tokens_follow_the_tempered_and_nucleus_filtered_softmax(sharp_lm):
    lm, n = sharp_lm, 4000
    prompt = build_prompt(lm.tokenizer, QUESTIONS[0], PromptConfig())
    cfg = SamplingConfig(max_new_tokens=1, stop=())
    dist = {t: first_token_distribution(lm, prompt, t) for t in (0.6, 1.0, 1.5)}
    assert dist[0.6].max() > 0.1, "a few likely tokens"
    for temperature, seed in ((0.6, 5), (1.5, 6)):
        drawn = np.array([g.token_ids[0] for g in generate_answers(lm, [prompt], cfg, temperature=temperature, n=n, seed=[seed])[0]])
        assert chi_square(drawn, dist[temperature]) < 40, temperature
        assert chi_square(drawn, dist[1.0]) > 100, f"T={temperature} samples must not look like T=1 ones"
    # top-p: only the nucleus is ever drawn, in its renormalised proportions
    p = dist[1.0]
    order = np.argsort(-p)
    inside = order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1]  # smallest set holding >= 50% of the mass
    got = generate_answers(lm, [prompt], SamplingConfig(max_new_tokens=1, stop=(), top_p=0.5), temperature=1.0, n=n, seed=[7])[0]
    drawn = np.array([g.token_ids[0] for g in got])
    assert set(drawn.tolist()) <= set(inside.tolist()) and len(set(drawn.tolist())) > 1
    nucleus = np.zeros_like(p)
    nucleus[inside] = p[inside] / p[inside].sum()
    assert chi_square(drawn, nucleus, top=min(10, len(inside) - 1)) < 40
    assert chi_square(drawn, p, top=min(10, len(inside) - 1)) > 100


def test_a_near_zero_temperature_is_the_models_argmax(tiny_lm, prompts):
    got = generate_answers(tiny_lm, prompts[:1], SamplingConfig(max_new_tokens=5, stop=()), temperature=1e-5, n=3, seed=[1])[0]
    ids = tiny_lm.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    greedy = []
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(tiny_lm.model(input_ids=ids).logits[0, -1].argmax()))
            if greedy[-1] in tiny_lm.tokenizer.all_special_ids:
                break
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], dim=1)
    assert all(list(g.token_ids) == greedy[: len(g.token_ids)] for g in got)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = make_tokenizer(chat=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=len(tok), n_positions=256, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(ModelSpec(name_or_path=str(folder), device="cpu"))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_a_pass_stopped_at_a_layer_gives_that_layers_states(which, tiny_lm, tiny_gpt2, prompts):
    lm = tiny_lm if which == "llama" else tiny_gpt2
    full = np.concatenate([s for _, s in extract_hidden_states(lm, prompts, batch_size=2)])  # (3, L+1, hidden)
    for layer in range(lm.n_layers + 1):
        got = np.concatenate([s for _, s in extract_layer_states(lm, prompts, layer, batch_size=2)])  # (3, hidden)
        assert got.shape == (len(prompts), lm.hidden_size) and got.dtype == np.float16
        np.testing.assert_array_equal(got, full[:, layer])
    assert not np.array_equal(full[:, 1], full[:, 2]), "layers differ, so equality above is not vacuous"
    assert not any(m._forward_pre_hooks for m in lm.model.modules()), "the stopping hook is removed"
    with pytest.raises(ModelLoadError, match=f"layers 0..{lm.n_layers}"):
        next(extract_layer_states(lm, prompts, lm.n_layers + 1))


def test_gpt2_samples_with_the_shared_cache_too(tiny_gpt2, prompts):
    cfg = SamplingConfig(k=4, max_new_tokens=6, stop=("e",))
    out = generate_answers(tiny_gpt2, prompts, cfg, temperature=1.0, n=4, seed=[1, 2, 3])
    for prompt, gens in zip(prompts, out):
        for g in gens:
            np.testing.assert_allclose(g.token_logprobs, teacher_forced(tiny_gpt2, prompt, g.token_ids), atol=1e-4)
