"""Experiment (Stage 3): the paper's RQ1-RQ3 on your own model. Selection strategies at equal budgets, each
fine-tuned on the gold answers of what it picked and scored on one fixed test split."""

import streamlit as st

from ka2l.ui import experiment as ex
from ka2l.ui.jobs_panel import job_panel
from ka2l.ui.state import active_pool, select_run

st.title("Experiment: does fine-tuning on the unknowns pay?")
st.caption("RQ1: KA2L at about half the data against all of it. RQ2: KA2L against random, entropy, coreset and BADGE at the "
           "same budget. RQ3: with the approved decoded questions. The pool's gold answers play the annotator.")
pool = active_pool()
if pool is None:
    st.info("No pool yet: add one with gold answers on the Pool page and run Stage 1 on it (Probe page).")
    st.stop()
run = select_run(pool)
if run is None:
    st.info("No finished Stage 1 run for the active pool yet: launch one on the Probe page. The experiment selects with its "
            "hidden states, labels and probe, and fine-tunes its model.")
    st.stop()

st.subheader("Settings")
cfg = ex.config_form(run["id"])
ex.launch(pool["name"], cfg)

st.subheader("Jobs")
job_panel(kinds=("experiment",), key="experiment")

st.subheader("Results")
experiment = ex.pick_experiment(pool["id"])
if experiment is None:
    st.caption("No experiment on this pool yet: launch one above.")
    st.stop()
ex.report_section(experiment)
