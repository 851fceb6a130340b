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
skip = st.checkbox(actions.SKIP_INVALID_LABEL, value=False)
pool = None
try:
    if source == "Upload a file":
        # Any file is taken, so a wrong type gets a message on the page instead of a tooltip on the widget.
        up = st.file_uploader("Question file", help="CSV, TSV, JSONL, JSON or Parquet")
        if up is not None:
            content = up.getvalue()
            chosen_key = f"ka2l.question_column.{up.file_id}"  # a plain key: it outlives the selectbox's runs
            chosen = st.session_state.get(chosen_key)
            try:
                pool = actions.read_upload(up.name, content, skip_invalid=skip, question_column=chosen)
            except PoolError as exc:
                failed = exc
            else:
                failed = None
            columns = actions.upload_columns(up.name, content) if failed is not None or chosen else []
            if actions.needs_question_column(columns):
                if failed is not None and chosen is None:  # "no 'question' column": the selectbox below is the fix
                    st.error(str(failed).split("\n")[0])
                    failed = None
                st.selectbox(actions.QUESTION_COLUMN_LABEL, columns, index=columns.index(chosen) if chosen in columns else None,
                             placeholder="Choose a column", key=f"{chosen_key}.widget",
                             on_change=lambda: st.session_state.update({chosen_key: st.session_state[f"{chosen_key}.widget"]}))
            if failed is not None:
                raise failed
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
        name = st.text_input(actions.POOL_NAME_LABEL, value=pool.name)
        if st.form_submit_button("Import pool", type="primary"):
            try:
                pool_id = actions.store_pool(pool, name)
            except Ka2lError as exc:
                st.error(str(exc))
            else:
                activate_pool(pool_id, "pool", f"Imported pool {name!r} ({len(pool.rows)} questions). It is now the active pool.")

st.subheader("Stored pools")
stored = data.pools_table()
if len(stored):
    st.dataframe(stored, hide_index=True, width="stretch")
else:
    st.caption("None yet.")
