"""Stage 3 evidence commands of ``python -m ka2l``: run the RQ1-RQ3 experiment (selection strategies at
equal budgets, each fine-tuned and evaluated on one test split) and print its report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import EXPERIMENT_METRICS, EXPERIMENT_STRATEGIES, FINETUNE_PRESETS, ExperimentConfig, from_dict, to_dict
from ..errors import ConfigError
from .parsing import add_command, add_run_flags, submit_job

GROUP = "Stage 3: fine-tuning"

# flag -> ExperimentConfig field
OPTIONS = {"run": "run_id", "probe": "probe_id", "layer": "layer", "test_share": "test_share", "test_seed": "test_seed",
           "augmented_share": "augmented_share", "metric": "metric", "bootstrap": "bootstrap", "eval_batch_size": "eval_batch_size",
           "bertscore_model": "bertscore_model"}
# flag -> FinetuneConfig field of the per-cell fine-tune
FINETUNE_OPTIONS = {"epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "grad_accum": "grad_accum", "max_length": "max_length",
                    "lora_r": "lora_r", "device": "device", "dtype": "dtype"}


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The defaults, the fine-tune preset (if any, with early stopping off), then every flag given, validated."""
    values: dict[str, Any] = {field: getattr(args, flag) for flag, field in OPTIONS.items() if getattr(args, flag) is not None}
    for name in ("strategies", "budgets", "seeds"):
        if getattr(args, name):
            values[name] = tuple(getattr(args, name))
    tune = to_dict(ExperimentConfig().finetune)
    if args.preset:
        tune.update(FINETUNE_PRESETS[args.preset])
        tune["patience"] = 0  # the held-out split is the test split: no model selection on it
    tune.update({field: getattr(args, flag) for flag, field in FINETUNE_OPTIONS.items() if getattr(args, flag) is not None})
    values["finetune"] = tune
    return from_dict(ExperimentConfig, values)


def _print_report(experiment_id: int, as_json: bool, metric: str | None = None) -> None:
    from ..finetune.experiment_report import build_report, render_report

    rep = build_report(experiment_id, metric=metric)
    print(json.dumps(rep, indent=1) if as_json else render_report(rep))


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ..finetune.experiment import run_experiment
    from ..progress import TqdmProgress

    cfg = config_from_args(args)
    if args.background:
        return submit_job("experiment", {"pool": args.pool, "experiment": to_dict(cfg)}, "the app's Jobs page,")
    if not args.quiet:
        cells = len(cfg.strategies) * len(cfg.budgets) * len(cfg.seeds)
        print(f"{cells} cells: {', '.join(cfg.strategies)} x budgets {', '.join(f'{b:g}' for b in cfg.budgets)} x seeds "
              f"{', '.join(map(str, cfg.seeds))}; finished cells are kept, so the same command continues an interrupted run")
    experiment_id = run_experiment(args.pool, cfg, progress=TqdmProgress(disable=args.quiet))
    _print_report(experiment_id, args.json)
    return 0


def _cmd_experiment_report(args: argparse.Namespace) -> int:
    from ..store import experiment as SX
    from ..store.db import connect

    if args.list or args.experiment is None:
        with connect() as db:
            rows = SX.list_experiments(db)
            counts = {r["id"]: SX.cells(db, r["id"]) for r in rows}
        if args.experiment is None and not args.list:
            raise ConfigError("Give --experiment ID (or --list to see the experiments).")
        if not rows:
            print("no experiments yet: run one with `python -m ka2l experiment --pool POOL`")
        for r in rows:
            cells = counts[r["id"]]
            print(f"experiment {r['id']}: pool {r['pool_id']}, run {r['run_id']} · {r['status']} · "
                  f"{sum(c['status'] == 'done' for c in cells)}/{len(cells)} cells done · {', '.join(r['config']['strategies'])}")
        return 0
    _print_report(args.experiment, args.json, args.metric)
    return 0


def add_commands(sub) -> None:
    from ..finetune.selection import describe

    d = ExperimentConfig()
    listing = "; ".join(f"{name}: {text}" for name, text in describe())
    p = add_command(sub, GROUP, "experiment", "RQ1-RQ3: fine-tune on each selection strategy's picks at equal budgets and compare "
                                              "them on one test split (resumable per cell)")
    p.add_argument("--pool", required=True, help="pool name or id (needs gold answers and a finished Stage 1 run)")
    p.add_argument("--strategies", nargs="+", choices=EXPERIMENT_STRATEGIES, metavar="NAME",
                   help=f"strategies to compare (default {' '.join(d.strategies)}). {listing}")
    p.add_argument("--budgets", nargs="+", type=float, metavar="SHARE",
                   help=f"budgets as shares of the pool left after the test split (default {' '.join(f'{b:g}' for b in d.budgets)})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="one selection and fine-tune per seed (default 0)")
    p.add_argument("--run", type=int, help="Stage 1 run (default: the pool's newest finished run)")
    p.add_argument("--probe", type=int, help="probe giving P(unknown) and the layer (default: the run's newest)")
    p.add_argument("--layer", type=int, help="layer coreset and badge compare (default: the probe's)")
    p.add_argument("--test-share", type=float, help=f"share of the pool held out as the test split (default {d.test_share:g})")
    p.add_argument("--test-seed", type=int, help="seed of the test split (default 0)")
    p.add_argument("--augmented-share", type=float, help=f"most of a ka2l-augmented budget that decoded questions take (default {d.augmented_share:g})")
    p.add_argument("--metric", choices=EXPERIMENT_METRICS, help=f"metric of the RQ comparisons (default {d.metric}; all are reported)")
    p.add_argument("--bootstrap", type=int, help=f"bootstrap resamples per interval (default {d.bootstrap})")
    p.add_argument("--eval-batch-size", type=int, help=f"test questions per generate call (default {d.eval_batch_size})")
    p.add_argument("--bertscore-model", help="local BERTScore model folder (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), help="fine-tune preset for every cell (early stopping stays off)")
    p.add_argument("--epochs", type=float, help=f"fine-tune epochs per cell (default {d.finetune.epochs:g})")
    p.add_argument("--lr", type=float, help=f"fine-tune learning rate (default {d.finetune.lr:g})")
    p.add_argument("--batch-size", type=int, help=f"fine-tune batch size (default {d.finetune.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"fine-tune gradient accumulation (default {d.finetune.grad_accum})")
    p.add_argument("--max-length", type=int, help=f"longest prompt + answer in tokens (default {d.finetune.max_length})")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank (default {d.finetune.lora_r})")
    p.add_argument("--device", help="device of the fine-tunes and evaluations: auto, cpu, cuda, mps")
    p.add_argument("--dtype", help="weights dtype: auto, float32, float16, bfloat16")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_run_flags(p)
    p.set_defaults(func=_cmd_experiment)

    p = add_command(sub, GROUP, "experiment-report", "the RQ1-RQ3 report of an experiment: metric per strategy and budget with "
                                                     "intervals, costs, paired comparisons")
    p.add_argument("--experiment", type=int, help="experiment id (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments with their status and cells done")
    p.add_argument("--metric", choices=EXPERIMENT_METRICS, help="compare on this metric instead of the experiment's")
    p.add_argument("--json", action="store_true", help="print the report as JSON (plot-ready frame included)")
    p.set_defaults(func=_cmd_experiment_report)
