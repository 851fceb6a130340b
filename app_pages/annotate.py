"""Annotate (Stage 3a): push the approved set to Label Studio in annotation order, follow the annotators,
pull their answers back, download the SFT dataset."""

import streamlit as st

from ka2l import jobs
from ka2l.errors import Ka2lError
from ka2l.ui import annotate as ann
from ka2l.ui.jobs_panel import job_panel
from ka2l.ui.state import active_pool, flash, show_flash

LIVE_SECONDS = 5  # how often annotation progress is re-read from Label Studio
ACTIVE_KEY = "ka2l.annotate.active_jobs"  # push / pull jobs seen running, to redraw the page when they end



def _submit(kind: str, cfg: dict, what: str) -> None:
    """Queue a push or pull job of this pool and say so; the same job already queued or running is named, not doubled."""
    try:
        job_id = ann.submit(kind, pool["name"], cfg)
    except jobs.JobPending as exc:
        st.info(str(exc))
    except Ka2lError as exc:
        st.error(str(exc))
    else:
        st.session_state[ACTIVE_KEY] = st.session_state.get(ACTIVE_KEY, set()) | {job_id}
        st.success(f"Job {job_id} {what}")


st.title("Annotate: answers from Label Studio")
show_flash("annotate")
pool = active_pool()
if pool is None:
    st.info("No pool yet: add one on the Pool page, run Stage 1 (Probe page) and curate the unknowns (Scores, Map, Augment).")
    st.stop()

# -- connection ---------------------------------------------------------------------------------------
st.subheader("Connection")
conn, broken = ann.current_connection()
connected = False
if broken:
    st.error(broken)
elif conn is None:
    st.warning("Not connected to Label Studio. Start the local server below, or enter a URL and token on the Settings page.")
else:
    checked = ann.check(conn)
    if checked["ok"]:
        connected = True
        st.success(f"Connected to {conn.url} as {ann.user_name(checked['user'])} · token {conn.masked} (from {conn.source}).")
    else:
        st.error(checked["error"])
local = ann.local_server()
c = st.columns([3, 1, 1])
if local["running"]:
    c[0].caption(f"Local Label Studio: running at {local['url']} (pid {local['pid']}).")
elif local["installed"]:
    c[0].caption("Local Label Studio: installed, not running. Start it to annotate on this machine.")
else:
    c[0].caption(f"Local Label Studio: not installed. Start installs it first (about a minute, into {local['venv']}).")
if c[1].button("Start local server", disabled=local["running"], help="Starts Label Studio on 127.0.0.1 with its own data "
               "folder under ka2l's, creates its user and token and connects ka2l to it. The first start takes about a minute."):
    try:
        with st.spinner("Starting Label Studio (about a minute the first time, seconds after)..."):
            started = ann.start_local_server()
    except Ka2lError as exc:
        st.error(str(exc))
    else:
        flash("annotate", f"Label Studio runs at {started['url']} (pid {started['pid']}); ka2l is connected to it as {started['user']}.")
        st.rerun()
if c[2].button("Stop local server", disabled=not local["running"], help="Stops the local Label Studio by its pid. Its projects are kept."):
    try:
        ann.stop_local_server()
    except Ka2lError as exc:
        st.error(str(exc))
    else:
        flash("annotate", "Stopped the local Label Studio; its projects and annotations stay in its data folder.")
        st.rerun()
st.page_link("app_pages/settings.py", label="Connect to another Label Studio (Settings)", icon=":material/settings:")

# -- project and push ---------------------------------------------------------------------------------
st.subheader("Push")
project = ann.project(pool["id"])
if project:
    c = st.columns([3, 1])
    c[0].markdown(f"Project **{project['title']}** · Label Studio project {project['project_id']} on {project['url']} · "
                  f"{project['linked']} task(s) pushed · last push {project['pushed_at'] or 'never'} · last pull {project['pulled_at'] or 'never'}")
    c[1].link_button("Open in Label Studio", project["link"], icon=":material/open_in_new:")
else:
    st.caption(f"Pool {pool['name']!r} has no Label Studio project yet: the first push creates one.")
diversity = st.slider("Diversity of the order", 0.0, 1.0, 0.3, 0.05,
                      help="0: most uncertain first (P(unknown)). Higher values push near-copies of questions already ranked "
                           "further back, so the first tasks spread over the unknown region.")
try:
    preview = ann.preview(pool["name"], float(diversity))
except Ka2lError as exc:
    st.error(str(exc))
    preview = None
if preview is not None:
    new = int((~preview["pushed"].astype(bool)).sum())
    c = st.columns(3)
    c[0].metric("Approved set", len(preview))
    c[1].metric("Already pushed", len(preview) - new)
    c[2].metric("To push", new)
    if preview.empty:
        st.info("The approved set is empty: add unknown questions to the curation set (Scores, Map) or approve candidates (Augment).")
    else:
        st.caption(f"In the order annotators will see them (rank 1 first; ranked on {preview.attrs.get('space') or 'the probe layer'}). "
                   "Already pushed tasks keep their rank.")
        st.dataframe(preview[["rank", "pushed", "kind", "question", "p_unknown", "se", "low_answer", "max_similarity", "ext_id"]],
                     hide_index=True, height=300,
                     column_config={"p_unknown": st.column_config.NumberColumn("P(unknown)", format="%.2f"),
                                    "se": st.column_config.NumberColumn("SE", format="%.2f"),
                                    "low_answer": "model's answer (prediction)",
                                    "max_similarity": st.column_config.NumberColumn("similarity to earlier", format="%.2f"),
                                    "ext_id": "pool id"})
    with st.form("push"):
        c = st.columns(2)
        title = c[0].text_input("Project title (first push only)", value="", placeholder=f"ka2l: {pool['name']}", disabled=bool(project))
        batch = c[1].number_input("Tasks per import call", 1, 5000, 200)
        if st.form_submit_button(f"Push {new} task(s)", type="primary", disabled=not (connected and new)):
            _submit("push", {"diversity": float(diversity), "title": title.strip(), "batch_size": int(batch)},
                    f"pushes {new} task(s); it keeps running if you reload or close the tab.")
    if not connected:
        st.caption("Push and Pull need a working connection (above).")
job_panel(kinds=("push", "pull"), key="annotate")


# -- live progress --------------------------------------------------------------------------------------
def _live(pool_name: str, has_project: bool) -> None:
    """Annotated / pushed, re-read every LIVE_SECONDS; redraws the whole page when a push or pull of this pool ends."""
    running = ann.active_jobs(pool_name)
    seen = st.session_state.get(ACTIVE_KEY, set())
    st.session_state[ACTIVE_KEY] = running
    if seen - running:  # a job ended since the last look: the project, preview and answers changed
        st.rerun(scope="app")
    if not has_project:
        return
    try:
        p = ann.progress(pool_name)
    except Ka2lError as exc:
        st.error(str(exc))
        return
    c = st.columns(4)
    c[0].metric("Pushed", p["pushed"])
    c[1].metric("Annotated in Label Studio", p["annotated"])
    c[2].metric("Skipped", p["skipped"])
    c[3].metric("Pulled into ka2l", p["pulled"])
    share = p["annotated"] / p["pushed"] if p["pushed"] else 0.0
    st.progress(min(share, 1.0), text=f"{p['annotated']} of {p['pushed']} pushed tasks annotated ({share:.0%}) · "
                                       f"updates every {LIVE_SECONDS} s")


st.subheader("Progress")
st.fragment(_live, run_every=LIVE_SECONDS)(pool["name"], bool(project))

# -- pull, answers, downloads -------------------------------------------------------------------------
st.subheader("Answers")
if st.button("Pull answers", type="primary", disabled=not (connected and project),
             help="Fetches every annotation of the project; changed ones are updated, none is added twice."):
    _submit("pull", {}, "pulls the answers; the table updates when it is done.")
if not project:
    st.caption("Nothing pushed yet.")
    st.stop()
try:
    answers = ann.answers(pool["name"])
except Ka2lError as exc:
    st.error(str(exc))
    st.stop()
counts = answers["status"].value_counts()
n_conflicts = int(answers["conflict"].sum())
c = st.columns(5)
for col, status in zip(c, ("answered", "cannot answer", "skipped", "pending")):
    col.metric(status.capitalize(), int(counts.get(status, 0)))
c[4].metric("Conflicts", n_conflicts)
only = st.toggle("Only conflicts", value=False, disabled=not n_conflicts,
                 help="Items whose annotators disagree. The chosen answer follows the rule in ka2l.annotate.pull.")
shown = answers[answers["conflict"]] if only else answers
st.caption("Rows tinted orange have conflicting annotations; the chosen answer goes into the dataset.")
st.dataframe(ann.highlight_conflicts(shown[["rank", "question", "status", "answer", "conflict", "decided_by", "votes",
                                            "all_answers", "annotator", "updated_at"]]),
             hide_index=True, width="stretch", key="answers",
             column_config={"all_answers": "every annotation", "decided_by": "decided by"})
try:
    files, n_pairs = ann.downloads(pool["name"])
except Ka2lError as exc:
    st.error(str(exc))
    st.stop()
st.caption(f"SFT dataset: {n_pairs} (question, answer) pair(s) with provenance. Put the alpaca file and dataset_info.json in "
           "one folder and train with LLaMA-Factory (`--dataset_dir FOLDER --dataset NAME`).")
c = st.columns(len(files))
for col, (label, (data, name, mime)) in zip(c, files.items()):
    col.download_button(label, data, file_name=name, mime=mime, disabled=not n_pairs)
