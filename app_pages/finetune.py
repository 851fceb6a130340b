"""Fine-tune (Stage 3b): LoRA-tune the Stage 1 run's model on answered questions, follow its loss live,
evaluate base vs tuned, see the knowledge boundary move."""

import streamlit as st

from ka2l.ui import finetune as ft
from ka2l.ui.state import active_pool, select_run

st.title("Fine-tune: teach the model its unknowns")
pool = active_pool()
if pool is None:
    st.info("No pool yet: add one on the Pool page, run Stage 1 (Probe page) and collect answers (Annotate page), "
            "or use a pool with gold answers.")
    st.stop()
run = select_run(pool)
if run is None:
    st.info("No finished Stage 1 run for the active pool yet: launch one on the Probe page. The fine-tune tunes that run's model "
            "with the prompt it was probed with.")
    st.stop()

# -- data and settings ---------------------------------------------------------------------------------
st.subheader("Data and settings")
cfg = ft.config_form(run["id"])
st.subheader("Dataset")
summary = ft.dataset_section(pool["name"], cfg) if cfg is not None else None
st.subheader("Preflight")
fits = ft.preflight_section(cfg) if cfg is not None else False
ft.launch(pool["name"], cfg, ready=bool(summary) and fits)

# -- training ------------------------------------------------------------------------------------------
st.subheader("Training")
row = ft.pick_finetune(pool["id"])
if row is None:
    st.caption("No fine-tune of this pool yet: launch one above.")
ft.live_section(pool["id"], row)
if row is None:
    st.stop()

# -- evaluation and the adapter -------------------------------------------------------------------------
st.subheader("Evaluation: base vs tuned on the held-out questions")
ft.evaluation_section(row)
st.subheader("Boundary shift: re-probe with the adapter")
ft.shift_section(row)
st.subheader("Adapter")
ft.adapter_section(row)
