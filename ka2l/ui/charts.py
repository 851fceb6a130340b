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
