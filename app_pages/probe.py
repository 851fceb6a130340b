"""Probe: configure and launch Stage 1 as a background job, or triage a pool with a saved probe."""

import streamlit as st

from ka2l import jobs
from ka2l.config import BACKENDS, EXECUTORS, JUDGE_KINDS, PROBE_KINDS, THRESHOLD_RULES, ExecutorConfig, SamplingConfig, field_help
from ka2l.errors import Ka2lError
from ka2l.ui import actions
from ka2l.ui.jobs_panel import job_panel
from ka2l.ui.state import active_pool

st.title("Stage 1: knowledge-distribution probing")
pool = active_pool()
if pool is None:
    st.info("Import a pool on the Pool page first.")
    st.stop()

s = actions.settings.load()
tab_stage1, tab_triage = st.tabs(["Run Stage 1", "Triage a pool with a saved probe"])
EXECUTOR_HELP = field_help(ExecutorConfig)


def executor_settings(key: str) -> dict:
    """Where the job's model stages run: this machine, or a Ray cluster (ExecutorConfig)."""
    c = st.columns(3)
    kind = c[0].selectbox("Executor", EXECUTORS, help=EXECUTOR_HELP["kind"], key=f"{key}-executor")
    address = c[1].text_input("Ray cluster address", help=EXECUTOR_HELP["address"], key=f"{key}-ray-address")
    actors = c[2].number_input("Ray actors per stage", min_value=1, max_value=256, value=1, help=EXECUTOR_HELP["num_actors"],
                               key=f"{key}-ray-actors")
    return {"kind": kind, "address": address.strip() or None, "num_actors": int(actors)}


with tab_stage1, st.form("stage1"):
    st.write(f"Pool: **{pool['name']}** ({pool['n_questions']} questions)")
    model = st.text_input("Model (hub id, folder or .gguf)", value=s["model"])
    size_note = actions.hidden_states_size(pool["name"], model)
    if size_note:
        st.caption(size_note)
    c = st.columns(4)
    k = c[0].number_input("Samples k", min_value=2, max_value=50, value=10)
    temperature = c[1].number_input("Temperature", min_value=0.05, max_value=2.0, value=1.0, step=0.05)
    low_t = c[2].number_input("Low temperature", min_value=0.01, max_value=1.0, value=0.1, step=0.01)
    max_new = c[3].number_input("Max new tokens", min_value=4, max_value=256, value=32)
    c = st.columns(4)
    judge = c[0].selectbox("Judge", JUDGE_KINDS, index=JUDGE_KINDS.index(s["judge"]))
    judge_model = c[1].text_input("Judge model (nli / embedding)", value=s["judge_model"] or "")
    rule = c[2].selectbox("Threshold rule", THRESHOLD_RULES)
    kind = c[3].selectbox("Probe kind", PROBE_KINDS)
    with st.expander("Advanced settings"):
        backend = st.selectbox("Sampling backend", BACKENDS, help=field_help(SamplingConfig)["backend"])
        executor = executor_settings("stage1")
    if st.form_submit_button("Launch Stage 1", type="primary"):
        cfg = {"model": {"name_or_path": model, "device": s["device"]},
               "sampling": {"k": int(k), "temperature": float(temperature), "low_temperature": float(low_t), "max_new_tokens": int(max_new),
                            "backend": backend},
               "judge": {"kind": judge, "model": judge_model or None, "device": s["device"]},
               "threshold": {"rule": rule}, "probe": {"kind": kind, "device": s["device"]}, "executor": executor}
        try:
            actions.check_executor(executor["kind"])
            job_id = jobs.submit("stage1", {"pool": pool["name"], "stage1": cfg})
            st.success(f"Job {job_id} submitted. Reloading this page or closing the tab does not stop it.")
        except jobs.JobPending as exc:
            st.info(str(exc))
            st.page_link("app_pages/jobs.py", label=f"Follow job {exc.job_id} on the Jobs page", icon=":material/work_history:")
        except Ka2lError as exc:
            st.error(str(exc))

with tab_triage:
    probes = actions.all_probes()
    if not probes:
        st.caption("No saved probe yet: run Stage 1 first.")
    else:
        with st.form("triage"):
            st.write(f"Pool to triage: **{pool['name']}**")
            probe_id = st.selectbox("Probe", [p["id"] for p in probes],
                                    format_func=lambda i: next(f"Probe {p['id']} · run {p['run_id']} · {p['kind']} · layer {p['layer']}" for p in probes if p["id"] == i))
            with st.expander("Advanced settings"):
                triage_executor = executor_settings("triage")
            if st.form_submit_button("Launch triage", type="primary"):
                try:
                    actions.check_executor(triage_executor["kind"])
                    job_id = jobs.submit("triage", {"pool": pool["name"], "triage": {"probe_id": int(probe_id), "device": s["device"],
                                                                                    "executor": triage_executor}})
                    st.success(f"Job {job_id} submitted.")
                except jobs.JobPending as exc:
                    st.info(str(exc))
                    st.page_link("app_pages/jobs.py", label=f"Follow job {exc.job_id} on the Jobs page", icon=":material/work_history:")
                except Ka2lError as exc:
                    st.error(str(exc))

st.subheader("Jobs")
job_panel(key="probe")
