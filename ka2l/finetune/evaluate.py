"""What a fine-tune bought: the base and the tuned model answer the held-out questions (the ``eval``
split in ``finetune_data``, which training never saw) at a low temperature, and each answer is scored
against its gold answer.

    base answers   the Stage 1 run's model with the run's prompt (the prompt training used), T = 0.1, seeded
    tuned answers  the same model with the fine-tune's adapter (``lora.load_tuned``)
    BERTScore      one load of the BERTScore model for every answer not yet scored
    summary        per metric and model the mean with its 95% bootstrap interval, and the paired
                   tuned - base difference with its own; into ``finetunes.evaluation``

Per question (``finetune_answers``): the answer, ``correct`` (Stage 1's rule, against the gold answer and,
for a pool question, the pool's own gold answers), sentence BLEU, ROUGE-L, METEOR, BERTScore (0-100; see
``textmetrics``). The summary adds corpus BLEU. Every summary names the BERTScore model.

Resumable: an item a model has answered is not answered again; a cancel keeps every stored batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..config import FinetuneConfig, ModelSpec, PromptConfig, SamplingConfig, Stage1Config, from_dict
from ..device import free_memory
from ..errors import ConfigError
from ..progress import NullProgress, Progress
from ..store import evaluation as E
from ..store import finetune as S
from ..store import queries as Q
from ..store.db import connect, now
from . import textmetrics as T

log = logging.getLogger(__name__)

TEMPERATURE = 0.1
MODELS = E.MODELS
SUMMARY_METRICS = ("correct", "bleu", "corpus_bleu", "rouge_l", "meteor", "bertscore")


def _setup(finetune_id: int, device: str | None) -> dict[str, Any]:
    """The fine-tune's row, eval split, base model spec, prompt, sampling and pool gold answers."""
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
        items = S.load_data(db, finetune_id, split="eval")
        run = Q.get_run(db, row["run_id"]) if row["run_id"] is not None else None
        golds = {f"q:{q['id']}": list(q["answers"] or []) for q in Q.pool_questions(db, row["pool_id"])}
    if not items:
        raise ConfigError(f"Fine-tune {finetune_id} has no held-out questions (split 'eval' in its data); there is nothing to evaluate. "
                          "Launch the fine-tune again with a larger eval share or more pairs.")
    cfg = from_dict(FinetuneConfig, row["config"])
    side = None
    if row["adapter_dir"]:
        from .lora import read_sidecar

        side = read_sidecar(row["adapter_dir"])
    if side is not None:  # what the adapter was trained on
        spec, prompt = from_dict(ModelSpec, side["model"]), from_dict(PromptConfig, side["prompt"])
    elif run is not None:
        stage1 = from_dict(Stage1Config, run["config"])
        spec, prompt = replace(stage1.model, device=cfg.device, dtype=cfg.dtype), stage1.prompt
    else:
        raise ConfigError(f"Fine-tune {finetune_id}'s Stage 1 run was deleted and it has no adapter: its model is unknown. Launch a new fine-tune.")
    sampling = from_dict(Stage1Config, run["config"]).sampling if run is not None else SamplingConfig()
    if device is not None:
        spec = replace(spec, device=device)
    return {"row": row, "items": items, "spec": spec, "prompt": prompt, "sampling": sampling, "golds": golds}


def _load(model: str, ctx: dict[str, Any]):
    from ..models.llm import load_model

    if model == "base":
        return load_model(ctx["spec"])
    _require_adapter(ctx["row"])
    from .lora import load_tuned

    return load_tuned(ctx["spec"], ctx["row"]["adapter_dir"])


def _require_adapter(row: dict[str, Any]) -> None:
    if row["status"] != "done" or not row["adapter_dir"]:
        raise ConfigError(f"Fine-tune {row['id']} is {row['status']}, so it has no tuned model to evaluate yet. Finish it first "
                          f"(resume its job, or `python -m ka2l finetune` with the same settings), then evaluate again; "
                          f"the base model alone can be evaluated meanwhile (--model base). Answers stored so far are kept.")


def _answer(finetune_id: int, model: str, ctx: dict[str, Any], temperature: float, seed: int, batch_size: int,
            progress: Progress, cache_dir) -> int:
    """``model`` answers the held-out items it has not answered; returns how many it answered now."""
    from ..models.llm import build_prompt, generate_answers

    items = ctx["items"]
    with connect() as db:
        done = E.answered_keys(db, finetune_id, model)
    todo = [i for i, it in enumerate(items) if it["item_key"] not in done]
    progress.stage(f"{model} answers", total=len(items), done=len(items) - len(todo))
    if not todo:
        return 0
    lm = _load(model, ctx)
    sampling = replace(ctx["sampling"], batch_size=batch_size)
    try:
        for b in range(0, len(todo), batch_size):
            rows = todo[b : b + batch_size]
            prompts = [build_prompt(lm.tokenizer, items[i]["question"], ctx["prompt"]) for i in rows]
            out = generate_answers(lm, prompts, sampling, temperature, 1, seed * 1_000_003 + rows[0])  # seed from the items, not the resume point
            stored = []
            for j, i in enumerate(rows):
                it, answer = items[i], out[j][0].text.strip()
                golds = [it["answer"]] + [g for g in ctx["golds"].get(it["item_key"], []) if g != it["answer"]]
                stored.append({"item_key": it["item_key"], "question": it["question"], "gold": it["answer"], "answer": answer,
                               "correct": int(T.correct(answer, golds, it["question"])), "bleu": T.sentence_bleu(answer, it["answer"]),
                               "rouge_l": T.rouge_l(answer, it["answer"]), "meteor": T.meteor(answer, it["answer"], cache_dir),
                               "bertscore": None, "made_with": json.dumps({"temperature": temperature, "seed": seed})})
            with connect() as db:
                E.add_answers(db, finetune_id, model, stored)
            progress.advance(len(rows), f"e.g. {stored[0]['answer'][:40]!r}")
    finally:
        del lm
        free_memory()
    return len(todo)


def _require_same_answers(finetune_id: int, models: Sequence[str], temperature: float, seed: int) -> None:
    """Stored answers are reused, so they must have been made with the settings asked for now: answers made at another
    temperature or seed are refused, not passed off as the new settings'. Each answer records its settings (older
    rows: the last finished evaluation's), so this holds after an interrupted first attempt too."""
    want = {"temperature": temperature, "seed": seed}
    with connect() as db:
        if not any(E.answered_keys(db, finetune_id, m) for m in models):
            return
        seen = E.made_with(db, finetune_id, models)
        previous = E.get_evaluation(db, finetune_id)
    if not seen and previous:
        seen = [{k: previous.get(k) for k in want}]
    other = next((s for s in seen if s != want), None)
    if other is not None:
        changed = [f"{k} {other.get(k)!r} -> {v!r}" for k, v in want.items() if other.get(k) != v]
        raise ConfigError(f"Fine-tune {finetune_id}'s stored answers were made with other settings ({'; '.join(changed)}). Evaluate "
                          f"with the stored settings to reuse them, or answer every question again: tick 'Answer again (fresh)' on the "
                          f"Fine-tune page, or `python -m ka2l evaluate --fresh`.")


def _forget_other_bertscores(finetune_id: int, name: str) -> int:
    """BERTScores from another model are scored again with ``name``'s; the answers are kept."""
    with connect() as db:
        previous = E.get_evaluation(db, finetune_id)
        n = E.clear_bertscore(db, finetune_id, name, previous.get("bertscore_model") if previous else None)
    if n:
        log.info("fine-tune %d: %d BERTScores from another model are scored again with %s", finetune_id, n, name)
    return n


def _score_bertscore(finetune_id: int, progress: Progress, model_dir, device: str, batch_size: int) -> int:
    with connect() as db:
        rows = E.unscored(db, finetune_id, "bertscore")
    progress.stage("BERTScore", total=len(rows))
    if not rows:
        return 0
    for b in range(0, len(rows), 256):  # stored in chunks so a cancel keeps what was scored
        chunk = rows[b : b + 256]
        scores = T.bertscore([r["answer"] for r in chunk], [r["gold"] for r in chunk], model_dir, device=device, batch_size=batch_size)
        with connect() as db:
            E.set_scores(db, finetune_id, "bertscore", [(r["model"], r["item_key"], s) for r, s in zip(chunk, scores)],
                         bertscore_model=T.bertscore_model_name(model_dir))
        progress.advance(len(chunk))
    return len(rows)


def summarize(rows: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per metric: each model's value with its bootstrap interval (``value``, ``lo``, ``hi``, ``n``) and,
    over the items both answered, the paired ``delta`` (tuned - base, resampled together). ``corpus_bleu``
    is sacrebleu's corpus BLEU (0 when no answer has four words, as short answers often do); the others
    are means of the per-question scores (``bleu``: sentence BLEU; ``correct``: a percentage)."""
    import numpy as np

    by = {m: {r["item_key"]: r for r in rows if r["model"] == m} for m in MODELS}
    paired = sorted(set(by["base"]) & set(by["tuned"]))
    out: dict[str, Any] = {}
    for metric in SUMMARY_METRICS:
        entry: dict[str, Any] = {}
        for m in MODELS:
            got = [by[m][k] for k in sorted(by[m])]
            if not got:
                continue
            if metric == "corpus_bleu":
                entry[m] = T.corpus_bleu_interval([r["answer"] for r in got], [r["gold"] for r in got], n_boot, seed)
            else:
                entry[m] = T.mean_interval([_value(r, metric) for r in got], n_boot, seed)
        if paired:
            if metric == "corpus_bleu":
                answers = {m: [by[m][k]["answer"] for k in paired] for m in MODELS}
                golds = [by["base"][k]["gold"] for k in paired]

                def stat(i, answers=answers, golds=golds):
                    sub = [golds[j] for j in i]
                    return T.corpus_bleu([answers["tuned"][j] for j in i], sub) - T.corpus_bleu([answers["base"][j] for j in i], sub)
            else:
                diff = np.array([_value(by["tuned"][k], metric) - _value(by["base"][k], metric) for k in paired])  # (paired,)

                def stat(i, diff=diff):
                    return float(diff[i].mean())
            entry["delta"] = T.interval(stat, len(paired), n_boot, seed)
        out[metric] = entry
    return out


def _value(row: dict[str, Any], metric: str) -> float:
    v = row[metric]
    if v is None:
        raise ConfigError(f"{row['model']} answer to {row['item_key']} has no {metric} yet; run the evaluation to the end.")
    return 100.0 * v if metric == "correct" else float(v)


def evaluate(finetune_id: int, progress: Progress | None = None, *, temperature: float = TEMPERATURE, seed: int = 0,
             batch_size: int = 16, bootstrap: int = 1000, models: Sequence[str] = MODELS, bertscore_model: str | None = None,
             device: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """Answer fine-tune ``finetune_id``'s held-out questions with ``models`` (base, tuned), score them and store
    the per-question rows and the summary (returned). ``device`` overrides the fine-tune's; ``bertscore_model``
    is a local model folder (default: the offline all-MiniLM-L6-v2); ``fresh`` forgets stored answers first."""
    from ..device import resolve_device

    progress = progress or NullProgress()
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ConfigError(f"models must be some of {', '.join(MODELS)}; got {list(models)}.")
    if not 0 < temperature <= 2:
        raise ConfigError(f"temperature must be in (0, 2]; the method uses {TEMPERATURE}. Got {temperature}.")
    if batch_size < 1 or bootstrap < 0:
        raise ConfigError(f"batch_size must be >= 1 and bootstrap >= 0; got {batch_size} and {bootstrap}.")
    started = time.time()
    progress.stage("preparing")
    ctx = _setup(finetune_id, device)
    if "tuned" in models:
        _require_adapter(ctx["row"])  # refused before an hour of base answers, not after
    cache_dir = None  # WordNet's folder under the data folder
    T.wordnet_data(cache_dir)  # a missing WordNet is reported before any model is loaded
    if not fresh:
        _require_same_answers(finetune_id, models, temperature, seed)
        _forget_other_bertscores(finetune_id, T.bertscore_model_name(bertscore_model))
    if fresh:
        with connect() as db:
            E.clear_answers(db, finetune_id)
    answered = {m: _answer(finetune_id, m, ctx, temperature, seed, batch_size, progress, cache_dir) for m in models}
    score_device = resolve_device(ctx["spec"].device)
    _score_bertscore(finetune_id, progress, bertscore_model, score_device, batch_size)
    progress.stage("summary", total=1)
    with connect() as db:
        rows = [r for r in E.answers(db, finetune_id) if r["model"] in models]
    summary = {
        "finetune_id": finetune_id, "n_eval": len(ctx["items"]), "models": list(models), "temperature": temperature, "seed": seed,
        "bootstrap": bootstrap, "interval": "95% percentile bootstrap over questions", "scale": "0-100",
        "bertscore_model": T.bertscore_model_name(bertscore_model), "base_model": ctx["spec"].name_or_path,
        "adapter_dir": ctx["row"]["adapter_dir"], "tuned_step": ctx["row"]["step"] if "tuned" in models else None,
        "answered_now": answered, "metrics": summarize(rows, bootstrap, seed), "versions": _versions(), "at": now(),
        "seconds": round(time.time() - started, 3),
    }
    with connect() as db:
        E.save_evaluation(db, finetune_id, summary)
    progress.advance(1)
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("transformers", "torch", "peft", "sacrebleu", "rouge-score", "nltk", "bert-score", T.BERTSCORE_WHEEL):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def report(summary: dict[str, Any]) -> str:
    """The summary as lines of text: per metric, base and tuned with intervals and the difference."""
    lines = [f"fine-tune {summary['finetune_id']}: {summary['n_eval']} held-out questions, T = {summary['temperature']}, "
             f"{summary['interval']} ({summary['bootstrap']} resamples), scores 0-100",
             f"BERTScore model: {summary['bertscore_model']}",
             f"{'metric':<10} {'base':>22} {'tuned':>22} {'tuned - base':>24}"]

    def cell(e: dict[str, float] | None) -> str:
        return "-" if not e else f"{e['value']:6.1f} [{e['lo']:6.1f}, {e['hi']:6.1f}]"

    for metric, entry in summary["metrics"].items():
        name = {"bleu": "BLEU", "corpus_bleu": "BLEU*", "rouge_l": "ROUGE-L", "meteor": "METEOR", "bertscore": "BERTScore"}.get(metric, metric)
        lines.append(f"{name:<10} {cell(entry.get('base')):>22} {cell(entry.get('tuned')):>22} {cell(entry.get('delta')):>24}")
    lines.append("* corpus BLEU (0 when no answer has four words); the other rows are means of per-question scores "
                 "(BLEU: sentence BLEU; correct: % of questions)")
    return "\n".join(lines)
