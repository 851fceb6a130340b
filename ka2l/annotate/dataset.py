"""The SFT dataset Stage 3a hands to the fine-tune: one (question, answer) pair per pushed item whose
pulled annotations chose an answer (``ka2l.annotate.pull``'s rule), with where it came from.

Formats:

- LLaMA-Factory's **alpaca** JSON (a list of ``{"instruction", "input", "output"}``) plus its
  ``dataset_info.json`` entry naming the file and the columns (``write_llamafactory``);
- **JSONL** for Hugging Face ``datasets`` (``load_dataset("json", data_files=...)``): one object per
  line, the pair and its provenance;
- formula-safe CSV: the page and CLI pass ``pairs()`` to ``ka2l.views.export.to_safe_csv`` (a stage
  package may not import views).

Items whose verdict is "cannot answer / ill-posed", skipped or not yet annotated give no pair; the
``answers()`` table of ``ka2l.annotate.pull`` lists them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..store import queries as Q
from ..store.db import connect
from .pull import answers, resolve_project

PAIR_COLUMNS = ("question", "answer", "pool", "kind", "item_key", "question_id", "ext_id", "candidate_id", "source",
                "annotator", "annotation_id", "votes", "conflict", "decided_by", "updated_at", "project", "ls_project_id",
                "task_id", "task_url")
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


def pairs(pool: str | int | None = None, project: int = 0, conflicts: bool = True):
    """(question, answer) pairs with provenance, in annotation order: the question as pushed (an edited
    candidate's edit), the chosen answer, the pool, the item (kind, key, question / candidate id, the
    pool's own id ``ext_id`` for originals), the chosen annotation (annotator, id, votes, conflict, how
    it was decided, when) and the task (ka2l's and Label Studio's project ids, task id, a link to the task).
    ``conflicts=False`` leaves out items whose annotators disagreed. Columns: ``PAIR_COLUMNS``."""
    import pandas as pd

    frame = answers(pool, project)
    with connect() as db:
        row = resolve_project(db, pool, project)
        pool_row = Q.get_pool(db, row["pool_id"])
        ext = {q["id"]: q["ext_id"] for q in Q.pool_questions(db, row["pool_id"])}
    frame = frame[frame["status"] == "answered"]
    if not conflicts:
        frame = frame[~frame["conflict"]]
    base = row["url"].rstrip("/")
    out = pd.DataFrame({
        "question": frame["question"], "answer": frame["answer"], "pool": pool_row["name"], "kind": frame["kind"],
        "item_key": frame["item_key"], "question_id": frame["question_id"],
        "ext_id": [ext.get(int(q)) if pd.notna(q) else None for q in frame["question_id"]],
        "candidate_id": frame["candidate_id"], "source": "label studio", "annotator": frame["annotator"],
        "annotation_id": frame["annotation_id"], "votes": frame["votes"], "conflict": frame["conflict"],
        "decided_by": frame["decided_by"], "updated_at": frame["updated_at"], "project": frame["project"],
        "ls_project_id": frame["ls_project_id"], "task_id": frame["task_id"],
        "task_url": [f"{base}/projects/{row['project_id']}/data?task={t}" for t in frame["task_id"]]},
        columns=list(PAIR_COLUMNS))
    return out.reset_index(drop=True)


def dataset_name(pool: str) -> str:
    """A name LLaMA-Factory accepts for ``--dataset`` (letters, digits, ``_``, ``-``, ``.``).

    >>> dataset_name("caps 2024/v1")
    'ka2l_caps_2024_v1'
    """
    return "ka2l_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", pool).strip("_") or "pool")


def to_alpaca(frame) -> list[dict[str, str]]:
    """LLaMA-Factory's alpaca records: the question as ``instruction``, an empty ``input``, the answer as ``output``."""
    return [{"instruction": str(q), "input": "", "output": str(a)} for q, a in zip(frame["question"], frame["answer"])]


def alpaca_json(frame) -> bytes:
    return json.dumps(to_alpaca(frame), ensure_ascii=False, indent=1).encode("utf-8")


def dataset_info_entry(name: str, file_name: str | None = None) -> dict[str, Any]:
    """The entry LLaMA-Factory's ``data/dataset_info.json`` needs for an alpaca file.

    >>> dataset_info_entry("ka2l_caps")["ka2l_caps"]["file_name"]
    'ka2l_caps.json'
    """
    return {name: {"file_name": file_name or f"{name}.json", "formatting": "alpaca", "columns": dict(ALPACA_COLUMNS)}}


def to_jsonl(frame) -> bytes:
    """One JSON object per line (the pair and its provenance; missing ids as null, never NaN), which
    ``datasets.load_dataset("json", data_files=...)`` and ``pandas.read_json(lines=True)`` read back."""
    rows = json.loads(frame.to_json(orient="records", force_ascii=False))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_llamafactory(frame, folder: str | Path, name: str) -> dict[str, Path]:
    """Write ``<name>.json`` (alpaca) into ``folder`` and add its entry to the folder's ``dataset_info.json``
    (other datasets' entries are kept), so ``llamafactory-cli train --dataset_dir folder --dataset name``
    finds it. Returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info.update(dataset_info_entry(name, data.name))
    _write(data, alpaca_json(frame))
    _write(info_path, json.dumps(info, ensure_ascii=False, indent=2).encode("utf-8"))
    return {"data": data, "dataset_info": info_path}


def write_jsonl(frame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, to_jsonl(frame))
    return path


def _write(path: Path, data: bytes) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
