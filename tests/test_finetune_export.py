"""Exports of a finished fine-tune on a tiny Llama: the adapter re-applied gives the tuned model's logits,
the merged folder loads as a plain model with the same logits, the LLaMA-Factory dataset holds exactly the
run's pairs and its yaml / command carry the run's settings; unfinished fine-tunes and non-empty folders
are refused."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from ka2l.cli.main import main
from ka2l.config import FinetuneConfig, ModelSpec, PromptConfig, from_dict
from ka2l.errors import ConfigError
from ka2l.finetune import export as X
from ka2l.finetune.lora import SIDECAR, load_finetuned, load_tuned
from ka2l.models.llm import build_prompt, load_model
from ka2l.store import finetune as S
from ka2l.store.db import connect
from helpers import data_dir, private_copy
from test_finetune import CAPS, cfg, setup_pool

QUESTIONS = [q for q, _ in CAPS[:3]]


@pytest.fixture(scope="module")
def tuned_store(tmp_path_factory, tiny_llama_dir):
    """One finished fine-tune of the tiny Llama on the capitals pairs (4 steps), stored once for the module."""
    from ka2l.finetune.lora import finetune

    folder = tmp_path_factory.mktemp("export-store")
    with data_dir(folder):
        setup_pool(tiny_llama_dir)
        fid = finetune("caps", cfg(epochs=2.0, eval_every=2, checkpoint_every=100))
    return folder, fid


@pytest.fixture
def tuned(tuned_store, tmp_path, monkeypatch) -> int:
    folder, fid = tuned_store
    private_copy(folder, tmp_path, monkeypatch)
    return fid


def logits(lm, questions=QUESTIONS):
    import torch

    prompts = [build_prompt(lm.tokenizer, q, PromptConfig()) for q in questions]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return lm.model(**enc).logits.float().numpy()  # (questions, tokens, vocab)


def spec_of(fid: int) -> ModelSpec:
    with connect() as db:
        row = S.get_finetune(db, fid)
    return from_dict(ModelSpec, json.loads((Path(row["adapter_dir"]) / SIDECAR).read_text())["model"])


def test_exported_adapter_reapplied_to_the_base_gives_the_tuned_logits(tuned, tmp_path):
    import numpy as np

    paths = X.export_adapter(tuned, tmp_path / "out")
    assert paths["folder"] == (tmp_path / "out").resolve()
    assert {p.name for p in paths["folder"].iterdir()} == set(X.ADAPTER_FILES)
    side = json.loads(paths["sidecar"].read_text())
    with connect() as db:
        row = S.get_finetune(db, tuned)
    assert side["dataset_hash"] == row["dataset_hash"] and side["config"] == row["config"] and side["finetune_id"] == tuned
    original, _ = load_finetuned(tuned, merge=False)
    again = load_tuned(spec_of(tuned), paths["folder"], merge=False)
    base = load_model(spec_of(tuned))
    np.testing.assert_array_equal(logits(again), logits(original))
    assert np.abs(logits(again) - logits(base)).max() > 1e-3, "the adapter changes nothing: the export is not the tuned model"


def test_merged_folder_loads_as_a_plain_model_with_the_tuned_logits(tuned, tmp_path):
    import numpy as np
    from transformers import AutoModelForCausalLM

    paths = X.export_adapter(tuned, tmp_path / "out", merge=True)
    merged = paths["merged"]
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists(), "the merged folder is a plain model, not an adapter"
    assert json.loads((merged / X.MERGED_SIDECAR).read_text())["finetune_id"] == tuned
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert type(plain).__name__ == "LlamaForCausalLM" and not hasattr(plain, "peft_config")
    through_ka2l = load_model(ModelSpec(name_or_path=str(merged), device="cpu"))
    unmerged = load_tuned(spec_of(tuned), paths["folder"], merge=False)  # base + adapter, not folded in
    base = load_model(spec_of(tuned))
    np.testing.assert_allclose(logits(through_ka2l), logits(unmerged), atol=1e-4, rtol=1e-4)
    assert np.abs(logits(through_ka2l) - logits(base)).max() > 1e-3, "the merged model is the base model"


def command_flags(script: str) -> dict[str, str]:
    """The ``--flag value`` pairs of the llamafactory-cli command in the written shell script."""
    text = "\n".join(line for line in script.splitlines() if not line.startswith("#")).replace("\\\n", " ")
    words = shlex.split(text)
    assert words[:2] == ["llamafactory-cli", "train"], words[:2]
    flags = words[2:]
    assert all(f.startswith("--") for f in flags[::2]) and len(flags) % 2 == 0, flags
    return {k[2:]: v for k, v in zip(flags[::2], flags[1::2])}


def test_dataset_export_holds_the_runs_pairs_and_its_settings(tuned, tmp_path, tiny_llama_dir):
    out = X.export_dataset(tuned, tmp_path / "lf")
    with connect() as db:
        train = S.load_data(db, tuned, "train")
        held = S.load_data(db, tuned, "eval")
        c = from_dict(FinetuneConfig, S.get_finetune(db, tuned)["config"])
    assert train and held and out["n_train"] == len(train) and out["n_eval"] == len(held)
    assert json.loads(out["train"].read_text()) == [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in train]
    assert json.loads(out["eval"].read_text()) == [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in held]
    info = json.loads(out["dataset_info"].read_text())
    assert {info[n]["file_name"] for n in out["names"].values()} == {out["train"].name, out["eval"].name}
    assert all(info[n]["formatting"] == "alpaca" for n in out["names"].values())

    args = yaml.safe_load(out["yaml"].read_text())
    assert args == out["arguments"]
    assert args["model_name_or_path"] == str(Path(tiny_llama_dir).resolve())
    assert (args["stage"], args["finetuning_type"], args["lora_target"], args["train_on_prompt"]) == ("sft", "lora", "all", False)
    assert (args["lora_rank"], args["lora_alpha"], args["lora_dropout"]) == (c.lora_r, c.lora_alpha, c.lora_dropout) == (16, 32.0, 0.0)
    assert (args["learning_rate"], args["num_train_epochs"], args["cutoff_len"]) == (c.lr, c.epochs, c.max_length)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (c.batch_size, c.grad_accum)
    assert (args["eval_steps"], args["save_steps"], args["seed"], args["warmup_ratio"]) == (c.eval_every, c.checkpoint_every, c.seed, c.warmup_ratio)
    assert args["lr_scheduler_type"] == "constant_with_warmup"  # ka2l's 'constant', as its trainer runs it
    assert (args["dataset"], args["eval_dataset"], args["dataset_dir"]) == (out["names"]["train"], out["names"]["eval"], str(out["folder"]))
    assert args["template"] == "chatml"  # the tiny Llama's chat template writes <|im_start|> turns
    assert "bf16" not in args and "fp16" not in args  # float32 on the CPU
    flags = command_flags(out["command_file"].read_text())
    assert flags == {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in args.items()}
    assert "patience" in out["unmapped"] and "patience" in out["yaml"].read_text()  # what does not map is said


def test_the_llamafactory_precision_is_the_one_training_used(tuned, tmp_path):
    """'auto' means bfloat16 on a GPU: the adapter's sidecar records what it resolved to, and the export asks for it."""
    from ka2l.finetune.lora import read_sidecar

    with connect() as db:
        side = read_sidecar(S.get_finetune(db, tuned)["adapter_dir"])
    assert (side["dtype"], side["device"]) == ("float32", "cpu")
    names = {"train": "t", "eval": "e"}
    gpu = {**side, "config": {**side["config"], "device": "auto", "dtype": "auto"}, "dtype": "bfloat16", "device": "cuda:0"}
    assert X.llamafactory_arguments(gpu, names, tmp_path).get("bf16") is True
    assert "bf16" not in X.llamafactory_arguments({**gpu, "dtype": "float32"}, names, tmp_path)
    old = {k: v for k, v in gpu.items() if k not in ("dtype", "device")}  # a sidecar written before the dtype was recorded
    assert "bf16" not in X.llamafactory_arguments(old, names, tmp_path)  # 'auto' read by the configured device: auto is not cuda


def test_an_unfinished_fine_tune_is_refused(tuned, tmp_path):
    with connect() as db:
        S.update_finetune(db, tuned, status="interrupted")
    for export in (X.export_adapter, X.export_dataset):
        with pytest.raises(ConfigError, match=rf"Fine-tune {tuned} is interrupted .*Finish it first"):
            export(tuned, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with connect() as db:
        S.update_finetune(db, tuned, status="done")
        adapter = Path(S.get_finetune(db, tuned)["adapter_dir"])
    (tmp_path / "moved").mkdir()
    (adapter / "adapter_model.safetensors").rename(tmp_path / "moved" / "adapter_model.safetensors")
    try:
        with pytest.raises(ConfigError, match="lacks adapter_model.safetensors"):
            X.export_adapter(tuned, tmp_path / "out")
    finally:
        (tmp_path / "moved" / "adapter_model.safetensors").rename(adapter / "adapter_model.safetensors")


def test_a_non_empty_folder_is_refused_unless_overwriting(tuned, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty.*--overwrite"):
        X.export_adapter(tuned, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(ConfigError, match="is not empty"):
        X.export_dataset(tuned, out)
    X.export_adapter(tuned, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == set(X.ADAPTER_FILES)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == [], "a temporary folder was left behind"


def test_cli_exports_adapter_and_dataset(tuned, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["finetune-export", "--finetune", str(tuned), "--out", str(out), "--dataset", "-q"]) == 0
    said = capsys.readouterr().out
    assert "llamafactory-cli train" in said and str(out.resolve()) in said
    assert set(X.ADAPTER_FILES) <= {p.name for p in out.iterdir()}
    assert (out / "llamafactory" / X.YAML_NAME).is_file() and (out / "llamafactory" / "dataset_info.json").is_file()
    assert main(["finetune-export", "--finetune", str(tuned), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["finetune-export", "--finetune", "99", "--out", str(tmp_path / "x")]) == 2
    assert "No fine-tune 99" in capsys.readouterr().err
