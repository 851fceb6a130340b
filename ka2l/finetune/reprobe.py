"""Stage 3b, "the boundary moved": Stage 1 again, on the tuned model.

``reprobe(finetune_id)`` runs a real Stage 1 run (``ka2l.probing.stage1.run_stage1``) on the pool of the
fine-tune's base run, with the base run's own Stage1Config except ``model.adapter``, which names the
fine-tune's adapter: the run's hidden states, answers and semantic entropies come from base + adapter
(``ka2l.models.llm.load_model`` merges it). It is an ordinary run: it resumes per question, shows on every
Stage 1 page and can be triaged with. Then the base run's saved probe scores the tuned model's hidden
states at the probe's layer, stored as the re-probe run's predictions (so the Fine-tune page can show the
saved probe's P(unknown) on the tuned model), and ``finetunes.reprobe_run_id`` records the run.

    before   the base run: its SE, BiSE, correctness; the saved probe on its states
    after    the re-probe run: SE and correctness of the tuned model; the same probe on its states

``ka2l.views.shift`` compares the two (at the base run's SE threshold, so "unknown" means the same on
both sides).

A tuned model can become sure of nearly everything: then its own SE split leaves too few unknown (or
known) questions for the re-probe run's own probes, and that run ends 'failed' with the reason, after its
hidden states, answers and semantic entropies were stored. The comparison needs nothing more, so the
re-probe goes on and says so in its result.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import Stage1Config, from_dict
from ..device import resolve_device, resolve_dtype_name
from ..errors import ConfigError, ProbeError
from ..progress import NullProgress, Progress
from ..store import finetune as S
from ..store import queries as Q
from ..store.db import connect

log = logging.getLogger(__name__)

STAGE = "saved probe"  # the progress stage after Stage 1's own (``ka2l.jobs`` plans it by this name)


def base_probe(db, run_id: int) -> dict[str, Any]:
    """The saved probe of Stage 1 run ``run_id`` that the re-probe compares with (its newest, as the report shows)."""
    probes = Q.list_probes(db, run_id)
    if not probes:
        raise ConfigError(f"Stage 1 run {run_id} has no saved probe, so there is nothing to compare the tuned model's states with. "
                          f"Finish the run (resume its job, or `python -m ka2l probe` with the same settings) first.")
    return probes[-1]


def reprobe_config(finetune_id: int, device: str | None = None) -> tuple[dict[str, Any], dict[str, Any], Stage1Config]:
    """(fine-tune row, base run row, the re-probe's Stage1Config): the base run's config with the fine-tune's
    adapter; ``device`` (if given) for the model and the probes. Refuses a fine-tune that is not done."""
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
        if row["status"] != "done" or not row["adapter_dir"]:
            raise ConfigError(f"Fine-tune {finetune_id} is {row['status']}, so it has no adapter to re-probe with yet. Finish it first "
                              f"(resume its job on the Fine-tune or Jobs page, or `python -m ka2l finetune` with the same settings), "
                              f"then re-probe.")
        if row["run_id"] is None:
            raise ConfigError(f"Fine-tune {finetune_id}'s Stage 1 run was deleted: there is no 'before' to compare with. "
                              f"Launch a new fine-tune from a finished Stage 1 run.")
        run = Q.get_run(db, row["run_id"])
        base_probe(db, run["id"])
    if run["kind"] != "stage1" or run["status"] != "done":
        raise ConfigError(f"Run {run['id']} is a {run['kind']} run that is {run['status']}; the re-probe repeats a finished Stage 1 run. "
                          f"Finish it first.")
    base = from_dict(Stage1Config, run["config"])
    if base.model.adapter is not None:  # refused when the fine-tune was launched; kept for rows made before that check
        raise ConfigError(f"Fine-tune {finetune_id} was trained on run {run['id']}, whose model already carried the adapter "
                          f"{base.model.adapter}; re-probing would apply its adapter to the bare base model instead. Fine-tune "
                          f"from the base model's Stage 1 run, then re-probe that fine-tune.")
    model = replace(base.model, adapter=row["adapter_dir"])
    probe = base.probe
    if device is not None:
        model, probe = replace(model, device=device), replace(probe, device=device)
    # the probe was trained on states in the base run's dtype: compute the tuned states in it too (as triage does)
    recorded = run["versions"].get("dtype")
    if recorded and recorded != resolve_dtype_name(model.dtype, resolve_device(model.device)):
        model = replace(model, dtype=recorded)
    return row, run, replace(base, model=model, probe=probe)


def reprobe(finetune_id: int, progress: Progress | None = None, device: str | None = None) -> int:
    """Re-run Stage 1 with fine-tune ``finetune_id``'s adapter and score the run's states with the base run's
    saved probe; returns the re-probe run's id (also in ``finetunes.reprobe_run_id``). Resumable (Stage 1
    resumes per question; a finished re-probe is returned as it is) and cancellable through ``progress``."""
    progress = progress or NullProgress()
    row, base_run, cfg = reprobe_config(finetune_id, device)
    run_id = _run(base_run["pool_id"], cfg, progress)
    with connect() as db:
        probe = base_probe(db, base_run["id"])
        run = Q.get_run(db, run_id)
        questions = Q.pool_questions(db, base_run["pool_id"])
    _score_with_saved_probe(run, probe, questions, progress)
    with connect() as db:
        S.update_finetune(db, finetune_id, reprobe_run_id=run_id)
    log.info("fine-tune %d: re-probe run %d (base run %d, probe %d)", finetune_id, run_id, base_run["id"], probe["id"])
    return run_id


def _run(pool_id: int, cfg: Stage1Config, progress: Progress) -> int:
    """Stage 1 with the adapter. A run whose own labels or probes cannot be made (the tuned model is sure of
    nearly everything) is still a complete re-probe once its states, answers and scores are stored."""
    from ..probing.runs import run_hash
    from ..probing.stage1 import run_stage1

    try:
        return run_stage1(pool_id, cfg, progress=progress)
    except ProbeError as exc:
        with connect() as db:
            runs = Q.find_matching_runs(db, pool_id, "stage1", run_hash(cfg))
            n = len(Q.pool_questions(db, pool_id))
            complete = [r for r in runs if r["hidden_path"] and len(Q.hidden_done_ids(db, r["id"])) == n
                        and len(Q.scored_ids(db, r["id"])) == n]
        if not complete:
            raise
        log.warning("re-probe run %d: no labels or probes of its own (%s); the comparison uses the base run's threshold and probe",
                    complete[0]["id"], exc)
        return int(complete[0]["id"])


def _score_with_saved_probe(run: dict[str, Any], probe: dict[str, Any], questions: list[dict[str, Any]], progress: Progress) -> None:
    """P(unknown) of the saved ``probe`` on ``run``'s hidden states at the probe's layer, as the run's predictions."""
    from ..probing.probes import load_probe, predict_unknown
    from ..store.hidden import HiddenStates

    progress.stage(STAGE, total=len(questions))
    net, meta = load_probe(probe["path"])
    layer = int(meta["layer"])
    hidden = HiddenStates.open(run["hidden_path"])  # (n, L + 1, hidden)
    if hidden.shape[0] != len(questions) or layer not in hidden.layers:
        raise ProbeError(f"Re-probe run {run['id']} has hidden states {hidden.shape}, which do not fit probe {probe['id']} "
                         f"(layer {layer}) on {len(questions)} questions. Delete run {run['id']} (`python -m ka2l runs` lists it) and re-probe again.")
    p = predict_unknown(net, np.asarray(hidden.layer(layer), dtype=np.float32))  # (n,)
    with connect() as db:
        Q.insert_predictions(db, run["id"], probe["id"], [
            {"question_id": q["id"], "p_unknown": float(pi), "label": int(pi >= 0.5), "layer": layer} for q, pi in zip(questions, p)])
    progress.advance(len(questions))

