"""What the Fine-tune page shows of Stage 3b, without Streamlit: the dataset a config would train on,
the preflight verdict (never raising for a config that does not fit: the page shows why), a fine-tune's
loss curve and live status, the job that runs it, its evaluation as tables, and its adapter's files."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, from_dict
from ..errors import ConfigError, Ka2lError, NotFound
from ..jobs import PENDING, list_jobs
from ..paths import data_dir
from ..store import evaluation as E
from ..store import finetune as S
from ..store import queries as Q
from ..store.db import connect

SOURCE_NAMES = {"labelstudio": "Label Studio answers", "gold": "the pool's gold answers", "file": "an uploaded question-answer file"}
METRIC_NAMES = {"correct": "correct (%)", "bleu": "BLEU", "corpus_bleu": "corpus BLEU", "rouge_l": "ROUGE-L", "meteor": "METEOR",
                "bertscore": "BERTScore"}
NO_PULLED_ANSWERS = ("no answers pulled yet: Annotate page -> Pull (after the annotators answered in Label Studio), "
                     "or choose 'gold answers' (the pool's own) or a question-answer file as the source.")
PREVIEW_ROWS = 50


# -- the data ------------------------------------------------------------------------------------------

def save_upload(name: str, content: bytes) -> str:
    """Store an uploaded question-answer file under the data folder, named by its content, and return its
    path: the same file gives the same path, so the same config (and the same fine-tune) again."""
    suffix = Path(name).suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{Path(name).name}: a question-answer file must be .csv or .jsonl (with 'question' and 'answer' "
                          f"columns), got {suffix or 'no extension'}.")
    folder = data_dir() / "finetune-files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(name).stem[:40]}-{hashlib.sha256(content).hexdigest()[:12]}{suffix}"
    if not path.is_file():
        path.write_bytes(content)
    return str(path)


def dataset_summary(pool: str | int, cfg: FinetuneConfig) -> dict[str, Any]:
    """The pairs ``cfg`` would train on for ``pool``: {'source', 'source_name', 'run_id', 'n_train', 'n_eval',
    'n_known', 'n_source', 'dropped', 'hash', 'preview' (a frame: split, origin, question, answer)}.
    Raises a ConfigError that says what to do when there is no data (e.g. nothing pulled from Label Studio)."""
    import pandas as pd

    from ..finetune import data as D

    try:
        ds = D.build(pool, cfg)
    except NotFound as exc:
        if cfg.source == "labelstudio":  # no Label Studio project yet
            raise ConfigError(f"{exc} Until then: {NO_PULLED_ANSWERS}") from exc
        raise
    except ConfigError as exc:
        if cfg.source == "labelstudio" and "gave no (question, answer) pair" in str(exc):
            raise ConfigError(f"The pool's Label Studio project has {NO_PULLED_ANSWERS}") from exc
        raise
    rows = [{"split": "train" if p in ds.train else "held out", "origin": p.origin, "question": p.question, "answer": p.answer}
            for p in (ds.eval + ds.train)[:PREVIEW_ROWS]]
    return {"source": cfg.source, "source_name": SOURCE_NAMES[cfg.source], "run_id": ds.run_id, "n_train": len(ds.train),
            "n_eval": len(ds.eval), "n_known": int(ds.notes["n_known"]), "n_source": int(ds.notes["n_source"]),
            "dropped": {k: v for k, v in ds.notes["dropped"].items() if v}, "hash": ds.hash,
            "preview": pd.DataFrame(rows, columns=["split", "origin", "question", "answer"])}


@functools.lru_cache(maxsize=8)
def _shape(source: str, revision: str | None):
    from ..finetune.preflight import model_shape

    return model_shape(source, revision)  # a meta-device build: cheap, but not on every page run


def preflight(cfg: FinetuneConfig, available: int | None = None) -> dict[str, Any]:
    """Whether fine-tuning run ``cfg.run_id``'s model with ``cfg`` fits its device (the same check a launch makes):
    {'fits', 'message' (the estimate, the memory available and, when it does not fit, what to change),
    'estimate_bytes', 'available_bytes', 'device', 'model'}. Raises a Ka2lError for a device or model that cannot be used."""
    from ..device import dtype_name, resolve_device, resolve_dtype
    from ..finetune import preflight as P
    from ..finetune.lora import run_model
    from ..models.llm import resolve_source

    if not cfg.run_id:
        raise ConfigError("Pick a finished Stage 1 run: its model is the one fine-tuned.")
    spec, _ = run_model(cfg.run_id, cfg)
    source, _ = resolve_source(spec)
    device = resolve_device(cfg.device)
    dtype = dtype_name(resolve_dtype(cfg.dtype, device))
    v = P.verdict(_shape(source, spec.revision), cfg, dtype, P.available_bytes(device) if available is None else available, device,
                  P.layout_of(cfg, device))
    return {"fits": v.fits, "message": v.message, "estimate_bytes": v.estimate.total, "available_bytes": v.available,
            "device": v.device, "model": spec.name_or_path}


# -- fine-tunes, their curve and their job ------------------------------------------------------------

def finetunes(pool_id: int) -> list[dict[str, Any]]:
    """The pool's fine-tunes, newest first."""
    with connect() as db:
        return list(reversed(S.list_finetunes(db, pool_id)))


def finetune(finetune_id: int) -> dict[str, Any]:
    with connect() as db:
        return S.get_finetune(db, finetune_id)


def label(row: dict[str, Any]) -> str:
    best = f" · best held-out loss {row['best_eval_loss']:.3f}" if row.get("best_eval_loss") is not None else ""
    return (f"Fine-tune {row['id']} · {Path(str(row['model'])).name} · {row['data_source']} ({row['n_train']} train / "
            f"{row['n_eval']} held out) · {row['status']}{best}")


def losses(finetune_id: int) -> dict[str, list]:
    """The loss curve as columns: {'train': {'step': [...], 'loss': [...]}, 'eval': {...}}."""
    with connect() as db:
        rows = S.log(db, finetune_id)
    return {split: {"step": [r["step"] for r in rows if r["split"] == split], "loss": [r["loss"] for r in rows if r["split"] == split]}
            for split in ("train", "eval")}


def status(row: dict[str, Any]) -> dict[str, Any]:
    """Live figures of a fine-tune: step, total, the last lr and tokens/s, and the time left at the rate so far."""
    with connect() as db:
        train = S.log(db, row["id"], "train")
    last = train[-1] if train else {}
    rates = [r["tokens_per_s"] for r in train[-20:] if r["tokens_per_s"]]
    step, total = int(row["step"] or 0), row["total_steps"]
    eta = None
    if row["status"] == "training" and total and step and row["seconds"]:
        eta = max(0.0, (int(total) - step) * float(row["seconds"]) / step)
    return {"step": step, "total": total, "lr": last.get("lr"), "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "eta_s": eta, "seconds": row["seconds"], "n_points": len(train)}


def _pool_id(db, pool: Any) -> int | None:
    try:
        return int(Q.get_pool(db, pool)["id"])
    except Ka2lError:
        return None


def jobs_of(pool_id: int, kind: str = "finetune") -> list[dict[str, Any]]:
    """Jobs of ``kind`` on this pool (by the pool named in their config, or for fine-tune-bound kinds, the fine-tune's pool), newest first."""
    out = []
    with connect() as db:
        for job in list_jobs(limit=200):
            if job["kind"] != kind:
                continue
            cfg = job["config"]
            if "pool" in cfg:
                owner = _pool_id(db, cfg["pool"])
            else:
                fid = (cfg.get(kind) or {}).get("finetune_id")
                try:
                    owner = int(S.get_finetune(db, int(fid))["pool_id"]) if fid else None
                except Ka2lError:
                    owner = None
            if owner == pool_id:
                out.append(job)
    return out


def job_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """The newest fine-tune job that runs (or ran) fine-tune ``row``: same pool and config."""
    from ..finetune.lora import stored_key, finetune_key

    for job in jobs_of(int(row["pool_id"])):
        if (job.get("result") or {}).get("finetune_id") == row["id"]:
            return job
        try:
            if finetune_key(from_dict(FinetuneConfig, job["config"].get("finetune", {}))) in (row["config_hash"], stored_key(row)):
                return job
        except Ka2lError:
            continue
    return None


def job_for(finetune_id: int, kind: str) -> dict[str, Any] | None:
    """The newest job of ``kind`` (evaluate, reprobe) whose config names fine-tune ``finetune_id``."""
    for job in list_jobs(limit=200):
        if job["kind"] == kind and (job["config"].get(kind) or {}).get("finetune_id") == finetune_id:
            return job
    return None


def pending_without_row(pool_id: int) -> list[dict[str, Any]]:
    """This pool's queued or running fine-tune jobs whose fine-tune row does not exist yet (the worker prepares its data)."""
    bound = {job["id"] for job in map(job_of, finetunes(pool_id)) if job}
    return [j for j in jobs_of(pool_id) if j["status"] in PENDING and j["id"] not in bound]


def watch_key(pool_id: int) -> tuple:
    """What changes the page's layout: the pool's fine-tunes and their statuses, and its pending fine-tune jobs."""
    return (tuple((r["id"], r["status"]) for r in finetunes(pool_id)),
            tuple(j["id"] for j in jobs_of(pool_id) if j["status"] in PENDING))


# -- evaluation ---------------------------------------------------------------------------------------

def evaluation(finetune_id: int) -> dict[str, Any] | None:
    with connect() as db:
        return E.get_evaluation(db, finetune_id)


def _cell(e: dict[str, float] | None) -> str:
    return "" if not e else f"{e['value']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}]"


def metrics_table(summary: dict[str, Any]):
    """One row per metric: base and tuned (value [95% interval]) and the paired difference, plus the numbers."""
    import pandas as pd

    rows = []
    for metric, entry in summary["metrics"].items():
        rows.append({"metric": METRIC_NAMES.get(metric, metric), "base": _cell(entry.get("base")), "tuned": _cell(entry.get("tuned")),
                     "tuned - base": _cell(entry.get("delta")),
                     "base_value": (entry.get("base") or {}).get("value"), "tuned_value": (entry.get("tuned") or {}).get("value"),
                     "delta_value": (entry.get("delta") or {}).get("value")})
    return pd.DataFrame(rows, columns=["metric", "base", "tuned", "tuned - base", "base_value", "tuned_value", "delta_value"])


def question_table(finetune_id: int):
    """Per held-out question: question, gold, base and tuned answers, correctness and the scores."""
    import pandas as pd

    with connect() as db:
        rows = E.table(db, finetune_id)
    cols = ["item_key", "question", "gold", "base_answer", "base_correct", "tuned_answer", "tuned_correct", "base_rouge_l",
            "tuned_rouge_l", "base_bertscore", "tuned_bertscore"]
    frame = pd.DataFrame(rows, columns=cols)
    for c in ("base_correct", "tuned_correct"):
        frame[c] = frame[c].map(lambda v: None if v is None or v != v else bool(v))
    return frame


# -- the adapter ---------------------------------------------------------------------------------------

def adapter(row: dict[str, Any]) -> dict[str, Any] | None:
    """A finished fine-tune's adapter: {'dir', 'files', 'sidecar' (bytes), 'sidecar_name'}; None before it exists."""
    from ..finetune.lora import SIDECAR

    folder = Path(row["adapter_dir"]) if row.get("adapter_dir") else None
    if folder is None or not folder.is_dir():
        return None
    side = folder / SIDECAR
    return {"dir": str(folder), "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
            "sidecar": side.read_bytes() if side.is_file() else json.dumps({}).encode(), "sidecar_name": SIDECAR}


# -- the boundary shift ------------------------------------------------------------------------------

def moved_questions(table):
    """The questions that crossed the boundary (``ka2l.views.shift.shift_table`` rows with ``moved`` set):
    unknown -> known first, then known -> unknown (forgetting), each by question id."""
    from .shift import KNOWN_TO_UNKNOWN, UNKNOWN_TO_KNOWN

    order = {UNKNOWN_TO_KNOWN: 0, KNOWN_TO_UNKNOWN: 1}
    moved = table[table["moved"].isin(list(order))]
    return moved.assign(_o=moved["moved"].map(order)).sort_values(["_o", "question_id"]).drop(columns="_o").reset_index(drop=True)


# -- exports -------------------------------------------------------------------------------------------

def export_folder(finetune_id: int) -> Path:
    return data_dir() / "exports" / f"finetune-{finetune_id}"


def export(finetune_id: int, merge: bool = False) -> dict[str, Any]:
    """Write a finished fine-tune's exports (``ka2l.finetune.export``) under the data folder, replacing earlier ones:
    the adapter (and with ``merge`` the base model with it merged in) and its data as LLaMA-Factory alpaca with the recipe."""
    from ..finetune import export as X

    folder = export_folder(finetune_id)
    X.export_adapter(finetune_id, folder / "adapter", merge=merge, overwrite=True)
    X.export_dataset(finetune_id, folder / "llamafactory", overwrite=True)
    return exported(finetune_id)


def exported(finetune_id: int) -> dict[str, Any] | None:
    """What ``export`` wrote for the fine-tune: {'adapter', 'dataset', 'merged' (or None), 'command'}; None before."""
    from ..finetune.export import COMMAND_NAME, MERGED_DIR

    folder = export_folder(finetune_id)
    adapter, dataset = folder / "adapter", folder / "llamafactory"
    if not (adapter.is_dir() and dataset.is_dir()):
        return None
    cmd = dataset / COMMAND_NAME
    return {"adapter": str(adapter), "dataset": str(dataset), "merged": str(adapter / MERGED_DIR) if (adapter / MERGED_DIR).is_dir() else None,
            "command": cmd.read_text() if cmd.is_file() else ""}


def zip_folder(folder: str | Path, leave_out: tuple[str, ...] = ("merged",)) -> bytes:
    """The files of ``folder`` as a zip (sub-folders named in ``leave_out`` left out: a merged model is a folder to copy, not a download)."""
    import io
    import zipfile

    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and rel.parts[0] not in leave_out:
                z.write(path, f"{folder.name}/{rel}")
    return buf.getvalue()
