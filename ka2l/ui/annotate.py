"""What the Annotate and Settings pages need of Stage 3a (the Label Studio round trip), reached through
ka2l.ui: the connection and its check, the local server, the pool's project, the push preview, live
progress, the answers and the SFT downloads. Every call that can fail raises a Ka2lError the page shows
with st.error. The token never leaves this module except masked."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import jobs
from ..annotate import connection, dataset, pull, push, server
from ..config import PushConfig
from ..errors import Ka2lError
from ..store import annotate as A
from ..store import queries as Q
from ..store.db import connect
from ..views.export import to_safe_csv

CHECK_SECONDS = 10      # a connection check is reused this long (page reruns must not hammer the server)
CONFLICT_COLOUR = "background-color: rgba(213, 94, 0, 0.18)"  # the map's "unknown" orange, light
HOW_TO_CONNECT = connection.HOW_TO_CONNECT
ENV_URL, ENV_TOKEN = connection.ENV_URL, connection.ENV_TOKEN


# -- the connection -----------------------------------------------------------------------------------

def current_connection() -> tuple[connection.Connection | None, str | None]:
    """(the connection ka2l uses or None, an error message when a configured one is broken)."""
    try:
        return connection.load(), None
    except Ka2lError as exc:
        return None, str(exc)


def test_connection(url: str, token: str) -> dict[str, Any]:
    """Who the token signs in as at ``url`` (raises a Ka2lError naming cause and fix). Not cached: a button."""
    from ..annotate.labelstudio import Client

    return Client(url, token, timeout=10, retries=0).whoami()


@st.cache_data(ttl=CHECK_SECONDS, show_spinner=False, max_entries=8)
def _check(url: str, masked: str, _token: str) -> dict[str, Any]:
    """Keyed by URL and the masked token (the token itself is not hashed into the cache key)."""
    try:
        return {"ok": True, "user": test_connection(url, _token)}
    except Ka2lError as exc:
        return {"ok": False, "error": str(exc)}


def check(conn: connection.Connection) -> dict[str, Any]:
    """{'ok': True, 'user': {...}} or {'ok': False, 'error': message}, reused for CHECK_SECONDS."""
    return _check(conn.url, conn.masked, conn.token)


def forget_check() -> None:
    _check.clear()


def save_connection(url: str, token: str) -> str:
    """Save to the 0600 file; returns its path. Raises ConfigError for a bad URL or token."""
    path = connection.save(url, token)
    forget_check()
    return str(path)


def forget_connection() -> bool:
    forget_check()
    return connection.forget()


def user_name(user: dict[str, Any]) -> str:
    return str(user.get("email") or user.get("username") or f"user {user.get('id')}")


def overridden_by() -> str | None:
    """Where a connection that beats the Settings file comes from (the environment or secrets.toml), if any."""
    conn, _ = current_connection()
    if conn is not None and conn.source in ("environment", "secrets.toml"):
        return conn.source
    return None


# -- the local server ---------------------------------------------------------------------------------

def local_server() -> dict[str, Any]:
    """{'installed', 'running', 'healthy', 'url', 'pid'} of the local Label Studio."""
    info = server.status() or {}
    return {"installed": server.installed(), "running": bool(info.get("running")), "healthy": bool(info.get("healthy")),
            "url": info.get("url"), "pid": info.get("pid"), "venv": str(server.venv_dir())}


def start_local_server(progress=None) -> dict[str, Any]:
    """Install (if missing) and start the local server, and connect ka2l to it. Blocks until it answers
    (about a minute the first time, seconds after)."""
    if not server.installed():
        server.install(progress=progress)
    info = server.start(progress=progress)
    forget_check()
    return {"url": info.url, "pid": info.pid, "user": info.username}


def stop_local_server() -> bool:
    stopped = server.stop()
    forget_check()
    return stopped


# -- the pool's project, the preview, the push --------------------------------------------------------

def project(pool_id: int) -> dict[str, Any] | None:
    """The pool's newest Label Studio project (ka2l's row) with its browser ``link``, or None before the first push."""
    with connect() as db:
        rows = A.projects(db, pool_id=pool_id)
        if not rows:
            return None
        row = dict(rows[0])
        row["linked"] = A.link_count(db, row["id"])
    row["link"] = f"{row['url']}/projects/{int(row['project_id'])}/data"
    return row


def preview(pool_name: str, diversity: float):
    """What a push would send, in order (rank 1 first), with ``pushed`` for what is already there."""
    return push.preview(pool_name, PushConfig(diversity=diversity))


def submit(kind: str, pool_name: str, cfg: dict[str, Any]) -> int:
    """Queue a push or pull job (raises jobs.JobPending when the same one is queued or running)."""
    return jobs.submit(kind, {"pool": pool_name, kind: cfg})


def active_jobs(pool_name: str) -> set[int]:
    """Ids of this pool's push / pull jobs that are queued or running."""
    return {j["id"] for j in jobs.list_jobs(limit=20) if j["kind"] in ("push", "pull")
            and j["config"].get("pool") == pool_name and j["status"] in jobs.PENDING}


# -- progress, answers, downloads ---------------------------------------------------------------------

def progress(pool_name: str) -> dict[str, Any]:
    return pull.progress(pool_name)


def answers(pool_name: str):
    return pull.answers(pool_name)


def highlight_conflicts(frame):
    """The answers table with rows whose annotators disagree tinted (a pandas Styler st.dataframe draws)."""
    def tint(row):
        return [CONFLICT_COLOUR if bool(row["conflict"]) else ""] * len(row)

    return frame.style.apply(tint, axis=1)


def downloads(pool_name: str) -> tuple[dict[str, tuple[bytes, str, str]], int]:
    """The SFT dataset as files ({label: (bytes, file name, mime)}) and its number of pairs."""
    import json

    frame = dataset.pairs(pool_name)
    name = dataset.dataset_name(pool_name)
    return {
        "Alpaca JSON (LLaMA-Factory)": (dataset.alpaca_json(frame), f"{name}.json", "application/json"),
        "dataset_info.json": (json.dumps(dataset.dataset_info_entry(name, f"{name}.json"), indent=2).encode("utf-8"),
                              "dataset_info.json", "application/json"),
        "JSONL (datasets)": (dataset.to_jsonl(frame), f"{name}.jsonl", "application/jsonl"),
        "CSV": (to_safe_csv(frame), f"{name}.csv", "text/csv"),
    }, len(frame)


def pool_id(pool_name: str) -> int:
    with connect() as db:
        return int(Q.get_pool(db, pool_name)["id"])


# -- the Map page: annotation rank and coverage -------------------------------------------------------

def annotation_order(pool_id: int):
    """The pool's tasks in annotation order (ka2l.views.maps.annotation_order)."""
    from ..views.maps import annotation_order as order

    return order(pool_id)


def rank_overlay(fig, points, order, n: int) -> None:
    """Mark the first ``n`` tasks' questions on the map figure: an open ring with the rank beside it.
    customdata starts with the question id, like the map's own points, so a lasso over them selects those questions."""
    import plotly.graph_objects as go

    from .charts import hover_text

    first = order.head(max(0, int(n))).dropna(subset=["question_id"])
    ranks = dict(zip(first["question_id"].astype(int), first["rank"].astype(int)))
    shown = points[points["question_id"].isin(ranks)]
    if shown.empty:
        return
    labels = [ranks[int(q)] for q in shown["question_id"]]
    fig.add_trace(go.Scattergl(
        x=shown["x"], y=shown["y"], mode="markers+text", name=f"first {int(n)} tasks (rank)", text=[str(r) for r in labels],
        textposition="top right", textfont={"size": 10},
        marker={"symbol": "circle-open", "size": 13, "color": "#000000", "line": {"width": 1.5}},
        customdata=[[int(q), hover_text(t), r] for q, t, r in zip(shown["question_id"], shown["question"], labels)],
        hovertemplate="%{customdata[1]}<br>annotation rank: %{customdata[2]}<extra></extra>"))
