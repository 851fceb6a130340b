"""End to end with the real embedded model (SmolLM2-135M-Instruct from PyPI) on 32 demo questions,
through the command line, as a user runs it; then a few real LoRA steps on the same run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ka2l.models.embedded import LOCAL_NAME, ensure_embedded_model
from ka2l.paths import PROJECT_ROOT
from ka2l.store import queries as Q
from ka2l.store.db import connect


@pytest.fixture
def embedded_model(tmp_path_factory, monkeypatch):
    """The converted model from `make setup` (data/models) when present, else converted once here."""
    shared = PROJECT_ROOT / "data" / "models"
    if not (shared / LOCAL_NAME / "ka2l_source.json").is_file():
        shared = tmp_path_factory.getbasetemp() / "models"
        monkeypatch.setenv("KA2L_MODEL_CACHE", str(shared / "cache"))  # converted here, not into the user's ~/.cache
        ensure_embedded_model(shared)
    target = os.environ["KA2L_DATA_DIR"] + "/models"
    os.makedirs(target, exist_ok=True)
    os.symlink(shared / LOCAL_NAME, f"{target}/{LOCAL_NAME}")


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "ka2l", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_stage1_with_smollm2_through_the_cli(embedded_model, tmp_path):
    out = cli("import", "demo:capitals", "--limit", "32", "--name", "caps32", "--seed", "3")
    assert out.returncode == 0, out.stderr
    out = cli("probe", "--pool", "caps32", "--k", "6", "--max-new-tokens", "20", "-q")
    assert out.returncode == 0, out.stderr
    report = out.stdout
    assert "Known / unknown split (two-means" in report
    assert "accuracy of the low-temperature answer" in report
    assert "<- chosen" in report and "Baselines on the test split" in report
    with connect() as db:
        run = Q.list_runs(db)[0]
        scores = Q.load_scores(db, run["id"])
        answers = Q.load_answers(db, run["id"])
        probe = Q.list_probes(db, run["id"])[0]
        layers = Q.probe_layers(db, probe["id"])
    assert run["status"] == "done" and run["n_layers"] == 30 and run["hidden_size"] == 576
    assert len(layers) == 30
    assert len(scores) == 32 and all(len(a["sample"]) == 6 for a in answers.values())
    texts = [a["low"][0]["text"] for a in answers.values()]
    assert all(t and "\n" not in t for t in texts), "answers are cut at the first line"
    # SmolLM2 knows some capitals and not others: a real mix, and the SE signal agrees with correctness
    correct = [s["correct"] for s in scores]
    assert 0 < sum(correct) < 32
    se_right = sum(s["se"] for s in scores if s["correct"]) / sum(correct)
    se_wrong = sum(s["se"] for s in scores if not s["correct"]) / (32 - sum(correct))
    assert se_right < se_wrong
    out = cli("report", "--pool", "caps32", "--json")
    assert out.returncode == 0, out.stderr
    import json

    rep = json.loads(out.stdout)
    assert rep["probe"]["best_layer"] == probe["layer"] and rep["run"]["id"] == run["id"]
    # the pool has gold answers, so every baseline has a prediction rejection ratio (NaN only when the
    # few test answers are all right or all wrong)
    assert all(b["prr"] is not None and {"prr_lo", "prr_hi"} <= set(b) for b in rep["probe"]["baselines"])
    assert "PRR" in report
    few_lora_steps_on_the_run("caps32", tmp_path)


def answer_nll(lm, rows) -> float:
    """Mean negative log-likelihood of the answer tokens (``completion_mask``) given Stage 1's prompt."""
    import torch

    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])  # (1, tokens)
        mask = torch.tensor(r["completion_mask"][1:], dtype=torch.bool)  # (tokens - 1,) the predicted answer tokens
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (tokens - 1, vocab)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]  # (tokens - 1,)
        total, count = total - float(picked[mask].sum()), count + int(mask.sum())
    return total / count


def last_logits(lm, prompts):
    import torch

    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return lm.model(**enc).logits[:, -1].float().numpy()  # (prompts, vocab)


def few_lora_steps_on_the_run(pool: str, tmp_path) -> None:
    """Four real LoRA steps on SmolLM2 through ``finetune()`` (the run's model and prompt): the adapter exists,
    losses are finite and logged per step, the held-out loss is recorded, the tuned model answers the training
    pairs with a lower loss than the base and its logits differ; the base read from the GGUF file with the
    adapter merged in saves as a plain folder that reloads with the same logits."""
    import math
    from pathlib import Path

    import numpy as np

    from ka2l.config import FinetuneConfig, ModelSpec
    from ka2l.finetune.data import Pair
    from ka2l.finetune.export import save_merged
    from ka2l.finetune.lora import finetune, load_finetuned, load_tuned, run_model
    from ka2l.finetune.trainer import encode_pairs
    from ka2l.models.embedded import embedded_gguf
    from ka2l.models.llm import build_prompt, load_model
    from ka2l.store import finetune as S

    cfg = FinetuneConfig(source="gold", gold_set="all", device="cpu", dtype="float32", epochs=0.5, batch_size=4, grad_accum=1,
                         max_length=64, lr=2e-3, lr_scheduler="constant", eval_share=0.1, eval_every=2, patience=0, checkpoint_every=100)
    fid = finetune(pool, cfg)
    with connect() as db:
        row = S.get_finetune(db, fid)
        train_log, eval_log = S.log(db, fid, "train"), S.log(db, fid, "eval")
        train = [Pair(r["item_key"], r["question"], r["answer"], r["origin"]) for r in S.load_data(db, fid, "train")]
    steps = row["total_steps"]
    assert row["status"] == "done" and row["step"] == steps and 3 <= steps <= 4 and row["n_eval"] >= 1
    assert (Path(row["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in train_log] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] > 0 for r in train_log)
    assert all(r["tokens_per_s"] for r in train_log[1:])  # the first step has no interval before it
    assert [r["step"] for r in eval_log] == sorted({*range(0, steps + 1, 2), steps})  # before training, every 2 steps, at the end
    assert all(math.isfinite(r["loss"]) for r in eval_log) and row["best_eval_loss"] == min(r["loss"] for r in eval_log)

    spec, prompt = run_model(row["run_id"], cfg)
    base = load_model(spec)
    tuned, _ = load_finetuned(fid)
    rows = encode_pairs(base.tokenizer, train, prompt, cfg.max_length)
    before, after = answer_nll(base, rows), answer_nll(tuned, rows)
    assert after < before, f"four steps did not lower the training answers' loss: {before:.3f} -> {after:.3f}"
    prompts = [build_prompt(base.tokenizer, p.question, prompt) for p in train[:2]]
    tuned_logits = last_logits(tuned, prompts)
    assert np.abs(tuned_logits - last_logits(base, prompts)).max() > 1e-2, "the tuned model's logits equal the base's"

    # merged from the GGUF-loaded base: transformers' GGUF quantiser refuses save_pretrained; the export rebuilds it
    from_gguf = load_tuned(ModelSpec(name_or_path=str(embedded_gguf()), device="cpu", dtype="float32"), row["adapter_dir"])
    folder = save_merged(from_gguf, tmp_path / "merged")
    del from_gguf
    merged = load_model(ModelSpec(name_or_path=str(folder), device="cpu", dtype="float32"))
    np.testing.assert_allclose(last_logits(merged, prompts), tuned_logits, rtol=1e-3, atol=1e-3)


def test_gguf_file_loads_directly_and_matches_the_converted_copy(embedded_model):
    """A .gguf path goes through the same loader; the one-time conversion keeps the weights exactly."""
    import numpy as np

    from ka2l.config import EMBEDDED_MODEL, ModelSpec, PromptConfig
    from ka2l.models.embedded import embedded_gguf
    from ka2l.models.llm import build_prompt, extract_hidden_states, load_model

    gguf = load_model(ModelSpec(name_or_path=str(embedded_gguf()), device="cpu", dtype="float32"))
    plain = load_model(ModelSpec(name_or_path=EMBEDDED_MODEL, device="cpu", dtype="float32"))
    assert gguf.n_layers == plain.n_layers == 30 and gguf.hidden_size == 576
    prompts = [build_prompt(plain.tokenizer, q, PromptConfig()) for q in ("What is the capital of Peru?", "Who wrote Hamlet?")]
    assert prompts == [build_prompt(gguf.tokenizer, q, PromptConfig()) for q in ("What is the capital of Peru?", "Who wrote Hamlet?")]
    a = np.concatenate([s for _, s in extract_hidden_states(gguf, prompts)]).astype(np.float32)
    b = np.concatenate([s for _, s in extract_hidden_states(plain, prompts)]).astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_smollm2_soft_prefix_decoder_trains_and_its_states_find_paraphrases(embedded_model):
    """The offline default decoder: SmolLM2 reads the questions and, as backbone, learns from a soft
    prefix; its mean-pooled states place a paraphrase nearest to its original, and after a few steps
    the decoder gives back each training question from its own vector."""
    import numpy as np
    import torch

    from ka2l.augment.candidates import Similarity
    from ka2l.config import EMBEDDED_MODEL, ModelSpec, PromptConfig
    from ka2l.augment.train import encode_questions
    from ka2l.augment.decoder import HiddenStateDecoder, load_backbone
    from ka2l.models.llm import load_model

    lm = load_model(ModelSpec(name_or_path=EMBEDDED_MODEL, device="cpu"))
    pool = ["What is the capital of France?", "Who wrote Hamlet?", "What is the chemical symbol of gold?",
            "What is the capital of Japan?", "Which planet is closest to the sun?", "Who painted the Mona Lisa?"]
    mean, _ = encode_questions(lm, pool + ["What is the capital city of France?", "Who is the author of Hamlet?"], PromptConfig(), [14])
    vecs = mean[:, 0]
    nearest, _ = Similarity(vecs[:6]).nearest_pool(vecs[6:])
    assert list(nearest) == [0, 1], "paraphrases sit nearest to the questions they rephrase"

    backbone, tok, kind = load_backbone(EMBEDDED_MODEL)
    assert kind == "causal"
    torch.manual_seed(0)
    decoder = HiddenStateDecoder(backbone, tok, kind, lm.hidden_size, n_pseudo=16)
    decoder.fit_standardisation(vecs[:6])
    opt = torch.optim.AdamW(decoder.parameters(), lr=2e-4)
    decoder.train()
    losses = []
    for _ in range(16):  # exact reconstruction from about step 11 (lr 2e-4, seed 0)
        loss = decoder.loss(torch.as_tensor(vecs[:4]), pool[:4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.1, losses
    # The decoder reads the vector: greedy decoding of each vector gives back its own question
    # (a decoder that ignored its input would write one question for all four).
    out = decoder.eval().generate(vecs[:4], max_new_tokens=16)
    exact = sum(o == q for o, q in zip(out, pool[:4]))
    # exact on this machine from about step 11; one miss is left for other CPUs' float rounding
    assert exact >= 3 and len(set(out)) == 4, out
