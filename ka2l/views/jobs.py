"""What a page or the command line shows of a background job, without Streamlit: the whole job's
progress and ETA with its phases, its main settings, what it made, and its log as a person reads it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from ..errors import Ka2lError
from ..jobs import ACTIVE, config_class, log_path, timestamp
from ..progress import overall_eta
from ..store.db import connect


def tail(job_id: int, lines: int = 20) -> str:
    """The last ``lines`` lines of a job's log, progress-bar redraws folded into their last state."""
    path = log_path(job_id)
    if not path.is_file():
        return ""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - 65536))
        text = f.read().decode("utf-8", "replace")
    if size > 65536:
        text = text.split("\n", 1)[-1]  # the first line was cut
    return "\n".join(clean_log(text)[-lines:])


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean_log(text: str) -> list[str]:
    """Log lines as a person reads them: a progress bar (tqdm) redraws its line with carriage returns,
    so each line keeps only its last drawing; terminal colour codes and blank lines go.

    >>> clean_log("Loading: 10%\\rLoading: 100%\\nstage answers: 0/61\\n")
    ['Loading: 100%', 'stage answers: 0/61']
    """
    out = []
    for line in text.split("\n"):
        drawn = [part for part in _ANSI.sub("", line).split("\r") if part.strip()]
        if drawn:
            out.append(drawn[-1].rstrip())
    return out


def format_duration(seconds: float | None) -> str:
    """'45 s', '3 min 05 s', '2 h 04 min'; '' for None."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


_SUMMARY = {  # the settings a person tells jobs apart by, per kind (the full config is shown beside them)
    "stage1": [("model", "model.name_or_path"), ("k", "sampling.k"), ("temperature", "sampling.temperature"),
               ("low temperature", "sampling.low_temperature"), ("max new tokens", "sampling.max_new_tokens"),
               ("judge", "judge.kind"), ("threshold rule", "threshold.rule"), ("probe", "probe.kind"), ("device", "model.device")],
    "triage": [("probe", "probe_id"), ("device", "device")],
    "decoder": [("probe", "probe_id"), ("backbone", "backbone"), ("pooling", "pooling"), ("layer", "layer"), ("epochs", "epochs"),
                ("time budget (min)", "max_minutes"), ("learning rate", "lr"), ("batch size", "batch_size"), ("extra pools", "extra_pools")],
    "generate": [("decoder", "decoder_id"), ("source", "source"), ("per question", "per_question"), ("noise", "noise"),
                 ("temperature", "temperature"), ("seed", "seed")],
}


def describe_config(job: dict[str, Any]) -> list[tuple[str, str]]:
    """[(setting, value)]: the job's main settings, defaults filled in (pool first when it has one)."""
    from ..config import from_dict, to_dict

    cfg = job["config"]
    try:
        full = to_dict(from_dict(config_class(job["kind"]), cfg.get(job["kind"], {})))
    except (Ka2lError, KeyError):
        full = cfg.get(job["kind"], {})
    out = [("pool", str(cfg["pool"]))] if cfg.get("pool") is not None else []
    for label, dotted in _SUMMARY.get(job["kind"], []):
        value: Any = full
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value in (None, "", [], ()) or (dotted == "layer" and value == -1) or (dotted == "max_minutes" and not value):
            continue
        out.append((label, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return out


def result_refs(job: dict[str, Any]) -> dict[str, int]:
    """What a finished job made, with the pool it belongs to: {'pool_id', 'run_id' | 'decoder_id' | 'generation_id'}."""
    result = dict(job.get("result") or {})
    if not result:
        return {}
    from ..store import augment as S
    from ..store import queries as Q

    try:
        with connect() as db:
            if "run_id" in result:
                result["pool_id"] = int(Q.get_run(db, result["run_id"])["pool_id"])
            elif "decoder_id" in result:
                result["pool_id"] = int(S.get_decoder(db, result["decoder_id"])["pool_id"])
            elif "generation_id" in result:
                result["pool_id"] = int(S.get_generation(db, result["generation_id"])["pool_id"])
    except Ka2lError:  # deleted since: say what it made, link nowhere
        pass
    return {k: int(v) for k, v in result.items() if k.endswith("_id") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def time_budget_s(job: dict[str, Any]) -> float | None:
    """The wall-clock budget that bounds the whole job (decoder training's ``max_minutes``), in seconds.

    >>> time_budget_s({"kind": "decoder", "config": {"decoder": {"max_minutes": 5}}})
    300.0
    >>> time_budget_s({"kind": "stage1", "config": {"stage1": {}}}) is None
    True
    """
    minutes = (job.get("config") or {}).get(job.get("kind"), {}).get("max_minutes") if job.get("kind") == "decoder" else None
    return float(minutes) * 60 if minutes else None


def progress_view(job: dict[str, Any], clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The whole job at a glance, for a page or the command line:

    fraction   share of the whole job done (phases weighed by their expected time), 0..1
    eta_s      seconds left for the whole job (None until it can be estimated)
    elapsed_s  seconds since the job started (to its end once finished)
    started    start time (ISO, UTC) or None
    phases     [{name, status, rows: [{name, done, total, status, elapsed_s, rate, eta_s, note}]}]
    """
    t = clock()
    start = timestamp(job["started_at"]) if job.get("started_at") else None
    end = timestamp(job["finished_at"]) if job.get("finished_at") else None
    elapsed = None if start is None else max(0.0, (end or t) - start)
    fraction = 1.0 if job["status"] == "done" else float(job.get("fraction") or 0.0)
    eta = None
    if job["status"] in ACTIVE and job.get("progress_started_at"):
        eta = overall_eta(fraction, float(job.get("credited") or 0.0), t - job["progress_started_at"])
        budget = time_budget_s(job)
        if eta is not None and budget is not None and start is not None:
            eta = max(0.0, min(eta, budget - (t - start)))  # the job ends by its budget, whatever the rate says
    phases = []
    for phase in job.get("phases") or []:
        rows = []
        for row in phase["rows"]:
            ran = ((row["finished_at"] or t) - row["started_at"]) if row.get("started_at") else None
            worked = row["done"] - row.get("start_done", 0)
            rate = worked / ran if ran and worked > 0 else None
            left = (row["total"] - row["done"]) / rate if rate and row["total"] and row["status"] == "running" else None
            rows.append({**row, "elapsed_s": ran, "rate": rate, "eta_s": left})
        phases.append({**phase, "rows": rows})
    return {"fraction": fraction, "eta_s": eta, "elapsed_s": elapsed, "started": job.get("started_at"), "phases": phases}


def describe_result(result: dict[str, Any] | None) -> str:
    """'run 3', 'decoder 2', 'generation 5' for a finished job's result."""
    if not result:
        return ""
    return ", ".join(f"{k.removesuffix('_id')} {v}" for k, v in result.items())
