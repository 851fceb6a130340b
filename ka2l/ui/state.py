"""Named session-state keys and the shared sidebar. Durable state is in the database, not here."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import settings
from ..paths import data_dir
from . import data

POOL_KEY = "ka2l.pool_id"
RUN_KEY = "ka2l.run_id"
NEXT_POOL_KEY = "ka2l.next_pool_id"  # a pool to make active, applied before the sidebar's selectbox exists
FLASH_KEY = "ka2l.flash"             # messages that survive one st.rerun(): {page: [(kind, text), ...]}


def flash(page: str, text: str, kind: str = "success") -> None:
    """Show ``text`` on ``page`` in its next run (a message set just before ``st.rerun()``)."""
    st.session_state.setdefault(FLASH_KEY, {}).setdefault(page, []).append((kind, text))


def show_flash(page: str) -> None:
    for kind, text in st.session_state.get(FLASH_KEY, {}).pop(page, []):
        getattr(st, kind)(text)


def activate_pool(pool_id: int, page: str, message: str) -> None:
    """Make ``pool_id`` the active pool and rerun, with ``message`` shown on ``page``.

    The sidebar's "Active pool" selectbox owns ``POOL_KEY`` once it is drawn, and Streamlit refuses
    writes to a widget's key after that in the same run (StreamlitWidgetAlreadyInstantiatedError).
    So the choice waits under its own key and ``active_pool`` applies it at the start of the next
    run, before the selectbox exists."""
    st.session_state[NEXT_POOL_KEY] = int(pool_id)
    flash(page, message)
    st.rerun()


def active_pool() -> dict[str, Any] | None:
    pools = data.pools()
    if not pools:
        return None
    ids = [p["id"] for p in pools]
    if st.session_state.get(NEXT_POOL_KEY) in ids:
        st.session_state[POOL_KEY] = st.session_state.pop(NEXT_POOL_KEY)
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
    if st.session_state.get(RUN_KEY) not in ids:  # the newest run of the plain model; a re-probe of a fine-tune only when chosen
        st.session_state[RUN_KEY] = next((r["id"] for r in runs if not _adapter(r)), ids[0])

    def label(i: int) -> str:
        r = next(r for r in runs if r["id"] == i)
        return f"Run {r['id']} · {r['model']}" + (f" + adapter {_adapter(r)}" if _adapter(r) else "") + f" · {r['created_at']}"

    run_id = st.selectbox("Stage 1 run", ids, key=RUN_KEY, format_func=label)
    return next(r for r in runs if r["id"] == run_id)


def _adapter(run: dict[str, Any]) -> str | None:
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return (config.get("model") or {}).get("adapter")


def require_run(kind: str = "stage1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(active pool, chosen finished run), or a hint and a stop when there is none yet."""
    pool = active_pool()
    run = select_run(pool, kind) if pool else None
    if run is None:
        st.info("No finished Stage 1 run for the active pool yet: launch one on the Probe page.")
        st.stop()
    return pool, run
