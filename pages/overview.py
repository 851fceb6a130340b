"""Runs: pick a Stage 1 run; see its progress while it runs and its evidence when it is done."""

import pandas as pd
import streamlit as st

from ka2l.errors import Ka2lError
from ka2l.ui import data
from ka2l.ui.charts import layer_auroc_figure

st.title("Where does the model's knowledge end?")

try:
    runs = data.runs()
    pools = {p["id"]: p for p in data.pools()}
except Ka2lError as exc:
    st.error(str(exc))
    st.stop()

if not runs:
    st.info("No runs yet. Import a pool and run Stage 1 from a terminal:\n\n"
            "```\npython -m ka2l import demo:capitals\npython -m ka2l probe --pool capitals\n```")
    st.stop()

labels = {r["id"]: f"Run {r['id']} · {r['kind']} · {pools[r['pool_id']]['name']} · {r['status']}" for r in reversed(runs)}
run_id = st.selectbox("Run", list(labels), format_func=labels.get)
run = next(r for r in runs if r["id"] == run_id)


@st.fragment(run_every=3)
def live_progress() -> None:
    prog = data.progress(run_id)
    st.write(f"Stage: **{data.report(run_id)['run']['stage']}**")
    for stage in ("hidden", "answers", "scores"):
        st.progress(prog[stage] / max(prog["total"], 1), text=f"{stage}: {prog[stage]} / {prog['total']}")


if run["status"] != "done":
    if run["status"] == "running":
        live_progress()
        st.caption("If the counts stop moving, the process working on this run has ended: run the same "
                   "`python -m ka2l probe` command again and it continues where it stopped.")
    else:
        st.warning(f"This run is {run['status']}. Run the same `python -m ka2l probe` command again to continue it; nothing stored is lost."
                   + (f"\n\nError: {run['error']}" if run["error"] else ""))
    st.stop()

rep = data.report(run_id)
if "triage" in rep:
    t = rep["triage"]
    st.metric("Predicted unknown", f"{t['n_unknown']} / {t['n']}")
    if t["shift"].get("warning"):
        st.warning(f"{t['shift']['share_beyond_heldout_q95']:.0%} of this pool lies further from the probe's training data than 95% of "
                   "its own held-out questions: these P(unknown) values are extrapolations. Run Stage 1 on a sample of this pool.")
    st.dataframe(pd.DataFrame(t["most_unknown"])[["p_unknown", "question"]], hide_index=True)
    st.stop()

split = rep.get("split", {})
cols = st.columns(4)
cols[0].metric("Known", split.get("n_known", "–"))
cols[1].metric("Unknown", split.get("n_unknown", "–"), help=f"SE >= γ* = {split.get('gamma', float('nan')):.3f} nats ({split.get('rule')})")
if "accuracy" in split:
    cols[2].metric("Accuracy (known / unknown)", f"{split['accuracy_known']:.0%} / {split['accuracy_unknown']:.0%}")
if "probe" in rep:
    p = rep["probe"]
    cols[3].metric(f"Probe test AUROC (layer {p['best_layer']})", f"{p['test_auroc']:.3f}",
                   help=f"95% bootstrap interval {p['test_ci'][0]:.3f} – {p['test_ci'][1]:.3f}; layer chosen on validation AUROC")
    st.subheader("Layer-wise AUROC")
    st.plotly_chart(layer_auroc_figure(p), use_container_width=True)
    left, right = st.columns(2)
    left.subheader("Baselines (test split)")
    left.dataframe(pd.DataFrame(p["baselines"]), hide_index=True)
    right.subheader("Threshold robustness")
    right.dataframe(pd.DataFrame(p["robustness"]), hide_index=True)
