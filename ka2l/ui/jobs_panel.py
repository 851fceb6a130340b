"""The job panel: live progress, ETA, log tail, Cancel / Resume. Polls the job rows, so it shows the
same thing after a reload, in a second tab and after an app restart."""

from __future__ import annotations

import streamlit as st

from .. import jobs


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f" · about {m} min {s:02d} s left" if m else f" · about {s} s left"


def render_job(job: dict, key: str) -> None:
    pool = job["config"].get("pool")
    label = f"Job {job['id']} · {job['kind']}{f' · pool {pool}' if pool else ''} · **{job['status']}**"
    with st.container(border=True):
        st.markdown(label)
        if job["status"] in jobs.ACTIVE:
            total = job["total"] or 0
            rate, eta = jobs.rate_and_eta(job)
            frac = min(job["done"] / total, 1.0) if total else 0.0
            rate_txt = f" · {rate:.2f}/s" if rate else ""
            st.progress(frac, text=f"{job['stage'] or 'starting'}: {job['done']}/{total or '?'}{rate_txt}{_fmt_eta(eta)}")
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
        elif job["status"] == "failed":
            st.error(job["error"] or "failed")
        elif job["status"] == "done" and job["result"]:
            st.success(f"Done: {jobs.describe_result(job['result'])}.")
        if job["status"] in ("failed", "cancelled"):
            if st.button("Resume", key=f"{key}-resume-{job['id']}", help="Continues the same run where it stopped."):
                jobs.resume(job["id"])
                st.rerun()
        tail = jobs.tail(job["id"], 12)
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
