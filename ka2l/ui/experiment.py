"""What the Experiment page (Stage 3) draws, reached through ka2l.ui: the RQ experiment's settings with each
strategy's description, Launch as a background job, the experiment's cells as they finish, its metric
against budget per strategy, and the report (``ka2l.finetune.experiment_report``) with RQ1-RQ3. Everything
shown is read from the store, so a reload or a second tab shows the same thing."""

from __future__ import annotations

from typing import Any

import streamlit as st

from .. import jobs
from ..config import EXPERIMENT_METRICS, EXPERIMENT_STRATEGIES, FINETUNE_PRESETS, ExperimentConfig, field_help, from_dict, to_dict
from ..device import DEVICES
from ..errors import Ka2lError

PREFIX = "ka2l.experiment."
SELECTED_KEY = PREFIX + "selected"
HELP = field_help(ExperimentConfig)
DEFAULTS = ExperimentConfig()
LIVE_SECONDS = 5


def _numbers(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(t) for t in text.replace(",", " ").split())
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not a list of {'numbers' if kind is float else 'whole numbers'} "
                         f"separated by spaces (e.g. {'0.25 0.5 1' if kind is float else '0 1 2'}).") from exc


def config_form(run_id: int) -> ExperimentConfig | None:
    """The settings as widgets; returns the validated config, or None after showing what is wrong."""
    from ..finetune.selection import describe

    c = st.columns([3, 2, 1])
    strategies = c[0].multiselect("Strategies", EXPERIMENT_STRATEGIES, default=list(DEFAULTS.strategies), key=PREFIX + "strategies",
                                  help=HELP["strategies"] + "\n\n" + "\n".join(f"- **{n}**: {d}" for n, d in describe()))
    budgets = c[1].text_input("Budgets (shares of the non-test pool)", " ".join(f"{b:g}" for b in DEFAULTS.budgets),
                              key=PREFIX + "budgets", help=HELP["budgets"])
    seeds = c[2].text_input("Seeds", " ".join(map(str, DEFAULTS.seeds)), key=PREFIX + "seeds", help=HELP["seeds"])
    c = st.columns(4)
    test_share = c[0].number_input("Test share", 0.05, 0.85, DEFAULTS.test_share, 0.05, key=PREFIX + "test_share", help=HELP["test_share"])
    metric = c[1].selectbox("Metric of the comparisons", EXPERIMENT_METRICS, key=PREFIX + "metric", help=HELP["metric"])
    preset = c[2].selectbox("Fine-tune preset", ["cpu-small", "gpu-paper", "defaults"], key=PREFIX + "preset",
                            help="Every cell's LoRA settings (early stopping stays off: the held-out split is the test split).")
    device = c[3].selectbox("Device", DEVICES, key=PREFIX + "device", help="Where the fine-tunes and evaluations run.")
    c = st.columns(3)
    tune = {**to_dict(DEFAULTS.finetune), **(FINETUNE_PRESETS.get(preset) or {}), "patience": 0, "device": device}
    tune["epochs"] = c[0].number_input("Epochs per cell", 0.1, 1000.0, float(tune["epochs"]), 0.5, key=PREFIX + "epochs")
    tune["lr"] = c[1].number_input("Learning rate", 1e-7, 1.0, float(tune["lr"]), 1e-5, format="%.1e", key=PREFIX + "lr")
    augmented = c[2].number_input("Augmented share", 0.0, 1.0, DEFAULTS.augmented_share, 0.1, key=PREFIX + "augmented",
                                  help=HELP["augmented_share"])
    try:
        values: dict[str, Any] = {"run_id": run_id, "strategies": tuple(strategies), "budgets": _numbers(budgets, float, "Budgets"),
                                  "seeds": _numbers(seeds, int, "Seeds"), "test_share": float(test_share), "metric": metric,
                                  "augmented_share": float(augmented), "finetune": tune}
        cfg = from_dict(ExperimentConfig, values)
    except (Ka2lError, ValueError) as exc:
        st.error(str(exc))
        return None
    n = len(cfg.strategies) * len(cfg.budgets) * len(cfg.seeds)
    st.caption(f"{n} cells: each selects its budget, fine-tunes on the selected questions' gold answers and answers the test split.")
    return cfg


def launch(pool_name: str, cfg: ExperimentConfig | None) -> None:
    if st.button("Launch experiment", type="primary", disabled=cfg is None, key=PREFIX + "launch",
                 help="Queues the experiment as a job; finished cells are kept through a cancel, a reload or a restart.") and cfg is not None:
        try:
            job_id = jobs.submit("experiment", {"pool": pool_name, "experiment": to_dict(cfg)})
        except jobs.JobPending as exc:
            st.info(str(exc))
        except Ka2lError as exc:
            st.error(str(exc))
        else:
            st.session_state.pop(SELECTED_KEY, None)
            st.success(f"Job {job_id} queued; its cells appear below as they finish.")


def pick_experiment(pool_id: int) -> dict[str, Any] | None:
    from ..store import experiment as SX
    from ..store.db import connect

    with connect() as db:
        rows = list(reversed(SX.list_experiments(db, pool_id)))
        done = {r["id"]: sum(c["status"] == "done" for c in SX.cells(db, r["id"])) for r in rows}
        total = {r["id"]: len(SX.cells(db, r["id"])) for r in rows}
    if not rows:
        return None
    ids = [r["id"] for r in rows]
    if st.session_state.get(SELECTED_KEY) not in ids:
        st.session_state[SELECTED_KEY] = ids[0]
    chosen = st.selectbox("Experiment", ids, key=SELECTED_KEY, format_func=lambda i: next(
        f"Experiment {r['id']} · run {r['run_id']} · {r['status']} · {done[i]}/{total[i]} cells · {', '.join(r['config']['strategies'])}"
        for r in rows if r["id"] == i))
    return next(r for r in rows if r["id"] == chosen)


def plot_frame(rep: dict[str, Any]):
    """Metric against budget, one column per strategy (a line chart's input)."""
    import pandas as pd

    frame = pd.DataFrame(rep["frame"], columns=["strategy", "budget", "n", "value", "lo", "hi"])
    return frame.pivot_table(index="budget", columns="strategy", values="value") if len(frame) else frame


def report_section(experiment: dict[str, Any]) -> None:
    """The report, redrawn while the experiment runs."""

    @st.fragment(run_every=LIVE_SECONDS if experiment["status"] == "running" else None)
    def draw() -> None:
        from ..finetune.experiment_report import build_report, render_report

        metric = st.selectbox("Metric", EXPERIMENT_METRICS, index=EXPERIMENT_METRICS.index(experiment["config"]["metric"]),
                              key=PREFIX + f"report-metric-{experiment['id']}")
        try:
            rep = build_report(experiment["id"], metric=metric)
        except Ka2lError as exc:
            st.error(str(exc))
            return
        if rep["cells_done"] == 0:
            st.caption(f"No cell finished yet (0/{rep['cells']}); results appear as cells finish.")
            return
        frame = plot_frame(rep)
        st.line_chart(frame, x_label="budget (share of the non-test pool)", y_label=rep["metric_name"])
        st.markdown(render_report(rep))

    draw()
