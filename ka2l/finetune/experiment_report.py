"""What the RQ experiment found, computed from its cells: the metric with its interval per strategy and
budget, a plot-ready frame, the cost per strategy, and RQ1-RQ3 answered by paired comparisons.

All comparisons are paired over the test questions (every cell answers the same ones): per question, the
metric averaged over a cell group's seeds; the difference of two groups is resampled by question (95%
percentile bootstrap). A comparison "excludes zero" when its whole interval lies on one side.

    RQ1  ka2l-unknown at the budget nearest half the largest one vs. the largest budget ("all the data":
         random at it, the first strategy there otherwise), with the annotation and compute ratios
    RQ2  at each budget, ka2l-unknown vs. every baseline run (random, entropy, coreset, badge)
    RQ3  at each budget, ka2l-augmented vs. ka2l-unknown
    base the untuned model on the same test split (``experiment.ensure_base``): a row, a flat line in the plot,
         and every cell's paired difference from it (did fine-tuning change anything at all?)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ExperimentConfig, from_dict
from ..store import augment as SA
from ..store import evaluation as E
from ..store import experiment as SX
from ..store import finetune as SF
from ..store import queries as Q
from ..store.db import connect
from . import selection as SEL
from .experiment import base_cell
from . import textmetrics as T

BASELINES = ("random", "entropy", "coreset", "badge")
BASE_NAME = "untuned base"  # the model before any fine-tune, on the same test split
METRIC_NAMES = {"rouge_l": "ROUGE-L", "bleu": "BLEU", "meteor": "METEOR", "bertscore": "BERTScore", "correct": "correct %"}
ONE_OFF = {  # stored data a strategy needs -> the run's timing stages that made it
    "hidden": ("hidden",), "se": ("answers", "scores", "probes"), "entropy": ("prompt_entropy",)}


def _values(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    out = {}
    for r in rows:
        v = r[metric]
        if v is not None:
            out[r["item_key"]] = 100.0 * v if metric == "correct" else float(v)
    return out


def _group(per_cell: list[dict[str, float]]) -> dict[str, float]:
    """Per question, the mean over the cells (seeds) that scored it in all of them."""
    if not per_cell:
        return {}
    keys = set.intersection(*(set(c) for c in per_cell))
    return {k: float(np.mean([c[k] for c in per_cell])) for k in sorted(keys)}


def paired(a: dict[str, float], b: dict[str, float], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of a - b over the questions both have, with its bootstrap interval, and whether it excludes 0.

    >>> r = paired({"x": 3.0, "y": 5.0}, {"x": 1.0, "y": 1.0}, 200)
    >>> r["value"], r["excludes_zero"], r["n"]
    (3.0, True, 2)
    """
    keys = sorted(set(a) & set(b))
    diff = np.array([a[k] - b[k] for k in keys])  # (questions,)
    if not keys:
        return {"value": None, "lo": None, "hi": None, "n": 0, "excludes_zero": False}
    out = T.interval(lambda i: float(diff[i].mean()), len(keys), n_boot, seed)
    out["excludes_zero"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def _verdict(d: dict[str, Any]) -> str:
    if d["value"] is None:
        return "not comparable (no common test question)"
    if not d["excludes_zero"]:
        return "no difference the interval can tell from zero"
    return "better" if d["value"] > 0 else "worse"


def _one_off_seconds(timings: dict[str, Any], generation_seconds: float) -> dict[str, float]:
    out = {}
    for s in SEL.STRATEGIES.values():
        total = sum(timings.get(stage, {}).get("seconds", 0.0) for need in s.needs for stage in ONE_OFF.get(need, ()))
        out[s.name] = total + (generation_seconds if "decoded" in s.needs else 0.0)
    return out


def build_report(experiment_id: int, metric: str | None = None, n_boot: int | None = None) -> dict[str, Any]:
    """The report as a dict (JSON-ready); ``metric`` / ``n_boot`` override the experiment's settings."""
    with connect() as db:
        exp = SX.get_experiment(db, experiment_id)
        cells = SX.cells(db, experiment_id)
        run = Q.get_run(db, exp["run_id"])
        answers = {c["finetune_id"]: E.answers(db, c["finetune_id"], "tuned") for c in cells if c["status"] == "done" and c["finetune_id"]}
        reference = base_cell(cells)
        base_rows = E.answers(db, reference["finetune_id"], "base") if reference else []
        trained = {fid: float(SF.get_finetune(db, fid)["seconds"] or 0.0) for fid in answers}
        gen_seconds = sum(g.get("seconds") or 0.0 for g in SA.list_generations(db, exp["pool_id"]))
    cfg = from_dict(ExperimentConfig, exp["config"])
    metric = metric or cfg.metric
    n_boot = cfg.bootstrap if n_boot is None else n_boot
    # A cell's fine-tune cost is its fine-tune's own training time, summed over every resume: a cell that found the
    # fine-tune already trained (by an earlier experiment with the same data and settings) or finished one that an
    # interrupted run had started spent only part of it itself
    done = [{**c, "finetune_seconds": trained[c["finetune_id"]] or c["finetune_seconds"]}
            for c in cells if c["status"] == "done" and c["finetune_id"] in answers]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in done:
        groups.setdefault((c["strategy"], float(c["budget"])), []).append(c)
    per_q = {key: _group([_values(answers[c["finetune_id"]], metric) for c in cs]) for key, cs in groups.items()}
    one_off = _one_off_seconds(run["timings"] or {}, gen_seconds)

    base_values = _values(base_rows, metric) if {r["item_key"] for r in base_rows} >= set(exp["test_keys"]) else {}
    base = None
    if base_values:
        stat = T.mean_interval(list(base_values.values()), n_boot, 0)
        base = {"value": stat["value"], "lo": stat["lo"], "hi": stat["hi"], "n_test": stat["n"], "finetune_id": reference["finetune_id"],
                "all_metrics": {m: T.mean_interval(list(_values(base_rows, m).values()), n_boot, 0)["value"] for m in METRIC_NAMES}}
    table, frame = [], []
    for (strategy, budget), cs in sorted(groups.items(), key=lambda kv: (cfg.strategies.index(kv[0][0]) if kv[0][0] in cfg.strategies else 99, kv[0][1])):
        values = list(per_q[(strategy, budget)].values())
        stat = T.mean_interval(values, n_boot, 0)
        all_metrics = {m: T.mean_interval(list(_group([_values(answers[c["finetune_id"]], m) for c in cs]).values()), n_boot, 0)["value"]
                       for m in METRIC_NAMES}
        row = {"strategy": strategy, "budget": budget, "n": int(cs[0]["n"]), "seeds": sorted(int(c["seed"]) for c in cs),
               "metric": metric, "value": stat["value"], "lo": stat["lo"], "hi": stat["hi"], "n_test": stat["n"], "all_metrics": all_metrics,
               "finetune_seconds": float(np.mean([c["finetune_seconds"] for c in cs])), "eval_seconds": float(np.mean([c["eval_seconds"] for c in cs])),
               "select_seconds": float(np.mean([c["select_seconds"] for c in cs])), "finetune_ids": [c["finetune_id"] for c in cs],
               "vs_base": paired(per_q[(strategy, budget)], base_values, n_boot) if base else None}
        table.append(row)
        frame.append({k: row[k] for k in ("strategy", "budget", "n", "value", "lo", "hi")})
    if base:  # a flat reference line across the budgets
        frame += [{"strategy": BASE_NAME, "budget": b, "n": 0, "value": base["value"], "lo": base["lo"], "hi": base["hi"]}
                  for b in sorted({r["budget"] for r in table})]

    costs = []
    for s in dict.fromkeys(c["strategy"] for c in cells):
        mine = [c for c in done if c["strategy"] == s]
        costs.append({"strategy": s, "one_off_seconds": one_off.get(s, 0.0), "annotations": int(sum(c["n"] for c in mine)),
                      "finetune_seconds": float(sum(c["finetune_seconds"] for c in mine)),
                      "eval_seconds": float(sum(c["eval_seconds"] for c in mine)),
                      "select_seconds": float(sum(c["select_seconds"] for c in mine)), "cells_done": len(mine),
                      "cells": sum(c["strategy"] == s for c in cells)})
    return {"experiment_id": experiment_id, "pool_id": exp["pool_id"], "run_id": exp["run_id"], "status": exp["status"],
            "metric": metric, "metric_name": METRIC_NAMES[metric], "bootstrap": n_boot, "n_test": len(exp["test_keys"]),
            "n_pool": exp["n_pool"], "device": (exp["inputs"] or {}).get("device"), "cells_done": len(done), "cells": len(cells),
            "interval": "95% percentile bootstrap over test questions (paired for differences)",
            "table": table, "frame": frame, "costs": costs, "base": base,
            "rq1": _rq1(groups, per_q, cfg, one_off, n_boot), "rq2": _rq2(groups, per_q, cfg, n_boot), "rq3": _rq3(groups, per_q, cfg, n_boot)}


def _cost(cs: list[dict[str, Any]], one_off: float) -> float:
    return one_off + float(np.mean([c["finetune_seconds"] for c in cs]))


def _rq1(groups, per_q, cfg: ExperimentConfig, one_off: dict[str, float], n_boot: int) -> dict[str, Any]:
    budgets = sorted({b for _, b in groups})
    if not budgets or not any(s == "ka2l-unknown" for s, _ in groups):
        return {"available": False, "why": "needs finished ka2l-unknown cells"}
    full_b = budgets[-1]
    if full_b < 1.0:  # the largest budget of a grid without 1.0 is not "all the data"
        return {"available": False, "why": f"needs finished cells at budget 1 (all the data); the largest finished is {full_b:g}"}
    at_full = [s for s, b in groups if b == full_b]
    full_s = "random" if "random" in at_full else (at_full[0] if at_full else None)
    ka2l = sorted((b for s, b in groups if s == "ka2l-unknown"), key=lambda b: (abs(b - full_b / 2), b))
    if full_s is None or not ka2l or ka2l[0] >= full_b:
        return {"available": False, "why": f"needs ka2l-unknown at a budget below the largest ({full_b:g}) and a finished cell at the largest"}
    half = ka2l[0]
    a, b = groups[("ka2l-unknown", half)], groups[(full_s, full_b)]
    d = paired(per_q[("ka2l-unknown", half)], per_q[(full_s, full_b)], n_boot)
    return {"available": True, "ka2l": {"strategy": "ka2l-unknown", "budget": half, "n": int(a[0]["n"]), "value": _mean(per_q[("ka2l-unknown", half)])},
            "full": {"strategy": full_s, "budget": full_b, "n": int(b[0]["n"]), "value": _mean(per_q[(full_s, full_b)])},
            "delta": d, "verdict": _verdict(d), "annotation_ratio": a[0]["n"] / b[0]["n"],
            "compute_ratio": _cost(a, one_off["ka2l-unknown"]) / max(_cost(b, one_off.get(full_s, 0.0)), 1e-9),
            "finetune_compute_ratio": _cost(a, 0.0) / max(_cost(b, 0.0), 1e-9)}


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def _versus(groups, per_q, mine: str, others: tuple[str, ...], n_boot: int) -> list[dict[str, Any]]:
    out = []
    for (s, b) in sorted(groups, key=lambda k: k[1]):
        if s != mine:
            continue
        for other in others:
            if (other, b) not in groups:
                continue
            d = paired(per_q[(mine, b)], per_q[(other, b)], n_boot)
            out.append({"budget": b, "strategy": mine, "versus": other, "value": _mean(per_q[(mine, b)]),
                        "other_value": _mean(per_q[(other, b)]), "delta": d, "verdict": _verdict(d)})
    return out


def _unanswered(cfg: ExperimentConfig, needs: tuple[str, ...]) -> str:
    """Why a comparison has no rows: a strategy it needs was not asked for, or its cells are not finished."""
    missing = [s for s in needs if s not in cfg.strategies]
    if missing:
        return f"the experiment did not include {' / '.join(missing)} (--strategies)"
    return f"no budget has finished cells of both {needs[0]} and {' or '.join(needs[1:])} yet"


def _rq2(groups, per_q, cfg: ExperimentConfig, n_boot: int) -> dict[str, Any]:
    rows = _versus(groups, per_q, "ka2l-unknown", BASELINES, n_boot)
    baselines = tuple(b for b in BASELINES if b in cfg.strategies) or BASELINES[:1]
    return {"available": bool(rows), "comparisons": rows, "why": "" if rows else _unanswered(cfg, ("ka2l-unknown",) + baselines),
            "wins": sum(r["verdict"] == "better" for r in rows), "losses": sum(r["verdict"] == "worse" for r in rows)}


def _rq3(groups, per_q, cfg: ExperimentConfig, n_boot: int) -> dict[str, Any]:
    rows = _versus(groups, per_q, "ka2l-augmented", ("ka2l-unknown",), n_boot)
    return {"available": bool(rows), "comparisons": rows, "why": "" if rows else _unanswered(cfg, ("ka2l-augmented", "ka2l-unknown"))}


# -- text ----------------------------------------------------------------------------------------------

def _num(x: float | None, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _delta(d: dict[str, Any]) -> str:
    return f"{_num(d['value'])} [{_num(d['lo'])}, {_num(d['hi'])}]{' (excludes 0)' if d['excludes_zero'] else ''}"


def render_report(rep: dict[str, Any]) -> str:
    """The report as Markdown: the table, the costs, then RQ1-RQ3 with their numbers."""
    m = rep["metric_name"]
    lines = [f"# Experiment {rep['experiment_id']} ({rep['status']}): {rep['cells_done']}/{rep['cells']} cells done",
             f"Pool {rep['pool_id']}, run {rep['run_id']}: {rep['n_pool']} selectable questions, {rep['n_test']} test questions. "
             f"{m} on the test split, {rep['interval']} ({rep['bootstrap']} resamples).", "",
             f"| strategy | budget | items | {m} | 95% interval | vs untuned base | seeds | fine-tune s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    b = rep.get("base")
    if b:
        lines.append(f"| {BASE_NAME} | 0 | 0 | {_num(b['value'])} | [{_num(b['lo'])}, {_num(b['hi'])}] | - | - | - | - |")
    for r in rep["table"]:
        vs = _delta(r["vs_base"]) if r.get("vs_base") else "-"
        lines.append(f"| {r['strategy']} | {r['budget']:g} | {r['n']} | {_num(r['value'])} | [{_num(r['lo'])}, {_num(r['hi'])}] | {vs} | "
                     f"{','.join(map(str, r['seeds']))} | {_num(r['finetune_seconds'], 1)} | {_num(r['eval_seconds'], 1)} |")
    if not b:
        lines.append(f"\n(No {BASE_NAME} row yet: the untuned model answers the test split once the cells are done.)")
    lines += ["", f"## Cost (seconds on {rep['device'] or 'the configured device'}; one-off = the run's stages the strategy needs)",
              "| strategy | annotations | one-off s | fine-tune s | eval s | cells |", "|---|---|---|---|---|---|"]
    for c in rep["costs"]:
        lines.append(f"| {c['strategy']} | {c['annotations']} | {_num(c['one_off_seconds'], 1)} | {_num(c['finetune_seconds'], 1)} | "
                     f"{_num(c['eval_seconds'], 1)} | {c['cells_done']}/{c['cells']} |")
    rq1 = rep["rq1"]
    lines += ["", "## RQ1: does KA2L at about half the data match all of it?"]
    if rq1["available"]:
        k, f = rq1["ka2l"], rq1["full"]
        lines.append(f"ka2l-unknown at {k['budget']:g} ({k['n']} items): {_num(k['value'])}; {f['strategy']} at {f['budget']:g} "
                     f"({f['n']} items): {_num(f['value'])}. Difference {_delta(rq1['delta'])}: {rq1['verdict']}. "
                     f"Annotations x{rq1['annotation_ratio']:.2f}, compute x{rq1['compute_ratio']:.2f} "
                     f"(fine-tuning alone x{rq1['finetune_compute_ratio']:.2f}).")
    else:
        lines.append(f"Not answered yet: {rq1['why']}.")
    for title, rq in (("RQ2: does KA2L beat the baselines at the same budget?", rep["rq2"]),
                      ("RQ3: do decoded questions help?", rep["rq3"])):
        lines += ["", f"## {title}"]
        if not rq["available"]:
            lines.append(f"Not answered: {rq['why']}.")
        for r in rq["comparisons"]:
            lines.append(f"- budget {r['budget']:g}: {r['strategy']} {_num(r['value'])} vs {r['versus']} {_num(r['other_value'])}: "
                         f"difference {_delta(r['delta'])}, {r['verdict']}")
        if "wins" in rq and rq["available"]:
            lines.append(f"ka2l-unknown is better in {rq['wins']} and worse in {rq['losses']} of {len(rq['comparisons'])} comparisons.")
    return "\n".join(lines)
