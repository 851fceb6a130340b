"""Model loading, prompts, hidden-state positions and sampling, on tiny models saved to disk and
loaded back through ka2l's own loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ka2l.config import ModelSpec, PromptConfig, SamplingConfig
from ka2l.errors import ModelLoadError
from ka2l.models.llm import _cut_at_stop, build_prompt, extract_hidden_states, generate_answers, last_token_index, load_model

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Capital of Italy, briefly, if you know it please?"]


def test_load_reports_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="tried it as a Hugging Face hub id"):
        load_model(ModelSpec(name_or_path="no-such-org/no-such-model", device="cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(name_or_path=str(tmp_path / "missing.gguf"), device="cpu"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(ModelSpec(name_or_path=str(tmp_path / "weights.bin"), device="cpu"))
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model(ModelSpec(name_or_path=str(tmp_path), device="cpu"))


def test_loader_sets_left_padding(tiny_lm):
    assert tiny_lm.tokenizer.padding_side == "left"
    assert tiny_lm.n_layers == 2 and tiny_lm.hidden_size == 32


def test_prompt_uses_chat_template_only_when_present(tiny_lm, tiny_llama_plain_dir):
    chat = build_prompt(tiny_lm.tokenizer, "Q?", PromptConfig())
    assert chat.startswith("<|im_start|>user\nAnswer the following") and chat.endswith("<|im_start|>assistant\n")
    plain_lm = load_model(ModelSpec(name_or_path=str(tiny_llama_plain_dir), device="cpu"))
    plain = build_prompt(plain_lm.tokenizer, "Q?", PromptConfig(few_shot=(("A?", "a"),)))
    assert plain.endswith("Question: A?\nAnswer: a\n\nQuestion: Q?\nAnswer:")
    forced_plain = build_prompt(tiny_lm.tokenizer, "Q?", PromptConfig(chat_template=False))
    assert "<|im_start|>" not in forced_plain


def test_last_token_index_either_padding_side():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert last_token_index(right).tolist() == [1, 3, 0]


def test_hidden_states_are_the_last_real_token_whatever_the_padding(tiny_lm):
    prompts = [build_prompt(tiny_lm.tokenizer, q, PromptConfig()) for q in QUESTIONS]
    lengths = [len(tiny_lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3, "prompts must differ in length so the batch is padded"
    batched = np.concatenate([s for _, s in extract_hidden_states(tiny_lm, prompts, batch_size=3)])
    assert batched.shape == (3, tiny_lm.n_layers + 1, tiny_lm.hidden_size) and batched.dtype == np.float16
    for i, p in enumerate(prompts):
        ids = tiny_lm.tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = tiny_lm.model(input_ids=ids, output_hidden_states=True)
        alone = torch.stack(out.hidden_states, 0)[:, 0, -1].numpy()  # (L+1, hidden) at the last real token
        np.testing.assert_allclose(batched[i].astype(np.float32), alone, atol=2e-2, rtol=1e-2)
        # and it is not the state of the padding or of the second-to-last token
        before = torch.stack(out.hidden_states, 0)[:, 0, -2].numpy()
        assert not np.allclose(batched[i, -1].astype(np.float32), before[-1], atol=1e-2)


def manual_logprobs(lm, prompt: str, token_ids) -> list[float]:
    """Raw log-probs of ``token_ids`` after ``prompt``, from one unpadded forward pass of the model."""
    prompt_ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, p)
    ids = torch.cat([prompt_ids, torch.tensor([list(token_ids)])], dim=1)  # (1, p + t)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.float(), dim=-1)  # (1, p + t, vocab)
    p = prompt_ids.shape[1]
    return [float(logp[0, p - 1 + j, t]) for j, t in enumerate(token_ids)]


def test_sampling_returns_k_answers_with_logprobs(tiny_lm):
    prompts = [build_prompt(tiny_lm.tokenizer, q, PromptConfig()) for q in QUESTIONS[:2]]
    cfg = SamplingConfig(k=4, max_new_tokens=6, stop=("Question:",))
    out = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=4, seed=0)
    assert [len(x) for x in out] == [4, 4]
    for prompt, gens in zip(prompts, out):
        for g in gens:
            assert 0 < len(g.token_ids) == len(g.token_logprobs) <= 6
            assert g.text == tiny_lm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
            # each stored log-prob is the model's own (temperature-1) log-prob of the token it belongs to
            np.testing.assert_allclose(g.token_logprobs, manual_logprobs(tiny_lm, prompt, g.token_ids), atol=1e-4)
            assert g.seq_logprob == pytest.approx(np.mean(g.token_logprobs))
    again = generate_answers(tiny_lm, prompts, cfg, temperature=1.0, n=4, seed=0)
    assert [[g.text for g in x] for x in out] == [[g.text for g in x] for x in again], "seeded sampling is reproducible"
    texts = {g.text for x in out for g in x}
    assert len(texts) > 1, "temperature-1 samples of a random model should differ"


def test_an_answer_that_stops_at_once_carries_its_stop_tokens_logprob(tiny_llama_dir):
    """Farquhar et al.: when only a stop token was generated, its log-prob stands for the answer; an
    empty answer used to get log-prob 0.0 (probability 1) and dominate the likelihood-weighted scores."""
    lm = load_model(ModelSpec(name_or_path=str(tiny_llama_dir), device="cpu"))
    prompt = build_prompt(lm.tokenizer, QUESTIONS[0], PromptConfig())
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():  # make the stop token about as likely as all other tokens together
        out = lm.model(**lm.tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
        h, logits = out.hidden_states[-1][0, -1], out.logits[0, -1]  # (hidden,), (vocab,)
        others = torch.cat([logits[:eos], logits[eos + 1 :]])
        lm.model.lm_head.weight[eos] = h * torch.logsumexp(others, 0) / h.dot(h)
    p_stop = manual_logprobs(lm, prompt, [eos])[0]
    assert -1.0 < p_stop < -0.4
    gens = generate_answers(lm, [prompt], SamplingConfig(max_new_tokens=4, stop=()), temperature=1.0, n=16, seed=0)[0]
    empty = [g for g in gens if g.text == ""]
    assert 0 < len(empty) < len(gens)
    for g in empty:
        assert g.seq_logprob == pytest.approx(p_stop, abs=1e-4)
        assert g.token_ids == (eos,) and g.token_logprobs == pytest.approx((p_stop,), abs=1e-4)


def test_sampling_ignores_the_models_own_generation_config(tmp_path):
    """A checkpoint's generation_config.json (repetition penalty, suppressed or banned tokens, ...) must
    not reshape ka2l's samples: they are drawn from the distribution whose raw log-probs are stored."""
    from transformers import GenerationConfig

    from tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "lm")
    lm = load_model(ModelSpec(name_or_path=str(folder), device="cpu"))
    prompt = build_prompt(lm.tokenizer, QUESTIONS[1], PromptConfig())
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, p)
    greedy = []
    with torch.no_grad():  # the raw model's most likely continuation, one forward pass per token
        for _ in range(4):
            greedy.append(int(lm.model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], dim=1)
    assert not set(greedy) & set(lm.tokenizer.all_special_ids)

    own = GenerationConfig.from_pretrained(folder)
    own.update(do_sample=True, top_k=5, top_p=0.5, repetition_penalty=5.0, suppress_tokens=[greedy[0]], bad_words_ids=[[greedy[1]]],
               no_repeat_ngram_size=1, min_new_tokens=4)
    own.save_pretrained(folder)
    lm = load_model(ModelSpec(name_or_path=str(folder), device="cpu"))
    enc = lm.tokenizer(prompt, return_tensors="pt")
    constrained = lm.model.generate(**enc, max_new_tokens=4)[0, enc["input_ids"].shape[1] :].tolist()
    assert constrained[0] != greedy[0], "the checkpoint's own config does change what generate() picks"

    # a near-zero temperature turns sampling into the raw model's argmax, whatever the checkpoint says
    g = generate_answers(lm, [prompt], SamplingConfig(max_new_tokens=4, stop=()), temperature=1e-5, n=1, seed=0)[0][0]
    assert list(g.token_ids) == greedy
    assert lm.model.generation_config.repetition_penalty == 5.0, "the checkpoint's own config is put back"
    np.testing.assert_allclose(g.token_logprobs, manual_logprobs(lm, prompt, greedy), atol=1e-4)


def test_stop_strings_cut_answers(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok(" Paris.\nQuestion: what", add_special_tokens=False)["input_ids"]
    text, kept = _cut_at_stop(tok, ids, ("\n", "Question:"), set(tok.all_special_ids))
    assert text == "Paris."
    assert tok.decode(ids[:kept]).strip().startswith("Paris")
    lead = tok("\nRome\n", add_special_tokens=False)["input_ids"]
    assert _cut_at_stop(tok, lead, ("\n",), set())[0] == "Rome", "a leading newline is not an empty answer"
    eos = ids[:2] + [tok.eos_token_id] + ids[2:]
    assert _cut_at_stop(tok, eos, (), {tok.eos_token_id})[1] == 2
