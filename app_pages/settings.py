"""Settings: the default model, device and judge used by new runs (stored in the database)."""

import streamlit as st

from ka2l.config import JUDGE_KINDS
from ka2l.errors import Ka2lError
from ka2l.ui import actions
from ka2l.ui.state import flash, show_flash

DEVICES = ["auto", "cpu", "cuda", "mps"]

st.title("Settings")
show_flash("settings")
s = actions.settings.load()
with st.form("settings"):
    model = st.text_input("Model (hub id, local folder, .gguf file, or the embedded default)", value=s["model"])
    device = st.selectbox("Device", DEVICES, index=DEVICES.index(s["device"].split(":")[0]))
    judge = st.selectbox("Judge", JUDGE_KINDS, index=JUDGE_KINDS.index(s["judge"]))
    judge_model = st.text_input("Judge model (for nli / embedding)", value=s["judge_model"] or "")
    if st.form_submit_button("Save", type="primary"):
        try:
            actions.settings.save({"model": model, "device": device, "judge": judge, "judge_model": judge_model or None})
        except Ka2lError as exc:
            st.error(str(exc))
        else:  # rerun, so the sidebar (drawn before this page) shows the new values
            flash("settings", "Saved. New runs use these settings.")
            st.rerun()
st.subheader("Data folder")
current = actions.data_dir()
with st.form("data-folder"):
    folder = st.text_input("Folder for the database, hidden states, probes and logs", value=str(current),
                           disabled=actions.data_dir_from_env(), help="KA2L_DATA_DIR, when set, takes precedence.")
    if st.form_submit_button("Use this folder", disabled=actions.data_dir_from_env()):
        try:
            now_using = actions.set_data_dir(folder)
        except Ka2lError as exc:
            st.error(str(exc))
        else:
            flash("settings", f"Now using {now_using}. Pools and runs in the old folder stay there.")
            st.rerun()
if actions.data_dir_from_env():
    st.caption("Set by the KA2L_DATA_DIR environment variable.")
st.caption("Label Studio credentials go in .streamlit/secrets.toml (see secrets.example.toml); they are never shown or logged.")
