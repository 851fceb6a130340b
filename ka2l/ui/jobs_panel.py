"""The job panel: the whole job's progress and ETA with its phases under it, when it started and how
long it took, its settings, a link to what it made, the log tail, Cancel / Resume. Polls the job
rows, so it shows the same thing after a reload, in a second tab and after an app restart."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from .. import jobs
from ..views import jobs as job_views
from .state import POOL_KEY, RUN_KEY

ICONS = {"done": ":material/check_circle:", "running": ":material/progress_activity:", "pending": ":material/radio_button_unchecked:",
         "skipped": ":material/skip_next:"}
RESULT_PAGES = {"stage1": ("app_pages/scores.py", "Scores"), "triage": ("app_pages/scores.py", "Scores"),
                "decoder": ("app_pages/augment.py", "Augment"), "generate": ("app_pages/augment.py", "Augment"),
                "push": ("app_pages/annotate.py", "Annotate"), "pull": ("app_pages/annotate.py", "Annotate"),
                "finetune": ("app_pages/finetune.py", "Fine-tune"), "evaluate": ("app_pages/finetune.py", "Fine-tune"),
                "reprobe": ("app_pages/finetune.py", "Fine-tune"), "experiment": ("app_pages/experiment.py", "Experiment")}


def _local(iso: str | None) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S") if iso else ""


def _timing(job: dict, view: dict) -> str:
    if view["started"] is None:
        return f"Queued {_local(job['created_at'])}"
    took = job_views.format_duration(view["elapsed_s"])
    if job["status"] in jobs.ACTIVE:
        return f"Started {_local(view['started'])} · running for {took}"
    return f"Started {_local(view['started'])} · ended {_local(job['finished_at'])} · took {took}"


def _count(row: dict) -> str:
    return f"{row['done']}/{row['total']}" if row["total"] else (str(row["done"]) if row["done"] else "")


def _phase_lines(view: dict) -> str:
    """One markdown line per phase, its stages after it; the running one with time, rate and notes."""
    lines = []
    for phase in view["phases"]:
        rows = phase["rows"]
        if not rows:
            note = " · not needed (already stored)" if phase["status"] == "skipped" else ""
            lines.append(f"- {ICONS[phase['status']]} {phase['name']}{note}")
            continue
        for row in rows:
            name = row["name"] if row["name"].startswith(phase["name"]) else f"{phase['name']}: {row['name']}"
            bits = [b for b in (_count(row), job_views.format_duration(row["elapsed_s"])) if b]
            if row["status"] == "running":
                if row["rate"]:
                    bits.append(f"{row['rate']:.2f}/s")
                if row["eta_s"] is not None:
                    bits.append(f"about {job_views.format_duration(row['eta_s'])} left in this phase")
                if phase.get("note"):
                    bits.append(phase["note"])
            lines.append(f"- {ICONS.get(row['status'], '')} {name} · " + " · ".join(bits) if bits else f"- {ICONS.get(row['status'], '')} {name}")
    return "\n".join(lines)


def _progress_text(job: dict, view: dict) -> str:
    text = f"Whole job: {view['fraction']:.0%}"
    if view["eta_s"] is not None:
        text += f" · about {job_views.format_duration(view['eta_s'])} left"
    elif job["status"] in jobs.ACTIVE:
        started = any(phase["rows"] for phase in view["phases"])
        text += " · estimating the time left" if started else " · starting (loading the model)"
    return text


def _parameters(job: dict) -> None:
    with st.expander("Parameters"):
        st.markdown("\n".join(f"- {k}: `{v}`" for k, v in job_views.describe_config(job)))
        st.json(job["config"], expanded=False)


def _select(pool_id: int | None, run_id: int | None) -> None:
    """Button callback (runs before the next run draws any widget, so the sidebar's pool may change)."""
    if pool_id is not None:
        st.session_state[POOL_KEY] = pool_id
    if run_id is not None:
        st.session_state[RUN_KEY] = run_id


def _result(job: dict, key: str) -> None:
    st.success(f"Done: {job_views.describe_result(job['result'])}.")
    refs = job_views.result_refs(job)
    page, title = RESULT_PAGES[job["kind"]]
    run_id = refs.get("run_id") if job["kind"] == "stage1" else None
    label = f"Open run {run_id} in {title}" if run_id else f"Open in {title}"
    if st.button(label, key=f"{key}-open-{job['id']}", icon=":material/open_in_new:", on_click=_select,
                 args=(refs.get("pool_id"), run_id), help="Selects the job's pool (and run) and opens the page."):
        st.switch_page(page)


def render_job(job: dict, key: str) -> None:
    pool = job["config"].get("pool")
    label = f"Job {job['id']} · {job['kind']}{f' · pool {pool}' if pool else ''} · **{job['status']}**"
    view = job_views.progress_view(job)
    with st.container(border=True):
        st.markdown(label)
        st.caption(_timing(job, view))
        if job["status"] in jobs.ACTIVE:
            st.progress(min(view["fraction"], 1.0), text=_progress_text(job, view))
            if view["phases"]:
                st.markdown(_phase_lines(view))
            if job["message"]:
                st.caption(job["message"])
            if st.button("Cancel", key=f"{key}-cancel-{job['id']}", help="Stops the worker process; stored work is kept."):
                jobs.cancel(job["id"])
                st.rerun()
        elif job["status"] == "queued":
            st.caption("Queued: starts when the running job ends.")
            if st.button("Cancel", key=f"{key}-cancel-{job['id']}"):
                jobs.cancel(job["id"])
                st.rerun()
        else:
            if view["phases"]:
                with st.expander(f"Phases ({view['fraction']:.0%} done)"):
                    st.markdown(_phase_lines(view))
            if job["status"] == "failed":
                st.error(job["error"] or "failed")
            elif job["status"] == "done" and job["result"]:
                _result(job, key)
        if job["status"] in ("failed", "cancelled"):
            if st.button("Resume", key=f"{key}-resume-{job['id']}", help="Continues the same run where it stopped."):
                try:
                    jobs.resume(job["id"])
                except jobs.JobPending as exc:
                    st.info(str(exc))
                else:
                    st.rerun()
        _parameters(job)
        tail = job_views.tail(job["id"], 12)
        if tail:
            with st.expander("Log"):
                st.code(tail, language=None)


@st.fragment(run_every=2)
def job_panel(kinds: tuple[str, ...] = jobs.KINDS, limit: int = 3, key: str = "panel") -> None:
    jobs.refresh()
    shown = [j for j in jobs.list_jobs(limit=20) if j["kind"] in kinds][:limit]
    if not shown:
        st.caption("No jobs yet.")
    for job in shown:
        render_job(job, key)
