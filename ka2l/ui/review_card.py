"""The candidate review queue: one candidate at a time with keyboard shortcuts, bulk decisions by
filter, undo; picking a row of the queue's table opens that candidate. Every decision goes to the
database at once; only 'skipped' and the table's pick live in the session. An approved edit is
re-probed with the probed model, loaded once per generation batch and kept."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ..augment import review
from ..augment.candidates import Reprober
from ..errors import Ka2lError

SKIPPED_KEY = "ka2l.review.skipped"
TABLE_KEY = "ka2l.review.table"  # + a version: a decision starts a fresh table, so its pick never points at another row
VERSION_KEY = "ka2l.review.table-version"
SHORTCUTS = {"approve": "A", "reject": "X", "skip": "S", "undo": "U"}


def _filtered(pool_id: int) -> pd.DataFrame:
    c = st.columns(4)
    show = c[0].selectbox("Show", ["pending", "approved", "rejected", "all"], key="rq-show")
    verdict = c[1].selectbox("Probe verdict", ["all", "re-probed unknown", "flagged known"], key="rq-verdict",
                             help="The saved probe re-scores every kept candidate; 'flagged known' ones are probably not new unknowns.")
    min_p = c[2].slider("Min P(unknown)", 0.0, 1.0, 0.0, 0.05, key="rq-min-p")
    max_sim = c[3].slider("Max similarity to nearest pool question", -1.0, 1.0, 1.0, 0.01, key="rq-max-sim")
    frame = pd.DataFrame(review.queue(pool_id, None if show == "all" else show))
    if frame.empty:
        return frame
    if verdict != "all":
        frame = frame[frame["flagged_known"] == (1 if verdict == "flagged known" else 0)]
    return frame[(frame["p_unknown"] >= min_p - 1e-9) & (frame["nearest_similarity"] <= max_sim + 1e-9)]


def _undo(pool_id: int) -> None:
    last = review.last_action(pool_id)
    label = f"Undo last ({last[0]['after_decision']}, {len(last)} candidate{'s' if len(last) > 1 else ''})" if last else "Undo last"
    if st.button(label, key="rq-undo", disabled=not last, shortcut=SHORTCUTS["undo"], help="Reverts the latest decision, single or bulk."):
        undone = review.undo(pool_id)
        st.toast(f"Undid {len(undone)} decision(s).")
        st.rerun()


@st.cache_resource(max_entries=1, show_spinner=False)
def _reprober(generation_id: int, device: str) -> Reprober:
    return Reprober(generation_id, device)


def _reprobe(candidate: dict, text: str) -> dict:
    from .. import settings

    with st.spinner("Re-probing the edited question..."):
        return _reprober(int(candidate["generation_id"]), settings.load()["device"])([text])[0]


def _fresh_table() -> None:
    st.session_state[VERSION_KEY] = st.session_state.get(VERSION_KEY, 0) + 1


def _decide(pool_id: int, ids: list[int], decision: str, edited: str | None = None) -> None:
    try:
        n = review.decide(pool_id, ids, decision, edited, reprobe=_reprobe)
    except Ka2lError as exc:
        st.error(str(exc))
        return
    _fresh_table()
    st.toast(f"{decision.capitalize()} {n} candidate(s).")
    st.rerun()


def _card(pool_id: int, row: pd.Series, position: str) -> None:
    cid = int(row["id"])
    with st.container(border=True):
        st.caption(f"{position} · candidate {cid} · batch {row['generation_id']} · sample {row['sample']} · noise {row['noise']:g} · "
                   f"currently **{row['decision']}**")
        st.markdown(f"**Source question:** {row['source_question']}")
        current = row["edited_text"] if isinstance(row["edited_text"], str) else row["text"]
        text = st.text_input("Candidate (edit before approving if needed)", value=current, key=f"rq-text-{cid}")
        if isinstance(row["edited_text"], str):
            st.caption(f"Decoder wrote: {row['text']}")
        c = st.columns(2)
        edited_row = isinstance(row["edited_text"], str)
        c[0].metric("P(unknown), re-probed" + (" (your edit)" if edited_row else ""), f"{row['p_unknown']:.2f}")
        if row["flagged_known"]:
            c[0].warning("The probe calls this one known: it may not add new knowledge.")
        c[1].metric("Similarity to nearest pool question", f"{row['nearest_similarity']:.3f}")
        c[1].caption(f"Nearest: {row['nearest_question']}")
        if edited_row:
            st.caption(f"The decoder's text: P(unknown) {row['decoded_p_unknown']:.2f}, similarity {row['decoded_nearest_similarity']:.3f}.")
        b = st.columns(3)
        edited = text if text.strip() and " ".join(text.split()) != row["text"] else None
        if b[0].button("Approve" + (" edited" if edited else ""), key="rq-approve", type="primary", shortcut=SHORTCUTS["approve"]):
            _decide(pool_id, [cid], "approved", edited)
        if b[1].button("Reject", key="rq-reject", shortcut=SHORTCUTS["reject"]):
            _decide(pool_id, [cid], "rejected")
        if b[2].button("Skip", key="rq-skip", shortcut=SHORTCUTS["skip"], help="Leave it pending and show the next one."):
            st.session_state.setdefault(SKIPPED_KEY, []).append(cid)
            _fresh_table()
            st.rerun()


def review_queue(pool_id: int) -> None:
    counts = review.counts(pool_id)
    c = st.columns(4)
    for col, name in zip(c, ("pending", "approved", "rejected")):
        col.metric(name.capitalize(), counts[name])
    with c[3]:
        _undo(pool_id)
    if not sum(counts.values()):
        st.info("No candidates yet: generate some in step 2.")
        return
    frame = _filtered(pool_id)
    st.caption(f"{len(frame)} candidate(s) match. Shortcuts: **A** approve · **X** reject · **S** skip · **U** undo.")
    if frame.empty:
        return
    card = st.container()  # filled below, once the table (drawn at the bottom) says whether a row was picked
    skipped = set(st.session_state.get(SKIPPED_KEY, []))
    todo = frame[~frame["id"].isin(skipped)]
    with st.expander(f"Bulk: decide all {len(frame)} matching candidates"):
        st.caption("Applies to every candidate the filters above match; one Undo reverts it.")
        b = st.columns(3)
        if b[0].button(f"Approve all {len(frame)}", key="rq-bulk-approve"):
            _decide(pool_id, frame["id"].tolist(), "approved")
        if b[1].button(f"Reject all {len(frame)}", key="rq-bulk-reject"):
            _decide(pool_id, frame["id"].tolist(), "rejected")
        if b[2].button(f"Back to pending ({len(frame)})", key="rq-bulk-pending"):
            _decide(pool_id, frame["id"].tolist(), "pending")
    st.caption("Pick a row to open that candidate above.")
    table = st.dataframe(frame[["id", "source_question", "text", "edited_text", "p_unknown", "flagged_known", "nearest_question",
                                "nearest_similarity", "decision"]], hide_index=True, on_select="rerun", selection_mode="single-row",
                         key=f"{TABLE_KEY}-{st.session_state.get(VERSION_KEY, 0)}",
                         column_config={"p_unknown": st.column_config.ProgressColumn("P(unknown)", min_value=0.0, max_value=1.0, format="%.2f"),
                                        "nearest_similarity": st.column_config.NumberColumn("similarity", format="%.3f")})
    picked = [i for i in table.selection.rows if i < len(frame)]
    with card:
        if picked:
            _card(pool_id, frame.iloc[picked[0]], f"picked from the table ({picked[0] + 1} of {len(frame)})")
        elif todo.empty:
            st.info(f"You skipped all {len(frame)} matching candidate(s).")
            if st.button("Show skipped ones again"):
                st.session_state[SKIPPED_KEY] = []
                st.rerun()
        else:
            _card(pool_id, todo.iloc[0], f"1 of {len(todo)}")
