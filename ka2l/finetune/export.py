"""What a finished fine-tune hands to the world outside ka2l: its adapter, the base model with the
adapter merged in, and its own training data with a LLaMA-Factory recipe that reproduces the run.

    export_adapter(id, out)              out/  adapter_model.safetensors, adapter_config.json and the sidecar
                                               (``lora.SIDECAR``: dataset hash, config, model, prompt, versions);
                                               ``PeftModel.from_pretrained(base, out)`` or ``lora.load_tuned`` applies it
    export_adapter(id, out, merge=True)  + out/merged/  the base model with the adapter folded in, as a plain
                                               transformers folder (safetensors, tokenizer, ``MERGED_SIDECAR``) that
                                               ``AutoModelForCausalLM.from_pretrained`` and ka2l's ``load_model`` read
    export_dataset(id, out)              out/  the fine-tune's train split and held-out split in LLaMA-Factory's alpaca
                                               format with their ``dataset_info.json`` entries (``annotate.dataset``'s
                                               writer), ``llamafactory_train.yaml`` and ``llamafactory_train.sh``
                                               (the same run as ``llamafactory-cli train`` flags)

Every export is written into a temporary folder beside ``out`` and renamed into place, so ``out`` is
complete or absent; a non-empty ``out`` is refused unless ``overwrite`` is given.

How ``FinetuneConfig`` maps onto LLaMA-Factory's arguments is in ``LLAMAFACTORY_FIELDS`` (mapped) and
``UNMAPPED`` (no LLaMA-Factory equivalent, with what to do instead); both are written into the export.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, ModelSpec, PromptConfig, from_dict
from ..errors import ConfigError, ModelLoadError
from ..models.llm import LoadedLM
from ..progress import NullProgress, Progress
from ..store import finetune as S
from ..store.db import connect
from . import lora
from .trainer import SCHEDULERS, replace_dir

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", lora.SIDECAR)
MERGED_DIR = "merged"
MERGED_SIDECAR = "ka2l-merged.json"
YAML_NAME = "llamafactory_train.yaml"
COMMAND_NAME = "llamafactory_train.sh"

# FinetuneConfig field -> the LLaMA-Factory argument(s) it sets
LLAMAFACTORY_FIELDS = {
    "lora_r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "targets": "lora_target",
    "epochs": "num_train_epochs", "lr": "learning_rate", "lr_scheduler": "lr_scheduler_type", "warmup_ratio": "warmup_ratio",
    "batch_size": "per_device_train_batch_size, per_device_eval_batch_size", "grad_accum": "gradient_accumulation_steps",
    "max_length": "cutoff_len", "eval_every": "eval_steps", "checkpoint_every": "save_steps", "seed": "seed",
    "dtype": "bf16 / fp16 (float32: neither)",
    "source, project, file, gold_set, run_id, eval_share, mix_known": "dataset / eval_dataset: the exported files hold "
    "the pairs these chose, already split (known pairs are in the train file)",
}
UNMAPPED = {
    "patience": "LLaMA-Factory has no early-stopping patience; it keeps the last adapter (ka2l with patience > 0 keeps the one "
                "with the lowest held-out loss). Set load_best_model_at_end: true and metric_for_best_model: eval_loss to keep the best.",
    "device": "LLaMA-Factory places the model itself (CUDA_VISIBLE_DEVICES, or accelerate / torchrun for several GPUs).",
    "prompt": "ka2l's prompt puts PromptConfig.instruction (and any few-shot pairs) before the question in the user turn; the "
              "alpaca file holds the bare question as 'instruction', so LLaMA-Factory's template wraps the question alone.",
    "loss": "Completion-only loss is LLaMA-Factory's default (train_on_prompt: false), so it needs no setting.",
}


# -- the fine-tune and the output folder ---------------------------------------------------------

def finished(finetune_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fine-tune's row and its adapter's sidecar; an unfinished fine-tune or a missing adapter file is refused."""
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
    if row["status"] != "done" or not row["adapter_dir"]:
        raise ConfigError(f"Fine-tune {finetune_id} is {row['status']} (step {row['step']} of {row['total_steps'] or '?'}), so it has no "
                          f"adapter to export yet. Finish it first (resume its job, or run `python -m ka2l finetune` again with the "
                          f"same settings), then export.")
    folder = Path(row["adapter_dir"])
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"Fine-tune {finetune_id}'s adapter folder {folder} lacks {', '.join(missing)}: the files were moved or "
                          f"deleted. Run the fine-tune again (a new config or data) to get a complete adapter.")
    return row, lora.read_sidecar(folder)


@contextmanager
def _staged(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that becomes ``out_dir`` when the block ends without error."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder to export into.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; give an empty or new folder, or allow overwriting it (--overwrite).")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ConfigError(f"Cannot write into {out.parent}: {exc.strerror}. Give a folder you can write to.") from exc
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is as readable as any folder
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the adapter and the merged model ------------------------------------------------------------

def export_adapter(finetune_id: int, out_dir: str | Path, merge: bool = False, overwrite: bool = False,
                   progress: Progress | None = None) -> dict[str, Path]:
    """Copy fine-tune ``finetune_id``'s adapter (safetensors, adapter config, sidecar) into ``out_dir``; with
    ``merge`` also write the base model with the adapter merged in under ``out_dir/merged``. Returns the paths
    written: ``folder``, ``adapter``, ``adapter_config``, ``sidecar`` (and ``merged``)."""
    progress = progress or NullProgress()
    row, side = finished(finetune_id)
    out = Path(out_dir).expanduser().resolve()
    progress.stage("copying adapter", total=len(ADAPTER_FILES) + int(merge))
    with _staged(out, overwrite) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(Path(row["adapter_dir"]) / name, tmp / name)
            progress.advance(1, name)
        if merge:
            progress.stage("merging adapter into the base model", total=1)
            spec = from_dict(ModelSpec, side["model"])
            tuned = lora.load_tuned(spec, row["adapter_dir"], merge=True)
            save_merged(tuned, tmp / MERGED_DIR, {"finetune_id": finetune_id, "base_model": side["model"],
                                                  "base_source": side.get("model_source"), "adapter": side})
            progress.advance(1)
    paths = {"folder": out, "adapter": out / ADAPTER_FILES[0], "adapter_config": out / ADAPTER_FILES[1], "sidecar": out / ADAPTER_FILES[2]}
    if merge:
        paths["merged"] = out / MERGED_DIR
    return paths


def save_merged(lm: LoadedLM, folder: str | Path, sidecar: dict[str, Any] | None = None) -> Path:
    """Save a tuned model (``lora.load_tuned``'s, merged or not) as a plain transformers folder: safetensors
    weights, config, generation config, tokenizer, and ``MERGED_SIDECAR``. A model read from a GGUF file
    carries transformers' GGUF quantiser, which refuses to save, though its weights are already plain
    floats: it is rebuilt without it first (as ``models.embedded`` converts the embedded model)."""
    folder = Path(folder)
    model = lm.model
    if hasattr(model, "merge_and_unload"):  # peft's wrapper: fold the adapter in
        model = model.merge_and_unload()
    model = _without_gguf_quantiser(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"Saving the merged model into {folder} wrote no safetensors file; transformers "
                             f"{_version('transformers')} saved another format. Report this with the folder's listing.")
    (folder / MERGED_SIDECAR).write_text(json.dumps({**(sidecar or {}), "source": lm.source, "dtype": str(model.dtype).removeprefix("torch."),
                                                     "versions": lora.versions()}, indent=1))
    return folder


def _without_gguf_quantiser(model):
    quantiser = getattr(model, "hf_quantizer", None)
    qc = getattr(model.config, "quantization_config", None)
    if quantiser is None and qc is None:
        return model
    method = str(getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else "")).lower()
    if not method.endswith("gguf"):
        raise ModelLoadError(f"The base model is quantised ({method or type(quantiser).__name__}), so the merged weights cannot be "
                             f"saved as a plain model. Export the adapter alone (without merge), or fine-tune an unquantised base.")
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())  # the GGUF weights were dequantised on load
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# -- the dataset and the LLaMA-Factory recipe ----------------------------------------------------

def export_dataset(finetune_id: int, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``finetune_id``'s own data (``finetune_data``: the train split, and the held-out split as a
    second file) in LLaMA-Factory's alpaca format with ``dataset_info.json``, plus ``llamafactory_train.yaml``
    and ``llamafactory_train.sh`` with the run's settings. Returns the paths, the dataset names, the
    ``arguments`` (the yaml's content), the ``command`` and the ``unmapped`` notes."""
    import pandas as pd

    from ..annotate.dataset import dataset_name, write_llamafactory

    row, side = finished(finetune_id)
    with connect() as db:
        data = S.load_data(db, finetune_id)
        pool = _pool_name(db, row["pool_id"])
    splits = {s: [r for r in data if r["split"] == s] for s in ("train", "eval")}
    name = dataset_name(f"{pool}_ft{finetune_id}")
    names = {"train": name, "eval": f"{name}_eval"}
    out = Path(out_dir).expanduser().resolve()
    with _staged(out, overwrite) as tmp:
        written = {}
        for split, rows in splits.items():
            frame = pd.DataFrame({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
            written[split] = write_llamafactory(frame, tmp, names[split])["data"]
        args = llamafactory_arguments(side, names, out, n_eval=len(splits["eval"]))
        _write_recipe(tmp, args, side)
    return {"folder": out, "train": out / written["train"].name, "eval": out / written["eval"].name,
            "dataset_info": out / "dataset_info.json", "yaml": out / YAML_NAME, "command_file": out / COMMAND_NAME,
            "names": names, "n_train": len(splits["train"]), "n_eval": len(splits["eval"]), "arguments": args,
            "command": command(args), "unmapped": dict(UNMAPPED)}


def _pool_name(db, pool_id: int) -> str:
    from ..store import queries as Q

    return str(Q.get_pool(db, pool_id)["name"])


def llamafactory_arguments(side: dict[str, Any], names: dict[str, str], dataset_dir: Path, n_eval: int = 1) -> dict[str, Any]:
    """LLaMA-Factory's training arguments for the run an adapter sidecar describes (``LLAMAFACTORY_FIELDS``)."""
    cfg = from_dict(FinetuneConfig, side["config"])
    spec = from_dict(ModelSpec, side["model"])
    prompt = from_dict(PromptConfig, side.get("prompt") or {})
    source = str(side.get("model_source") or spec.name_or_path)
    if Path(source).is_dir():
        source = str(Path(source).resolve())  # the embedded model's data-folder link -> the converted copy itself
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    args: dict[str, Any] = {"model_name_or_path": source}
    if spec.revision:
        args["model_revision"] = spec.revision
    args.update({
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all" if "all-linear" in cfg.targets else ",".join(cfg.targets),
        "lora_rank": cfg.lora_r, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout,
        "dataset_dir": str(dataset_dir), "dataset": names["train"], "template": template_for(side, prompt),
        "cutoff_len": cfg.max_length, "train_on_prompt": False, "overwrite_cache": True,
        "output_dir": f"saves/ka2l-finetune-{side.get('finetune_id', 'x')}", "logging_steps": 1, "save_steps": cfg.checkpoint_every,
        "plot_loss": True, "report_to": "none",
        "per_device_train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.lr, "num_train_epochs": cfg.epochs, "lr_scheduler_type": SCHEDULERS.get(cfg.lr_scheduler, cfg.lr_scheduler),
        "warmup_ratio": cfg.warmup_ratio, "seed": cfg.seed,
    })
    # what training used: the sidecar records the resolved dtype ('auto' on a GPU meant bfloat16); older sidecars
    # only have the config, and 'auto' is then read by the configured device
    dtype = side.get("dtype") or (cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cfg.device.startswith("cuda") else "float32"))
    if dtype == "bfloat16":
        args["bf16"] = True
    elif dtype == "float16":
        args["fp16"] = True
    if n_eval:
        args.update({"eval_dataset": names["eval"], "per_device_eval_batch_size": cfg.batch_size, "eval_strategy": "steps",
                     "eval_steps": cfg.eval_every})
    return args


def template_for(side: dict[str, Any], prompt: PromptConfig) -> str:
    """LLaMA-Factory's template closest to the prompt ka2l trained with: ``empty`` for a plain-text prompt,
    else the chat format the tokenizer's template writes (``chatml`` for ``<|im_start|>``, ``llama3`` for
    Llama 3's header tokens), ``default`` when it is none of these (check it against the model's own)."""
    if not prompt.chat_template:
        return "empty"
    folder = Path(side["model_source"]) if side.get("model_source") else None
    template = ""
    if folder is not None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif folder is not None and (folder / "tokenizer_config.json").is_file():
        found = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template") or ""
        template = found if isinstance(found, str) else json.dumps(found)  # a list of named templates
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return "default" if template else "empty"


def command(args: dict[str, Any], sep: str = " ") -> str:
    """The ``llamafactory-cli train`` command line with ``args`` as flags (equivalent to the yaml file)."""
    return sep.join(["llamafactory-cli train"] + [f"--{k} {shlex.quote(_flag(v))}" for k, v in args.items()])


def _flag(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _write_recipe(folder: Path, args: dict[str, Any], side: dict[str, Any]) -> None:
    import yaml

    head = [f"ka2l fine-tune {side.get('finetune_id')} as a LLaMA-Factory run (dataset {side.get('dataset_hash')}, "
            f"ka2l {side.get('versions', {}).get('ka2l', '?')}).",
            "Mapped from ka2l's FinetuneConfig:"]
    head += [f"  {k} -> {v}" for k, v in LLAMAFACTORY_FIELDS.items()]
    head += ["No LLaMA-Factory equivalent:"] + [f"  {k}: {v}" for k, v in UNMAPPED.items()]
    prompt = from_dict(PromptConfig, side.get("prompt") or {})
    head += [f"  ka2l's instruction line was: {prompt.instruction!r}" + (f", with {len(prompt.few_shot)} few-shot pairs" if prompt.few_shot else "")]
    head += [f"template: '{args['template']}' is the closest match to the prompt ka2l used; check it against the model's chat template."]
    comment = "".join(f"# {line}\n" for line in head)
    (folder / YAML_NAME).write_text(comment + "\n" + yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
    script = (f"#!/bin/sh\n{comment}\n# The same run from the yaml file:\n#   llamafactory-cli train {YAML_NAME}\n"
              + command(args, sep=" \\\n  ") + "\n")
    path = folder / COMMAND_NAME
    path.write_text(script, encoding="utf-8")
    os.chmod(path, 0o755)
