"""The vLLM sampling backend (``--backend vllm``) against a stand-in engine that answers in vLLM's own
output types (vllm.outputs.RequestOutput / CompletionOutput, vllm.logprobs.Logprob, checked
vllm.SamplingParams). The wheel is installed without its CUDA engine (requirements-vllm-types.txt):
PyPI's vllm is a CUDA build and cannot run on these CPUs, so ``FakeVllm`` draws each request with the
tiny HF model through ka2l's own seeded sampler, one row per request, and returns what vLLM returns in
``logprobs_mode="raw_logprobs"``: the sampled tokens and their raw (temperature-1) log-probs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm.outputs", reason="vLLM's types are not installed: pip install --no-deps -r requirements-vllm-types.txt")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402

from ka2l.cli.main import build_parser, main  # noqa: E402
from ka2l.cli.probing import stage1_config  # noqa: E402
from ka2l.config import ModelSpec, SamplingConfig, to_dict  # noqa: E402
from ka2l.errors import ConfigError  # noqa: E402
from ka2l.models import vllm_backend  # noqa: E402
from ka2l.models.llm import _sample_tokens, _stop_token_ids, build_prompt, generate_answers  # noqa: E402
from ka2l.models.sampling import HfSampler, make_sampler  # noqa: E402
from ka2l.models.vllm_backend import LOGPROBS_MODE, VllmSampler, sample_seed  # noqa: E402
from ka2l.probing import runs, stage1  # noqa: E402
from ka2l.probing.probes import auroc, load_probe, predict_unknown  # noqa: E402
from ka2l.probing.runs import check_same_backend  # noqa: E402
from ka2l.probing.stage1 import run_stage1  # noqa: E402
from ka2l.store import queries as Q  # noqa: E402
from ka2l.store.db import connect  # noqa: E402
from ka2l.store.hidden import HiddenStates  # noqa: E402
from helpers import N_KNOWN, import_pool, stage1_cfg  # noqa: E402


class FakeVllm:
    """``vllm.LLM`` as the backend uses it: ``generate(prompts, sampling_params, use_tqdm=...)`` and
    ``llm_engine.model_config.max_model_len``. Each request is one row of ka2l's HF sampler seeded with the
    request's own seed (what vLLM's per-request generator does), stopped at the request's stop strings."""

    def __init__(self, lm, max_model_len: int = 4096):
        self.lm = lm
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        self.requests: list[tuple[list[int], SamplingParams]] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        outputs = []
        for r, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            assert isinstance(sp, SamplingParams) and sp.n == 1 and sp.logprobs == 0 and sp.seed is not None
            ids = list(prompt["prompt_token_ids"])
            assert len(ids) + sp.max_tokens <= self.llm_engine.model_config.max_model_len, "vLLM would reject this request"
            self.requests.append((ids, sp))
            enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            cfg = SamplingConfig(max_new_tokens=sp.max_tokens, top_p=sp.top_p, stop=tuple(sp.stop))
            with torch.no_grad():
                [(tokens, lps)] = _sample_tokens(self.lm, enc, cfg, sp.temperature, 1, [sp.seed])
            outputs.append(_request_output(self.lm.tokenizer, r, ids, tokens, lps, sp.stop))
        return outputs


def _request_output(tok, r: int, prompt_ids, tokens, lps, stops) -> RequestOutput:
    text = tok.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    text = text[: min(cuts)] if cuts else text  # vLLM drops the stop string from the text, not from token_ids
    logprobs = [{t: Logprob(logprob=lp, rank=None, decoded_token=tok.decode([t]))} for t, lp in zip(tokens, lps)]
    done = CompletionOutput(index=0, text=text, token_ids=list(tokens), cumulative_logprob=float(sum(lps)), logprobs=logprobs,
                            finish_reason="stop" if cuts else "length")
    return RequestOutput(request_id=str(r), prompt=None, prompt_token_ids=list(prompt_ids), prompt_logprobs=None, outputs=[done],
                         finished=True)


class Scripted:
    """An engine that answers every request with the same scripted tokens and log-probs."""

    def __init__(self, tok, tokens, lps):
        self.tok, self.tokens, self.lps = tok, tokens, lps
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        return [_request_output(self.tok, r, p["prompt_token_ids"], self.tokens, self.lps, sp.stop)
                for r, (p, sp) in enumerate(zip(prompts, sampling_params))]


@pytest.fixture
def use_fake(monkeypatch):
    """Make the backend's engine a FakeVllm over the given HF model (no GPU check: the fake needs none)."""
    made = []

    def install(lm, max_model_len=4096):
        monkeypatch.setattr(vllm_backend, "require_engine", lambda: None)
        monkeypatch.setattr(vllm_backend, "build_engine", lambda spec, cfg, dtype: made.append(FakeVllm(lm, max_model_len)) or made[-1])
        return made
    return install


def _prompts(lm, questions):
    return [build_prompt(lm.tokenizer, q, stage1_cfg(Path(".")).prompt) for q in questions]


def test_answers_are_the_hf_paths_for_the_same_draws(tiny_lm, use_fake):
    """Each vLLM answer is exactly the HF path's answer for its seed: text cut at the same stop, the same
    kept tokens, the raw log-probs and their mean (seq_logprob); seeds are one per question and sample."""
    made = use_fake(tiny_lm)
    cfg = SamplingConfig(k=3, max_new_tokens=8, backend="vllm")
    sampler = make_sampler(cfg, tiny_lm)
    assert isinstance(sampler, VllmSampler) and sampler.max_len == 4096
    prompts = _prompts(tiny_lm, ["What is the capital of France?", "Who wrote Hamlet?"])
    got = sampler.generate(prompts, 1.0, 3, [10, 12])
    engine = made[0]
    assert [sp.seed for _, sp in engine.requests] == [sample_seed(10, 0), sample_seed(10, 1), sample_seed(10, 2),
                                                      sample_seed(12, 0), sample_seed(12, 1), sample_seed(12, 2)]
    assert len({sp.seed for _, sp in engine.requests}) == 6
    sp = engine.requests[0][1]
    assert sp.stop == ["\n", "Question:"] and sp.max_tokens == 8 and sp.temperature == 1.0 and sp.top_p == 1.0
    assert set(sp.stop_token_ids) == _stop_token_ids(tiny_lm)
    hf_ids = tiny_lm.tokenizer(prompts[0], add_special_tokens=not prompts[0].startswith(tiny_lm.tokenizer.bos_token or "\0"))["input_ids"]
    assert engine.requests[0][0] == list(hf_ids)
    for j, p in enumerate(prompts):
        for i in range(3):
            [[hf]] = generate_answers(tiny_lm, [p], cfg, 1.0, 1, [sample_seed([10, 12][j], i)])
            assert got[j][i] == hf  # text, token ids and token log-probs
            assert got[j][i].seq_logprob == pytest.approx(hf.seq_logprob)
    texts = {g.text for answers in got for g in answers}
    assert len(texts) > 1, "six seeds draw more than one answer from the untrained tiny model"


def test_a_retried_batch_draws_the_same_answers(tiny_lm, use_fake):
    use_fake(tiny_lm)
    sampler = make_sampler(SamplingConfig(k=4, max_new_tokens=6, backend="vllm"), tiny_lm)
    prompts = _prompts(tiny_lm, ["Capital of Peru?", "Capital of Chad?", "Capital of Laos?"])
    first = sampler.generate(prompts, 1.0, 4, [2, 4, 6])
    again = sampler.generate([prompts[2], prompts[0]], 1.0, 4, [6, 2])  # another batch, other neighbours
    assert again == [first[2], first[0]]
    other = sampler.generate([prompts[0]], 1.0, 4, [3])
    assert other != [first[0]], "another seed draws other answers"


def test_answers_are_cut_at_stop_strings_and_tokens_as_in_the_hf_path(tiny_lm):
    tok = tiny_lm.tokenizer
    cfg = SamplingConfig(k=2, max_new_tokens=16, backend="vllm")
    answer = tok(" Paris", add_special_tokens=False)["input_ids"]
    ids = answer + tok("\nQuestion: next", add_special_tokens=False)["input_ids"]  # the answer's tokens end where the stop begins
    lps = [-0.1 * (t + 1) for t in range(len(ids))]
    sampler = VllmSampler.build(cfg, tiny_lm, tiny_lm.spec, engine=Scripted(tok, ids, lps))
    [[g]] = sampler.generate(["Q?"], 1.0, 1, [0])
    kept = len(answer)
    assert g.text == "Paris" and g.token_ids == tuple(ids[:kept]) and g.token_logprobs == tuple(lps[:kept])
    assert g.seq_logprob == pytest.approx(np.mean(lps[:kept]))
    eos = tok.eos_token_id  # stopped at once: the stop token stands for the empty answer
    sampler = VllmSampler.build(cfg, tiny_lm, tiny_lm.spec, engine=Scripted(tok, [eos], [-2.5]))
    [[g]] = sampler.generate(["Q?"], 1.0, 1, [0])
    assert (g.text, g.token_ids, g.token_logprobs) == ("", (eos,), (-2.5,))


def test_backend_refuses_what_it_cannot_run(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SamplingConfig(k=2, backend="vllm")
    with pytest.raises(ConfigError, match="vLLM's PyPI build needs an NVIDIA GPU; use --backend hf here"):
        make_sampler(cfg, tiny_lm)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="does not load GGUF"):
        make_sampler(cfg, model_spec=ModelSpec(name_or_path=str(gguf)))
    with pytest.raises(ConfigError, match="carries the adapter"):
        make_sampler(cfg, model_spec=ModelSpec(name_or_path=str(tmp_path), adapter=str(tmp_path)))
    assert isinstance(make_sampler(SamplingConfig(k=2), tiny_lm), HfSampler)


def test_engine_is_built_for_raw_logprobs_without_the_checkpoint_defaults(tiny_llama_dir, monkeypatch):
    """build_engine's arguments, with vllm.LLM replaced by a recorder (the real one needs CUDA)."""
    import vllm

    built = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (60 * 2**30, 80 * 2**30))
    # into the module's namespace: vllm.LLM is a lazy attribute whose import needs the engine's dependencies
    monkeypatch.setitem(vars(vllm), "LLM", lambda **kw: built.update(kw) or SimpleNamespace(llm_engine=SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=2048))))
    spec = ModelSpec(name_or_path=str(tiny_llama_dir), device="cpu")
    sampler = VllmSampler.build(SamplingConfig(k=2, seed=7, backend="vllm"), None, spec)  # tokenizer read from the folder
    assert built["model"] == built["tokenizer"] == str(tiny_llama_dir) and built["logprobs_mode"] == LOGPROBS_MODE == "raw_logprobs"
    assert built["generation_config"] == "vllm" and built["seed"] == 7 and built["dtype"] == "bfloat16"
    assert built["gpu_memory_utilization"] == pytest.approx(0.7)  # the free share, less 5%
    assert sampler.max_len == 2048 and sampler.tokenizer.eos_token_id in sampler.stop_ids
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2 * 2**30, 80 * 2**30))
    with pytest.raises(ConfigError, match="GPU memory are free"):
        VllmSampler.build(SamplingConfig(k=2, backend="vllm"), None, spec)


def test_over_long_prompts_are_left_out_with_their_reason(tiny_lm, use_fake):
    prompts = _prompts(tiny_lm, ["Short?", "Long " * 80 + "?"])
    limit = len(tiny_lm.tokenizer(prompts[0])["input_ids"]) + 8 + 2
    use_fake(tiny_lm, max_model_len=limit)
    sampler = make_sampler(SamplingConfig(k=2, max_new_tokens=8, backend="vllm"), tiny_lm)
    refused = sampler.refusals(prompts)
    assert list(refused) == [1] and f"exceeds the vLLM engine's max_model_len {limit}" in refused[1] and "max_new_tokens 8" in refused[1]
    with pytest.raises(ConfigError, match="cannot be answered by vLLM"):
        sampler.generate(prompts, 1.0, 2, [0, 2])
    assert len(sampler.generate(prompts[:1], 1.0, 2, [0])[0]) == 2


def test_stage1_with_vllm_end_to_end(memo_model, capitals, use_fake, monkeypatch, capsys):
    """Stage 1 with the vLLM backend on the memorising tiny model: hidden states from HF for every question,
    answers from the engine, an over-long question in the middle of the pool left out (named in the run's
    summary and the CLI's report) while the others reach SE, labels and probes, whose rows skip it."""
    long_q = "Which city is the capital of " + "the very long and winding " * 40 + "country?"
    known, unknown = capitals[:24], capitals[N_KNOWN : N_KNOWN + 24]  # memorised by memo_model / not
    import_pool(known + [(long_q, ["Nowhere"])] + unknown)
    cfg = stage1_cfg(memo_model)
    cfg = replace(cfg, sampling=replace(cfg.sampling, backend="vllm"))
    tok = AutoTokenizer.from_pretrained(memo_model)
    limit = max(len(tok(build_prompt(tok, q, cfg.prompt))["input_ids"]) for q, _ in known + unknown) + cfg.sampling.max_new_tokens + 4
    assert len(tok(build_prompt(tok, long_q, cfg.prompt))["input_ids"]) > limit + 50
    loaded = []
    real_load = stage1.load_model
    monkeypatch.setattr(stage1, "load_model", lambda spec, *a, **kw: loaded.append(spec) or real_load(spec, *a, **kw))
    made = []
    monkeypatch.setattr(vllm_backend, "require_engine", lambda: None)
    monkeypatch.setattr(vllm_backend, "build_engine",
                        lambda spec, c, dtype: made.append(FakeVllm(real_load(spec), max_model_len=limit)) or made[-1])
    run_id = run_stage1("caps", cfg)
    with connect() as db:
        run = Q.get_run(db, run_id)
        answers = Q.load_answers(db, run_id)
        scores = Q.load_scores(db, run_id)
        [probe] = Q.list_probes(db, run_id)
        qids = [q["id"] for q in Q.pool_questions(db, Q.get_pool(db, "caps")["id"])]
    assert run["status"] == "done" and run["config"]["sampling"]["backend"] == "vllm"
    assert len(made) == 1 and len(loaded) == 1, "one HF model for the hidden states, one engine for the answers"
    hidden = HiddenStates.open(run["hidden_path"])
    assert hidden.shape == (49, 4, 64) and np.isfinite(np.asarray(hidden[:, 1:])).all()  # every question, the long one too
    kept = qids[:24] + qids[25:]
    assert set(answers) == set(kept) and len(made[0].requests) == 48 * 7
    assert all(len(a["low"]) == 1 and len(a["sample"]) == 6 for a in answers.values())
    assert [s["question_id"] for s in scores] == kept
    se = np.array([s["se"] for s in scores])
    assert se[:24].mean() < se[24:].mean() - 0.5, "memorised questions must have lower SE"
    left = run["summary"]["left_out"]
    assert list(left) == [str(qids[24])] and f"exceeds the vLLM engine's max_model_len {limit}" in left[str(qids[24])]
    # the probe was trained on the answered questions' rows: its stored test AUROC is recomputed from them
    bise = np.array([s["bise"] for s in scores])
    test, layer = np.array(probe["metrics"]["split"]["test"]), probe["metrics"]["best_layer"]
    net, _ = load_probe(probe["path"])
    rows = np.asarray(hidden[:, layer])[[i for i, q in enumerate(qids) if q != qids[24]]]
    assert probe["metrics"]["test_auroc"] == pytest.approx(auroc(bise[test], predict_unknown(net, rows[test].astype(np.float32))))
    # a second run of the same config is the finished run; under hf it is another run, never this one resumed
    assert run_stage1("caps", cfg) == run_id
    with connect() as db:
        hf_id, state = runs.start_run(db, run["pool_id"], "stage1", replace(cfg, sampling=replace(cfg.sampling, backend="hf")),
                                         cfg.model.name_or_path, True, "float32")
    assert hf_id != run_id and state == "new"
    # the CLI's probe command prints the left-out question after the report
    monkeypatch.setattr(stage1, "run_stage1", lambda *a, **kw: run_id)
    capsys.readouterr()
    assert main(["probe", "--pool", "caps", "--model", str(memo_model), "--backend", "vllm", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 question(s) left out" in out and f"max_model_len {limit}" in out


def test_a_run_is_never_resumed_under_another_backend(memo_model, capitals, monkeypatch):
    import_pool(capitals[:4])
    vcfg = stage1_cfg(memo_model)
    vcfg = replace(vcfg, sampling=replace(vcfg.sampling, backend="vllm"))
    hcfg = replace(vcfg, sampling=replace(vcfg.sampling, backend="hf"))
    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
        vid, _ = runs.start_run(db, pool_id, "stage1", vcfg, "m", True, "float32")
        row = Q.get_run(db, vid)
        with pytest.raises(ConfigError, match=f"Run {vid} .*vllm backend; it cannot be resumed with --backend hf.*--backend vllm"):
            check_same_backend(row, hcfg)
        check_same_backend(row, vcfg)  # the same backend continues
        # whatever finds the run (here: a hash that ignores the backend), start_run refuses to continue it
        monkeypatch.setattr(runs, "run_hash", lambda cfg: row["config_hash"])
        with pytest.raises(ConfigError, match="cannot be resumed with --backend hf"):
            runs.start_run(db, pool_id, "stage1", hcfg, "m", True, "float32")
        assert runs.start_run(db, pool_id, "stage1", vcfg, "m", True, "float32") == (vid, "resumed")


def test_cli_backend_flag_and_no_gpu_message(capitals, monkeypatch, capsys):
    args = build_parser().parse_args(["probe", "--pool", "caps", "--backend", "vllm"])
    assert stage1_config(args).sampling.backend == "vllm"
    assert stage1_config(build_parser().parse_args(["probe", "--pool", "caps"])).sampling.backend == "hf"
    assert to_dict(stage1_config(args))["sampling"]["backend"] == "vllm"
    import_pool(capitals[:4])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stage1, "load_model", lambda *a, **kw: pytest.fail("no model may load before the GPU check"))
    capsys.readouterr()
    assert main(["probe", "--pool", "caps", "--backend", "vllm", "--model", "some/model", "--quiet"]) == 2
    assert "vLLM's PyPI build needs an NVIDIA GPU; use --backend hf here" in capsys.readouterr().err


def test_probe_page_submits_the_chosen_backend(capitals, monkeypatch):
    from ka2l import jobs
    from helpers import open_page, select_caps

    import_pool(capitals[:4])
    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda kind, config: submitted.append((kind, config)) or 7)
    at = select_caps(open_page("probe"))
    backend = next(s for s in at.selectbox if s.label == "Sampling backend")
    assert backend.value == "hf" and list(backend.options) == ["hf", "vllm"]
    backend.set_value("vllm")
    next(b for b in at.button if b.label == "Launch Stage 1").click().run()
    assert not at.exception and any("Job 7 submitted" in s.value for s in at.success)
    [(kind, config)] = submitted
    assert kind == "stage1" and config["stage1"]["sampling"]["backend"] == "vllm"
