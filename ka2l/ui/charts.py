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


def map_figure(frame, color: str, contour: bool):
    """Scatter (WebGL) of the 2-D projection coloured by ``color``; optional known/unknown density contours."""
    import plotly.express as px
    import plotly.graph_objects as go

    discrete = color in ("bise", "correct")
    plot = frame.assign(**{color: frame[color].astype("string")}) if discrete else frame
    fig = px.scatter(plot, x="x", y="y", color=color, hover_data={"question": True, "x": False, "y": False},
                     render_mode="webgl", custom_data=["question_id"],
                     color_continuous_scale="Viridis" if not discrete else None)
    if contour and "bise" in frame:
        for label, name, colour in ((0, "known", "#440154"), (1, "unknown", "#fde725")):
            part = frame[frame["bise"] == label]
            if len(part) > 2:
                fig.add_trace(go.Histogram2dContour(x=part["x"], y=part["y"], name=f"{name} density", showscale=False,
                                                    contours={"coloring": "none"}, line={"color": colour, "width": 1.5}, ncontours=6))
    fig.update_layout(height=560, dragmode="lasso", margin={"t": 30}, legend={"orientation": "h"})
    return fig
