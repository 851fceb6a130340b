"""The phases each kind of job goes through, with rough weights, for the whole job's progress and ETA
(``ka2l.jobs.JobProgress`` tracks them; ``ka2l.views.jobs`` shows them).

Weights are rough seconds on a 2-core CPU with SmolLM2-135M (48 capitals questions, k = 10: hidden states
0.13 s a question, answers 2.2 s, a layer's probe 0.7 s); only their ratios matter, and the ETA, measured on
the job itself, corrects them as it runs. A phase's name is the stage name the library call reports.
"""

from __future__ import annotations

from typing import Any

from .errors import Ka2lError
from .progress import PhaseSpec
from .store.db import connect


def plan(kind: str, config: dict[str, Any]) -> list[PhaseSpec]:
    """The phases a job of ``kind`` goes through with ``config``, in order, with rough weights."""
    from .config import from_dict
    from .jobs import config_class

    cfg = from_dict(config_class(kind), config.get(kind, {}))
    if kind == "stage1":
        return _stage1_plan(cfg, *_pool_facts(config.get("pool")))
    if kind == "triage":
        return [PhaseSpec("hidden states", 1.0, note=f"reports after every batch of {cfg.batch_size} questions")]
    if kind == "decoder":
        return _decoder_plan(cfg)
    if kind == "push":  # stage names are those ka2l.annotate.push reports
        return [PhaseSpec("ranking", 1.0, note="orders the approved set by P(unknown) and diversity"),
                PhaseSpec("pushing tasks", 5.0, note=f"reports after every batch of {cfg.batch_size} tasks")]
    if kind == "finetune":  # stage names are those ka2l.finetune.lora reports
        return _finetune_plan(cfg, config.get("pool"))
    if kind == "evaluate":  # stage names are those ka2l.finetune.evaluate reports
        return _evaluate_plan(cfg)
    if kind == "reprobe":  # Stage 1's stages, then ka2l.finetune.reprobe's own
        return _reprobe_plan(cfg)
    if kind == "experiment":  # stage names are those ka2l.finetune.experiment reports
        return _experiment_plan(cfg)
    if kind == "pull":  # stage names are those ka2l.annotate.pull reports
        return [PhaseSpec("exporting annotations", 2.0, note="Label Studio builds the export in one call"),
                PhaseSpec("storing annotations", 1.0)]
    return [PhaseSpec("generating candidates", 1.0, note=f"reports after every {max(1, cfg.batch_size // cfg.per_question)} source questions")]


def _pool_facts(pool: Any) -> tuple[int, bool]:
    """(questions, has gold answers) of a pool; a guess when it cannot be read."""
    from .store import queries as Q

    try:
        with connect() as db:
            row = Q.get_pool(db, pool)
        return int(row["n_questions"]), bool(row["has_answers"])
    except Ka2lError:
        return 100, False


def _stage1_plan(cfg, n: int, has_gold: bool) -> list[PhaseSpec]:
    s, layers = cfg.sampling, 30
    judge = {"lexical": 0.002}.get(cfg.judge.kind, 0.02 * (s.k - 1) / 2)  # model judges compare pairs
    probe_set = layers * (0.5 + 0.004 * n) * (3.0 if cfg.probe.kind == "llama-mlp" else 1.0)
    baselines = ((("SE probe (logistic)",) if cfg.probe.kind != "logistic" else ())
                 + (("accuracy probe (logistic)",) if has_gold else ()))
    phases = [
        PhaseSpec("hidden states", 0.13 * n, note=f"reports after every batch of {s.hidden_batch_size} questions"),
        PhaseSpec("answers", 0.0063 * n * (s.k + 1) * s.max_new_tokens,
                  note=f"reports after every batch of {s.batch_size} questions (1 + {s.k} answers each)"),
        PhaseSpec("semantic entropy", judge * s.k * n + 0.5),
        PhaseSpec("probes", probe_set, match="probes (", note="one probe per layer"),
    ]
    if baselines:
        phases.append(PhaseSpec("baselines", len(baselines) * layers * (0.5 + 0.004 * n), match="probes (", count=len(baselines),
                                labels=baselines, note="one logistic probe per layer"))
    return phases + [PhaseSpec("threshold robustness", 1.0)]


def _decoder_plan(cfg) -> list[PhaseSpec]:
    import math

    n = 100
    try:
        from .store import queries as Q

        with connect() as db:
            run = Q.get_run(db, Q.get_probe(db, cfg.probe_id)["run_id"])
            n = int(Q.get_pool(db, run["pool_id"])["n_questions"])
            n_all = n + sum(int(Q.get_pool(db, name)["n_questions"]) for name in cfg.extra_pools)
    except Ka2lError:
        n_all = n
    heldout = max(1, round(cfg.heldout_share * n)) if cfg.heldout_share > 0 and n >= 5 else 0
    n_eval = min(cfg.eval_size, heldout) + min(cfg.eval_size, n_all - heldout)
    steps = cfg.epochs * math.ceil(max(1, n_all - heldout) / cfg.batch_size)
    training = steps * 2.5 * cfg.batch_size
    if cfg.max_minutes:
        training = min(training, cfg.max_minutes * 60)
    return [PhaseSpec("question vectors", 0.15 * n_all),
            PhaseSpec("baseline reconstruction", 7.0 * n_eval, note=f"decodes {n_eval} questions"),
            PhaseSpec("training", training, note=f"{steps} steps" + (f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else "")),
            PhaseSpec("held-out reconstruction", 2.5 * n_eval, note=f"decodes {n_eval} questions")]


def _finetune_plan(cfg, pool: Any) -> list[PhaseSpec]:
    import math

    n = max(2, _pool_facts(pool)[0] // 2)  # a guess: the worker reports the real step count as training starts
    steps = max(1, math.ceil(cfg.epochs * math.ceil(math.ceil(n * (1 - cfg.eval_share) / cfg.batch_size) / cfg.grad_accum)))
    evals = steps // cfg.eval_every + 2
    return [PhaseSpec("preparing data", 1.0), PhaseSpec("loading model", 5.0),
            PhaseSpec("training", steps * cfg.batch_size * cfg.grad_accum * 0.5 + evals * 2.0,
                      note=f"about {steps} steps; held-out loss every {cfg.eval_every}, a checkpoint every {cfg.checkpoint_every}"),
            PhaseSpec("saving adapter", 1.0)]


def _finetune_facts(finetune_id: int) -> tuple[int, dict[str, Any] | None]:
    """(held-out questions, the base Stage 1 run) of a fine-tune; a guess when it cannot be read."""
    from .store import finetune as S
    from .store import queries as Q

    try:
        with connect() as db:
            row = S.get_finetune(db, finetune_id)
            run = Q.get_run(db, row["run_id"]) if row["run_id"] is not None else None
        return int(row["n_eval"]), run
    except Ka2lError:
        return 20, None


def _evaluate_plan(cfg) -> list[PhaseSpec]:
    n, _ = _finetune_facts(cfg.finetune_id)
    answers = [PhaseSpec(f"{m} answers", 5.0 + 0.4 * n, note=f"reports after every batch of {cfg.batch_size} questions"
                         + ("; loads the model with its adapter" if m == "tuned" else "")) for m in cfg.models]
    return [PhaseSpec("preparing", 1.0), *answers, PhaseSpec("BERTScore", 3.0 + 0.02 * n * len(cfg.models)), PhaseSpec("summary", 0.5)]


def _reprobe_plan(cfg) -> list[PhaseSpec]:
    from .config import Stage1Config, from_dict
    from .finetune.reprobe import STAGE

    _, run = _finetune_facts(cfg.finetune_id)
    stage1 = from_dict(Stage1Config, run["config"]) if run is not None else Stage1Config()
    n, has_gold = _pool_facts(run["pool_id"] if run is not None else None)
    return _stage1_plan(stage1, n, has_gold) + [PhaseSpec(STAGE, 0.5, note="the base run's saved probe on the tuned model's states")]


def _experiment_plan(cfg) -> list[PhaseSpec]:
    """One phase per cell (selection, fine-tune, evaluation: up to 9 stages named after the cell), in grid order."""
    from .finetune.experiment import cell_label

    cells = [{"strategy": s, "budget": b, "seed": seed} for s in cfg.strategies for b in sorted(cfg.budgets) for seed in cfg.seeds]
    phases = [PhaseSpec("preparing the experiment", 1.0)]
    if any(s in ("entropy", "badge") for s in cfg.strategies):
        phases.append(PhaseSpec("prompt entropy", 2.0, note=f"one forward pass per {cfg.eval_batch_size} questions, stored"))
    for c in cells:
        label = cell_label(c)
        phases.append(PhaseSpec(label, 20.0 * float(c["budget"]) + 10.0, match=f"{label}:", count=9,
                                note="select, fine-tune, evaluate on the test split"))
    phases.append(PhaseSpec("untuned base", 3.0, match="untuned base:", count=6, note="the untuned model answers the test split once"))
    return phases
