"""What a finished run shows: the known/unknown split, the layer-wise AUROC curve, the evidence
tables. ``build_report`` returns plain data (for the app and ``--json``); ``format_report`` text."""

from __future__ import annotations

import math
from typing import Any

from ..store import queries as Q
from ..store.hidden import describe_size
from .cost import cost_meter, format_cost


def build_report(db, run_id: int) -> dict[str, Any]:
    run = Q.get_run(db, run_id)
    pool = Q.get_pool(db, run["pool_id"])
    out: dict[str, Any] = {"run": {k: run[k] for k in ("id", "kind", "status", "stage", "model", "error", "created_at", "timings", "config")},
                           "pool": {"id": pool["id"], "name": pool["name"], "n_questions": pool["n_questions"]}}
    if run["hidden_path"] and run["n_layers"]:
        out["hidden"] = hidden_storage(run, pool["n_questions"])
    if run["kind"] == "triage":
        preds = Q.load_predictions(db, run_id)
        out["triage"] = {"n": len(preds), "n_unknown": sum(p["label"] for p in preds), "shift": run["summary"].get("shift", {}),
                         "most_unknown": sorted(preds, key=lambda p: -p["p_unknown"])[:10]}
        out["cost"] = cost_meter(db, run_id)
        return out
    scores = Q.load_scores(db, run_id)
    k = run["config"]["sampling"]["k"]
    out["n_scored"] = len(scores)
    if scores:
        calls = [s["judge_calls"] for s in scores]
        out["judge"] = {"kind": run["config"]["judge"]["kind"], "calls_per_question": sum(calls) / len(calls), "naive_calls": k * (k - 1),
                        "mean_clusters": sum(s["n_clusters"] for s in scores) / len(scores)}
    if run["threshold"] and scores and all(s["bise"] is not None for s in scores):
        out["split"] = _split(scores, run["threshold"])
    probes = Q.list_probes(db, run_id)
    out["cost"] = cost_meter(db, run_id)
    if probes:
        p = probes[-1]
        out["probe"] = {"id": p["id"], "kind": p["kind"], "best_layer": p["layer"], "path": p["path"],
                        "layers": Q.probe_layers(db, p["id"]), **{k: p["metrics"][k] for k in ("test_auroc", "test_ci", "val_auroc", "test_auroc_correct", "baselines", "robustness")}}
    return out


def hidden_storage(run: dict[str, Any], n_questions: int) -> dict[str, Any]:
    """Where a run's hidden states are and the size they take (n × stored layers × hidden × 2 bytes)."""
    from pathlib import Path

    from ..store.hidden import estimate_bytes

    n_stored = 1 if run["kind"] == "triage" else run["n_layers"] + 1
    per_layer = Path(run["hidden_path"]).is_dir()
    return {"path": run["hidden_path"], "layout": "one file per layer" if per_layer else "one file (stored before per-layer files)",
            "bytes": estimate_bytes(n_questions, n_stored, run["hidden_size"]), "n_layers": n_stored,
            "text": describe_size(n_questions, n_stored, run["hidden_size"])}


def _split(scores: list[dict], threshold: dict) -> dict[str, Any]:
    unknown = [s for s in scores if s["bise"] == 1]
    known = [s for s in scores if s["bise"] == 0]
    res: dict[str, Any] = {"rule": threshold["rule"], "gamma": threshold["gamma"], "n_known": len(known), "n_unknown": len(unknown)}
    graded = [s for s in scores if s["correct"] is not None]
    if graded:
        acc = lambda rows: (sum(s["correct"] for s in rows) / len(rows)) if rows else math.nan  # noqa: E731
        res.update(accuracy=acc(graded), accuracy_known=acc([s for s in known if s["correct"] is not None]),
                   accuracy_unknown=acc([s for s in unknown if s["correct"] is not None]))
    return res


def _f(x: Any, nd: int = 3) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _bar(x: float | None, lo: float = 0.4, hi: float = 1.0, width: int = 30) -> str:
    if x is None or math.isnan(x):
        return ""
    return "#" * max(0, round((min(max(x, lo), hi) - lo) / (hi - lo) * width))


def format_report(rep: dict[str, Any]) -> str:
    run, lines = rep["run"], []
    lines.append(f"Run {run['id']} ({run['kind']}, {run['status']}) on pool {rep['pool']['name']!r} "
                 f"({rep['pool']['n_questions']} questions), model {run['model']}")
    if run.get("error"):
        lines.append(f"  error: {run['error']}")
    t = run.get("timings") or {}
    if t:
        lines.append("  time: " + ", ".join(f"{k} {v['seconds']:.1f}s ({v['seconds'] / max(v['n'], 1):.3f}s each)" for k, v in t.items()))
    if "hidden" in rep:
        h = rep["hidden"]
        lines.append(f"  hidden states: {h['text']}, {h['layout']} in {h['path']}")
    if "triage" in rep:
        tr = rep["triage"]
        lines.append(f"\nTriage: {tr['n_unknown']} of {tr['n']} questions predicted unknown ({tr['n_unknown'] / max(tr['n'], 1):.0%}).")
        shift = tr.get("shift") or {}
        if shift.get("available"):
            lines.append(f"  {shift['share_beyond_heldout_q95']:.0%} of these questions lie further from the probe's training data than "
                         f"95% of its own held-out questions (about 5% is expected for a similar pool).")
            if shift["warning"]:
                lines.append("  WARNING: this pool looks unlike the one the probe was trained on; its P(unknown) values are "
                             "extrapolations. Run Stage 1 on a sample of this pool to train a probe for it.")
        lines.append("Most unknown:")
        lines += [f"  {p['p_unknown']:.2f}  {p['question']}" for p in tr["most_unknown"]]
        lines += format_cost(rep.get("cost") or {})
        return "\n".join(lines)
    if "judge" in rep:
        j = rep["judge"]
        lines.append(f"  judge {j['kind']}: {j['calls_per_question']:.1f} calls per question (naive k(k-1) = {j['naive_calls']}), "
                     f"{j['mean_clusters']:.2f} clusters on average")
    if "split" in rep:
        s = rep["split"]
        n = s["n_known"] + s["n_unknown"]
        lines.append(f"\nKnown / unknown split ({s['rule']}, gamma* = {s['gamma']:.3f} nats): "
                     f"{s['n_known']} known, {s['n_unknown']} unknown ({s['n_unknown'] / max(n, 1):.0%} unknown)")
        if "accuracy" in s:
            lines.append(f"  accuracy of the low-temperature answer: {s['accuracy']:.0%} overall, "
                         f"{_f(s['accuracy_known'], 2)} on known, {_f(s['accuracy_unknown'], 2)} on unknown")
    p = rep.get("probe")
    if p:
        lines.append(f"\nLayer-wise AUROC of the {p['kind']} probe against BiSE (best layer chosen on validation: {p['best_layer']})")
        lines.append("  layer   val    test  [95% CI]        vs incorrect  test curve (0.4 .. 1.0)")
        for L in p["layers"]:
            mark = " <- chosen" if L["layer"] == p["best_layer"] else ""
            lines.append(f"  {L['layer']:>5}  {_f(L['val_auroc'])}  {_f(L['test_auroc'])}  [{_f(L['test_ci_low'])}, {_f(L['test_ci_high'])}]"
                         f"  {_f(L['test_auroc_correct']):>12}  {_bar(L['test_auroc'])}{mark}")
        lines.append("\nBaselines on the test split (AUROC: positive = unknown / incorrect; PRR: prediction rejection ratio")
        lines.append("against correctness of the low-temperature answer, 1 = oracle, 0 = random rejection)")
        lines.append(f"  {'method':<44} {'vs BiSE':>8} {'vs incorrect':>13} {'PRR':>6}  [95% CI]")
        for b in p["baselines"]:
            ci = f"[{_f(b.get('prr_lo'))}, {_f(b.get('prr_hi'))}]" if b.get("prr") is not None else ""
            lines.append(f"  {b['method']:<44} {_f(b['auroc_bise']):>8} {_f(b['auroc_incorrect']):>13} {_f(b.get('prr')):>6}  "
                         f"{ci:<16}  {b.get('note', '')}".rstrip())
        lines.append("\nThreshold robustness (probe retrained at the chosen layer)")
        lines.append(f"  {'delta':>6} {'tau':>7} {'unknown':>8} {'vs BiSE':>8} {'vs incorrect':>13}")
        for r in p["robustness"]:
            lines.append(f"  {r['delta']:>+6.2f} {r['threshold']:>7.3f} {r['share_unknown']:>8.0%} {_f(r['auroc_bise']):>8} "
                         f"{_f(r['auroc_incorrect']):>13}  {r.get('note', '')}".rstrip())
        lines.append(f"\nSaved probe {p['id']}: {p['path']}  (use it with: python -m ka2l triage --pool NEW_POOL --probe {p['id']})")
    lines += format_cost(rep.get("cost") or {})
    return "\n".join(lines)
