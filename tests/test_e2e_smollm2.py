"""End to end with the real embedded model (SmolLM2-135M-Instruct from PyPI) on 32 demo questions,
through the command line, as a user runs it."""

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


def test_stage1_with_smollm2_through_the_cli(embedded_model):
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
