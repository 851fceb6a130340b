"""Scores: every question of a Stage 1 run; filters; drill-down; selection into (and out of) the curation set; downloads."""

import streamlit as st

from ka2l.errors import Ka2lError
from ka2l.ui import actions, data
from ka2l.ui.state import flash, require_run, show_flash

st.title("Scores")
pool, run = require_run()

try:
    frame = data.scores(run["id"])
except Ka2lError as exc:
    st.error(str(exc))
    st.stop()


def _add(ids: list[int]) -> None:
    added = actions.curation.add(pool["id"], ids, source=f"scores/run {run['id']}")
    flash("scores", f"Added {added} new question(s); the curation set has {len(actions.curation.member_ids(pool['id']))}.")


def _remove(ids: list[int]) -> None:
    removed = actions.curation.remove(pool["id"], ids)
    flash("scores", f"Removed {removed} question(s); the curation set has {len(actions.curation.member_ids(pool['id']))}.")


c = st.columns(4)
label = c[0].selectbox("Label", data.LABEL_FILTERS, format_func={"all": "all", "unknown": "unknown (BiSE = 1)", "known": "known (BiSE = 0)"}.get)
correct = c[1].selectbox("Correctness", data.CORRECTNESS_FILTERS, disabled=frame["correct"].isna().all())
se_min, se_max = float(frame["se"].min()), float(frame["se"].max())
se_range = c[2].slider("SE range (nats)", se_min, max(se_max, se_min + 1e-6), (se_min, max(se_max, se_min + 1e-6)))
text = c[3].text_input("Question contains")
view = data.filter_scores(frame, data.ScoresFilter(label=label, correctness=correct, se_range=se_range, contains=text))
shown = data.with_curation(view, actions.curation.member_ids(pool["id"]))

st.caption(f"{len(view)} of {len(frame)} questions. Click column headers to sort; select rows for the drill-down and the curation set.")
event = st.dataframe(shown, hide_index=True, width="stretch", on_select="rerun", selection_mode="multi-row", key="scores-table",
                     column_config={"question_id": None, "in_set": st.column_config.CheckboxColumn("in set", help="In the curation set"),
                                    "se": st.column_config.NumberColumn("SE", format="%.3f"),
                                    "se_weighted": st.column_config.NumberColumn("SE (weighted)", format="%.3f"),
                                    "p_unknown": st.column_config.ProgressColumn("P(unknown)", min_value=0.0, max_value=1.0, format="%.2f")})
chosen = shown.iloc[event.selection.rows] if event and event.selection.rows else shown.iloc[0:0]
in_set = data.curated_ids(chosen)

add, remove, downloads = st.columns([1, 1, 1])
add.button(f"Add {len(chosen)} selected to the curation set", disabled=chosen.empty, on_click=_add, args=(chosen["question_id"].tolist(),))
remove.button(f"Remove {len(in_set)} selected from the curation set", disabled=not in_set, on_click=_remove, args=(in_set,),
              help="Only the selected questions that are in the set; the questions stay in the pool.")
show_flash("scores")
csv_file, jsonl_file = data.download_files(view)  # ready bytes, cached per filter: a click never waits on the server
downloads.download_button("Download CSV", csv_file, file_name=f"run-{run['id']}-scores.csv", mime="text/csv", on_click="ignore")
downloads.download_button("Download JSONL", jsonl_file, file_name=f"run-{run['id']}-scores.jsonl", mime="application/jsonl",
                          on_click="ignore")

if not view.empty:
    text_of = dict(zip(view["question_id"].tolist(), view["question"].tolist()))
    options = list(text_of)
    first = int(chosen.iloc[0]["question_id"]) if not chosen.empty else options[0]
    qid = st.selectbox("Drill down into", options, index=options.index(first), key=f"drill-{first}", format_func=text_of.get)
    d = data.detail(run["id"], int(qid))
    st.subheader(d["question"])
    st.write(f"Low-temperature answer: **{d['low']}**" + (f" · gold: {' | '.join(d['gold'])}" if d["gold"] else ""))
    st.caption(f"Probe layer: {d['layer']} · judge: {d['judge']} · {d['judge_calls']} judge calls")
    for cl in d["clusters"]:
        with st.container(border=True):
            st.markdown(f"**Cluster {cl['cluster']}** · {cl['size']} answer(s)")
            for a in cl["answers"]:
                st.write(f"- {a}")
    if d["verdicts"]:
        with st.expander("Judge verdicts"):
            st.dataframe(d["verdicts"], hide_index=True)
