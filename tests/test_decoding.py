"""Stage 2 backend: the hidden-state decoder on tiny backends of both kinds (loaded through ka2l's
loader), resumable training, generation with noise, the candidate filters and the review log."""

from __future__ import annotations

import dataclasses

import csv
import io
import json
import os

import numpy as np
import pytest
import torch

from ka2l.augment import review
from ka2l.augment.candidates import CandidateFilter, dedupe_key, generate_candidates, is_question, normalise, screen
from ka2l.config import DecoderConfig, FilterConfig, GenerateConfig, PromptConfig, config_hash
from ka2l.augment.train import decoder_key, encode_questions, train_decoder
from ka2l.augment.decoder import HiddenStateDecoder, load_backbone, load_decoder, perturb, save_decoder
from ka2l.errors import Cancelled, ConfigError
from ka2l.metrics import bleu
from ka2l.probing.stage1 import run_stage1
from ka2l.probing.probes import load_probe
from ka2l.store import queries as Q
from ka2l.store import augment as S
from ka2l.store.db import connect
from helpers import data_dir, import_pool, stage1_cfg
from tiny import save_tiny_t5

# -- the decoder itself ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def vectors(tiny_lm, capitals):
    texts = [q for q, _ in capitals[:40]]
    mean, _ = encode_questions(tiny_lm, texts, PromptConfig(), [tiny_lm.n_layers])
    return texts, mean[:, 0]


def _train(decoder, texts, vecs, steps=150, lr=3e-3):
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr)
    losses = []
    decoder.train()
    for step in range(steps):
        rows = np.random.default_rng(step).choice(len(texts), 8, replace=False)
        loss = decoder.loss(torch.as_tensor(vecs[rows]), [texts[i] for i in rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return decoder.eval(), losses


def _probe_by_hand(model_dir, probe_path, texts: list[str]) -> np.ndarray:
    """P(unknown) of each text as the saved probe gives it, from one unpadded forward pass per text through
    plain transformers: the last prompt token's state at the probe's layer (hidden_states[0] = embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ka2l.models.llm import build_prompt
    from ka2l.probing.probes import predict_unknown

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    net, meta = load_probe(probe_path)
    states = []
    for text in texts:
        prompt = build_prompt(tok, text, PromptConfig())
        enc = tok(prompt, return_tensors="pt", add_special_tokens=not (tok.bos_token and prompt.startswith(tok.bos_token)))
        with torch.no_grad():
            states.append(model(**enc, output_hidden_states=True).hidden_states[meta["layer"]][0, -1].numpy())
    return predict_unknown(net, np.stack(states))


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_decoder_learns_to_reconstruct_questions(kind, tiny_llama_dir, tiny_t5_dir, vectors, tmp_path):
    texts, vecs = vectors
    backbone, tok, found = load_backbone(str(tiny_llama_dir if kind == "causal" else tiny_t5_dir))
    assert found == kind
    torch.manual_seed(0)
    decoder = HiddenStateDecoder(backbone, tok, kind, vecs.shape[1], n_pseudo=16)
    decoder.fit_standardisation(vecs)
    before = bleu(decoder.generate(vecs[:16]), texts[:16])
    decoder, losses = _train(decoder, texts, vecs)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses[::15]
    after = bleu(decoder.generate(vecs[:16]), texts[:16])
    assert after > before + 20, (before, after)

    clean = decoder.generate(vecs[:8])
    assert decoder.generate(vecs[:8]) == clean, "greedy decoding of the same vectors is deterministic"
    noisy = decoder.generate(perturb(vecs[:8], 0.5, np.random.default_rng(0)))
    assert noisy != clean, "noise on the vectors changes what is decoded"
    sampled = decoder.generate(vecs[:8], temperature=1.0, seed=1)
    assert sampled != clean or decoder.generate(vecs[:8], temperature=1.0, seed=2) != clean

    save_decoder(decoder, tmp_path / "dec", {"layer": 2})
    again, meta = load_decoder(tmp_path / "dec")
    assert meta["kind"] == kind and meta["layer"] == 2
    assert again.generate(vecs[:8]) == clean, "a saved decoder decodes the same after loading"


def test_seq2seq_pseudo_tokens_go_through_the_encoder(tiny_t5_dir, vectors, tmp_path):
    """As vec2text and the authors' code do: the pseudo-tokens are the T5 encoder's inputs_embeds, not its outputs."""
    import json

    texts, vecs = vectors
    backbone, tok, kind = load_backbone(str(tiny_t5_dir))
    decoder = HiddenStateDecoder(backbone, tok, kind, vecs.shape[1], n_pseudo=16)
    decoder.fit_standardisation(vecs)
    fed = []
    hook = backbone.get_encoder().register_forward_hook(lambda m, args, kwargs, out: fed.append(kwargs.get("inputs_embeds")), with_kwargs=True)
    try:
        decoder.loss(torch.as_tensor(vecs[:4]), texts[:4]).backward()
        prefix = decoder.pseudo_tokens(torch.as_tensor(vecs[:4])).detach()
        assert len(fed) == 1 and fed[0] is not None and torch.allclose(fed[0].detach(), prefix), "training runs the encoder on the pseudo-tokens"
        encoder_grads = [p.grad for name, p in backbone.get_encoder().named_parameters() if "block" in name]
        assert encoder_grads and all(g is not None and float(g.abs().sum()) > 0 for g in encoder_grads), "the encoder is trained"
        fed.clear()
        decoder.eval().generate(vecs[:2])
        assert len(fed) == 1 and torch.allclose(fed[0], decoder.pseudo_tokens(torch.as_tensor(vecs[:2]))), "generation encodes once"
    finally:
        hook.remove()
    # a decoder saved before this change fed encoder outputs: loading it would decode garbage, so it is refused
    save_decoder(decoder, tmp_path / "dec", {"layer": 1})
    sidecar = json.loads((tmp_path / "dec" / "decoder.json").read_text())
    sidecar.pop("seq2seq_input")
    (tmp_path / "dec" / "decoder.json").write_text(json.dumps(sidecar))
    from ka2l.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="older ka2l.*Train it again"):
        load_decoder(tmp_path / "dec")


def test_perturb_scales_noise_to_the_vector_norm():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((200, 64)).astype(np.float32) * 10
    noisy = perturb(v, 0.2, np.random.default_rng(1))
    ratio = np.linalg.norm(noisy - v, axis=1) / np.linalg.norm(v, axis=1)
    assert abs(ratio.mean() - 0.2) < 0.02
    assert np.array_equal(perturb(v, 0.0, rng), v)


# -- filters -------------------------------------------------------------------------------------


def test_normalise_screen_and_keys():
    assert normalise("  question: what is   the capital of Chad ?  N'Djamena") == "What is the capital of Chad?"
    assert is_question("Name the capital of Chad") and not is_question("The capital of Chad.")
    cfg = FilterConfig(max_chars=60, min_words=3)
    assert screen("", cfg)[1] == "empty"
    assert screen("Chad?", cfg)[1] == "under 3 words"
    assert screen("What " + " ".join(f"w{i}" for i in range(30)) + "?", cfg)[1] == "over 60 characters"
    assert screen("What " + "very " * 20 + "long?", cfg)[1] == "repeats itself"
    assert screen("The capital of Chad is here.", cfg)[1] == "not a question"
    assert screen("The capital of Chad is here.", FilterConfig(require_question=False))[1] is None
    assert dedupe_key("What is the capital of Chad?") == dedupe_key("what is the CAPITAL of chad")


def test_decoder_loops_are_dropped_and_glued_fragments_cut_off():
    """Seen in decoded capitals candidates: a loop kept as a 'question', and fragments glued to the question word."""
    loop = "What interpreWhat whatWhatWhat What What whoWhatWhat is whatWhat is theWhatWhat isWhat isWhat is structuresWhat"
    assert screen(loop, FilterConfig())[1] == "repeats itself"
    assert screen(loop, FilterConfig(max_repeats=0))[1] is None, "0 turns the check off"
    assert screen("What isWhat is the capital of Peru?", FilterConfig())[1] is None, "twice is not a loop"
    assert screen("Where is Mississippi's capital, Jackson, Mississippi?", FilterConfig())[1] is None
    assert normalise("AustWhat is the capital of Saint Martin?") == "What is the capital of Saint Martin?"
    assert normalise("ÍWhat is the capital of the Maldives?") == "What is the capital of the Maldives?"
    assert normalise("What is the capital of Chad? Who knows") == "What is the capital of Chad?", "nothing glued: unchanged"
    assert normalise("Somehow Who wrote it?") == "Somehow Who wrote it?", "only a fragment glued to the question word goes"
    with pytest.raises(ConfigError, match="max_repeats"):
        FilterConfig(max_repeats=-1)


# -- training, generation and review on a stored Stage 1 run ---------------------------------------


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, memo_model, capitals):
    """A stored pool with a Stage 1 run (memorising tiny model) and a decoder trained on it."""
    folder = tmp_path_factory.mktemp("stage2")
    with data_dir(folder):
        pool_id = import_pool(capitals)
        run_id = run_stage1("caps", stage1_cfg(memo_model))
        with connect() as db:
            probe = Q.list_probes(db, run_id)[0]
        cfg = DecoderConfig(probe_id=probe["id"], backbone=str(memo_model), epochs=15, lr=3e-3, eval_size=16, device="cpu")
        decoder_id = train_decoder(cfg)
    return {"folder": folder, "pool_id": pool_id, "run_id": run_id, "probe": probe, "decoder_id": decoder_id, "cfg": cfg}


@pytest.fixture
def store(stage2, monkeypatch):
    monkeypatch.setenv("KA2L_DATA_DIR", str(stage2["folder"]))
    return stage2


def test_trained_decoder_is_stored_with_its_evidence(store):
    with connect() as db:
        d = S.get_decoder(db, store["decoder_id"])
        losses = S.losses(db, d["id"])
    assert d["status"] == "done" and d["step"] == d["total_steps"] == len(losses)
    assert d["layer"] == store["probe"]["layer"] and d["pooling"] == "mean"
    m = d["metrics"]
    assert m["n_heldout"] == 8 and m["n_train"] == 72
    assert m["after"]["train"]["bleu"] > m["before"]["train"]["bleu"] + 20, "reconstruction of training questions improves"
    from ka2l.augment.train import _heldout
    from ka2l.metrics import rouge_l

    with connect() as db:
        pool_q = [q["question"] for q in Q.pool_questions(db, store["pool_id"])]
    held = m["after"]["heldout"]
    assert [e["question"] for e in held["examples"]] == [pool_q[i] for i in _heldout(80, 0.1, 0)], "the held-out split is decoded"
    assert [e["question"] for e in m["before"]["heldout"]["examples"]] == [e["question"] for e in held["examples"]]
    assert held["n"] == len(held["examples"]) == 8
    hyps, refs = [e["decoded"] for e in held["examples"]], [e["question"] for e in held["examples"]]
    assert held["bleu"] == pytest.approx(bleu(hyps, refs)) and held["rouge_l"] == pytest.approx(rouge_l(hyps, refs)), "scores of what was decoded"
    meta = load_decoder(d["path"])[1]
    assert meta["config"]["backbone"] == store["cfg"].backbone and meta["layer"] == d["layer"] and "transformers" in meta["versions"]
    assert train_decoder(store["cfg"]) == d["id"], "the same config reuses the finished decoder"


class StopAt:
    """Progress that cancels once training reaches a step (as the job's cancel flag does)."""

    def __init__(self, step: int | None):
        self.step, self.done, self.stages = step, 0, []

    def stage(self, name, total=None, done=0):
        self.stages.append((name, total, done))
        self.done = done

    def advance(self, n=1, message=None):
        self.done += n
        if self.stages[-1][0] == "training" and self.step is not None and self.done >= self.step:
            raise Cancelled("stop")

    def close(self):
        pass


def test_cancelled_training_resumes_from_its_checkpoint(store):
    cfg = DecoderConfig(probe_id=store["probe"]["id"], backbone=store["cfg"].backbone, epochs=3, lr=3e-3, eval_size=4, seed=5, device="cpu")
    with pytest.raises(Cancelled):
        train_decoder(cfg, progress=StopAt(12))
    with connect() as db:
        d = S.find_decoder(db, decoder_key(cfg))
        assert d["status"] == "interrupted" and d["step"] == 12
    folder = store["folder"] / "decoders" / f"decoder-{d['id']}" / "checkpoint"
    assert (folder / "optimizer.pt").is_file() and (folder / "state.json").is_file()
    again = StopAt(None)
    assert train_decoder(cfg, progress=again) == d["id"]
    assert ("training", 27, 12) in again.stages, "training continued at step 12 of 27"
    assert not any(name == "question vectors" for name, *_ in again.stages), "cached vectors were reused"
    with connect() as db:
        d = S.get_decoder(db, d["id"])
        assert d["status"] == "done" and [r["step"] for r in S.losses(db, d["id"])] == list(range(1, 28))
    assert not folder.exists(), "the checkpoint is removed once the decoder is saved"


class FakeClock:
    """Seconds that pass only when work is charged to them (``costs`` per call of the wrapped steps)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Progress that records every stage and advance, with the fake time it happened at."""

    def __init__(self, clock):
        self.clock, self.stages, self.advances = clock, [], []

    def stage(self, name, total=None, done=0):
        self.stages.append((name, total, done))

    def advance(self, n=1, message=None):
        self.advances.append((self.stages[-1][0], n, self.clock()))

    def close(self):
        pass


@pytest.fixture
def charged(monkeypatch):
    """A fake clock that every costly step moves on: encoding 0.05 s a question, decoding 2 s a question,
    a training step 1 s, saving the decoder 3 s. The job's real work runs; only time is simulated."""
    import ka2l.augment.decoder as D
    import ka2l.augment.train as T

    clock = FakeClock()

    def charging(fn, cost):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock.now += cost(*args, **kwargs)
            return out
        return wrapped

    monkeypatch.setattr(T, "encode_questions", charging(T.encode_questions, lambda lm, texts, *a, **k: 0.05 * len(texts)))
    monkeypatch.setattr(D.HiddenStateDecoder, "generate", charging(D.HiddenStateDecoder.generate, lambda self, v, *a, **k: 2.0 * len(v)))
    monkeypatch.setattr(D.HiddenStateDecoder, "loss", charging(D.HiddenStateDecoder.loss, lambda *a, **k: 1.0))
    monkeypatch.setattr(D, "save_decoder", charging(D.save_decoder, lambda *a, **k: 3.0))
    return clock


def test_time_budget_bounds_the_whole_job(scratch, charged):
    """'Time budget 1 min' is the job's time: vectors, both reconstruction reports, training and saving.
    Unbounded, the two reports alone (2 x 24 questions at 2 s) would take 96 s."""
    cfg = DecoderConfig(probe_id=scratch["probe"]["id"], backbone=scratch["cfg"].backbone, epochs=50, lr=3e-3, eval_size=16, seed=21,
                        max_minutes=1.0, device="cpu")
    progress = Recorder(charged)
    start = charged.now
    decoder_id = train_decoder(cfg, progress=progress, clock=charged)
    assert charged.now - start <= 60.0, f"the job took {charged.now - start:.1f} s of a 60 s budget"
    with connect() as db:
        d = S.get_decoder(db, decoder_id)
    m = d["metrics"]
    assert d["status"] == "done" and m["stopped"] == "time budget" and m["job_seconds"] == pytest.approx(charged.now - start)
    assert 20 <= m["steps"] < 450, "most of the budget went to training, which stopped before its 50 epochs"
    for when in ("before", "after"):
        assert m[when]["heldout"]["n"] >= 1 and m[when]["train"]["n"] >= 1, "both reports kept held-out and training questions"
    assert [e["question"] for e in m["before"]["heldout"]["examples"]] == [e["question"] for e in m["after"]["heldout"]["examples"]]
    decoded = m["after"]["heldout"]["n"] + m["after"]["train"]["n"]
    assert 3 <= decoded < 24, "the reports were cut to fit"

    # every phase reports at its own grain: questions encoded, questions decoded, steps
    names = [name for name, *_ in progress.stages]
    assert names == ["question vectors", "baseline reconstruction", "training", "held-out reconstruction"]
    totals = {name: total for name, total, _ in progress.stages}
    assert totals["question vectors"] == 80 and totals["baseline reconstruction"] == 8 + 16, "8 held-out and 16 training questions"
    assert totals["held-out reconstruction"] == decoded, "the final report decodes what the baseline decoded"
    per = {name: [n for stage, n, _ in progress.advances if stage == name] for name in names}
    assert sum(per["question vectors"]) == 80 and len(per["question vectors"]) >= 2
    assert per["baseline reconstruction"][0] == 1 and sum(per["baseline reconstruction"]) == decoded, "the first question measures the rate"
    assert per["training"] == [1] * m["steps"]
    assert sum(per["held-out reconstruction"]) == decoded


def test_a_budget_too_small_for_the_vectors_fails_at_once_with_an_estimate(scratch, charged):
    cfg = DecoderConfig(probe_id=scratch["probe"]["id"], backbone=scratch["cfg"].backbone, epochs=5, seed=22, max_minutes=0.05, device="cpu")
    start = charged.now
    with pytest.raises(ConfigError, match=r"Encoding the 80 training questions would take about 4 s.*over half of the 3 s time budget"):
        train_decoder(cfg, progress=Recorder(charged), clock=charged)
    assert charged.now - start < 1.0, "it stopped after the first batch, not at the end"
    with connect() as db:
        failed = S.find_decoder(db, decoder_key(cfg))
    assert failed["status"] == "failed"
    # the advice works: a larger budget resumes that same decoder rather than starting a new one
    bigger = dataclasses.replace(cfg, max_minutes=60.0)
    assert decoder_key(bigger) == decoder_key(cfg) and config_hash(bigger) != config_hash(cfg)
    assert train_decoder(bigger, progress=Recorder(charged), clock=charged) == failed["id"]


def test_extra_corpus_adds_training_questions_only(store, capitals):
    from ka2l.pools.reader import PoolData, QuestionRow

    held = [q for q, _ in capitals[:80]]
    extra = PoolData(name="corpus", source="t", n_read=3, rows=[QuestionRow("0", "Which river flows through Cairo?"),
                                                               QuestionRow("1", "Who painted the Mona Lisa?"), QuestionRow("2", held[3])])
    with connect() as db:
        Q.insert_pool(db, extra)
    cfg = DecoderConfig(probe_id=store["probe"]["id"], backbone=store["cfg"].backbone, epochs=1, eval_size=0, extra_pools=("corpus",), device="cpu")
    with connect() as db:
        d = S.get_decoder(db, train_decoder(cfg))
    assert d["n_train"] == 72 + 2, "two new questions; the pool copy is not added twice"
    with pytest.raises(Exception, match="missing-corpus"):
        train_decoder(DecoderConfig(probe_id=store["probe"]["id"], extra_pools=("missing-corpus",)))


def test_generation_filters_and_reprobes_every_candidate(store):
    gen_id = generate_candidates(
        GenerateConfig(decoder_id=store["decoder_id"], per_question=3, noise=0.2, device="cpu"))
    with connect() as db:
        g = S.get_generation(db, gen_id)
        rows = S.candidates(db, store["pool_id"], status=None)
        pool_keys = {dedupe_key(q["question"]) for q in Q.pool_questions(db, store["pool_id"])}
        unknown = [r["question_id"] for r in Q.load_scores(db, store["run_id"]) if r["bise"] == 1]
    s = g["summary"]
    assert s["generated"] == 3 * len(unknown) == len(rows)
    assert {r["source_question_id"] for r in rows} == set(unknown)
    kept = [r for r in rows if r["status"] == "kept"]
    assert 0 < len(kept) == s["kept"] < len(rows)
    by_hand = _probe_by_hand(store["cfg"].backbone, store["probe"]["path"], [r["text"] for r in kept])
    assert [r["p_unknown"] for r in kept] == pytest.approx(by_hand, abs=1e-4), "re-probed: the probe on each candidate's own text"
    assert [r["flagged_known"] for r in kept] == [int(p < 0.5) for p in by_hand]
    assert all(r["nearest_question"] and -1 <= r["nearest_similarity"] <= 1 for r in kept)
    assert not {dedupe_key(r["text"]) for r in kept} & pool_keys, "no kept candidate copies a pool question"
    assert len({dedupe_key(r["text"]) for r in kept}) == len(kept), "no two kept candidates are the same question"
    assert all(r["drop_reason"] for r in rows if r["status"] == "dropped")
    assert s["unknown_share_of_kept"] == pytest.approx(np.mean(by_hand >= 0.5))
    with pytest.raises(ConfigError, match="curation set is empty"):
        generate_candidates(GenerateConfig(decoder_id=store["decoder_id"], source="curation"))


@pytest.fixture
def scratch(stage2, tmp_path, monkeypatch):
    """A copy of the Stage 2 store, for tests that add rows the other tests must not see."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(stage2["folder"], folder)
    monkeypatch.setenv("KA2L_DATA_DIR", str(folder))
    return {**stage2, "folder": folder}


def _kept_of(db, decoder_id: int) -> list[dict]:
    return list(db.query("SELECT c.text, c.vector FROM candidates c JOIN generations g ON g.id = c.generation_id "
                         "WHERE g.decoder_id = ? AND c.status = 'kept' ORDER BY c.id", [decoder_id]))


def test_candidates_are_compared_only_within_their_decoders_vector_space(scratch):
    """A pool's kept candidates come from decoders of different layers, poolings or models: their vectors
    are compared only with candidates of the same space (texts are compared whatever made them)."""
    from ka2l.augment.candidates import same_space_decoders
    from ka2l.config import ModelSpec, Stage1Config, to_dict

    a = scratch["decoder_id"]
    last = DecoderConfig(probe_id=scratch["probe"]["id"], backbone=scratch["cfg"].backbone, pooling="last", epochs=1, eval_size=0, device="cpu")
    b = train_decoder(last)
    generate_candidates(GenerateConfig(decoder_id=a, per_question=2, noise=0.2, seed=11, device="cpu"))
    generate_candidates(GenerateConfig(decoder_id=b, per_question=2, noise=0.2, seed=11, device="cpu"))
    with connect() as db:
        da, db_ = S.get_decoder(db, a), S.get_decoder(db, b)
        space_a, space_b = same_space_decoders(db, da), same_space_decoders(db, db_)
        assert a in space_a and b not in space_a and space_b == [b], "the last-token decoder's space is its own"
        assert all((d["layer"], d["pooling"]) == (da["layer"], "mean") for d in S.list_decoders(db, scratch["pool_id"]) if d["id"] in space_a)
        kept_a, kept_b = _kept_of(db, a), _kept_of(db, b)
        assert kept_a and kept_b
        vecs = S.kept_vectors(db, scratch["pool_id"], [a])
        assert [v.tobytes() for v in vecs] == [r["vector"] for r in kept_a], "exactly decoder a's kept vectors, in order"
        assert {r["text"] for r in kept_a + kept_b} <= set(S.kept_texts(db, scratch["pool_id"]))

        # a kept candidate from a decoder over another model (hidden size 32, not 64): comparing it crashed generation
        other = Q.create_run(db, scratch["pool_id"], "stage1", to_dict(Stage1Config(model=ModelSpec(name_or_path="another-model"))), "x",
                             "another-model", {})
        dec = S.create_decoder(db, {"probe_id": scratch["probe"]["id"], "run_id": other, "pool_id": scratch["pool_id"], "layer": 1,
                                    "pooling": "mean", "backbone": "another-model", "config": {}, "config_hash": "y", "status": "done"})
        gen, _ = S.start_generation(db, dec, scratch["pool_id"], {}, "z")
        source = Q.pool_questions(db, scratch["pool_id"])[50]["id"]
        S.insert_candidates(db, [{"generation_id": gen, "pool_id": scratch["pool_id"], "source_question_id": source, "sample": 0, "noise": 0.1,
                                  "raw_text": "Which river runs through the capital?", "text": "Which river runs through the capital?",
                                  "status": "kept", "vector": np.ones(32, np.float32)}])
        assert same_space_decoders(db, S.get_decoder(db, dec)) == [dec]
    gen_id = generate_candidates(GenerateConfig(decoder_id=a, per_question=2, noise=0.2, seed=12, device="cpu"))
    with connect() as db:
        assert S.get_generation(db, gen_id)["status"] == "done"


def filter_inputs(store):
    """What a CandidateFilter is built from, read back from the store: the pool's questions, the decoder row and
    its saved metadata, the probed model, the probe and the decoder's cached pool vectors."""
    from ka2l.config import ModelSpec
    from ka2l.models.llm import load_model

    with connect() as db:
        pool_q = Q.pool_questions(db, store["pool_id"])
        d = S.get_decoder(db, store["decoder_id"])
    _, meta = load_decoder(d["path"])
    net, pmeta = load_probe(store["probe"]["path"])
    vectors = np.load(store["folder"] / "decoders" / f"decoder-{d['id']}" / "vectors.npy")[: len(pool_q)]
    return pool_q, d, meta, load_model(ModelSpec(**meta["model"])), net, pmeta, vectors


def test_candidate_filter_drops_copies_and_non_questions(store, tiny_lm):
    pool_q, d, meta, lm, net, pmeta, vectors = filter_inputs(store)
    keep = CandidateFilter(FilterConfig(), pool_q, vectors, lm, PromptConfig(), d["layer"], pmeta["layer"], "mean", net, [], None,
                           corpus_texts=["Who painted the Mona Lisa?"])
    first = pool_q[0]["question"]  # "What is the capital of X?"
    variant = first.replace("What is the capital of", "Which river flows through the capital of")  # a new question
    texts = [first.upper(), variant, variant.lower().rstrip("?"), "Lagos.", "", "The answer is Paris and nothing else",
             "who painted the mona lisa"]
    rows = keep([pool_q[0]["id"], pool_q[1]["id"], pool_q[2]["id"]], texts, 3, 0.1)
    assert [r["drop_reason"] for r in rows] == ["same as a pool question", None, "same as another candidate", "under 3 words", "empty",
                                                "not a question", "same as an extra-corpus training question"]
    # the nearest pool question and its similarity: centred cosine of mean-pooled states at the decoder's layer
    mean, _ = encode_questions(lm, [variant], PromptConfig(), [d["layer"]])
    centred, pool_c = mean[0, 0] - vectors.mean(0), vectors - vectors.mean(0)
    sims = pool_c @ centred / (np.linalg.norm(pool_c, axis=1) * np.linalg.norm(centred))
    assert rows[1]["status"] == "kept" and rows[1]["nearest_question_id"] == pool_q[int(sims.argmax())]["id"]
    assert rows[1]["nearest_similarity"] == pytest.approx(sims.max(), abs=1e-5)
    assert rows[1]["p_unknown"] == pytest.approx(_probe_by_hand(meta["model"]["name_or_path"], store["probe"]["path"], [variant])[0], abs=1e-4)
    assert rows[1]["flagged_known"] == int(rows[1]["p_unknown"] < 0.5)
    assert [r["source_question_id"] for r in rows] == [pool_q[0]["id"]] * 3 + [pool_q[1]["id"]] * 3 + [pool_q[2]["id"]]
    strict = CandidateFilter(FilterConfig(similarity=0.0), pool_q, vectors, lm, PromptConfig(), d["layer"], pmeta["layer"], "mean", net, [], None)
    assert strict([pool_q[0]["id"]], [variant], 1, 0.1)[0]["drop_reason"].startswith("near-copy of a pool question")


def test_lexical_near_duplicates_are_dropped_beside_the_vector_check(store):
    """Vectors missed "Who wrote '1984'?" beside the pool's "Who wrote the novel '1984'?": a word check catches it."""
    from ka2l.augment.candidates import content_words, word_overlap

    assert content_words("Who wrote '1984'?") == {"who", "wrote", "1984"}
    assert word_overlap(content_words("Who wrote '1984'?"), content_words("Who wrote the novel '1984'?")) == 1.0
    same = ("Who is the first President of the United States?", "Who was the first president of the United States?")
    assert word_overlap(*map(content_words, same)) == 1.0
    second = content_words("Who was the second President of the United States?")
    assert word_overlap(second, content_words(same[0])) == 0.8, "one content word apart: another question"
    assert "not" in content_words("Which city is not Paris?"), "negation is meaning, not a function word"

    pool_q, d, meta, lm, net, pmeta, vectors = filter_inputs(store)

    def make(**cfg):
        return CandidateFilter(FilterConfig(similarity=1.0, **cfg), pool_q, vectors, lm, PromptConfig(), d["layer"], pmeta["layer"], "mean",
                               net, ["Who wrote the novel '1984'?"], None, corpus_texts=["Who painted the Mona Lisa?"])

    first = pool_q[0]["question"]  # "What is the capital of Algeria?"
    river = first.replace("What is the capital of", "Which river flows through the capital of")
    texts = [first.replace("capital of", "capital city of"), river, "Which river flows through " + first.split()[-1].rstrip("?") + "'s capital?",
             "Who painted Mona Lisa?", "Who wrote '1984'?", "What is the capital of Atlantis?"]
    rows = make()([pool_q[0]["id"]], texts, len(texts), 0.1)
    assert [r["drop_reason"] for r in rows] == [
        f"near-copy of a pool question (word overlap 1.00 with {first!r})", None,
        f"near-copy of another candidate (word overlap 1.00 with {river!r})",
        "near-copy of an extra-corpus training question (word overlap 1.00 with 'Who painted the Mona Lisa?')",
        "near-copy of another candidate (word overlap 1.00 with \"Who wrote the novel '1984'?\")", None]
    loose = make(word_overlap=0.6)([pool_q[0]["id"]], ["What is the capital of Atlantis?"], 1, 0.1)[0]
    assert loose["drop_reason"].startswith("near-copy of a pool question (word overlap 0.67 with 'What is the capital of"), loose
    with pytest.raises(ConfigError, match="word_overlap"):
        FilterConfig(word_overlap=0)


# -- review -----------------------------------------------------------------------------------------


def _candidate(candidate_id: int) -> dict:
    with connect() as db:  # a fresh connection each time: decisions are on disk at once
        return S.get_candidates(db, [candidate_id])[0]


def test_review_decisions_persist_edits_keep_the_original_and_undo(store):
    from ka2l.store import curation

    pool = store["pool_id"]
    queue = review.queue(pool)
    assert len(queue) >= 4
    a, b, c, d = (q["id"] for q in queue[:4])
    assert review.decide(pool, [a], "approved") == 1
    assert review.decide(pool, [b], "approved", edited_text="  What is the capital   of Atlantis? ") == 1
    assert review.decide(pool, [c], "rejected") == 1
    with connect() as db:  # a fresh connection: the decisions are on disk
        rows = {r["id"]: r for r in S.get_candidates(db, [a, b, c])}
    assert rows[a]["decision"] == "approved" and rows[a]["edited_text"] is None
    assert rows[b]["edited_text"] == "What is the capital of Atlantis?" and rows[b]["text"] == queue[1]["text"], "the decoder's text is kept"
    assert rows[c]["decision"] == "rejected"
    assert review.counts(pool)["approved"] == 2
    # the edit is re-probed: its P(unknown) and nearest pool question are those of the edited text
    atlantis = "What is the capital of Atlantis?"
    by_hand = _probe_by_hand(store["cfg"].backbone, store["probe"]["path"], [atlantis])[0]
    assert rows[b]["p_unknown"] == pytest.approx(by_hand, abs=1e-4) and rows[b]["flagged_known"] == int(by_hand < 0.5)
    assert rows[b]["decoded_p_unknown"] == queue[1]["p_unknown"] and rows[b]["p_unknown"] != queue[1]["p_unknown"]
    vectors = np.load(store["folder"] / "decoders" / f"decoder-{store['decoder_id']}" / "vectors.npy")[:80]
    with connect() as db:
        pool_q = Q.pool_questions(db, pool)
    from ka2l.config import ModelSpec
    from ka2l.models.llm import load_model

    mean, _ = encode_questions(load_model(ModelSpec(name_or_path=store["cfg"].backbone, device="cpu")), [atlantis], PromptConfig(),
                               [store["probe"]["layer"]])
    centred, pool_c = mean[0, 0] - vectors.mean(0), vectors - vectors.mean(0)
    sims = pool_c @ centred / (np.linalg.norm(pool_c, axis=1) * np.linalg.norm(centred))
    assert rows[b]["nearest_similarity"] == pytest.approx(sims.max(), abs=1e-5)
    assert rows[b]["nearest_question"] == pool_q[int(sims.argmax())]["question"]

    assert [r["candidate_id"] for r in review.undo(pool)] == [c]
    assert _candidate(c)["decision"] == "pending"
    review.decide(pool, [c, d], "rejected")  # a bulk decision is one undoable action
    assert len(review.last_action(pool)) == 2
    review.undo(pool)
    assert {_candidate(c)["decision"], _candidate(d)["decision"]} == {"pending"}
    review.undo(pool)  # now the edit is undone, and the candidate's values are the decoder's text's again
    assert _candidate(b)["decision"] == "pending" and _candidate(b)["edited_text"] is None
    assert _candidate(b)["p_unknown"] == queue[1]["p_unknown"] and _candidate(b)["nearest_similarity"] == queue[1]["nearest_similarity"]

    def not_again(candidate, text):
        raise AssertionError("this text was probed already")

    review.decide(pool, [b], "approved", edited_text="What is the capital of Atlantis?", reprobe=not_again)
    assert _candidate(b)["p_unknown"] == pytest.approx(by_hand, abs=1e-4)

    def failing(candidate, text):
        raise ConfigError("the probed model is gone")

    with pytest.raises(ConfigError, match="gone"):
        review.decide(pool, [d], "approved", edited_text="What is the capital of Lemuria?", reprobe=failing)
    assert _candidate(d)["decision"] == "pending" and _candidate(d)["edited_text"] is None, "a failed re-probe changes nothing"

    with pytest.raises(ConfigError, match="empty"):
        review.decide(pool, [b], "approved", edited_text="   ")
    with pytest.raises(ConfigError, match="not one of"):
        review.decide(pool, [b], "maybe")
    assert _candidate(b)["edited_text"] == "What is the capital of Atlantis?", "a refused edit changes nothing"

    with connect() as db:
        unknown_q = [r["question_id"] for r in Q.load_scores(db, store["run_id"]) if r["bise"] == 1][:3]
    curation.add(pool, unknown_q, source="test")
    approved = review.approved_set(pool)
    assert list(approved["kind"]) == ["original"] * 3 + ["decoded"] * 2
    decoded = approved[approved["kind"] == "decoded"].set_index("candidate_id")
    assert set(decoded["question"]) == {queue[0]["text"], atlantis}
    assert decoded.loc[b, "decoded_text"] == queue[1]["text"] and decoded.loc[b, "p_unknown"] == pytest.approx(by_hand, abs=1e-4)
    assert decoded.loc[a, "p_unknown"] == queue[0]["p_unknown"]
    ext = {q["id"]: q for q in pool_q}
    assert list(decoded["source_ext_id"]) == [ext[q["source_question_id"]]["ext_id"] for q in queue[:2]]
    originals = approved[approved["kind"] == "original"]
    assert list(originals["ext_id"]) == [ext[i]["ext_id"] for i in unknown_q], "originals keep their pool id"
    assert list(originals["answers"]) == [ext[i]["answers"] for i in unknown_q] and all(originals["answers"].map(len)), "and gold answers"

    from ka2l.pools.reader import parse_answers
    from ka2l.views.export import to_jsonl, to_safe_csv

    lines = [json.loads(line) for line in to_jsonl(approved).decode().splitlines()]
    assert [r["question_id"] for r in lines] == unknown_q + [None, None] and [r["candidate_id"] for r in lines[3:]] == [a, b]
    assert all(type(r["question_id"]) is int for r in lines[:3]) and lines[0]["answers"] == ext[unknown_q[0]]["answers"]
    table = list(csv.DictReader(io.StringIO(to_safe_csv(approved).decode())))
    assert [r["question_id"] for r in table] == [str(i) for i in unknown_q] + ["", ""], "ids are integers, not 44.0"
    assert parse_answers(table[0]["answers"]) == tuple(ext[unknown_q[0]]["answers"]), "gold answers read back by the pool reader"


def test_cli_lists_decoders_and_exports_the_approved_set(store, tmp_path, capsys):
    from ka2l.cli.main import main

    assert main(["decoders", "--pool", "caps"]) == 0
    assert f"decoder {store['decoder_id']}" in capsys.readouterr().out
    assert main(["approved", "--pool", "caps", "--out", str(tmp_path / "a.jsonl")]) == 0
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert main(["approved", "--pool", "caps", "--out", str(tmp_path / "a.txt")]) == 2
    assert "must end in .jsonl or .csv" in capsys.readouterr().err
    rows = [json.loads(line) for line in lines]
    assert {r["kind"] for r in rows} == {"original", "decoded"}
    assert all(type(r["candidate_id"]) is int and r["source_ext_id"] for r in rows if r["kind"] == "decoded"), "ids are integers"
    assert all(type(r["question_id"]) is int and r["ext_id"] and r["answers"] for r in rows if r["kind"] == "original")


def test_stage2_jobs_are_refused_at_once_when_what_they_need_is_missing(store):
    from ka2l import jobs
    from ka2l.errors import NotFound

    before = len(jobs.list_jobs())
    with pytest.raises(NotFound, match="No probe 999"):
        jobs.submit("decoder", {"decoder": {"probe_id": 999}})
    with pytest.raises(NotFound, match="no-such-corpus"):
        jobs.submit("decoder", {"decoder": {"probe_id": store["probe"]["id"], "extra_pools": ["no-such-corpus"]}})
    with pytest.raises(ConfigError, match="noise"):
        jobs.submit("generate", {"generate": {"decoder_id": store["decoder_id"], "noise": -1}})
    with pytest.raises(NotFound, match="No decoder 42"):
        jobs.submit("generate", {"generate": {"decoder_id": 42}})
    assert len(jobs.list_jobs()) == before, "nothing was queued"


# -- decoder training under accelerate launch ---------------------------------------------------------

DDP = dict(launcher="accelerate", num_processes=2)


def _rank_lines(decoder_id: int, folder) -> dict[int, tuple[int, int, str]]:
    """rank -> (steps, questions trained on, weights checksum) each worker logged when training ended."""
    import re

    text = (folder / "decoders" / f"decoder-{decoder_id}" / "launch" / "launch.log").read_text()
    found = re.findall(r"rank (\d+) of 2: (\d+) steps, (\d+) questions, weights ([0-9a-f]+)", text)
    return {int(r): (int(s), int(q), w) for r, s, q, w in found}


def test_two_cpu_processes_train_the_decoder_like_one(scratch):
    """Each worker takes half of every batch and DDP averages the gradients, so two processes take the steps one
    process takes: the same loss curve (each half weighted by its tokens), equal weights in
    both workers, and every training question seen once per epoch across them. A worker training alone (no
    sync) ends with other weights; one taking the whole batch sees every question twice."""
    one = DecoderConfig(probe_id=scratch["probe"]["id"], backbone=scratch["cfg"].backbone, epochs=2, batch_size=8, lr=3e-3,
                        eval_size=4, seed=7, device="cpu")
    first = train_decoder(one)
    progress = StopAt(None)
    second = train_decoder(dataclasses.replace(one, **DDP), progress=progress, resume=False)
    assert second != first
    with connect() as db:
        d1, d2 = S.get_decoder(db, first), S.get_decoder(db, second)
        loss1, loss2 = S.losses(db, first), S.losses(db, second)
    assert d2["status"] == "done" and d2["total_steps"] == d1["total_steps"] == 2 * 9 and d2["metrics"]["n_train"] == 72
    assert [r["step"] for r in loss2] == [r["step"] for r in loss1] == list(range(1, 19)), "one row per step: rank 0 alone writes"
    assert loss1[-1]["loss"] < 0.7 * loss1[0]["loss"], loss1
    # before the first update the weights are the same: only shares weighted by their tokens give the batch's loss
    # exactly (a plain mean of the two halves' means does not, when their token counts differ)
    assert loss2[0]["loss"] == pytest.approx(loss1[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in loss2] == pytest.approx([r["loss"] for r in loss1], rel=1e-2)
    ranks = _rank_lines(second, scratch["folder"])
    assert sorted(ranks) == [0, 1] and ranks[0][0] == ranks[1][0] == 18
    assert ranks[0][1] + ranks[1][1] == 2 * 72 and ranks[0][1] == ranks[1][1], ranks
    assert ranks[0][2] == ranks[1][2], "DDP kept both workers' weights equal"
    assert any(name == "training" for name, *_ in progress.stages), "the workers' progress reached the job"
    folder = scratch["folder"] / "decoders" / f"decoder-{second}"
    assert not (folder / "checkpoint").exists() and (folder / "model").is_dir()
    trained, meta = load_decoder(d2["path"])
    assert meta["metrics"]["steps"] == 18 and meta["config"]["num_processes"] == 2
    assert d2["metrics"]["after"]["train"]["bleu"] > d2["metrics"]["before"]["train"]["bleu"], "the final report decodes what the workers trained"


def test_a_cancelled_launch_stops_both_workers_at_one_checkpoint_and_resumes_from_it(scratch):
    cfg = DecoderConfig(probe_id=scratch["probe"]["id"], backbone=scratch["cfg"].backbone, epochs=6, batch_size=8, lr=3e-3,
                        eval_size=4, seed=8, device="cpu", **DDP)
    with pytest.raises(Cancelled):
        train_decoder(cfg, progress=StopAt(3))  # the job's cancel, seen when the workers' progress is relayed
    with connect() as db:
        d = S.find_decoder(db, decoder_key(cfg))
        steps = [r["step"] for r in S.losses(db, d["id"])]
    folder = scratch["folder"] / "decoders" / f"decoder-{d['id']}"
    state = json.loads((folder / "checkpoint" / "state.json").read_text())
    assert d["status"] == "interrupted" and 3 <= d["step"] < 54, d["step"]
    assert state["step"] == d["step"] and steps == list(range(1, d["step"] + 1)), "the checkpoint and the rows stop at one step"
    ranks = _rank_lines(d["id"], scratch["folder"])
    assert ranks[0][0] == ranks[1][0] == d["step"], "both workers stopped at the same step"
    again = StopAt(None)
    assert train_decoder(dataclasses.replace(cfg, launcher="none", num_processes=1), progress=again) == d["id"], "the same decoder, in one process"
    assert ("training", 54, d["step"]) in again.stages
    with connect() as db:
        assert S.get_decoder(db, d["id"])["status"] == "done"
        assert [r["step"] for r in S.losses(db, d["id"])] == list(range(1, 55)), "no step twice, none missing"


def test_decoder_launcher_settings_are_refused_before_anything_is_stored(scratch, capsys):
    from ka2l import jobs
    from ka2l.augment import launch as AL
    from ka2l.cli.main import main
    from ka2l.paths import PROJECT_ROOT

    fsdp = str(PROJECT_ROOT / "configs" / "accelerate" / "fsdp.yaml")
    with pytest.raises(ConfigError, match="launcher is 'none': set launcher to 'accelerate'"):
        DecoderConfig(num_processes=2)
    with pytest.raises(ConfigError, match="FSDP config, but a decoder trains with DDP only"):
        AL.check(DecoderConfig(device="cuda", accelerate_config=fsdp, **DDP), gpus=2)
    with pytest.raises(ConfigError, match="needs 4 CUDA GPUs.*but 2 are visible"):
        AL.check(DecoderConfig(device="cuda", launcher="accelerate", num_processes=4), gpus=2)
    AL.check(DecoderConfig(device="cpu", **DDP))
    before = len(jobs.list_jobs())
    with pytest.raises(ConfigError, match="DDP only"):
        jobs.submit("decoder", {"decoder": {"probe_id": scratch["probe"]["id"], "accelerate_config": fsdp, "device": "cpu", **DDP}})
    with pytest.raises(ConfigError, match="DDP only"):
        train_decoder(DecoderConfig(probe_id=scratch["probe"]["id"], accelerate_config=fsdp, device="cpu", **DDP))
    with connect() as db:
        assert S.find_decoder(db, decoder_key(DecoderConfig(probe_id=scratch["probe"]["id"], device="cpu"))) is None
    assert len(jobs.list_jobs()) == before
    capsys.readouterr()
    code = main(["decoder-train", "--probe", str(scratch["probe"]["id"]), "--device", "cpu", "--launcher", "accelerate",
                 "--num-processes", "2", "--accelerate-config", fsdp])  # the command's flags reach the config and its check
    assert code == 2 and "a decoder trains with DDP only" in capsys.readouterr().err
    assert decoder_key(DecoderConfig(probe_id=1, **DDP)) == decoder_key(DecoderConfig(probe_id=1)), "more processes resume the same decoder"
