"""The LoRA fine-tune on tiny models: it learns, its labels mask the prompt, it cancels, dies and resumes
from its checkpoint through the real job system, and a launch that cannot fit is refused."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import signal

import pytest

from ka2l import jobs
from ka2l.config import FinetuneConfig, ModelSpec, PromptConfig, SamplingConfig, to_dict
from ka2l.errors import ConfigError
from ka2l.finetune import preflight as P
from ka2l.finetune.data import Pair
from ka2l.finetune.lora import finetune, folder_of, load_finetuned
from ka2l.finetune.trainer import checkpoints, encode_pairs, make_trainer
from ka2l.models.llm import build_prompt, generate_answers, load_model
from ka2l.store import finetune as S
from ka2l.store.db import connect
from helpers import import_pool, wait_for
from test_finetune_data import stored_run

CAPS = [("What is the capital of France?", ["Paris"]), ("What is the capital of Italy?", ["Rome"]),
        ("What is the capital of Spain?", ["Madrid"]), ("Who wrote Hamlet?", ["William Shakespeare"]),
        ("What is the chemical symbol of gold?", ["Au"]), ("What is the capital of Peru?", ["Lima"]),
        ("What is the capital of Chile?", ["Santiago"]), ("What is the capital of Japan?", ["Tokyo"]),
        ("What is the capital of Egypt?", ["Cairo"]), ("What is the capital of Kenya?", ["Nairobi"])]


def setup_pool(model, rows=CAPS) -> int:
    return stored_run(model, import_pool(None, rows=rows))


def cfg(**kw) -> FinetuneConfig:
    base = dict(source="gold", gold_set="all", device="cpu", batch_size=4, grad_accum=1, max_length=96, eval_share=0.2,
                lora_r=16, lora_alpha=32.0, lr=1e-2, lr_scheduler="constant", patience=0)
    return FinetuneConfig(**{**base, **kw})


def test_labels_mask_every_prompt_token(tiny_llama_dir, tmp_path):
    lm = load_model(ModelSpec(name_or_path=str(tiny_llama_dir), device="cpu"))
    pairs = [Pair(f"q:{i}", q, a[0], "gold") for i, (q, a) in enumerate(CAPS[:4])]
    rows = encode_pairs(lm.tokenizer, pairs, PromptConfig(), 96)
    trainer = make_trainer(lm, rows, rows[:1], cfg(), tmp_path / "out", max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        row = by_ids[tuple(ids[:n])]
        k = row["completion_mask"].index(1)  # prompt length
        prompt = lm.tokenizer.decode(ids[:k])
        assert prompt in {build_prompt(lm.tokenizer, p.question, PromptConfig()) for p in pairs}  # Stage 1's own prompt
        assert all(label == -100 for label in labels[:k]), "a prompt token carries loss"
        assert labels[k:n] == ids[k:n] and ids[n - 1] == lm.tokenizer.eos_token_id  # the answer and EOS are learned
        assert all(label == -100 for label in labels[n:])  # padding carries none


def exact(lm, prompt, rows) -> float:
    prompts = [build_prompt(lm.tokenizer, q, prompt) for q, _ in rows]
    got = generate_answers(lm, prompts, SamplingConfig(max_new_tokens=8), temperature=0.1, n=1, seed=0)
    return sum(g[0].text.strip().rstrip(".") == a[0] for g, (_, a) in zip(got, rows)) / len(rows)


def test_a_tiny_llama_learns_memorised_pairs(memo_model, capitals):
    """The memorising model does not know capitals 40-51; after LoRA it answers its training ones."""
    setup_pool(memo_model, rows=capitals[40:52])
    fid = finetune("caps", cfg(epochs=60.0, eval_every=10, checkpoint_every=1000, lr=3e-3))
    with connect() as db:
        row = S.get_finetune(db, fid)
        evals = [r["loss"] for r in S.log(db, fid, "eval")]
        train_log = S.log(db, fid, "train")
        train = [(r["question"], [r["answer"]]) for r in S.load_data(db, fid, "train")]
    assert row["status"] == "done" and row["step"] == row["total_steps"] == len(train_log) and row["n_eval"] >= 1
    assert all(r["lr"] and r["tokens_per_s"] for r in train_log[1:])
    assert min(evals) < evals[0] - 0.5, f"held-out loss did not fall: {evals}"
    assert train_log[-1]["loss"] < 0.1 * train_log[0]["loss"]
    base = load_model(ModelSpec(name_or_path=str(memo_model), device="cpu"))
    tuned, prompt = load_finetuned(fid)
    assert (folder_of(fid) / "adapter" / "adapter_model.safetensors").is_file()
    before, after = exact(base, prompt, train), exact(tuned, prompt, train)
    assert before <= 0.2 and after >= 0.8, (before, after)
    # with early stopping on, training stops after `patience` evaluations without a lower held-out loss and keeps the best
    fid2 = finetune("caps", cfg(epochs=60.0, eval_every=10, checkpoint_every=1000, lr=3e-3, patience=2))
    with connect() as db:
        row2 = S.get_finetune(db, fid2)
        evals2 = S.log(db, fid2, "eval")
    best = min(evals2, key=lambda r: r["loss"])
    assert row2["stopped_early"] and row2["step"] < row2["total_steps"] and row2["best_eval_loss"] == best["loss"]
    side = json.loads((folder_of(fid2) / "adapter" / "ka2l-finetune.json").read_text())
    assert side["step"] == best["step"] and side["dataset_hash"] == row2["dataset_hash"] and side["config"]["patience"] == 2


def job_config(**kw) -> dict:
    return {"pool": "caps", "finetune": to_dict(cfg(epochs=100.0, eval_every=40, checkpoint_every=5, lr=1e-3, **kw))}


def trained_steps(fid=1) -> int:
    with connect() as db:
        return max((r["step"] for r in S.log(db, fid, "train")), default=0) if S.list_finetunes(db) else 0


def training_row(job_id: int) -> dict:
    return next(r for p in jobs.get(job_id)["phases"] for r in p["rows"] if r["stage"] == "training")


def test_cancel_mid_training_then_resume_continues_from_the_checkpoint(tiny_llama_dir):
    setup_pool(tiny_llama_dir)
    job_id = jobs.submit("finetune", job_config())
    wait_for(lambda: trained_steps() >= 12)
    jobs.cancel(job_id, wait=True)
    assert jobs.get(job_id)["status"] == "cancelled"
    with connect() as db:
        row = S.get_finetune(db, 1)
    saved = checkpoints(folder_of(1) / "checkpoints")
    stopped = int(saved[-1].name.split("-")[-1])
    assert row["status"] == "interrupted" and stopped >= 12 and row["step"] == stopped  # a checkpoint at the step it stopped
    again = jobs.resume(job_id)
    wait_for(lambda: jobs.get(again)["status"] in ("done", "failed"))
    assert jobs.get(again)["status"] == "done", jobs.get(again)["error"]
    assert training_row(again)["start_done"] == stopped  # continued, did not start over
    with connect() as db:
        row = S.get_finetune(db, 1)
        steps = [r["step"] for r in S.log(db, 1, "train")]
    assert row["status"] == "done" and steps == list(range(1, row["total_steps"] + 1))


def test_a_killed_worker_fails_and_resumes_from_its_last_checkpoint(tiny_llama_dir):
    setup_pool(tiny_llama_dir)
    job_id = jobs.submit("finetune", job_config())
    wait_for(lambda: trained_steps() >= 12)
    os.killpg(jobs.get(job_id)["pid"], signal.SIGKILL)
    wait_for(lambda: jobs.get(job_id)["status"] == "failed", timeout=30)
    saved = checkpoints(folder_of(1) / "checkpoints")
    last = int(saved[-1].name.split("-")[-1])
    assert last >= 10 and last % 5 == 0
    again = jobs.resume(job_id)
    wait_for(lambda: jobs.get(again)["status"] in ("done", "failed"))
    assert jobs.get(again)["status"] == "done", jobs.get(again)["error"]
    assert training_row(again)["start_done"] == last
    with connect() as db:
        row = S.get_finetune(db, 1)
        steps = [r["step"] for r in S.log(db, 1, "train")]
    assert row["status"] == "done" and steps == list(range(1, row["total_steps"] + 1))


# -- preflight ----------------------------------------------------------------------------------------

SHAPE = P.ModelShape(n_params=1000, hidden=4, layers=2, heads=2, vocab=10, linears=(("l.q_proj", 4, 4), ("l.up_proj", 4, 8)))


def test_preflight_estimate_on_numbers():
    c = FinetuneConfig(lora_r=2, batch_size=2, max_length=8)
    est = P.estimate(SHAPE, c, "float32")
    assert est.weights == 4000 and est.lora == 4 * (2 * 8 + 2 * 12) and est.optimizer == 12 * 40
    assert est.activations == 2 * 2 * 8 * (17 * 4 + 2.5 * 2 * 8) * 4 + 2 * 8 * 10 * 8
    assert est.total == int(1.1 * (4000 + 160 + 480 + est.activations + P.OVERHEAD))
    assert P.estimate(SHAPE, c, "bfloat16").weights == 2000
    assert P.lora_params(SHAPE, ("q_proj",), 2) == 16
    with pytest.raises(ConfigError, match="No linear layer matches.*q_proj, up_proj"):
        P.lora_params(SHAPE, ("k_proj",), 2)


def test_preflight_refuses_with_the_fix():
    c = FinetuneConfig(lora_r=2, batch_size=8, grad_accum=2, max_length=8)
    ok = P.verdict(SHAPE, c, "float32", available=10 * P.GIB, device="cpu")
    assert ok.fits and "It fits" in ok.message
    room = P.estimate(SHAPE, c, "float32", batch=3).total  # batch 3 fits exactly, 4 does not
    v = P.verdict(SHAPE, c, "float32", available=room, device="cpu")
    assert not v.fits and "lower batch_size to 3 and raise grad_accum to 6" in v.message
    tiny = P.verdict(SHAPE, c, "float32", available=1000, device="cpu")
    assert not tiny.fits and "use a smaller model or a device with more memory" in tiny.message


def test_preflight_counts_what_each_process_holds_under_the_launcher(tmp_path):
    """FSDP / ZeRO-3 split the weights over the processes, so a model too big for one GPU fits four; DDP workers on
    the CPU each hold a whole copy in the one RAM, so two need twice what one does."""
    big = P.ModelShape(n_params=10**9, hidden=4, layers=2, heads=2, vocab=10, linears=(("l.q_proj", 4, 4),))
    c = FinetuneConfig(lora_r=2, batch_size=1, grad_accum=1, max_length=8)
    one = P.estimate(big, c, "bfloat16")
    available = one.total // 2  # half of what one process needs
    alone = P.verdict(big, c, "bfloat16", available, "cuda")
    assert not alone.fits and "shard them over several GPUs" in alone.message
    fsdp = replace(c, launcher="accelerate", num_processes=4)
    layout = P.layout_of(fsdp, "cuda", "FSDP")
    sharded = P.verdict(big, fsdp, "bfloat16", available, "cuda", layout)
    assert sharded.fits and "sharded over 4 processes" in sharded.message
    assert sharded.estimate.weights == 10**9 * 2 // 4 and sharded.estimate.activations == one.activations
    assert P.verdict(big, fsdp, "bfloat16", available, "cuda", P.layout_of(fsdp, "cuda", "MULTI_GPU")).fits is False  # DDP: a whole copy per GPU
    ddp_cpu = replace(c, launcher="accelerate", num_processes=2)
    assert P.layout_of(ddp_cpu, "cpu") == P.Layout(2, shards=1, copies=2)
    # read from the config file: ZeRO-3 and FULL_SHARD split the weights; ZeRO-2 and SHARD_GRAD_OP keep them whole
    from ka2l.paths import PROJECT_ROOT

    configs = PROJECT_ROOT / "configs" / "accelerate"
    for name, shards in (("fsdp.yaml", 4), ("deepspeed-zero3.yaml", 4), ("ddp.yaml", 1)):
        assert P.layout_of(replace(fsdp, accelerate_config=str(configs / name)), "cuda").shards == shards, name
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text((configs / "deepspeed-zero3.yaml").read_text().replace("zero_stage: 3", "zero_stage: 2"))
    grad_op = tmp_path / "grad-op.yaml"
    grad_op.write_text((configs / "fsdp.yaml").read_text().replace("FULL_SHARD", "SHARD_GRAD_OP"))
    for whole in (zero2, grad_op):
        assert P.layout_of(replace(fsdp, accelerate_config=str(whole)), "cuda") == P.Layout(4, shards=1, copies=1), whole.name
    room = P.estimate(SHAPE, c, "float32").total
    assert P.verdict(SHAPE, c, "float32", room, "cpu").fits
    shared = P.verdict(SHAPE, ddp_cpu, "float32", room, "cpu", P.layout_of(ddp_cpu, "cpu"))
    assert not shared.fits and "x 2 processes sharing cpu" in shared.message and "use fewer processes than 2" in shared.message
    assert P.verdict(SHAPE, ddp_cpu, "float32", 2 * room, "cpu", P.layout_of(ddp_cpu, "cpu")).fits


def test_an_impossible_launch_is_refused_before_it_queues(tiny_llama_dir):
    setup_pool(tiny_llama_dir)
    huge = {"pool": "caps", "finetune": to_dict(cfg(batch_size=512, max_length=8192))}
    with pytest.raises(ConfigError, match=r"does not fit: lower batch_size to \d+ and raise grad_accum"):
        jobs.submit("finetune", huge)
    assert jobs.list_jobs() == []
    with pytest.raises(ConfigError, match="does not fit"):
        finetune("caps", cfg(), available=10**6)
    with connect() as db:
        assert S.list_finetunes(db) == []  # nothing stored for a refused launch


def test_a_stop_asked_for_after_the_last_step_keeps_the_finished_fine_tune_and_still_stops_the_caller(tiny_llama_dir, monkeypatch):
    """SIGTERM while the last evaluation or the save runs used to be swallowed (only a step's end read it), so an
    experiment went on to its next cell; now the finished fine-tune is stored and the caller is interrupted."""
    import ka2l.finetune.lora as L

    setup_pool(tiny_llama_dir)
    real = L.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        train = trainer.train

        def train_then_term(*a, **kw):
            out = train(*a, **kw)
            os.kill(os.getpid(), signal.SIGTERM)  # after every step's check, before the final save
            return out

        trainer.train = train_then_term
        return trainer

    monkeypatch.setattr(L, "make_trainer", make_trainer)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the handler of a CLI run is restored, not the default kill
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(AssertionError("the fine-tune's own handler was not installed")))
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune("caps", cfg(epochs=2.0, eval_every=100, checkpoint_every=100))
    finally:
        signal.signal(signal.SIGTERM, previous)
    with connect() as db:
        row = S.get_finetune(db, 1)
    assert row["status"] == "done" and row["adapter_dir"] and row["step"] == row["total_steps"]
    monkeypatch.setattr(L, "make_trainer", lambda *a, **k: pytest.fail("a finished fine-tune trained again"))
    assert finetune("caps", cfg(epochs=2.0, eval_every=100, checkpoint_every=100)) == 1
