"""ka2l app: router only (page config, navigation, shared sidebar)."""

import streamlit as st

from ka2l.ui.state import sidebar

st.set_page_config(page_title="ka2l: knowledge boundaries", page_icon=":material/psychology:", layout="wide")

page = st.navigation({
    "Data": [st.Page("app_pages/pool.py", title="Pool", icon=":material/upload_file:", default=True)],
    "Stage 1": [
        st.Page("app_pages/probe.py", title="Probe", icon=":material/play_circle:"),
        st.Page("app_pages/scores.py", title="Scores", icon=":material/table:"),
        st.Page("app_pages/map.py", title="Map", icon=":material/scatter_plot:"),
        st.Page("app_pages/probes.py", title="Probes", icon=":material/monitoring:"),
    ],
    "Stage 2": [st.Page("app_pages/augment.py", title="Augment", icon=":material/auto_awesome:")],
    "Stage 3": [
        st.Page("app_pages/annotate.py", title="Annotate", icon=":material/rate_review:"),
        st.Page("app_pages/finetune.py", title="Fine-tune", icon=":material/model_training:"),
        st.Page("app_pages/experiment.py", title="Experiment", icon=":material/science:"),
    ],
    "System": [
        st.Page("app_pages/jobs.py", title="Jobs", icon=":material/work_history:"),
        st.Page("app_pages/settings.py", title="Settings", icon=":material/settings:"),
    ],
})
sidebar()
page.run()
