"""Settings: the default model, device and judge used by new runs (stored in the database), the data folder,
and the Label Studio connection (a 0600 file; the token is only ever shown masked)."""

import streamlit as st

from ka2l.config import JUDGE_KINDS
from ka2l.errors import ConfigError, Ka2lError
from ka2l.ui import actions, annotate
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

st.subheader("Label Studio connection")
conn, broken = annotate.current_connection()
if broken:
    st.error(broken)
elif conn is None:
    st.info("Not connected. Enter the URL and a token below, or start the local server on the Annotate page.")
else:
    st.markdown(f"Using **{conn.url}** · token `{conn.masked}` · from {conn.source}")
if annotate.overridden_by():
    st.caption(f"The connection comes from {annotate.overridden_by()} ({annotate.ENV_URL} / {annotate.ENV_TOKEN}, or .streamlit/"
               "secrets.toml), which take precedence over what is saved here.")
with st.form("label-studio"):
    url = st.text_input("Label Studio URL", value=conn.url if conn else "", placeholder="http://127.0.0.1:8080")
    token = st.text_input("Token", type="password", value="",
                          placeholder=f"stored: {conn.masked}" if conn else "a personal access token or a legacy token",
                          help="Label Studio: Account & Settings -> Personal Access Token (or the legacy Access Token). Saved to "
                               "<data folder>/secrets/label_studio.json, readable by you only; never shown, logged or stored in "
                               "the database. Leave empty to keep the stored one.")
    c = st.columns(2)
    save = c[0].form_submit_button("Save connection", type="primary")
    test = c[1].form_submit_button("Test connection")
if save or test:
    use_token = token.strip() or (conn.token if conn and url.strip().rstrip("/") == conn.url else "")
    try:
        if not use_token:
            raise ConfigError("Enter the token: there is no stored one for this URL.")
        if test:
            user = annotate.test_connection(url.strip(), use_token)
            st.success(f"Label Studio at {url.strip()} answers; the token signs in as {annotate.user_name(user)}.")
        else:
            path = annotate.save_connection(url, use_token)
            flash("settings", f"Saved the Label Studio connection to {path} (readable by you only).")
            st.rerun()
    except Ka2lError as exc:
        st.error(str(exc))
if conn is not None and conn.source not in ("environment", "secrets.toml"):
    if st.button("Forget the saved connection"):
        annotate.forget_connection()
        flash("settings", "Forgot the saved Label Studio connection.")
        st.rerun()
