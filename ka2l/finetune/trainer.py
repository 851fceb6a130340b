"""TRL's SFTTrainer as ka2l's LoRA fine-tune uses it (``lora.train`` drives it): the pairs tokenised with a
completion mask (loss on the answer only), LoRA settings, checkpoints written whole or not at all, the step
count, and what every training process must do together (agree on stopping, save a sharded adapter).
Imports ``trl``, ``peft``, ``datasets`` and ``torch`` inside the functions that use them."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, PromptConfig
from ..errors import ConfigError
from ..models.llm import LoadedLM, build_prompt
from . import data as D

KEEP_CHECKPOINTS = 2
SCHEDULERS = {"constant": "constant_with_warmup"}  # ka2l's scheduler names -> transformers' (constant keeps the warm-up)


# -- tokenising ----------------------------------------------------------------------------------

def encode_pair(tokenizer, prompt: str, answer: str) -> dict[str, list[int]]:
    """``input_ids`` = prompt tokens (as Stage 1 encodes them) + answer tokens + EOS, and a ``completion_mask``
    that is 0 on the prompt, 1 on the answer and EOS. The two are tokenised apart, as at generation time."""
    bos = tokenizer.bos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    sep = "" if prompt.endswith((" ", "\n")) else " "  # a plain 'Answer:' prompt is continued after a space
    answer_ids = tokenizer(sep + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return {"input_ids": list(prompt_ids) + list(answer_ids), "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)}


def encode_pairs(tokenizer, pairs: Sequence[D.Pair], prompt: PromptConfig, max_length: int) -> list[dict[str, list[int]]]:
    """Every pair encoded; a prompt that leaves no room for its answer within ``max_length`` is refused."""
    rows = [encode_pair(tokenizer, build_prompt(tokenizer, p.question, prompt), p.answer) for p in pairs]
    long = [sum(1 for m in r["completion_mask"] if m == 0) for r in rows]
    over = [n for n in long if n >= max_length - 1]
    if over:
        raise ConfigError(f"{len(over)} of {len(rows)} prompts are {max(over)} tokens or longer, more than max_length = {max_length} "
                          f"leaves for an answer. Raise max_length to at least {max(over) + 32}, or shorten those questions.")
    return rows


# -- the trainer ---------------------------------------------------------------------------------

def trainer_class():
    from trl import SFTTrainer

    class AtomicSFTTrainer(SFTTrainer):
        """SFTTrainer whose checkpoints are written under ``.partial`` and renamed into place when complete."""

        _ka2l_partial: str | None = None
        _ka2l_before_commit: Any = None  # writes the loss rows up to this step before its checkpoint exists


        def _get_output_dir(self, trial):
            return self._ka2l_partial or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            # Several processes: rank 0 prepares the folder and renames it when every rank wrote its part (its RNG state).
            out = Path(self.args.output_dir)
            name = f"checkpoint-{self.state.global_step}"
            partial = out / ".partial"
            if self.args.should_save:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self._ka2l_partial = str(partial)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._ka2l_partial = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if self._ka2l_before_commit is not None:  # a kill after the rename must not lose the rows a resume skips
                    self._ka2l_before_commit()
                replace_dir(partial / name, out / name)
                shutil.rmtree(partial, ignore_errors=True)
                for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old, ignore_errors=True)

    return AtomicSFTTrainer


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst``: an existing ``dst`` is moved aside first and removed after."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def world_size(cfg: FinetuneConfig) -> int:
    """Training processes ``cfg`` asks for: ``num_processes`` under the accelerate launcher, else 1."""
    return cfg.num_processes if cfg.launcher == "accelerate" else 1


def total_steps(n_train: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps for ``cfg.epochs`` passes over ``n_train`` pairs; with several processes each step
    takes ``batch_size x grad_accum`` pairs on every process (accelerate deals the batches out in turn).

    >>> total_steps(10, FinetuneConfig(batch_size=4, grad_accum=2, epochs=3.0))
    6
    >>> total_steps(16, FinetuneConfig(batch_size=4, grad_accum=1, epochs=1.0, launcher="accelerate", num_processes=2))
    2
    """
    batches = math.ceil(math.ceil(n_train / cfg.batch_size) / world_size(cfg))  # per process
    per_epoch = math.ceil(batches / cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * per_epoch))


def make_trainer(lm: LoadedLM, train_rows: list[dict], eval_rows: list[dict], cfg: FinetuneConfig, output_dir: Path,
                 max_steps: int | None = None, callbacks: Sequence[Any] = (), eval_on_start: bool = True, device: str | None = None):
    """TRL's SFTTrainer over pre-tokenised rows (``encode_pairs``), LoRA as ``cfg`` says, completion-only loss.
    ``device`` is where training runs when the weights were loaded elsewhere (FSDP / ZeRO-3 workers load on
    the CPU and train on their GPU); default: the model's device."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    max_steps = max_steps or total_steps(len(train_rows), cfg)
    device = device or lm.device
    use_cpu = device == "cpu"
    bf16 = device.startswith("cuda") and next(lm.model.parameters()).dtype == torch.bfloat16
    sched = SCHEDULERS.get(cfg.lr_scheduler, cfg.lr_scheduler)
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
        lr_scheduler_type=sched, warmup_steps=int(round(cfg.warmup_ratio * max_steps)), logging_steps=1,
        eval_strategy="steps", eval_steps=cfg.eval_every, eval_on_start=eval_on_start, save_strategy="steps",
        save_steps=cfg.checkpoint_every, save_total_limit=None, seed=cfg.seed, report_to="none", completion_only_loss=True,
        max_length=cfg.max_length, use_cpu=use_cpu, bf16=bf16, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", packing=False, padding_free=False)
    targets = "all-linear" if "all-linear" in cfg.targets else list(cfg.targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM", bias="none")
    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback

    disable_progress_bar()  # the job reports progress; no bars in its log
    torch.manual_seed(cfg.seed)  # LoRA's initialisation
    lm.tokenizer.padding_side = "right"  # training pads right (TRL's collator does); generation sets left again
    try:
        trainer = trainer_class()(model=lm.model, args=args, train_dataset=Dataset.from_list(train_rows),
                                   eval_dataset=Dataset.from_list(eval_rows), processing_class=lm.tokenizer, peft_config=lora,
                                   callbacks=list(callbacks))
    except ValueError as exc:
        if "target modules" in str(exc).lower() or "target_modules" in str(exc):
            raise ConfigError(f"LoRA targets {list(cfg.targets)} match no module of this model ({exc}). Use 'all-linear'.") from exc
        raise
    trainer.remove_callback(PrinterCallback)  # losses go to the store, not stdout
    return trainer


# -- across processes ------------------------------------------------------------------------------

def any_rank(flag: bool, device: Any) -> bool:
    """``flag`` of this process, or'ed over every training process (an all-reduce), so that all of them stop at
    the same step: a process that stopped alone would leave the others waiting in their next gradient sync."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sharded(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def save_adapter(trainer, folder: Path) -> None:
    """The trainer's LoRA weights as a PEFT adapter folder (safetensors + adapter_config.json). Under FSDP or
    ZeRO-3 the weights are sharded, so every process takes part (``Trainer.save_model`` gathers them and rank 0
    writes); otherwise rank 0 saves its copy (DDP keeps every copy equal)."""
    if sharded(trainer):
        trainer.save_model(str(folder))
        if trainer.args.should_save:
            (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; the sidecar records the config
    elif trainer.args.should_save:
        trainer.model.save_pretrained(str(folder))
