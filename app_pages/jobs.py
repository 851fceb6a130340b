"""Jobs: every background job, its progress, log, Cancel and Resume."""

import streamlit as st

from ka2l.ui.jobs_panel import job_panel

st.title("Jobs")
st.caption("Jobs run in their own processes, one at a time; this page polls them every 2 seconds.")
job_panel(limit=20, key="jobs")
