"""``python -m ka2l``: the parser, with commands grouped by stage, and the entry point that turns
ka2l's errors into messages."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from ..errors import Ka2lError
from . import annotate, augment, jobs, pools, probing
from . import finetune as finetune_cli
from . import evaluate as evaluate_cli
from . import experiment as experiment_cli
from .parsing import grouped_listing

EXAMPLES = """examples:
  python -m ka2l import demo:capitals                 # a committed demo pool
  python -m ka2l import questions.csv --name support  # your own pool (CSV, JSONL, JSON, Parquet)
  python -m ka2l probe --pool capitals                # Stage 1 on the embedded SmolLM2 (resumable)
  python -m ka2l report --pool capitals               # split, layer-wise AUROC, baselines
  python -m ka2l triage --pool new-questions --probe 1
  python -m ka2l decoder-train --probe 1 --minutes 10  # Stage 2: hidden-state -> question decoder
  python -m ka2l generate --decoder 1 --noise 0.1      # new candidate questions from the unknowns
  python -m ka2l approved --pool capitals --out approved.jsonl
  python -m ka2l annotate serve                        # Stage 3a: a local Label Studio, connected
  python -m ka2l annotate push --pool capitals         # the approved set, most useful first
  python -m ka2l annotate pull --pool capitals         # the answers back
  python -m ka2l annotate export --pool capitals --format alpaca --out sft/capitals.json
  python -m ka2l experiment --pool capitals --strategies random ka2l-unknown --budgets 0.25 0.5 1.0
  python -m ka2l experiment-report --experiment 1     # RQ1-RQ3 with paired bootstrap intervals
"""

STAGES = (pools, probing, augment, annotate, finetune_cli, evaluate_cli, experiment_cli, jobs)  # the order of the groups in --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ka2l", description="Find where a language model's knowledge ends (KA2L).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands listed below")
    for stage in STAGES:
        stage.add_commands(sub)
    sub._choices_actions.clear()  # the flat listing; the grouped one below replaces it
    parser.epilog = f"commands by stage:\n{grouped_listing(sub)}\n\n{EXAMPLES}"
    return parser


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: stored work kept, the run marked interrupted


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if not args.verbose:  # keep the terminal to ka2l's own progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Ka2lError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: everything stored so far is kept; run the same command again to continue.", file=sys.stderr)
        return 130
