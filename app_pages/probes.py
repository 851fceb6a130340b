"""Probes: layer-wise AUROC, the threshold criterion, baselines and threshold robustness; a plain
warning when a split is too small to conclude from; what full SE and triage cost per question."""

import streamlit as st

from ka2l.ui import data
from ka2l.ui.charts import layer_auroc_figure, threshold_figure
from ka2l.ui.state import require_run

st.title("Probe evidence")
pool, run = require_run()

rep = data.report(run["id"])
split = rep.get("split", {})
cols = st.columns(4)
cols[0].metric("Known", split.get("n_known", "–"))
cols[1].metric("Unknown", split.get("n_unknown", "–"), help=f"SE ≥ γ* = {split.get('gamma', float('nan')):.3f} nats ({split.get('rule')})")
if "accuracy" in split:
    cols[2].metric("Accuracy (known / unknown)", f"{split['accuracy_known']:.0%} / {split['accuracy_unknown']:.0%}")
p = rep.get("probe")
if p is None:
    st.warning("This run has no probe (too few questions of one label?).")
    st.stop()
counts, shares = data.split_counts(run["id"])
too_small = data.small_split_warnings(counts, shares)
cols[3].metric(f"Probe test AUROC (layer {p['best_layer']})", f"{p['test_auroc']:.3f}" + (" (too few to conclude)" if too_small else ""),
               help=f"95% bootstrap interval {p['test_ci'][0]:.3f} – {p['test_ci'][1]:.3f}; layer chosen on validation AUROC")
for text in too_small:
    st.warning(text, icon=":material/warning:")
if counts:
    st.caption("Questions per split: " + " · ".join(f"{data.SPLIT_NAMES[k]} {c['n']} ({c['unknown']} unknown, {c['known']} known)"
                                                    for k, c in counts.items()))
st.subheader("Layer-wise AUROC")
st.plotly_chart(layer_auroc_figure(p), width="stretch")
st.subheader("Threshold criterion")
st.plotly_chart(threshold_figure(data.run_threshold(run["id"])), width="stretch")
st.subheader("Baselines (test split)")
st.dataframe(data.evidence_table(p["baselines"]), hide_index=True, width="stretch")
st.subheader("Threshold robustness")
st.caption("The probe retrained at the chosen layer with the threshold γ* shifted by δ.")
st.dataframe(data.evidence_table(p["robustness"]), hide_index=True, width="stretch")
st.subheader("Cost per question")
cost = rep.get("cost") or {}
if cost:
    st.caption("Seconds per question from the runs' own stored timings on this device, extrapolated to larger pools: full semantic "
               "entropy (hidden states, sampling, judging) against triage with the saved probe (one forward pass that stops at its layer)."
               + (f" Full SE costs {cost['se_over_triage']:.0f}x triage." if "se_over_triage" in cost else ""))
    st.dataframe(data.cost_table(cost), hide_index=True, width="stretch")
else:
    st.caption("No stored timings for this run yet.")
