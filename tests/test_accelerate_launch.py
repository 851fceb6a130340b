"""Fine-tuning under ``accelerate launch``: two CPU processes (DDP over gloo) train the tiny LoRA through the
real job and launcher, like one process with the same effective batch; they stop together on cancel and
resume; bad launcher settings and a failing launch are refused with the fix; the shipped accelerate configs
parse with accelerate's own loader."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from ka2l import jobs, launcher
from ka2l.config import FinetuneConfig, ModelSpec, to_dict
from ka2l.errors import ConfigError
from ka2l.finetune import launch as L
from ka2l.finetune.lora import finetune, folder_of, load_finetuned
from ka2l.finetune.trainer import checkpoints
from ka2l.models.llm import build_prompt, load_model
from ka2l.paths import PROJECT_ROOT
from ka2l.store import finetune as S
from ka2l.store.db import connect
from helpers import wait_for
from test_finetune import cfg, setup_pool, trained_steps, training_row

DDP = dict(launcher="accelerate", num_processes=2)


def curve(fid: int) -> tuple[list[dict], list[dict]]:
    with connect() as db:
        return S.log(db, fid, "train"), S.log(db, fid, "eval")


def rank_lines(fid: int) -> dict[int, str]:
    """rank -> the LoRA-weights checksum each worker logged when training ended."""
    text = (L.folder(fid) / "launch.log").read_text()
    return {int(r): digest for r, digest in re.findall(r"rank (\d+) of 2: \d+ steps, LoRA weights ([0-9a-f]+)", text)}


def test_two_cpu_processes_train_like_one_with_the_same_effective_batch(memo_model, capitals):
    setup_pool(memo_model, rows=capitals[40:52])  # capitals the memorising model does not know; 8 to train on, 4 held out
    common = dict(epochs=4.0, batch_size=2, eval_every=4, checkpoint_every=1000, lr=1e-2, eval_share=0.25)
    one = finetune("caps", cfg(grad_accum=2, **common))  # one process: 2 pairs x 2 accumulated = 4 a step
    job = jobs.submit("finetune", {"pool": "caps", "finetune": to_dict(cfg(grad_accum=1, **common, **DDP))})  # 2 x 2 processes
    wait_for(lambda: jobs.get(job)["status"] in ("done", "failed", "cancelled"), timeout=600)
    assert jobs.get(job)["status"] == "done", jobs.get(job)["error"]
    two = jobs.get(job)["result"]["finetune_id"]
    assert two != one
    with connect() as db:
        row1, row2 = S.get_finetune(db, one), S.get_finetune(db, two)
    steps = 4 * math.ceil(math.ceil(row1["n_train"] / 2) / 2)  # 4 epochs of batches of 4 (rounded up per process)
    assert row2["status"] == "done" and row2["n_train"] == row1["n_train"] and row2["total_steps"] == row1["total_steps"] == steps
    (train1, eval1), (train2, eval2) = curve(one), curve(two)
    # exactly one set of loss rows: a row per step, none from a second writer's own step count
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == list(range(1, steps + 1))
    assert [r["step"] for r in eval2] == [r["step"] for r in eval1] == list(range(0, steps + 1, 4))
    # the same curve: the two processes take the batches one process accumulates (the same pairs, as accelerate deals
    # one shuffled order out in turn), so DDP's averaged gradients give the same steps; a worker training alone, on
    # every pair or without the gradient sync would drift away
    assert train1[-1]["loss"] < 0.5 * train1[0]["loss"] and eval1[-1]["loss"] < eval1[0]["loss"] - 1.0, (train1, eval1)
    assert [r["loss"] for r in train2] == pytest.approx([r["loss"] for r in train1], rel=1e-2)
    assert [r["loss"] for r in eval2] == pytest.approx([r["loss"] for r in eval1], rel=1e-2)
    # both processes ran, and DDP kept their weights equal; the adapter was saved once, by rank 0, and loads
    ranks = rank_lines(two)
    assert sorted(ranks) == [0, 1] and ranks[0] == ranks[1], ranks
    adapter = folder_of(two) / "adapter"
    side = json.loads((adapter / "ka2l-finetune.json").read_text())
    assert side["world_size"] == 2 and side["config"]["num_processes"] == 2 and side["steps_trained"] == steps
    assert sorted(p.name for p in folder_of(two).iterdir()) == ["adapter", "launch"]  # no checkpoints or partial folders left
    tuned, prompt = load_finetuned(two, device="cpu")
    base = load_model(ModelSpec(name_or_path=str(memo_model), device="cpu"))
    ids = base.tokenizer(build_prompt(base.tokenizer, "What is the capital of Peru?", prompt), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids).logits, base.model(ids).logits, atol=1e-4)  # the adapter changed the model


def test_a_cancel_stops_both_workers_at_one_checkpoint_and_resume_continues_from_it(tiny_llama_dir):
    setup_pool(tiny_llama_dir)
    job = jobs.submit("finetune", {"pool": "caps", "finetune": to_dict(cfg(epochs=200.0, eval_every=50, checkpoint_every=1000,
                                                                             lr=1e-3, batch_size=2, **DDP))})
    wait_for(lambda: trained_steps() >= 3, timeout=600)
    assert training_row(job)["total"] == 400  # the workers' progress reached the job
    jobs.cancel(job, wait=True)
    wait_for(lambda: jobs.get(job)["status"] in ("cancelled", "failed"))
    assert jobs.get(job)["status"] == "cancelled", jobs.get(job)["error"]
    stops = dict(re.findall(r"rank (\d): INFO ka2l.finetune.launch: stopped: fine-tune 1 stopped at step (\d+)",
                            (L.folder(1) / "launch.log").read_text()))
    assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], stops  # both workers left through the stop, at one step
    with connect() as db:
        row = S.get_finetune(db, 1)
    saved = checkpoints(folder_of(1) / "checkpoints")
    stopped = int(saved[-1].name.split("-")[-1])
    assert row["status"] == "interrupted" and stopped >= 3 and row["step"] == stopped == int(stops["0"])
    assert {p.name for p in saved[-1].iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"}
    # resumed: both workers load the checkpoint (each its RNG state) and go on; cancelled again to keep the test short
    again = jobs.resume(job)
    wait_for(lambda: training_row(again)["done"] > stopped if _has_training(again) else False, timeout=600)
    assert training_row(again)["start_done"] == stopped  # continued from the checkpoint, did not start over
    jobs.cancel(again, wait=True)
    wait_for(lambda: jobs.get(again)["status"] in ("cancelled", "failed"))
    assert jobs.get(again)["status"] == "cancelled", jobs.get(again)["error"]
    with connect() as db:
        steps = [r["step"] for r in S.log(db, 1, "train")]
    assert steps == list(range(1, max(steps) + 1))  # one row a step across both launches


def _has_training(job: int) -> bool:
    return any(r["stage"] == "training" for p in jobs.get(job)["phases"] for r in p["rows"])


def test_a_failing_launch_shows_the_workers_log(tiny_llama_dir, monkeypatch):
    setup_pool(tiny_llama_dir)
    monkeypatch.setattr(launcher, "command", lambda module, ident, n, config, port: [sys.executable, "-c", "import sys; print('worker exploded: no GPU 7'); sys.exit(3)"])
    with pytest.raises(L.LaunchError, match=r"(?s)exit code 3.*worker exploded: no GPU 7.*resume the job"):
        finetune("caps", cfg(**DDP))
    with connect() as db:
        row = S.list_finetunes(db)[0]
    assert row["status"] == "failed" and "worker exploded" in row["error"]


CONFIGS = PROJECT_ROOT / "configs" / "accelerate"


def test_bad_launcher_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="launcher is 'none': set launcher to 'accelerate'"):
        FinetuneConfig(num_processes=2)
    with pytest.raises(ConfigError, match="does not exist.*configs/accelerate/"):
        L.check(FinetuneConfig(device="cpu", accelerate_config=str(tmp_path / "nope.yaml"), **DDP))
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [not, a, type\n")
    with pytest.raises(ConfigError, match="not a config accelerate can read"):
        L.check(FinetuneConfig(device="cpu", accelerate_config=str(bad), **DDP))
    with pytest.raises(ConfigError, match="FSDP config, which needs CUDA GPUs.*leave accelerate_config empty"):
        L.check(FinetuneConfig(device="cpu", accelerate_config=str(CONFIGS / "fsdp.yaml"), **DDP))
    with pytest.raises(ConfigError, match="needs 4 CUDA GPUs.*but 2 are visible"):
        L.check(FinetuneConfig(device="cuda", launcher="accelerate", num_processes=4), gpus=2)
    L.check(FinetuneConfig(device="cuda", launcher="accelerate", num_processes=2, accelerate_config=str(CONFIGS / "fsdp.yaml")), gpus=2)
    L.check(FinetuneConfig(device="cpu", **DDP))  # DDP on CPU needs nothing more


def test_shipped_accelerate_configs_parse_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    found = {p.name: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert set(found) == {"ddp.yaml", "fsdp.yaml", "deepspeed-zero3.yaml"}
    assert L.config_kind(str(CONFIGS / "ddp.yaml")) == "MULTI_GPU"
    fsdp = found["fsdp.yaml"]
    assert L.config_kind(str(CONFIGS / "fsdp.yaml")) == "FSDP"
    assert fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ds = found["deepspeed-zero3.yaml"]
    assert L.config_kind(str(CONFIGS / "deepspeed-zero3.yaml")) == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 3
    for p in CONFIGS.glob("*.yaml"):
        assert p.read_text().lstrip().startswith("#"), f"{p.name} says when to use it"
    cmd = launcher.command("ka2l.finetune.launch", 7, 4, str(CONFIGS / "fsdp.yaml"), 1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == ["-m", "ka2l.finetune.launch", "7"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--config_file") + 1].endswith("fsdp.yaml")
    plain = launcher.command("ka2l.finetune.launch", 7, 2, "", 1234)
    assert "--multi_gpu" in plain and "--config_file" not in plain and plain[plain.index("--main_process_port") + 1] == "1234"


def test_the_finetune_command_takes_the_launcher_flags():
    import argparse

    from ka2l.cli import finetune as F

    parser = argparse.ArgumentParser()
    F.add_commands(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--pool", "caps", "--launcher", "accelerate", "--num-processes", "4",
                              "--accelerate-config", "configs/accelerate/fsdp.yaml"])
    c = F.config_from_args(args)
    assert (c.launcher, c.num_processes, c.accelerate_config) == ("accelerate", 4, "configs/accelerate/fsdp.yaml")
    with pytest.raises(ConfigError, match="set launcher to 'accelerate'"):
        F.config_from_args(parser.parse_args(["finetune", "--pool", "caps", "--num-processes", "2"]))
