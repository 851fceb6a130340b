"""Named session-state keys and the shared sidebar. Durable state is in the database, not here."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import settings
from ..paths import data_dir
from . import data

POOL_KEY = "ka2l.pool_id"
RUN_KEY = "ka2l.run_id"


def active_pool() -> dict[str, Any] | None:
    pools = data.pools()
    if not pools:
        return None
    ids = [p["id"] for p in pools]
    if st.session_state.get(POOL_KEY) not in ids:
        st.session_state[POOL_KEY] = ids[-1]
    return next(p for p in pools if p["id"] == st.session_state[POOL_KEY])


def sidebar() -> None:
    pools = data.pools()
    with st.sidebar:
        if pools:
            active_pool()
            st.selectbox("Active pool", [p["id"] for p in pools], key=POOL_KEY,
                         format_func=lambda i: next(f"{p['name']} ({p['n_questions']})" for p in pools if p["id"] == i))
        else:
            st.caption("No pool yet: add one on the Pool page.")
        s = settings.load()
        st.caption(f"Model: `{s['model']}` · device `{s['device']}` · judge `{s['judge']}`")
        st.caption(f"Data folder: `{data_dir()}`")


def select_run(pool: dict[str, Any], kind: str = "stage1") -> dict[str, Any] | None:
    """A finished run of the active pool, chosen by the user (latest first)."""
    runs = [r for r in reversed(data.runs()) if r["pool_id"] == pool["id"] and r["kind"] == kind and r["status"] == "done"]
    if not runs:
        return None
    ids = [r["id"] for r in runs]
    if st.session_state.get(RUN_KEY) not in ids:
        st.session_state[RUN_KEY] = ids[0]
    run_id = st.selectbox("Stage 1 run", ids, key=RUN_KEY,
                          format_func=lambda i: next(f"Run {r['id']} · {r['model']} · {r['created_at']}" for r in runs if r["id"] == i))
    return next(r for r in runs if r["id"] == run_id)


def require_run(kind: str = "stage1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(active pool, chosen finished run), or a hint and a stop when there is none yet."""
    pool = active_pool()
    run = select_run(pool, kind) if pool else None
    if run is None:
        st.info("No finished Stage 1 run for the active pool yet: launch one on the Probe page.")
        st.stop()
    return pool, run
