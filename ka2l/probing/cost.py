"""The cost meter: seconds per question of full semantic entropy (hidden states, sampling, judging)
against triage with a saved probe, from the runs' own stored timings, and what 1,000 and 100,000
questions would take at that speed on the machine that ran them.

Each stage's cost per question is its stored seconds over the questions it processed (summed over
resumes), so an interrupted and resumed run is measured by the work it did. Worked example: a Stage 1
run whose timings are ``hidden 4 s / 50, answers 40 s / 50, scores 6 s / 50`` costs 0.08 + 0.8 + 0.12 =
1.0 s per question of full SE; a triage run of ``hidden 2 s / 100, predict 0.1 s / 100`` costs
0.021 s per question, so full SE costs about 48x triage, and 100,000 questions take 27.8 h against 35 min.
"""

from __future__ import annotations

from typing import Any

from ..store import queries as Q

SE_STAGES = (("hidden", "hidden states"), ("answers", "sampling"), ("scores", "judging (clustering, SE)"))
TRIAGE_STAGES = (("hidden", "hidden state at the probe's layer"), ("predict", "probe"))
SCALES = (1_000, 100_000)


def _per_question(timings: dict[str, Any], stages) -> dict[str, float] | None:
    """{stage label: seconds per question}, or None when a stage has not run yet."""
    out = {}
    for key, label in stages:
        t = timings.get(key)
        if not t or not t.get("n"):
            return None
        out[label] = t["seconds"] / t["n"]
    return out


def _side(run: dict[str, Any], stages, measured: bool) -> dict[str, Any] | None:
    parts = _per_question(run["timings"] or {}, stages)
    if parts is None:
        return None
    total = sum(parts.values())
    return {"run_id": run["id"], "measured": measured, "parts": parts, "s_per_question": total,
            "extrapolated_s": {n: total * n for n in SCALES}}


def _triage_estimate(stage1: dict[str, Any], layer: int) -> dict[str, Any] | None:
    """Triage not run yet: the Stage 1 hidden-state pass scaled to the layers triage runs (it stops at the
    probe's layer; no LM head either way)."""
    t = (stage1["timings"] or {}).get("hidden")
    if not t or not t.get("n") or not stage1.get("n_layers"):
        return None
    s = t["seconds"] / t["n"] * max(layer, 1) / stage1["n_layers"]
    return {"run_id": None, "measured": False, "parts": {"hidden state at the probe's layer (estimated)": s}, "s_per_question": s,
            "extrapolated_s": {n: s * n for n in SCALES}}


def cost_meter(db, run_id: int) -> dict[str, Any]:
    """Full SE against triage for a Stage 1 run (its probe's latest finished triage run, else an estimate
    from its own hidden-state pass) or for a triage run (against its probe's Stage 1 run). Empty when the
    timings needed are not stored yet."""
    run = Q.get_run(db, run_id)
    if run["kind"] == "triage":
        probe = Q.get_probe(db, run["config"]["probe_id"])
        stage1, triage_run = Q.get_run(db, probe["run_id"]), run
    else:
        stage1, probes = run, Q.list_probes(db, run_id)
        probe = probes[-1] if probes else None
        ids = {p["id"] for p in probes}
        done = [r for r in Q.list_runs(db) if r["kind"] == "triage" and r["status"] == "done" and r["config"].get("probe_id") in ids]
        triage_run = done[-1] if done else None
    se = _side(stage1, SE_STAGES, measured=True)
    if se is None:
        return {}
    triage = _side(triage_run, TRIAGE_STAGES, measured=True) if triage_run is not None else None
    if triage is None and probe is not None:
        triage = _triage_estimate(stage1, int(probe["layer"]))
    out: dict[str, Any] = {"se": se, "triage": triage, "probe_id": probe["id"] if probe else None,
                           "layer": int(probe["layer"]) if probe else None, "n_layers": stage1.get("n_layers")}
    if triage and triage["s_per_question"] > 0:
        out["se_over_triage"] = se["s_per_question"] / triage["s_per_question"]
    return out


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '2.4 h', '3.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cost_rows(meter: dict[str, Any]) -> list[dict[str, str]]:
    """The meter as table rows: method, s/question, 1,000 and 100,000 questions, what was measured."""
    rows = []
    for key, name in (("se", "Full semantic entropy"), ("triage", "Triage with the saved probe")):
        side = meter.get(key)
        if not side:
            continue
        where = f"run {side['run_id']}" if side["measured"] else "estimated from the Stage 1 run's hidden-state pass"
        rows.append({"method": name, "s / question": f"{side['s_per_question']:.3f}",
                     **{f"{n:,} questions": duration(side["extrapolated_s"][n]) for n in SCALES},
                     "of which": ", ".join(f"{k} {v:.3f}s" for k, v in side["parts"].items()), "from": where})
    return rows


def format_cost(meter: dict[str, Any]) -> list[str]:
    if not meter:
        return []
    lines = ["\nCost per question on this device (from the runs' stored timings)"]
    for r in cost_rows(meter):
        lines.append(f"  {r['method']:<28} {r['s / question']:>7} s/q   1,000 q: {r['1,000 questions']:>9}   "
                     f"100,000 q: {r['100,000 questions']:>9}   ({r['of which']}; {r['from']})")
    if "se_over_triage" in meter:
        lines.append(f"  full SE costs {meter['se_over_triage']:.0f}x triage per question")
    return lines
