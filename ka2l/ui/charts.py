"""Plotly figures for run evidence (no data access here: they take the report dict)."""

from __future__ import annotations

from typing import Any


def layer_auroc_figure(probe: dict[str, Any]):
    import plotly.graph_objects as go

    layers = [L["layer"] for L in probe["layers"]]
    fig = go.Figure()
    fig.add_scatter(x=layers, y=[L["val_auroc"] for L in probe["layers"]], name="validation", mode="lines+markers")
    fig.add_scatter(x=layers, y=[L["test_auroc"] for L in probe["layers"]], name="test", mode="lines+markers",
                    error_y={"type": "data", "symmetric": False,
                             "array": [(L["test_ci_high"] or 0) - (L["test_auroc"] or 0) for L in probe["layers"]],
                             "arrayminus": [(L["test_auroc"] or 0) - (L["test_ci_low"] or 0) for L in probe["layers"]]})
    if any(L["test_auroc_correct"] is not None for L in probe["layers"]):
        fig.add_scatter(x=layers, y=[L["test_auroc_correct"] for L in probe["layers"]], name="test vs incorrect", mode="lines", line={"dash": "dot"})
    fig.add_vline(x=probe["best_layer"], line_dash="dash", annotation_text=f"chosen: layer {probe['best_layer']}")
    fig.add_hline(y=0.5, line_color="grey", line_width=1)
    fig.update_layout(xaxis_title="layer", yaxis_title="AUROC (positive = unknown)", height=380, margin={"t": 30})
    return fig


def threshold_figure(threshold: dict[str, Any]):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_scatter(x=threshold["candidates"], y=threshold["criterion"], mode="lines", name=threshold["rule"])
    fig.add_vline(x=threshold["gamma"], line_dash="dash", annotation_text=f"γ* = {threshold['gamma']:.3f}")
    fig.update_layout(xaxis_title="candidate threshold τ (nats)", yaxis_title="criterion (minimised)", height=320, margin={"t": 30})
    return fig


# Distinct, colour-blind-safe colours (Okabe-Ito) for named categories; contours use their label's colour.
CATEGORY_COLOURS = {"known": "#0072B2", "unknown": "#D55E00", "correct": "#009E73", "incorrect": "#CC79A7",
                    "no gold answer": "#999999", "no label": "#999999"}


def colour_label(column: str) -> str:
    """What the map's colour choice is called on the page: 'se' -> 'SE (nats)'."""
    from ..views.maps import COLOUR_LABELS

    return COLOUR_LABELS.get(column, column)


def hover_text(question: str, width: int = 70) -> str:
    """A question for a tooltip: HTML-escaped (plotly renders tags in hover text) and wrapped.

    >>> hover_text("Is <b>this</b> bold & safe?")
    'Is &lt;b&gt;this&lt;/b&gt; bold &amp; safe?'
    """
    import html
    import textwrap

    return "<br>".join(html.escape(line) for line in textwrap.wrap(str(question), width) or [""])


def map_figure(frame, color: str, contour: bool):
    """Scatter (WebGL) of the 2-D projection in ``frame`` (columns x, y, question_id, question and
    ``color``), with optional known / unknown density contours computed from the same x, y.

    Binary colours (BiSE, correctness) are named categories with distinct colours; numbers are
    coloured on a scale and shown to 3 decimals. Hovering a point shows its question (escaped);
    the contours take no hover. Every point's customdata starts with its question id (the lasso
    selection reads it)."""
    import numpy as np
    import plotly.graph_objects as go

    from ..views.maps import CATEGORIES, COLOUR_LABELS, category_labels, density_grid

    title = COLOUR_LABELS.get(color, color)
    texts = [hover_text(q) for q in frame["question"]]
    fig = go.Figure()
    if color in CATEGORIES:
        labels = np.array(category_labels(frame[color].tolist(), color), dtype=object)
        order = list(CATEGORIES[color].values()) + sorted(set(labels) - set(CATEGORIES[color].values()))
        for name in [n for n in order if (labels == n).any()]:
            part = labels == name
            fig.add_trace(go.Scattergl(
                x=frame["x"][part], y=frame["y"][part], mode="markers", name=name, legendgroup=name,
                marker={"color": CATEGORY_COLOURS[name], "size": 7, "opacity": 0.85},
                customdata=[[int(q), t, name] for q, t in zip(frame["question_id"][part], np.array(texts, dtype=object)[part])],
                hovertemplate=f"%{{customdata[1]}}<br>{title}: %{{customdata[2]}}<extra></extra>"))
    else:
        values = frame[color].astype(float)
        fig.add_trace(go.Scattergl(
            x=frame["x"], y=frame["y"], mode="markers", name=title, showlegend=False,
            marker={"color": values, "colorscale": "Viridis", "size": 7, "opacity": 0.85, "showscale": True,
                    "colorbar": {"title": {"text": title}}},
            customdata=[[int(q), t, v] for q, t, v in zip(frame["question_id"], texts, values)],
            hovertemplate=f"%{{customdata[1]}}<br>{title}: %{{customdata[2]:.3f}}<extra></extra>"))
    if contour and "bise" in frame:
        for label, name in CATEGORIES["bise"].items():
            part = (frame["bise"] == label).to_numpy()
            grid = density_grid(frame["x"][part], frame["y"][part])
            if grid is None:
                continue
            gx, gy, z = grid
            fig.add_trace(go.Contour(x=gx, y=gy, z=z, name=f"{name} density", hoverinfo="skip", showscale=False, showlegend=True,
                                     contours={"coloring": "none", "start": 0.15, "end": 0.95, "size": 0.2},
                                     line={"color": CATEGORY_COLOURS[name], "width": 1.5}))
    # the view frames the points; the density grid reaches past them, so contour lines run off the edge instead of stopping at it
    for ax, update in (("x", fig.update_xaxes), ("y", fig.update_yaxes)):
        lo, hi = float(frame[ax].min()), float(frame[ax].max())
        margin = max(0.05 * (hi - lo), 1e-3)
        update(range=[lo - margin, hi + margin])
    fig.update_layout(height=560, dragmode="lasso", margin={"t": 30}, hovermode="closest", xaxis_title="x", yaxis_title="y",
                      legend={"orientation": "h", "title": {"text": title if color in CATEGORIES else ""}})
    return fig


def loss_figure(curves: dict[str, dict[str, list]]):
    """A fine-tune's loss by optimizer step: training loss (a line) and held-out loss (markers), from
    ``ka2l.views.finetune.losses``."""
    import plotly.graph_objects as go

    fig = go.Figure()
    train, held = curves["train"], curves["eval"]
    fig.add_trace(go.Scatter(x=train["step"], y=train["loss"], mode="lines", name="train loss", line={"color": CATEGORY_COLOURS["known"]}))
    fig.add_trace(go.Scatter(x=held["step"], y=held["loss"], mode="lines+markers", name="held-out loss",
                             line={"color": CATEGORY_COLOURS["unknown"], "dash": "dot"}, marker={"size": 8}))
    fig.update_layout(xaxis_title="optimizer step", yaxis_title="loss (answer tokens)", height=340, margin={"t": 30},
                      legend={"orientation": "h"}, hovermode="x unified")
    return fig



SHIFT_STYLE = {"before": {"color": "#999999", "symbol": "circle"}, "after": {"color": "#0072B2", "symbol": "diamond"}}


def shift_figure(frame):
    """The knowledge-boundary map before and after a fine-tune in ONE projection (``ka2l.views.shift.shift_projection``:
    x, y, when, question_id, question, bise, moved): before grey circles, after blue diamonds, unknown (BiSE 1) points
    larger, questions that crossed the boundary ringed orange. Hover shows the (escaped) question, its side and label."""
    import pandas as pd
    import plotly.graph_objects as go

    fig = go.Figure()
    for when, style in SHIFT_STYLE.items():
        part = frame[frame["when"] == when]
        if part.empty:
            continue
        labels = ["no label" if pd.isna(b) else ("unknown" if int(b) == 1 else "known") for b in part["bise"]]
        moved = [bool(m) for m in part["moved"]]
        fig.add_trace(go.Scattergl(
            x=part["x"], y=part["y"], mode="markers", name=f"{when} fine-tune",
            marker={"color": style["color"], "symbol": style["symbol"], "opacity": 0.8,
                    "size": [11 if lab == "unknown" else 7 for lab in labels],
                    "line": {"width": [2 if m else 0 for m in moved], "color": CATEGORY_COLOURS["unknown"]}},
            customdata=[[int(q), hover_text(t), lab, when, f" · {m}" if m else ""]
                        for q, t, lab, m in zip(part["question_id"], part["question"], labels, part["moved"])],
            hovertemplate="%{customdata[1]}<br>%{customdata[3]}: %{customdata[2]}%{customdata[4]}<extra></extra>"))
    fig.update_layout(height=520, margin={"t": 30}, hovermode="closest", xaxis_title="x", yaxis_title="y", legend={"orientation": "h"})
    return fig
