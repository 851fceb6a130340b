"""Stage 1 (knowledge-distribution probing) and triage, orchestrated over the pieces, resumable.

Every stage commits per batch; a re-run with the same pool and config continues where an
interrupted one stopped (Ctrl-C, kill, crash) and recomputes nothing that was stored:

    hidden   last-prompt-token states, every layer, memory-mapped float16 (n, L+1, hidden)
    answers  one low-temperature answer + k samples per question, with token log-probs
    scores   clustering (judge calls counted) and SE / weighted SE / regular entropy / log-lik / correctness
    labels   dynamic threshold gamma* -> BiSE
    probes   per-layer probes, best layer on validation AUROC, baseline + robustness tables
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import Stage1Config, TriageConfig, from_dict, to_dict
from ..device import dtype_name, resolve_device, resolve_dtype_name
from .entropy import discrete_semantic_entropy, find_threshold, binarize, is_correct, mean_log_likelihood, regular_entropy, weighted_semantic_entropy
from ..errors import ConfigError, ProbeError
from ..models.llm import LoadedLM, build_prompt, extract_hidden_states, extract_layer_states, load_model
from ..models.sampling import check_backend, make_sampler
from ..paths import probes_dir
from ..progress import NullProgress, Progress
from ..store import queries as Q
from ..store.hidden import HiddenStates
from .runs import StageTimer, forget_lost_hidden_states, open_run_hidden, run_status, start_run
from .storage import check_hidden_space, model_dims, run_hidden_path
from ..store.db import connect

log = logging.getLogger(__name__)


def _check_space_before_loading(db, run_id: int, n_questions: int, cfg: Stage1Config, lm: LoadedLM | None) -> None:
    """Log the hidden states' size and refuse a too-small disk before minutes of model loading, from the
    model's config alone (when it cannot be read here, the check runs after the load, still before any forward pass)."""
    dims = (lm.n_layers, lm.hidden_size) if lm is not None else model_dims(cfg.model)
    if dims is not None:
        check_hidden_space(db, run_id, n_questions, *dims)


def _stage_hidden(db, run_id: int, lm: LoadedLM, questions: list[dict], prompts: list[str], batch_size: int, progress: Progress,
                  layer: int | None = None) -> HiddenStates:
    """Last-prompt-token states, (n, L+1, hidden) at every layer; or with ``layer`` (triage), (n, 1, hidden)
    at that layer alone, from a forward pass that stops there. One file per layer (``ka2l.store.hidden``)."""
    forget_lost_hidden_states(db, run_id)
    store = open_run_hidden(db, run_id, len(questions), lm.n_layers, lm.hidden_size, lm.source, layer)
    done = Q.hidden_done_ids(db, run_id)
    todo = [i for i, q in enumerate(questions) if q["id"] not in done]
    progress.stage("hidden states", total=len(questions), done=len(questions) - len(todo))
    with StageTimer(db, run_id, "hidden") as timer:
        todo_prompts = [prompts[i] for i in todo]
        batches = (extract_hidden_states(lm, todo_prompts, batch_size) if layer is None else
                   ((start, states[:, None]) for start, states in extract_layer_states(lm, todo_prompts, layer, batch_size)))
        for start, states in batches:
            rows = todo[start : start + len(states)]
            store.write(rows, states)
            store.flush()
            Q.mark_hidden_done(db, run_id, [questions[i]["id"] for i in rows])
            timer.n += len(rows)
            progress.advance(len(rows))
    return store


def _stage_answers(db, run_id: int, lm: LoadedLM, questions: list[dict], prompts: list[str], cfg: Stage1Config, progress: Progress) -> None:
    """The low-temperature answer and k samples of every question, from the sampler cfg.sampling.backend names.
    Questions the engine refuses (vLLM: a prompt longer than its max_model_len allows) are left out with
    their reason, logged and recorded in the run's summary ('left_out'); the others are stored."""
    s = cfg.sampling
    done = Q.answered_ids(db, run_id)
    todo = [i for i, q in enumerate(questions) if q["id"] not in done]
    progress.stage("answers", total=len(questions), done=len(questions) - len(todo))
    sampler = make_sampler(s, lm) if todo else None
    left_out: dict[str, str] = {}
    with StageTimer(db, run_id, "answers") as timer:
        for b in range(0, len(todo), s.batch_size):
            rows = todo[b : b + s.batch_size]
            refused = sampler.refusals([prompts[i] for i in rows])
            for j, why in refused.items():
                q = questions[rows[j]]
                left_out[str(q["id"])] = f"question {q['id']} ({q['question'][:80]!r}) was left out: {why}"
                log.warning("run %d: %s", run_id, left_out[str(q["id"])])
            rows = [i for j, i in enumerate(rows) if j not in refused]
            if not rows:
                progress.advance(len(refused))
                continue
            batch_prompts = [prompts[i] for i in rows]
            # One seed per question and draw: a question's answers depend on its place in the pool alone,
            # not on its batch or on where a resume started.
            seeds = [2 * (s.seed * 1_000_003 + i) for i in rows]
            where = f"questions {b + 1}-{b + len(rows) + len(refused)} of the {len(todo)} left"
            progress.advance(0, f"{where}: the low-temperature answer")  # a note between batches, so 0/61 reads as busy
            low = sampler.generate(batch_prompts, s.low_temperature, 1, seeds)
            progress.advance(0, f"{where}: {s.k} samples each")
            samples = sampler.generate(batch_prompts, s.temperature, s.k, [x + 1 for x in seeds])
            Q.insert_answers(db, run_id, {questions[i]["id"]: (low[j][0], samples[j]) for j, i in enumerate(rows)})
            timer.n += len(rows)
            progress.advance(len(rows) + len(refused), f"e.g. {low[0][0].text[:40]!r}")
    if todo:
        summary = {k: v for k, v in Q.get_run(db, run_id)["summary"].items() if k != "left_out"}
        Q.update_run(db, run_id, summary={**summary, **({"left_out": left_out} if left_out else {})})


class _AnsweredRows:
    """The hidden-state rows of the answered questions alone, for the probes when a run left questions out
    (their states exist, but they have no answers, so no SE label): ``[rows, layer]`` reads one layer."""

    def __init__(self, hidden: Any, positions: list[int]):
        self.hidden, self.positions = hidden, np.asarray(positions, dtype=np.int64)
        self.shape = (len(positions), *hidden.shape[1:])
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, *rest = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.hidden[(self.positions[rows], *rest)])


def score_question(judge, question: dict, answers: dict[str, list[dict]]) -> dict[str, Any]:
    """Clustering + every per-question uncertainty score for one question's stored answers."""
    samples = answers["sample"]
    texts = [a["text"] for a in samples]
    clustering = judge.cluster(question["question"], texts)
    lps = [a["seq_logprob"] for a in samples]
    low = answers["low"][0]
    golds = question["answers"]
    where = f"question {question['id']} ({question['question']!r})"  # named by the scores' errors
    return {
        "question_id": question["id"],
        "cluster_ids": list(clustering.ids),
        "n_clusters": clustering.n_clusters,
        "judge_calls": clustering.judge_calls,
        "verdicts": [list(v) for v in clustering.verdicts],
        "se": discrete_semantic_entropy(clustering.ids),
        "se_weighted": weighted_semantic_entropy(clustering.ids, lps, where=where),
        "regular_entropy": regular_entropy(lps, where=where),
        "mean_loglik": mean_log_likelihood(low["token_logprobs"], where=where),
        "correct": int(is_correct(low["text"], golds, question["question"])) if golds else None,
    }


def _stage_scores(db, run_id: int, questions: list[dict], cfg: Stage1Config, progress: Progress, batch: int = 32) -> None:
    from .judges import make_judge

    done = Q.scored_ids(db, run_id)
    todo = [q for q in questions if q["id"] not in done]
    progress.stage("semantic entropy", total=len(questions), done=len(questions) - len(todo))
    if not todo:
        return
    judge = make_judge(cfg.judge)
    with StageTimer(db, run_id, "scores") as timer:
        for b in range(0, len(todo), batch):
            chunk = todo[b : b + batch]
            answers = Q.load_answers(db, run_id, [q["id"] for q in chunk])
            Q.insert_scores(db, run_id, [score_question(judge, q, answers[q["id"]]) for q in chunk])
            timer.n += len(chunk)
            progress.advance(len(chunk))


def one_sided_advice(se: np.ndarray, n_known: int, n_unknown: int, cfg: Stage1Config) -> str:
    """What to change when a threshold leaves too few questions of one label: the fix depends on which side is short.

    >>> from ka2l.config import Stage1Config
    >>> one_sided_advice(np.log([10.0] * 9 + [1.0]), 1, 9, Stage1Config()).split(":")[0]
    'The model is unsure of almost every question (9 of 10 have all 10 samples in different meanings)'
    """
    from .probes import MIN_PER_CLASS

    s = cfg.sampling
    if len(se) < 2 * MIN_PER_CLASS:
        return (f"The pool's {len(se)} questions are too few for {MIN_PER_CLASS} of each label, whatever the threshold: "
                f"import a larger pool.")
    if n_known < MIN_PER_CLASS:
        at_max = int(np.sum(se >= math.log(s.k) - 1e-6))
        spread = f" ({at_max} of {len(se)} have all {s.k} samples in different meanings)" if at_max else ""
        return (f"The model is unsure of almost every question{spread}: the pool lies beyond what it knows, so there is "
                f"nothing known to contrast. Use a pool with questions it can answer, a larger model, or steadier samples: "
                f"a lower --temperature (now {s.temperature}); another --threshold-rule moves the line too.")
    return (f"The model agrees with itself on almost every question: add harder questions, or sample more varied "
            f"answers with a higher --k or --temperature (now k = {s.k}, temperature = {s.temperature}); another "
            f"--threshold-rule moves the line too.")


_KEPT = "No label was stored; the hidden states, answers and semantic entropies computed so far are kept."


def _stage_labels(db, run_id: int, cfg: Stage1Config) -> dict[str, Any]:
    """gamma* -> BiSE for every question, stored only when the probes can learn from the labels."""
    from .probes import MIN_PER_CLASS

    rows = Q.load_scores(db, run_id)
    se = np.array([r["se"] for r in rows], dtype=np.float64)
    if len(se) and np.all(se == se[0]):
        agree = "agree on one answer" if se[0] == 0 else "disagree to the same degree"
        s = cfg.sampling
        nucleus = f"; sampling.top_p = {s.top_p} keeps only the most likely tokens, raise it towards 1" if s.top_p < 1 else ""
        raise ProbeError(
            f"All {len(se)} questions have the same semantic entropy ({se[0]:.3f} nats): the {cfg.sampling.k} samples "
            f"{agree} for every question, so there is no known / unknown contrast for the probes to learn. {_KEPT} "
            f"Use a larger or more varied pool, or sample more varied answers: a higher --k or --temperature "
            f"(now k = {s.k}, temperature = {s.temperature}{nucleus})."
        )
    th = find_threshold(se, cfg.threshold.rule, cfg.threshold.n_candidates)
    labels = binarize(se, th.gamma)
    n_unknown = int(labels.sum())
    if min(n_unknown, len(labels) - n_unknown) < MIN_PER_CLASS:
        raise ProbeError(
            f"The {th.rule} threshold gamma* = {th.gamma:.3f} nats labels {len(labels) - n_unknown} questions known and "
            f"{n_unknown} unknown, but the probes need at least {MIN_PER_CLASS} of each to split train / validation / test. "
            f"{_KEPT} {one_sided_advice(se, len(labels) - n_unknown, n_unknown, cfg)}"
        )
    Q.set_bise(db, run_id, {r["question_id"]: int(l) for r, l in zip(rows, labels)})
    threshold = {"rule": th.rule, "gamma": th.gamma, "candidates": list(th.candidates), "criterion": list(th.criterion),
                 "share_unknown": float(labels.mean())}
    Q.update_run(db, run_id, threshold=threshold)
    return threshold


def _stage_probes(db, run_id: int, cfg: Stage1Config, hidden: np.ndarray, progress: Progress) -> int:
    from .baselines import baseline_table, threshold_robustness
    from .probes import distance_from_training, layer_features, probe_layers, save_probe

    rows = Q.load_scores(db, run_id)
    run = Q.get_run(db, run_id)
    bise = np.array([r["bise"] for r in rows], dtype=np.int64)
    has_gold = any(r["correct"] is not None for r in rows)
    incorrect = np.array([-1 if r["correct"] is None else 1 - r["correct"] for r in rows], dtype=np.int64) if has_gold else None
    device = _probe_device(cfg)
    with StageTimer(db, run_id, "probes") as timer:
        main = probe_layers(hidden, bise, cfg.probe, incorrect=incorrect, device=device, progress=progress)
        scores = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("se", "se_weighted", "regular_entropy", "mean_loglik")}
        table = baseline_table(hidden, scores, bise, incorrect, main, cfg.probe, progress, device=device)
        robust = threshold_robustness(hidden, scores["se"], run["threshold"]["gamma"], incorrect, main.split, main.best_layer, cfg.probe,
                                      progress=progress, device=device)
        folder = probes_dir() / f"run-{run_id}-{cfg.probe.kind}-layer{main.best_layer}"
        held_out = np.concatenate([main.split.val, main.split.test])
        ref = distance_from_training(main.net, layer_features(hidden, main.best_layer, held_out))
        meta = {"target": "bise", "run_id": run_id, "model": run["model"], "threshold": run["threshold"]["gamma"],
                "threshold_rule": cfg.threshold.rule, "prompt": to_dict(cfg.prompt),
                "heldout_distance_q95": float(np.quantile(ref, 0.95))}
        path = save_probe(folder, main.net, main.kind, main.best_layer, cfg.probe, meta)
        metrics = {"split": main.split.to_dict(), "best_layer": main.best_layer, "baselines": table, "robustness": robust,
                   "test_auroc": main.best.test_auroc, "test_ci": [main.best.test_ci_low, main.best.test_ci_high],
                   "val_auroc": main.best.val_auroc, "test_auroc_correct": main.best.test_auroc_correct}
        layers = [vars(s) for s in main.layers]
        probe_id = Q.insert_probe(db, run_id, main.kind, "bise", main.best_layer, str(path), to_dict(cfg.probe), metrics, layers)
        timer.n = len(main.layers)
    return probe_id


def _probe_device(cfg: Stage1Config) -> str:
    return resolve_device(cfg.probe.device)


def run_stage1(pool: int | str, cfg: Stage1Config, progress: Progress | None = None, resume: bool = True,
               lm: LoadedLM | None = None, model_stages: Callable[..., Any] | None = None) -> int:
    """Run (or resume) Stage 1 on a stored pool; returns the run id. Interruptions keep all stored work.
    ``model_stages(db, run_id, questions, cfg, dtype, progress)``: another executor's hidden states, answers and
    scores (``ka2l.scale.run_stage1`` passes its Ray executor's), instead of this process's."""
    progress = progress or NullProgress()
    if cfg.executor.kind != "local" and model_stages is None:
        log.warning("the %s executor runs through ka2l.scale.run_stage1; this call runs Stage 1 locally", cfg.executor.kind)
    with connect() as db:
        pool_row = Q.get_pool(db, pool)
        questions = Q.pool_questions(db, pool_row["id"])
        dtype = dtype_name(lm.model.dtype) if lm is not None else resolve_dtype_name(cfg.model.dtype, resolve_device(cfg.model.device))
        run_id, state = start_run(db, pool_row["id"], "stage1", cfg, cfg.model.name_or_path, resume, dtype)
        log.info("run %d on pool %r (%d questions): %s", run_id, pool_row["name"], len(questions), state)
        if state == "done":
            return run_id
        with run_status(db, run_id, progress):
            hidden = None
            forget_lost_hidden_states(db, run_id)
            if model_stages is not None:
                hidden = model_stages(db, run_id, questions, cfg, dtype, progress)
            elif len(Q.hidden_done_ids(db, run_id)) < len(questions) or len(Q.answered_ids(db, run_id)) < len(questions):
                check_backend(cfg.sampling, cfg.model)  # vLLM missing / no GPU: said before minutes of loading
                _check_space_before_loading(db, run_id, len(questions), cfg, lm)
                lm = lm or load_model(cfg.model)
                prompts = [build_prompt(lm.tokenizer, q["question"], cfg.prompt) for q in questions]
                hidden = _stage_hidden(db, run_id, lm, questions, prompts, cfg.sampling.hidden_batch_size, progress)
                _stage_answers(db, run_id, lm, questions, prompts, cfg, progress)
            answered = Q.answered_ids(db, run_id)  # every question, unless the sampler left some out (see _stage_answers)
            _stage_scores(db, run_id, [q for q in questions if q["id"] in answered], cfg, progress)
            _stage_labels(db, run_id, cfg)
            if hidden is None:
                hidden = HiddenStates.open(run_hidden_path(Q.get_run(db, run_id)))
            if len(answered) < len(questions):
                hidden = _AnsweredRows(hidden, [i for i, q in enumerate(questions) if q["id"] in answered])
            _stage_probes(db, run_id, cfg, hidden, progress)
    return run_id


SHIFT_WARNING_SHARE = 0.25


def shift_summary(distances: np.ndarray, reference_q95: float | None) -> dict[str, Any]:
    """Share of a triaged pool further from the probe's training data than 95% of its own held-out
    questions (about 5% when the pool is like the training pool)."""
    if reference_q95 is None:
        return {"available": False}
    share = float((distances > reference_q95).mean())
    return {"available": True, "share_beyond_heldout_q95": share, "median_distance": float(np.median(distances)),
            "heldout_q95": reference_q95, "warning": share > SHIFT_WARNING_SHARE}


def run_triage(pool: int | str, cfg: TriageConfig, progress: Progress | None = None, resume: bool = True,
               lm: LoadedLM | None = None, hidden_stage: Callable[..., Any] | None = None) -> int:
    """Score a pool with a saved probe from one forward pass per question that stops at the probe's layer
    (no sampling; only that layer's states are stored), with the model in the dtype of the probe's
    Stage 1 run (whatever 'auto' means on this machine). ``hidden_stage(db, run_id, questions, source_cfg,
    cfg, dtype, layer, progress)``: another executor's states (``ka2l.scale.run_triage`` passes Ray's)."""
    from .probes import distance_from_training, load_probe, predict_unknown

    progress = progress or NullProgress()
    with connect() as db:
        probe_row = Q.get_probe(db, cfg.probe_id)
        net, meta = load_probe(probe_row["path"])
        source_run = Q.get_run(db, probe_row["run_id"])
        source = from_dict(Stage1Config, source_run["config"])
        pool_row = Q.get_pool(db, pool)
        questions = Q.pool_questions(db, pool_row["id"])
        device = resolve_device(cfg.device)
        dtype = source_run["versions"].get("dtype") or resolve_dtype_name(source.model.dtype, device)
        if lm is not None and dtype_name(lm.model.dtype) != dtype:
            raise ConfigError(f"The model given to triage runs in {dtype_name(lm.model.dtype)}, but probe {cfg.probe_id} was trained on "
                              f"hidden states computed in {dtype} (Stage 1 run {source_run['id']}). Load the model in {dtype}, "
                              f"or let triage load it.")
        run_id, state = start_run(db, pool_row["id"], "triage", cfg, source.model.name_or_path, resume, dtype)
        if state == "done":
            return run_id
        with run_status(db, run_id, progress):
            layer = int(meta["layer"])
            if hidden_stage is not None:
                hidden = hidden_stage(db, run_id, questions, source, cfg, dtype, layer, progress)
            else:
                lm = lm or load_model(replace(source.model, dtype=dtype), device=device)
                prompts = [build_prompt(lm.tokenizer, q["question"], source.prompt) for q in questions]
                hidden = _stage_hidden(db, run_id, lm, questions, prompts, cfg.batch_size, progress, layer=layer)  # (n, 1, hidden)
            with StageTimer(db, run_id, "predict") as timer:
                x = np.asarray(hidden.layer(layer), dtype=np.float32)
                p = predict_unknown(net, x)
                Q.insert_predictions(db, run_id, cfg.probe_id, [
                    {"question_id": q["id"], "p_unknown": float(pi), "label": int(pi >= 0.5), "layer": layer} for q, pi in zip(questions, p)])
                timer.n = len(questions)
            Q.update_run(db, run_id, summary={"shift": shift_summary(distance_from_training(net, x), meta.get("heldout_distance_q95"))})
    return run_id
