"""What the Fine-tune page (Stage 3b) draws, reached through ka2l.ui: the config form with its presets,
the dataset it would train on, the preflight verdict, Launch, the live loss chart with the job's Cancel /
Resume, the evaluation tables, the boundary shift and the adapter's files. Everything it shows is read from
the store (``ka2l.views.finetune``), so a reload or a second tab shows the same thing."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import jobs
from ..config import FINETUNE_PRESETS, FINETUNE_SOURCES, GOLD_SETS, LR_SCHEDULERS, FinetuneConfig, field_help, from_dict, to_dict
from ..device import DEVICES, DTYPES
from ..errors import Ka2lError
from ..views import finetune as V
from ..views.jobs import format_duration
from .charts import loss_figure
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
LABELS = {"epochs": "Epochs", "lr": "Learning rate", "batch_size": "Batch size", "grad_accum": "Gradient accumulation",
          "max_length": "Max length (tokens)", "lora_r": "LoRA rank r", "device": "Device", "dtype": "Weights dtype",
          "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "targets": "LoRA targets (space-separated)",
          "lr_scheduler": "LR schedule", "warmup_ratio": "Warm-up share", "eval_share": "Held-out share",
          "eval_every": "Held-out loss every N steps", "patience": "Early-stopping patience (0 = off)",
          "checkpoint_every": "Checkpoint every N steps", "seed": "Seed", "mix_known": "Mix in k known questions",
          "project": "Label Studio project (ka2l id, 0 = newest)"}
CHOICES = {"device": DEVICES, "dtype": DTYPES, "lr_scheduler": LR_SCHEDULERS}
BOUNDS = {"epochs": (0.01, 1000.0, 0.5), "lr": (1e-7, 1.0, 1e-5), "batch_size": (1, 4096, 1), "grad_accum": (1, 4096, 1),
          "max_length": (8, 1 << 20, 64), "lora_r": (1, 1024, 1), "lora_alpha": (0.01, 4096.0, 1.0), "lora_dropout": (0.0, 0.99, 0.05),
          "warmup_ratio": (0.0, 0.99, 0.01), "eval_share": (0.01, 0.89, 0.05), "eval_every": (1, 100000, 1), "patience": (0, 1000, 1),
          "checkpoint_every": (1, 100000, 1), "seed": (0, 2**31 - 1, 1), "mix_known": (0, 100000, 1), "project": (0, 10**9, 1)}
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
    for name in MAIN + ADVANCED:
        st.session_state[PREFIX + name] = _widget_value(name, values[name])


def _field(container, name: str) -> None:
    key, label, help_ = PREFIX + name, LABELS[name], HELP[name]
    if name in CHOICES:
        container.selectbox(label, CHOICES[name], key=key, help=help_)
    elif name == "targets":
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
    if any(PREFIX + n not in st.session_state for n in MAIN + ADVANCED):
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
    if data is None:
        return None
    values = {n: st.session_state[PREFIX + n] for n in MAIN + ADVANCED}
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
    st.plotly_chart(loss_figure(curves, s["total"]), key=f"finetune-loss-{finetune_id}", width="stretch")
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


# -- evaluation, adapter -----------------------------------------------------------------------------

def evaluation_section(row: dict[str, Any]) -> None:
    summary = V.evaluation(row["id"])
    if summary is None:
        st.caption(f"Fine-tune {row['id']} has no evaluation yet" + (": it runs once training is done." if row["status"] != "done"
                   else f": `python -m ka2l evaluate --finetune {row['id']}` answers its held-out questions with the base and the tuned model."))
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

