"""Push a pool's approved set (curated originals + approved decoded candidates) to a Label Studio project,
most useful questions first.

What a task holds (``task["data"]``): the question as plain text, the distinct sampled answers with their
cluster sizes as plain text (``<Text>``, never ``<HyperText>``: question and answer text is untrusted),
ka2l's ids (``ka2l_key``, ``question_id``, ``candidate_id``, ``source_question_id``, ``ext_id``), the
pool, the kind and the scores ``se``, ``p_unknown``, ``rank`` (numbers, so the Data Manager sorts and
filters by them). The model's low-temperature answer rides as a **prediction** on the ``answer`` text
area, so the annotator corrects it instead of typing from scratch.

Order (``ordering.rank_for_annotation``): P(unknown) with an MMR diversity term. The vectors compared:

- no approved candidate: the probe layer's hidden states of the latest Stage 1 run (last prompt token at
  the layer of the run's newest probe), the states the probe itself reads;
- approved candidates present: one space for every item, the *decoder space* of the decoder that made
  the first approved candidate (the states a decoder was trained on: its layer and pooling). Originals
  take their rows of that decoder's ``vectors.npy``; candidates of decoders in the same space take their
  stored vector; a candidate from a decoder of another space takes its source question's vector (a
  decoded question starts as a neighbour of its source).

MMR runs over the first ``RANK_MMR_LIMIT`` picks (O(limit * n * d)); the rest follow by P(unknown).
Ranks are unique per project: items pushed by a later push rank after everything already pushed, in
their order within the current ranking.

Idempotent: ``ls_tasks`` links each item key to its task. A push sends only unlinked items; each batch's
links are written in one transaction right after its import. When the server's task count differs
from the link count (a push killed between an import and its links), links are rebuilt from the
tasks' ``ka2l_key`` before anything is sent, so no task is created twice.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from ..config import PushConfig
from ..errors import ConfigError, NotFound, ProjectGone
from ..progress import NullProgress, Progress
from ..store import annotate as A
from ..store import queries as Q
from ..store.db import connect, now
from .labelstudio import TITLE_MAX

log = logging.getLogger(__name__)

QUESTION, SAMPLED, ANSWER, CANNOT = "question", "sampled_answers", "answer", "cannot_answer"  # tag names pull reads
CANNOT_CHOICE = "Cannot answer / ill-posed"
MODEL_VERSION = "ka2l low-temperature answer"
RANK_MMR_LIMIT = 1000

LABEL_CONFIG = f"""<View>
  <Header value="Question"/>
  <Text name="{QUESTION}" value="${QUESTION}"/>
  <Header value="The model's sampled answers (distinct answers, with how many samples gave each)"/>
  <Text name="sampled" value="${SAMPLED}"/>
  <Header value="Your answer: correct the model's answer, or write your own"/>
  <TextArea name="{ANSWER}" toName="{QUESTION}" editable="true" rows="3" placeholder="The correct answer"/>
  <Choices name="{CANNOT}" toName="{QUESTION}" choice="single" showInline="true">
    <Choice value="{CANNOT_CHOICE}"/>
  </Choices>
</View>"""


def label_config_hash(config: str = LABEL_CONFIG) -> str:
    return hashlib.sha256(config.encode()).hexdigest()[:16]


def _number(value: Any) -> float | None:
    """A JSON-safe float (NaN / NA -> None)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def sampled_text(clusters: list[tuple[str, int]]) -> str:
    """The distinct sampled answers, biggest cluster first, one per line.

    >>> print(sampled_text([("Paris", 5), ("Lyon", 1)]))
    5 x  Paris
    1 x  Lyon
    >>> sampled_text([])
    '(no sampled answers: a decoded question)'
    """
    if not clusters:
        return "(no sampled answers: a decoded question)"
    return "\n".join(f"{size} x  {text}" for text, size in clusters)


# -- the items ----------------------------------------------------------------------------------------

def _stage1(db, pool_id: int) -> dict[str, Any]:
    """Per pool question of the latest Stage 1 run: SE, probe P(unknown), low answer, clusters; and the
    probe layer's states (rows in pool order)."""
    from ..probing.probes import load_probe, predict_unknown
    from ..store.hidden import HiddenStates

    run = Q.latest_run(db, "stage1", pool_id)
    probes = Q.list_probes(db, run["id"])
    if not probes:
        raise NotFound(f"Stage 1 run {run['id']} has no probe, so there is no P(unknown) to rank by; re-run Stage 1.")
    net, meta = load_probe(probes[-1]["path"])
    pool_q = Q.pool_questions(db, pool_id)
    states = np.asarray(HiddenStates.open(run["hidden_path"]).layer(meta["layer"]), dtype=np.float32)  # (n_pool, hidden)
    p_unknown = predict_unknown(net, states)  # (n_pool,)
    row_of = {q["id"]: i for i, q in enumerate(pool_q)}
    scores = {r["question_id"]: r for r in Q.load_scores(db, run["id"])}
    answers = Q.load_answers(db, run["id"])
    per_q: dict[int, dict[str, Any]] = {}
    for q in pool_q:
        got = answers.get(q["id"], {"low": [], "sample": []})
        samples = [a["text"] for a in got["sample"]]
        cl = Q.get_clustering(db, run["id"], q["id"])
        ids = cl["cluster_ids"] if cl else [0] * len(samples)
        groups: dict[int, list[str]] = {}
        for text, c in zip(samples, ids):
            groups.setdefault(c, []).append(text)
        ranked = sorted(groups.values(), key=lambda g: -len(g))
        per_q[q["id"]] = {"se": _number(scores.get(q["id"], {}).get("se")), "p_unknown": float(p_unknown[row_of[q["id"]]]),
                          "low": got["low"][0]["text"] if got["low"] else None,
                          "clusters": [(g[0], len(g)) for g in ranked]}
    return {"run": run, "per_q": per_q, "states": states, "row_of": row_of, "n_pool": len(pool_q)}


def _vectors(db, frame, s1: dict[str, Any]) -> tuple[np.ndarray, str]:
    """One vector per item in one space (see the module docstring) and the space's name."""
    from ..augment.candidates import same_space_decoders
    from ..paths import decoders_dir
    from ..store import augment as S

    decoded = frame[frame["kind"] == "decoded"]
    if decoded.empty:
        rows = [s1["row_of"][int(q)] for q in frame["question_id"]]
        return s1["states"][rows], "probe layer"
    cands = {c["id"]: c for c in S.get_candidates(db, [int(i) for i in decoded["candidate_id"]])}
    decoder_of = {cid: S.get_generation(db, c["generation_id"])["decoder_id"] for cid, c in cands.items()}
    first = S.get_decoder(db, decoder_of[min(cands)])
    same = set(same_space_decoders(db, first))
    pool_vectors = np.load(decoders_dir() / f"decoder-{first['id']}" / "vectors.npy")[: s1["n_pool"]]  # pool questions first
    stored = S.candidate_vectors(db, cands)
    out = []
    for kind, qid, cid in zip(frame["kind"], frame["question_id"], frame["candidate_id"]):
        if kind == "original":
            out.append(pool_vectors[s1["row_of"][int(qid)]])
        elif decoder_of[int(cid)] in same and int(cid) in stored:
            out.append(stored[int(cid)])
        else:
            out.append(pool_vectors[s1["row_of"][int(cands[int(cid)]["source_question_id"])]])
    return np.stack(out).astype(np.float32), f"decoder {first['id']} space"


def items(pool: int | str, diversity: float = 0.3, progress: Progress | None = None):
    """The approved set as tasks-to-be, in annotation order: a DataFrame with item_key, kind, question,
    question_id, candidate_id, source_question_id, ext_id, se, p_unknown, low_answer, clusters (list of
    (answer, size)), max_similarity, rank (1 = first), and ``attrs['space']`` naming the vectors used."""
    import pandas as pd

    from ..augment.review import approved_set
    from .ordering import rank_for_annotation

    progress = progress or NullProgress()
    with connect() as db:
        pool_row = Q.get_pool(db, pool)
    frame = approved_set(pool_row["id"]).reset_index(drop=True)
    progress.stage("ranking", len(frame))
    cols = ["item_key", "kind", "question", "question_id", "candidate_id", "source_question_id", "ext_id", "se", "p_unknown",
            "low_answer", "clusters", "max_similarity", "rank"]
    if frame.empty:
        out = pd.DataFrame(columns=cols)
        out.attrs["space"] = ""
        return out
    with connect() as db:
        s1 = _stage1(db, pool_row["id"])
        vectors, space = _vectors(db, frame, s1)
    records = []
    for r in frame.to_dict("records"):
        original = r["kind"] == "original"
        stats = s1["per_q"].get(int(r["question_id"])) if original and pd.notna(r["question_id"]) else None
        if original and stats is None:
            raise NotFound(f"Question {r['question_id']} of the approved set is not in Stage 1 run {s1['run']['id']}; re-run Stage 1.")
        records.append({
            "item_key": A.item_key("question" if original else "candidate", r["question_id"] if original else r["candidate_id"]),
            "kind": r["kind"], "question": r["question"],
            "question_id": r["question_id"] if original else pd.NA, "candidate_id": pd.NA if original else r["candidate_id"],
            "source_question_id": pd.NA if original else r["source_question_id"], "ext_id": r["ext_id"] if original else r["source_ext_id"],
            "se": stats["se"] if stats else None, "p_unknown": stats["p_unknown"] if stats else _number(r["p_unknown"]),
            "low_answer": stats["low"] if stats else None, "clusters": stats["clusters"] if stats else []})
    out = pd.DataFrame(records, columns=cols[:-2])
    p = out["p_unknown"].astype("float64").fillna(0.0).to_numpy()  # a candidate not yet re-probed after an edit ranks last
    ranking = rank_for_annotation(p, vectors, diversity=diversity, limit=RANK_MMR_LIMIT)
    out["max_similarity"] = ranking.max_similarity
    out["rank"] = ranking.rank
    out = out.iloc[ranking.order].reset_index(drop=True)
    out = out.astype({"question_id": "Int64", "candidate_id": "Int64", "source_question_id": "Int64", "se": "Float64", "p_unknown": "Float64"})
    out.attrs["space"] = space
    progress.advance(len(frame))
    return out


# -- projects -----------------------------------------------------------------------------------------

def _client(client=None):
    if client is not None:
        return client
    from .connection import require
    from .labelstudio import Client

    return Client.from_connection(require())


def _project_row(db, pool_row: dict[str, Any], cfg: PushConfig, url: str) -> dict[str, Any] | None:
    if cfg.project:
        row = A.get_project(db, cfg.project)
        if row["pool_id"] != pool_row["id"]:
            raise ConfigError(f"Project {cfg.project} belongs to another pool (id {row['pool_id']}), not {pool_row['name']!r}; "
                              "pick one of this pool's projects or 0 for its newest.")
        if row["url"] != url.rstrip("/"):
            raise ConfigError(f"Project {cfg.project} lives on {row['url']}, but the connection is to {url}. Connect to "
                              f"{row['url']} in Settings, or push with project 0 to create a project on {url}.")
        return row
    rows = A.projects(db, pool_id=pool_row["id"], url=url)
    return rows[0] if rows else None


def _moved_project(pool_row: dict[str, Any], client) -> dict[str, Any] | None:
    """The pool's newest project when the server it was made on now answers at ``client.url`` (the local
    server restarted on another port): the project of that id there has the recorded title. Its URL is
    updated, so this push, the next pull and the links all keep using it instead of a second project that
    would receive every task again."""
    with connect() as db:
        rows = A.projects(db, pool_id=pool_row["id"])
    if not rows:
        return None
    row = rows[0]
    try:
        there = client.project(row["project_id"])
    except ProjectGone:
        return None
    if there["title"] != row["title"]:
        return None
    log.info("Project %s was made on %s; the server now answers at %s (same id and title): pushing there.",
             row["id"], row["url"], client.url)
    with connect() as db:
        A.move_project(db, row["id"], client.url)
        return A.get_project(db, row["id"])


def new_project(pool: int | str, title: str = "", client=None) -> dict[str, Any]:
    """Create a Label Studio project for the pool and record it (it becomes the pool's newest, so a push
    with project 0 goes there). Use it when the previous project was deleted in Label Studio."""
    client = _client(client)
    with connect() as db:
        pool_row = Q.get_pool(db, pool)
    title = (title or f"ka2l: {pool_row['name']}")[:TITLE_MAX]
    description = (f"Questions the model does not know, from ka2l pool {pool_row['name']!r}. Sort by rank (1 = annotate first); "
                   "correct the model's answer or mark the question as not answerable.")
    project_id = client.create_project(title, LABEL_CONFIG, description)
    with connect() as db:
        row_id = A.add_project(db, pool_row["id"], client.url, project_id, title, label_config_hash())
        return A.get_project(db, row_id)


# -- preview and push ---------------------------------------------------------------------------------

def preview(pool: int | str, cfg: PushConfig = PushConfig(), url: str | None = None):
    """What a push would send, in order: ``items`` plus ``pushed`` (already linked in the project a push
    with ``cfg`` would use on server ``url``; the saved connection's URL when None) and ``task_id``;
    pushed items show the rank they were pushed with. Reads only ka2l's store: no server call."""
    import pandas as pd

    frame = items(pool, cfg.diversity)
    frame["pushed"] = False
    frame["task_id"] = frame["rank"].map(lambda _: None).astype("Int64")
    if url is None:
        from .connection import load

        conn = load()
        url = conn.url if conn else None
    if url is None or frame.empty:
        return frame
    with connect() as db:
        row = _project_row(db, Q.get_pool(db, pool), cfg, url)
        linked = {r["item_key"]: r for r in A.links(db, row["id"])} if row else {}
    if linked:
        frame["pushed"] = frame["item_key"].isin(linked)
        frame["task_id"] = frame["item_key"].map(lambda k: linked[k]["task_id"] if k in linked else None).astype("Int64")
        nxt = max((r["rank"] for r in linked.values() if r["rank"] is not None), default=0) + 1
        ranks = []
        for k in frame["item_key"]:  # as push numbers them: new items after everything pushed, in ranking order
            if k in linked:
                ranks.append(linked[k]["rank"])
            else:
                ranks.append(nxt)
                nxt += 1
        frame["rank"] = pd.array(ranks, dtype="Int64")
    return frame


def task_of(item: dict[str, Any], pool_name: str, rank: int) -> dict[str, Any]:
    """The Label Studio task for one item (see the module docstring for its data)."""

    def ident(v: Any) -> int | None:
        return None if v is None or v != v or str(v) == "<NA>" else int(v)

    data = {QUESTION: str(item["question"]), SAMPLED: sampled_text(item["clusters"]), "ka2l_key": item["item_key"],
            "kind": item["kind"], "pool": pool_name, "question_id": ident(item["question_id"]),
            "candidate_id": ident(item["candidate_id"]), "source_question_id": ident(item["source_question_id"]),
            "ext_id": None if item["ext_id"] is None or str(item["ext_id"]) == "<NA>" else str(item["ext_id"]),
            "se": _number(item["se"]), "p_unknown": _number(item["p_unknown"]), "rank": int(rank)}
    task: dict[str, Any] = {"data": data}
    if item["low_answer"]:
        task["predictions"] = [{"model_version": MODEL_VERSION, "score": _number(1.0 - (data["p_unknown"] or 0.0)),
                                "result": [{"from_name": ANSWER, "to_name": QUESTION, "type": "textarea",
                                            "value": {"text": [str(item["low_answer"])]}}]}]
    return task


def push(pool: int | str, cfg: PushConfig = PushConfig(), progress: Progress | None = None, client=None) -> dict[str, Any]:
    """Send the pool's approved set to Label Studio (see the module docstring). Creates and records the
    project on the first push. Returns {project, project_id, url, title, pushed, reconciled, linked, tasks,
    skipped}: ka2l's project row id, Label Studio's id, the project's browser URL, how many tasks this push
    created, how many links it rebuilt from the server, links and server tasks after it, items already
    linked before it."""
    progress = progress or NullProgress()
    client = _client(client)
    with connect() as db:
        pool_row = Q.get_pool(db, pool)
        row = _project_row(db, pool_row, cfg, client.url)
    if row is None and not cfg.project:
        row = _moved_project(pool_row, client)
    ranked = items(pool_row["id"], cfg.diversity, progress)
    if row is None:
        row = new_project(pool_row["id"], cfg.title, client)
    project = row["id"]
    server_count = client.task_count(row["project_id"])  # ProjectGone before anything is sent
    with connect() as db:
        links_before = A.link_count(db, project)
    reconciled = 0
    if server_count != links_before:  # a push died between an import and its links: rebuild them from the server
        with connect() as db:
            linked = A.linked_keys(db, project)
        rebuilt = [{"item_key": t["data"]["ka2l_key"], "task_id": t["id"], "question": str(t["data"].get(QUESTION, "")),
                    "rank": t["data"].get("rank")} for t in client.tasks(row["project_id"])
                   if t["data"].get("ka2l_key") and t["data"]["ka2l_key"] not in linked]
        if rebuilt:
            with connect() as db:
                reconciled = A.add_links(db, project, rebuilt)
            log.info("project %s: rebuilt %d links from the server's tasks", row["project_id"], reconciled)
    with connect() as db:
        linked = A.linked_keys(db, project)
        next_rank = max((r["rank"] for r in A.links(db, project) if r["rank"] is not None), default=0) + 1
    todo = ranked[~ranked["item_key"].isin(linked)].to_dict("records")
    progress.stage("pushing tasks", len(todo))
    pushed = 0
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        tasks = [task_of(item, pool_row["name"], next_rank + start + i) for i, item in enumerate(batch)]
        task_ids = client.import_tasks(row["project_id"], tasks)
        with connect() as db:
            A.add_links(db, project, [{"item_key": t["data"]["ka2l_key"], "task_id": tid, "question": t["data"][QUESTION],
                                       "rank": t["data"]["rank"]} for t, tid in zip(tasks, task_ids)])
        pushed += len(batch)
        progress.advance(len(batch))
    with connect() as db:
        A.touch_project(db, project, "pushed_at")
        total = A.link_count(db, project)
    return {"project": project, "project_id": int(row["project_id"]), "url": client.project_url(row["project_id"]),
            "title": row["title"], "pushed": pushed, "reconciled": reconciled, "linked": total,
            "tasks": server_count + pushed, "skipped": len(ranked) - len(todo), "pushed_at": now()}

