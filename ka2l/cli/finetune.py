"""Stage 3b training commands of ``python -m ka2l``: launch a LoRA fine-tune, list fine-tunes, export one."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import FINETUNE_PRESETS, FINETUNE_SOURCES, GOLD_SETS, LR_SCHEDULERS, FinetuneConfig, from_dict, to_dict
from .parsing import add_command, add_launcher_flags, add_run_flags, submit_job

GROUP = "Stage 3: fine-tuning"

# flag -> FinetuneConfig field
OPTIONS = {"source": "source", "project": "project", "file": "file", "gold_set": "gold_set", "run": "run_id", "lora_r": "lora_r",
           "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "epochs": "epochs", "lr": "lr", "lr_scheduler": "lr_scheduler",
           "warmup_ratio": "warmup_ratio", "batch_size": "batch_size", "grad_accum": "grad_accum", "max_length": "max_length",
           "eval_share": "eval_share", "eval_every": "eval_every", "patience": "patience", "checkpoint_every": "checkpoint_every",
           "seed": "seed", "mix_known": "mix_known", "device": "device", "dtype": "dtype", "launcher": "launcher",
           "num_processes": "num_processes", "accelerate_config": "accelerate_config"}


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The preset (if any), then every flag given, validated."""
    values: dict[str, Any] = dict(FINETUNE_PRESETS[args.preset]) if args.preset else {}
    values.update({field: getattr(args, flag) for flag, field in OPTIONS.items() if getattr(args, flag) is not None})
    if args.targets:
        values["targets"] = tuple(args.targets)
    return from_dict(FinetuneConfig, values)


def format_finetune(row: dict[str, Any]) -> str:
    best = f"{row['best_eval_loss']:.4f}" if row["best_eval_loss"] is not None else "-"
    line = (f"fine-tune {row['id']}: {row['model']} · {row['data_source']} ({row['n_train']} train / {row['n_eval']} held out) · "
            f"{row['status']} · step {row['step']}/{row['total_steps'] or '?'} · best held-out loss {best}"
            + (" · stopped early" if row["stopped_early"] else ""))
    if row["adapter_dir"]:
        line += f"\n  adapter: {row['adapter_dir']}"
    if row["error"]:
        line += f"\n  error: {row['error']}"
    return line


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..finetune.lora import check_launch, finetune
    from ..progress import TqdmProgress
    from ..store import finetune as S
    from ..store.db import connect

    cfg = config_from_args(args)
    if args.background:
        return submit_job("finetune", {"pool": args.pool, "finetune": to_dict(cfg)}, "the app's Fine-tune or Jobs page,")
    ds, verdict = check_launch(args.pool, cfg)
    if not args.quiet:
        print(f"{len(ds.train)} training pairs ({ds.notes['n_known']} known), {len(ds.eval)} held out; dataset {ds.hash}")
        print(verdict.message)
    finetune_id = finetune(args.pool, cfg, progress=TqdmProgress(disable=args.quiet))
    with connect() as db:
        print(format_finetune(S.get_finetune(db, finetune_id)))
    return 0


def _cmd_finetunes(args: argparse.Namespace) -> int:
    from ..store import finetune as S
    from ..store import queries as Q
    from ..store.db import connect

    with connect() as db:
        pool_id = Q.get_pool(db, args.pool)["id"] if args.pool else None
        rows = S.list_finetunes(db, pool_id)
    if not rows:
        print("no fine-tunes yet: launch one with `python -m ka2l finetune --pool POOL`")
    for row in rows:
        print(format_finetune(row))
    return 0


def _cmd_finetune_export(args: argparse.Namespace) -> int:
    from ..finetune.export import export_adapter, export_dataset
    from ..progress import TqdmProgress

    paths = export_adapter(args.finetune, args.out, merge=args.merge, overwrite=args.overwrite, progress=TqdmProgress(disable=args.quiet))
    print(f"adapter of fine-tune {args.finetune}: {paths['folder']} (adapter_model.safetensors, adapter_config.json, sidecar)")
    if args.merge:
        print(f"merged model: {paths['merged']} (loads with AutoModelForCausalLM.from_pretrained or --model {paths['merged']})")
    if args.dataset:
        ds = export_dataset(args.finetune, paths["folder"] / "llamafactory")
        print(f"LLaMA-Factory dataset: {ds['folder']} ({ds['n_train']} train pairs in {ds['train'].name}, {ds['n_eval']} held out "
              f"in {ds['eval'].name}, dataset_info.json)")
        print(f"reproduce the run: llamafactory-cli train {ds['yaml']}   (or {ds['command_file']})")
    return 0


def add_commands(sub) -> None:
    d = FinetuneConfig()
    p = add_command(sub, GROUP, "finetune", "Stage 3b: LoRA fine-tune a Stage 1 run's model on answered questions (resumable)")
    p.add_argument("--pool", required=True, help="pool name or id")
    p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), help="start from a preset: cpu-small, or gpu-paper (the paper's values); flags override it")
    p.add_argument("--source", choices=FINETUNE_SOURCES, help=f"where the pairs come from (default {d.source})")
    p.add_argument("--project", type=int, help="ka2l's Label Studio project id (default: the pool's newest)")
    p.add_argument("--file", help="a .csv or .jsonl with question and answer columns (with --source file)")
    p.add_argument("--gold-set", choices=GOLD_SETS, help=f"questions the gold source uses (default {d.gold_set})")
    p.add_argument("--run", type=int, help="Stage 1 run whose model is tuned (default: the pool's newest finished run)")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, help=f"LoRA dropout (default {d.lora_dropout:g})")
    p.add_argument("--targets", nargs="+", help="modules that get LoRA (default all-linear)")
    p.add_argument("--epochs", type=float, help=f"passes over the training pairs (default {d.epochs:g})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, help=f"schedule (default {d.lr_scheduler})")
    p.add_argument("--warmup-ratio", type=float, help="share of steps warming up (default 0)")
    p.add_argument("--batch-size", type=int, help=f"pairs per forward pass (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"forward passes per optimizer step (default {d.grad_accum})")
    p.add_argument("--max-length", type=int, help=f"longest prompt + answer in tokens (default {d.max_length})")
    p.add_argument("--eval-share", type=float, help=f"share of pairs held out (default {d.eval_share:g})")
    p.add_argument("--eval-every", type=int, help=f"held-out loss every N steps (default {d.eval_every})")
    p.add_argument("--patience", type=int, help=f"early stopping after N evaluations without improvement, 0 = off (default {d.patience})")
    p.add_argument("--checkpoint-every", type=int, help=f"checkpoint every N steps (default {d.checkpoint_every})")
    p.add_argument("--seed", type=int, help="seed for split, mix, initialisation and order (default 0)")
    p.add_argument("--mix-known", type=int, help="mix in k known questions with the model's own answers (default 0 = off)")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", help="auto, float32, float16, bfloat16")
    add_launcher_flags(p, "the fine-tune runs", "effective batch = batch size x grad accum x processes",
                       ", e.g. configs/accelerate/fsdp.yaml or deepspeed-zero3.yaml for models too large for one GPU")
    add_run_flags(p)
    p.set_defaults(func=_cmd_finetune)

    p = add_command(sub, GROUP, "finetunes", "list fine-tunes with their status, steps and best held-out loss")
    p.add_argument("--pool", help="only this pool's fine-tunes")
    p.set_defaults(func=_cmd_finetunes)

    p = add_command(sub, GROUP, "finetune-export", "export a finished fine-tune: its adapter, the merged model, its data for LLaMA-Factory")
    p.add_argument("--finetune", type=int, required=True, help="fine-tune id (see `finetunes`)")
    p.add_argument("--out", required=True, help="folder to write (new or empty); the adapter files go at its top")
    p.add_argument("--merge", action="store_true", help="also write the base model with the adapter merged in, under OUT/merged")
    p.add_argument("--dataset", action="store_true", help="also write the training data (alpaca + dataset_info.json) and a "
                                                            "LLaMA-Factory yaml and command under OUT/llamafactory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    add_run_flags(p, background=False)
    p.set_defaults(func=_cmd_finetune_export)
