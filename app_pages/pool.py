"""Pool: upload a question file or pick a demo pool; validation report; preview; store."""

import pandas as pd
import streamlit as st

from ka2l.errors import Ka2lError, PoolError
from ka2l.ui import actions, data
from ka2l.ui.state import activate_pool, show_flash

st.title("Question pool")
st.caption("CSV, JSONL, JSON or Parquet with a `question` column; optional `answer`/`answers` (aliases as a JSON list or "
           "separated by `|`) and `id`. Other columns are kept as metadata.")
show_flash("pool")

source = st.radio("Source", ["Upload a file", "Demo pool"], horizontal=True)
skip = st.checkbox("Leave out invalid rows instead of refusing the file", value=False)
pool = None
try:
    if source == "Upload a file":
        up = st.file_uploader("Question file", type=["csv", "tsv", "jsonl", "ndjson", "json", "parquet"])
        if up is not None:
            pool = actions.read_upload(up.name, up.getvalue(), skip_invalid=skip)
    else:
        name = st.selectbox("Demo pool", actions.demo_names())
        if name:
            pool = actions.read_demo(name)
except PoolError as exc:
    st.error(str(exc).split("\n")[0])
    if exc.problems:
        st.dataframe(pd.DataFrame({"problem": exc.problems}), hide_index=True, width="stretch")

if pool is not None:
    rep = pool.report()
    c = st.columns(3)
    c[0].metric("Questions", rep["rows_imported"])
    c[1].metric("With gold answers", rep["rows_with_answers"])
    c[2].metric("Rows left out", len(rep["skipped"]))
    if rep["skipped"]:
        with st.expander(f"{len(rep['skipped'])} rows left out"):
            st.dataframe(pd.DataFrame({"problem": rep["skipped"]}), hide_index=True)
    st.dataframe(pd.DataFrame([{"id": r.ext_id, "question": r.question, "answers": " | ".join(r.answers)} for r in pool.rows[:200]]),
                 hide_index=True, width="stretch")
    with st.form("store"):
        name = st.text_input("Pool name", value=pool.name)
        if st.form_submit_button("Import pool", type="primary"):
            try:
                pool_id = actions.store_pool(pool, name)
            except Ka2lError as exc:
                st.error(str(exc))
            else:
                activate_pool(pool_id, "pool", f"Imported pool {name!r} ({len(pool.rows)} questions). It is now the active pool.")

st.subheader("Stored pools")
pools = data.pools()
if pools:
    st.dataframe(pd.DataFrame(pools)[["id", "name", "n_questions", "has_answers", "source", "created_at"]], hide_index=True)
else:
    st.caption("None yet.")
