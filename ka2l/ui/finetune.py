"""What the Fine-tune page (Stage 3b) draws, reached through ka2l.ui: the config form with its presets,
the dataset it would train on, the preflight verdict, Launch, the live loss chart with the job's Cancel /
Resume, the evaluation tables, the boundary shift and the adapter's files. Everything it shows is read from
the store (``ka2l.views.finetune``), so a reload or a second tab shows the same thing."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import jobs
from ..config import (EVALUATE_MODELS, FINETUNE_PRESETS, FINETUNE_SOURCES, GOLD_SETS, LAUNCHERS, LR_SCHEDULERS, EvaluateConfig, FinetuneConfig,
                      ReprobeConfig, field_help, from_dict, to_dict)
from ..device import DEVICES, DTYPES
from ..errors import Ka2lError
from ..views import finetune as V
from ..views.jobs import format_duration
from ..views import shift as shift_views
from ..views.maps import METHODS
from .charts import loss_figure, shift_figure
from .jobs_panel import render_job

LIVE_SECONDS = 2            # how often a fine-tune in training is redrawn
PRESET_KEY = "ka2l.finetune.preset"
SELECTED_KEY = "ka2l.finetune.selected"
KNOWN_KEY = "ka2l.finetune.known"  # fine-tune ids seen, so a new one is selected when it appears
PREFIX = "ka2l.finetune.f."        # + field name: the form's widgets
HELP = field_help(FinetuneConfig)
DEFAULTS = FinetuneConfig()
DATA_FIELDS = ("source", "project", "file", "gold_set", "run_id")  # set by the data section, not by a preset
SOURCE_LABELS = {"labelstudio": "Label Studio answers", "gold": "gold answers (the pool's own)", "file": "question-answer file (upload)"}
MAIN = ("epochs", "lr", "batch_size", "grad_accum", "max_length", "lora_r", "device", "dtype")
ADVANCED = ("lora_alpha", "lora_dropout", "targets", "lr_scheduler", "warmup_ratio", "eval_share", "eval_every", "patience",
            "checkpoint_every", "seed", "mix_known")
SCALE = ("launcher", "num_processes", "accelerate_config")  # several GPUs through accelerate launch, in the advanced settings
LABELS = {"epochs": "Epochs", "lr": "Learning rate", "batch_size": "Batch size", "grad_accum": "Gradient accumulation",
          "max_length": "Max length (tokens)", "lora_r": "LoRA rank r", "device": "Device", "dtype": "Weights dtype",
          "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "targets": "LoRA targets (space-separated)",
          "lr_scheduler": "LR schedule", "warmup_ratio": "Warm-up share", "eval_share": "Held-out share",
          "eval_every": "Held-out loss every N steps", "patience": "Early-stopping patience (0 = off)",
          "checkpoint_every": "Checkpoint every N steps", "seed": "Seed", "mix_known": "Mix in k known questions",
          "project": "Label Studio project (ka2l id, 0 = newest)", "launcher": "Launcher", "num_processes": "Processes (GPUs)",
          "accelerate_config": "accelerate config file (empty = DDP)"}
CHOICES = {"device": DEVICES, "dtype": DTYPES, "lr_scheduler": LR_SCHEDULERS, "launcher": LAUNCHERS}
TEXTS = ("targets", "accelerate_config")
BOUNDS = {"epochs": (0.01, 100000.0, 0.5), "lr": (1e-7, 1.0, 1e-5), "batch_size": (1, 4096, 1), "grad_accum": (1, 4096, 1),
          "max_length": (8, 1 << 20, 64), "lora_r": (1, 1024, 1), "lora_alpha": (0.01, 4096.0, 1.0), "lora_dropout": (0.0, 0.99, 0.05),
          "warmup_ratio": (0.0, 0.99, 0.01), "eval_share": (0.01, 0.89, 0.05), "eval_every": (1, 100000, 1), "patience": (0, 1000, 1),
          "checkpoint_every": (1, 100000, 1), "seed": (0, 2**31 - 1, 1), "mix_known": (0, 100000, 1), "project": (0, 10**9, 1),
          "num_processes": (1, 1024, 1)}
FORMATS = {"lr": "%.1e"}


# -- the config form ----------------------------------------------------------------------------------

def _widget_value(name: str, value: Any) -> Any:
    if name == "targets":
        return " ".join(value)
    default = getattr(DEFAULTS, name)
    return float(value) if isinstance(default, float) else value


def _apply_preset() -> None:
    """Fill every training field from the chosen preset (fields it does not name get the config's defaults)."""
    values = {**to_dict(DEFAULTS), **FINETUNE_PRESETS[st.session_state[PRESET_KEY]]}
    for name in MAIN + ADVANCED + SCALE:
        st.session_state[PREFIX + name] = _widget_value(name, values[name])


def _field(container, name: str) -> None:
    key, label, help_ = PREFIX + name, LABELS[name], HELP[name]
    if name in CHOICES:
        container.selectbox(label, CHOICES[name], key=key, help=help_)
    elif name in TEXTS:
        container.text_input(label, key=key, help=help_)
    else:
        lo, hi, step = BOUNDS[name]
        container.number_input(label, min_value=lo, max_value=hi, step=step, key=key, help=help_, format=FORMATS.get(name))


def _source_picker() -> dict[str, Any]:
    """Where the pairs come from; returns the data fields of the config."""
    c = st.columns([2, 2])
    source = c[0].radio("Pairs from", FINETUNE_SOURCES, format_func=SOURCE_LABELS.get, key=PREFIX + "source", help=HELP["source"],
                        horizontal=True)
    out: dict[str, Any] = {"source": source}
    if source == "gold":
        out["gold_set"] = c[1].radio("Gold answers of", GOLD_SETS, key=PREFIX + "gold_set", help=HELP["gold_set"], horizontal=True,
                                     format_func={"unknown": "the run's unknown questions", "all": "every question"}.get)
    elif source == "file":
        up = c[1].file_uploader("Question-answer file (.csv or .jsonl with 'question' and 'answer' columns)", type=["csv", "jsonl"],
                                key=PREFIX + "upload", help=HELP["file"])
        if up is None:
            raise Ka2lError("Upload a .csv or .jsonl file with 'question' and 'answer' columns, or choose another source.")
        out["file"] = V.save_upload(up.name, up.getvalue())
    return out


def config_form(run_id: int) -> FinetuneConfig | None:
    """The source, the preset and every training field (help from the config's own); the config, or None
    after showing what is wrong."""
    if PREFIX + "source" not in st.session_state:
        st.session_state[PREFIX + "source"] = DEFAULTS.source
        st.session_state[PREFIX + "gold_set"] = DEFAULTS.gold_set
    try:
        data = _source_picker()
    except Ka2lError as exc:
        st.info(str(exc))
        data = None
    if PRESET_KEY not in st.session_state:
        st.session_state[PRESET_KEY] = next(iter(FINETUNE_PRESETS))
    if any(PREFIX + n not in st.session_state for n in MAIN + ADVANCED + SCALE):
        _apply_preset()
    st.selectbox("Preset", list(FINETUNE_PRESETS), key=PRESET_KEY, on_change=_apply_preset,
                 help="Fills the fields below: cpu-small runs in minutes on a laptop CPU with SmolLM2-135M; gpu-paper is the "
                      "paper's setting (LoRA on all linear layers, 3 epochs, lr 1e-4, batch 4 x grad-accum 8, bf16 on CUDA).")
    cols = st.columns(4)
    for i, name in enumerate(MAIN):
        _field(cols[i % 4], name)
    with st.expander("Advanced settings"):
        cols = st.columns(4)
        for i, name in enumerate(ADVANCED + (("project",) if data and data["source"] == "labelstudio" else ())):
            _field(cols[i % 4], name)
        st.caption("Several GPUs: the job starts `accelerate launch` with one training process per GPU (DDP; an FSDP or "
                   "DeepSpeed ZeRO-3 config file from configs/accelerate/ for models too large for one GPU).")
        cols = st.columns([1, 1, 2])
        for i, name in enumerate(SCALE):
            _field(cols[i], name)
    if data is None:
        return None
    values = {n: st.session_state[PREFIX + n] for n in MAIN + ADVANCED + SCALE}
    values["accelerate_config"] = str(values["accelerate_config"]).strip()
    values["targets"] = tuple(str(values["targets"]).split())
    if data["source"] == "labelstudio":
        data["project"] = int(st.session_state.get(PREFIX + "project", 0))
    try:
        return from_dict(FinetuneConfig, {**values, **data, "run_id": int(run_id)})
    except Ka2lError as exc:
        st.error(str(exc))
        return None


# -- data, preflight, launch --------------------------------------------------------------------------

def dataset_section(pool_name: str, cfg: FinetuneConfig) -> dict[str, Any] | None:
    try:
        summary = V.dataset_summary(pool_name, cfg)
    except Ka2lError as exc:
        st.warning(str(exc))
        return None
    c = st.columns(4)
    c[0].metric("Training pairs", summary["n_train"])
    c[1].metric("Held out", summary["n_eval"])
    c[2].metric("Known mixed in", summary["n_known"])
    c[3].metric("Source pairs", summary["n_source"])
    dropped = ", ".join(f"{n} {why}" for why, n in summary["dropped"].items())
    st.caption(f"Pairs from {summary['source_name']}, the model of Stage 1 run {summary['run_id']} · dataset {summary['hash']}"
               + (f" · dropped: {dropped}" if dropped else "") + ". Held-out pairs are never trained on; the evaluation answers them.")
    st.dataframe(summary["preview"], hide_index=True, height=220, key="finetune-preview")
    return summary


def preflight_section(cfg: FinetuneConfig) -> bool:
    """The memory estimate against what the device has; True when a launch may go ahead."""
    try:
        verdict = V.preflight(cfg)
    except Ka2lError as exc:
        st.error(f"Preflight: {exc}")
        return False
    if verdict["fits"]:
        st.success(f"Preflight ({verdict['model']}): {verdict['message']}")
    else:
        st.error(f"Preflight refuses this launch. {verdict['message']}")
    return bool(verdict["fits"])


def launch(pool_name: str, cfg: FinetuneConfig | None, ready: bool) -> None:
    """The Launch button; disabled until the data builds and the preflight passes."""
    if st.button("Launch fine-tune", type="primary", disabled=cfg is None or not ready, key="finetune-launch",
                 help="Queues the fine-tune as a job: it keeps running if you reload or close the tab, and Cancel keeps its checkpoint.") \
            and cfg is not None:
        try:
            job_id = jobs.submit("finetune", {"pool": pool_name, "finetune": to_dict(cfg)})
        except jobs.JobPending as exc:  # the same fine-tune already queued or running: not an error
            st.info(str(exc))
        except Ka2lError as exc:
            st.error(str(exc))
        else:
            st.session_state.pop(SELECTED_KEY, None)  # follow the new fine-tune once it appears
            st.success(f"Job {job_id} queued: it fine-tunes {cfg.source} pairs; the chart below follows it.")


# -- the fine-tunes and the live chart -----------------------------------------------------------------

def pick_finetune(pool_id: int) -> dict[str, Any] | None:
    """The fine-tune to show (newest first; a new one is selected as it appears)."""
    rows = V.finetunes(pool_id)
    if not rows:
        return None
    ids = [r["id"] for r in rows]
    known = st.session_state.get(KNOWN_KEY)
    if st.session_state.get(SELECTED_KEY) not in ids or (known is not None and set(ids) - set(known)):
        st.session_state[SELECTED_KEY] = ids[0]
    st.session_state[KNOWN_KEY] = ids
    chosen = st.selectbox("Fine-tune", ids, key=SELECTED_KEY, format_func=lambda i: V.label(next(r for r in rows if r["id"] == i)))
    return next(r for r in rows if r["id"] == chosen)


def _live(pool_id: int, finetune_id: int | None, seen: tuple) -> None:
    """The chosen fine-tune's loss chart, figures and job, re-read from the store; the whole page is redrawn
    when a fine-tune appears or changes status (its evaluation and adapter sections depend on it)."""
    if V.watch_key(pool_id) != seen:
        st.rerun(scope="app")
    for job in V.pending_without_row(pool_id):
        render_job(job, "finetune-new")
    if finetune_id is None:
        return
    row = V.finetune(finetune_id)
    curves = V.losses(finetune_id)
    s = V.status(row)
    job = V.job_of(row)
    running = job is not None and job["status"] in jobs.PENDING
    c = st.columns(4)
    c[0].metric("Step", f"{s['step']} / {s['total'] or '?'}")
    c[1].metric("Learning rate", f"{s['lr']:.2e}" if s["lr"] is not None else "-")
    c[2].metric("Tokens / s", f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "-")
    c[3].metric("Time left", format_duration(s["eta_s"]) if running and s["eta_s"] is not None else "-")
    st.plotly_chart(loss_figure(curves), key=f"finetune-loss-{finetune_id}", width="stretch")
    points = len(curves["train"]["step"])
    if running:
        st.caption(f"Training: step {s['step']} of {s['total'] or '?'} · {points} loss points · the chart updates every {LIVE_SECONDS} s.")
    else:
        st.caption(f"Fine-tune {finetune_id} is {row['status']} · {points} loss points · trained {format_duration(row['seconds'])}"
                   + (" · stopped early (best held-out loss kept)" if row["stopped_early"] else ""))
    if row["error"]:
        st.error(row["error"])
    if job is not None and (running or job["status"] in ("failed", "cancelled")):
        render_job(job, "finetune")
    elif job is not None:
        st.caption(f"Trained by job {job['id']} ({job['status']}).")


def live_section(pool_id: int, row: dict[str, Any] | None) -> None:
    seen = V.watch_key(pool_id)
    active = bool(seen[1]) or (row is not None and row["status"] == "training")
    st.fragment(_live, run_every=LIVE_SECONDS if active else None)(pool_id, row["id"] if row else None, seen)


# -- jobs bound to a fine-tune (evaluate, reprobe) -------------------------------------------------------

EVAL_HELP = field_help(EvaluateConfig)
REPROBE_HELP = field_help(ReprobeConfig)


def _submit(kind: str, cfg: dict[str, Any], what: str) -> None:
    """Queue an evaluate or reprobe job; the same one already queued or running is named, not doubled."""
    try:
        job_id = jobs.submit(kind, {kind: cfg})
    except jobs.JobPending as exc:
        st.info(str(exc))
    except Ka2lError as exc:
        st.error(str(exc))
    else:
        st.success(f"Job {job_id} {what}; it keeps running if you reload or close the tab.")


def _follow(finetune_id: int, kind: str, seen: str | None) -> None:
    """The newest ``kind`` job of the fine-tune (progress, Cancel, Resume); the page is redrawn when it ends."""
    job = V.job_for(finetune_id, kind)
    if (job["status"] if job else None) != seen:
        st.rerun(scope="app")
    if job is not None and job["status"] in jobs.PENDING + ("failed", "cancelled"):
        render_job(job, f"finetune-{kind}")


def _job_follow(finetune_id: int, kind: str) -> None:
    job = V.job_for(finetune_id, kind)
    status = job["status"] if job else None
    st.fragment(_follow, run_every=LIVE_SECONDS if status in jobs.PENDING else None)(finetune_id, kind, status)


# -- evaluation, shift, adapter -----------------------------------------------------------------------

def _evaluate_form(row: dict[str, Any]) -> None:
    done = row["status"] == "done"
    with st.expander("Evaluation settings"):
        c = st.columns(4)
        models = c[0].multiselect("Models", EVALUATE_MODELS, default=list(EVALUATE_MODELS) if done else ["base"],
                                  key=f"finetune-eval-models-{row['id']}", help=EVAL_HELP["models"])
        temperature = c[1].number_input("Temperature", 0.01, 2.0, 0.1, 0.05, key=f"finetune-eval-t-{row['id']}", help=EVAL_HELP["temperature"])
        bootstrap = c[2].number_input("Bootstrap resamples", 0, 100000, 1000, 100, key=f"finetune-eval-boot-{row['id']}",
                                      help=EVAL_HELP["bootstrap"])
        batch = c[3].number_input("Batch size", 1, 1024, 16, key=f"finetune-eval-batch-{row['id']}", help=EVAL_HELP["batch_size"])
        c = st.columns(4)
        seed = c[0].number_input("Seed", 0, 2**31 - 1, 0, key=f"finetune-eval-seed-{row['id']}", help=EVAL_HELP["seed"])
        device = c[1].selectbox("Device", ("(the fine-tune's)",) + DEVICES, key=f"finetune-eval-device-{row['id']}", help=EVAL_HELP["device"])
        bert = c[2].text_input("BERTScore model folder", "", key=f"finetune-eval-bert-{row['id']}", help=EVAL_HELP["bertscore_model"])
        fresh = c[3].checkbox("Answer again (fresh)", False, key=f"finetune-eval-fresh-{row['id']}", help=EVAL_HELP["fresh"])
    if st.button("Evaluate", key=f"finetune-evaluate-{row['id']}", type="primary", disabled=not models,
                 help="Base and tuned answer the held-out questions at T = 0.1; BLEU, ROUGE-L, METEOR, BERTScore and correctness "
                      "with bootstrap intervals. Resumable: stored answers are not asked again."):
        _submit("evaluate", {"finetune_id": row["id"], "models": list(models), "temperature": float(temperature), "seed": int(seed),
                             "batch_size": int(batch), "bootstrap": int(bootstrap), "bertscore_model": bert.strip() or None,
                             "device": None if device.startswith("(") else device, "fresh": bool(fresh)},
                f"evaluates fine-tune {row['id']} ({' and '.join(models)})")
    if not done:
        st.caption(f"Fine-tune {row['id']} is {row['status']}: the base model can be evaluated now, the tuned one once training is done.")
    _job_follow(row["id"], "evaluate")


def evaluation_section(row: dict[str, Any]) -> None:
    _evaluate_form(row)
    summary = V.evaluation(row["id"])
    if summary is None:
        st.caption(f"Fine-tune {row['id']} has no evaluation yet.")
        return
    st.caption(f"{summary['n_eval']} held-out questions · T = {summary['temperature']} · {summary['interval']} "
               f"({summary['bootstrap']} resamples) · scores 0-100 · BERTScore model: **{summary['bertscore_model']}**")
    table = V.metrics_table(summary)
    st.dataframe(table[["metric", "base", "tuned", "tuned - base"]], hide_index=True, key=f"finetune-metrics-{row['id']}")
    st.dataframe(V.question_table(row["id"]), hide_index=True, height=300, key=f"finetune-questions-{row['id']}",
                 column_config={"item_key": None, "base_answer": "base answer", "tuned_answer": "tuned answer",
                                "base_correct": st.column_config.CheckboxColumn("base correct"),
                                "tuned_correct": st.column_config.CheckboxColumn("tuned correct"),
                                "base_rouge_l": st.column_config.NumberColumn("base ROUGE-L", format="%.1f"),
                                "tuned_rouge_l": st.column_config.NumberColumn("tuned ROUGE-L", format="%.1f"),
                                "base_bertscore": st.column_config.NumberColumn("base BERTScore", format="%.1f"),
                                "tuned_bertscore": st.column_config.NumberColumn("tuned BERTScore", format="%.1f")})


def shift_section(row: dict[str, Any]) -> None:
    """Re-probe with the adapter, then the boundary before and after: shares unknown, the moved questions, one map."""
    done = row["status"] == "done"
    if st.button("Re-probe with the adapter", key=f"finetune-reprobe-{row['id']}", disabled=not done,
                 help="Runs Stage 1 again on the pool with the tuned model (the base run's settings, the adapter applied) and "
                      "scores its states with the base run's saved probe. " + REPROBE_HELP["finetune_id"]):
        _submit("reprobe", {"finetune_id": row["id"]}, f"re-probes the pool with fine-tune {row['id']}'s adapter")
    if not done:
        st.caption(f"Fine-tune {row['id']} is {row['status']}: re-probing needs its finished adapter.")
    _job_follow(row["id"], "reprobe")
    try:
        summary = shift_views.shift_summary(row["id"])
    except Ka2lError as exc:
        st.caption(str(exc))
        return
    if summary["reprobe_status"] != "done":  # a tuned model sure of nearly everything gets no labels or probes of its own
        st.caption(f"Re-probe run {summary['reprobe_run_id']} is {summary['reprobe_status']} on its own labels and probes "
                   f"({summary['reprobe_error'] or 'no reason stored'}); its states, answers and scores are complete, so the "
                   "comparison below uses the base run's threshold and saved probe.")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    c = st.columns(4)
    c[0].metric("Unknown before", pct(summary["share_unknown_before"]))
    c[1].metric("Unknown after", pct(summary["share_unknown_after"]),
                delta=None if summary["share_unknown_before"] is None or summary["share_unknown_after"] is None
                else f"{summary['share_unknown_after'] - summary['share_unknown_before']:+.0%}", delta_color="inverse")
    c[2].metric("Unknown → known", summary["n_unknown_to_known"])
    c[3].metric("Known → unknown (forgetting)", summary["n_known_to_unknown"])
    c = st.columns(4)
    c[0].metric("Mean P(unknown) before", f"{summary['p_unknown_before_mean']:.3f}" if summary["p_unknown_before_mean"] is not None else "-")
    c[1].metric("Mean P(unknown) after", f"{summary['p_unknown_after_mean']:.3f}" if summary["p_unknown_after_mean"] is not None else "-")
    c[2].metric("Correct before", pct(summary["correct_before"]))
    c[3].metric("Correct after", pct(summary["correct_after"]))
    st.caption(f"{summary['n']} questions · base run {summary['base_run_id']} vs re-probe run {summary['reprobe_run_id']} · unknown = SE above "
               f"the base run's γ* = {summary['gamma']:.3f} ({summary['threshold_rule']}) on both sides · P(unknown) from the base run's "
               f"saved probe {summary['probe_id']} (layer {summary['layer']}) on each model's states.")
    moved = V.moved_questions(shift_views.shift_table(row["id"]))
    if moved.empty:
        st.caption("No question crossed the boundary.")
    else:
        st.dataframe(moved[["moved", "question", "gold", "in_training", "correct_before", "correct_after", "p_unknown_before",
                            "p_unknown_after", "ext_id"]], hide_index=True, key=f"finetune-moved-{row['id']}",
                     column_config={"in_training": st.column_config.CheckboxColumn("trained on"),
                                    "p_unknown_before": st.column_config.NumberColumn("P(unknown) before", format="%.2f"),
                                    "p_unknown_after": st.column_config.NumberColumn("P(unknown) after", format="%.2f"),
                                    "ext_id": "pool id"})
    method = st.selectbox("Projection", METHODS, key=f"finetune-shift-method-{row['id']}",
                          help="Fitted on the base run's states at the probe's layer; the tuned model's states are placed in the same map.")
    try:
        frame = shift_views.shift_projection(row["id"], method=method)
    except Ka2lError as exc:
        st.error(str(exc))
        return
    st.plotly_chart(shift_figure(frame), key=f"finetune-shift-map-{row['id']}", width="stretch")


def adapter_section(row: dict[str, Any]) -> None:
    found = V.adapter(row)
    if found is None:
        st.caption("The adapter is written when training ends.")
        return
    st.code(found["dir"], language=None)
    st.caption("Files: " + ", ".join(found["files"]) + ". Load it with peft's PeftModel.from_pretrained on the base model; "
               "the sidecar names the model, prompt, dataset hash, config and versions.")
    st.download_button("Download the adapter's sidecar (JSON)", found["sidecar"], file_name=f"finetune-{row['id']}-{found['sidecar_name']}",
                       mime="application/json", key=f"finetune-sidecar-{row['id']}")
    _exports(row)


def _exports(row: dict[str, Any]) -> None:
    """Export the adapter (optionally merged into the base) and the run's data with a LLaMA-Factory recipe; download them."""
    c = st.columns([1, 3])
    merge = c[1].checkbox("Also merge the adapter into the base model (a full model folder; takes a while)", key=f"finetune-merge-{row['id']}")
    if c[0].button("Export", key=f"finetune-export-{row['id']}",
                   help="Writes the adapter and the fine-tune's own train / held-out pairs as LLaMA-Factory alpaca with a yaml and "
                        "the llamafactory-cli command reproducing this run, under the data folder (replacing an earlier export)."):
        try:
            with st.spinner("Exporting..."):
                V.export(row["id"], merge=merge)
        except Ka2lError as exc:
            st.error(str(exc))
    done = V.exported(row["id"])
    if done is None:
        return
    st.caption(f"Exported to `{done['adapter']}` and `{done['dataset']}`" + (f"; merged model in `{done['merged']}`" if done["merged"] else "") + ".")
    c = st.columns(2)
    c[0].download_button("Download the adapter (zip)", V.zip_folder(done["adapter"]), file_name=f"finetune-{row['id']}-adapter.zip",
                         mime="application/zip", key=f"finetune-dl-adapter-{row['id']}")
    c[1].download_button("Download the LLaMA-Factory dataset and recipe (zip)", V.zip_folder(done["dataset"]),
                         file_name=f"finetune-{row['id']}-llamafactory.zip", mime="application/zip", key=f"finetune-dl-dataset-{row['id']}")
    if done["command"]:
        st.code(done["command"].strip(), language="bash")

