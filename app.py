"""ka2l app: router only (page config, navigation, shared sidebar)."""

import streamlit as st

from ka2l.config import EMBEDDED_MODEL
from ka2l.paths import data_dir

st.set_page_config(page_title="ka2l: knowledge boundaries", page_icon=":material/psychology:", layout="wide")

page = st.navigation([st.Page("pages/overview.py", title="Runs", icon=":material/monitoring:", default=True)])
with st.sidebar:
    st.caption(f"Data folder: `{data_dir()}`")
    st.caption(f"Default model: `{EMBEDDED_MODEL}`")
page.run()
