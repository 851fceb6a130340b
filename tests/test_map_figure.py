"""The Map page's figure (issue 11, item 5), checked on the plotly figure object itself: hovering shows
the question (escaped, values to 3 decimals), never a contour bin; binary colours are named
categories in distinct colours; the density contours sit on their own points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ka2l.ui.charts import map_figure


@pytest.fixture
def frame():
    """40 known questions around (-3, -3) and 6 unknown ones in a tight group at x 4.5 to 5, as the
    UMAP map of the issue had them; SE with full float precision; one question with markup in it."""
    rng = np.random.default_rng(0)
    known = rng.normal([-3.0, -3.0], 1.0, size=(40, 2))
    unknown = np.column_stack([rng.uniform(4.5, 5.0, 6), rng.uniform(1.0, 1.4, 6)])
    xy = np.vstack([known, unknown])
    questions = [f"Known question {i}?" for i in range(40)] + ["Is <b>this</b> bold & <i>safe</i>?"] + [f"Unknown {i}?" for i in range(5)]
    return pd.DataFrame({
        "question_id": np.arange(1, 47), "question": questions, "x": xy[:, 0], "y": xy[:, 1],
        "se": np.r_[np.full(40, 0.0), np.full(6, 1.6094379124341005)], "bise": [0] * 40 + [1] * 6,
        "p_unknown": np.linspace(0.01, 0.99, 46), "correct": [1.0] * 38 + [0.0, np.nan] + [0.0] * 6,
    })


def _points(fig):
    return [t for t in fig.data if t.type in ("scatter", "scattergl")]


def _contours(fig):
    return [t for t in fig.data if "contour" in t.type]


@pytest.mark.parametrize("colour", ["se", "bise", "p_unknown", "correct"])
def test_hover_shows_the_question_never_the_contour(frame, colour):
    fig = map_figure(frame, colour, contour=True)
    assert len(_contours(fig)) == 2, "known and unknown density"
    assert all(t.hoverinfo == "skip" for t in _contours(fig)), "a contour must not take the hover from the points"
    for trace in _points(fig):
        assert trace.hovertemplate and "customdata[1]" in trace.hovertemplate and "<extra></extra>" in trace.hovertemplate
        assert [int(c[0]) for c in trace.customdata] == sorted(int(c[0]) for c in trace.customdata), "question id first (lasso)"


def test_numbers_in_the_tooltip_have_three_decimals(frame):
    for colour in ("se", "p_unknown"):
        (trace,) = _points(map_figure(frame, colour, contour=False))
        assert ":.3f}" in trace.hovertemplate, trace.hovertemplate
    (trace,) = _points(map_figure(frame, "se", contour=False))
    assert "1.6094379124341005" not in trace.hovertemplate


def test_question_text_is_escaped(frame):
    texts = [c[1] for t in _points(map_figure(frame, "bise", contour=False)) for c in t.customdata]
    assert "Is &lt;b&gt;this&lt;/b&gt; bold &amp; &lt;i&gt;safe&lt;/i&gt;?" in texts
    assert not any("<b>" in t or "<i>" in t for t in texts)


@pytest.mark.parametrize("colour, names", [("bise", {"known", "unknown"}), ("correct", {"correct", "incorrect", "no gold answer"})])
def test_binary_colours_are_named_categories_in_distinct_colours(frame, colour, names):
    traces = _points(map_figure(frame, colour, contour=False))
    assert {t.name for t in traces} == names
    colours = [t.marker.color for t in traces]
    assert len(set(colours)) == len(colours), colours
    assert all(isinstance(c, str) for c in colours), "one colour per category, not a scale over 0 / 1"
    for t in traces:
        assert {c[2] for c in t.customdata} == {t.name}, "the tooltip names the category"


def test_contours_sit_on_their_own_points(frame):
    fig = map_figure(frame, "bise", contour=True)
    for name, label in (("known density", 0), ("unknown density", 1)):
        trace = next(t for t in _contours(fig) if t.name == name)
        part = frame[frame["bise"] == label]
        z = np.asarray(trace.z)
        gx, gy = np.asarray(trace.x), np.asarray(trace.y)
        assert z.shape == (len(gy), len(gx))
        assert gx.min() <= part["x"].min() and gx.max() >= part["x"].max(), "the grid spans the points"
        assert gy.min() <= part["y"].min() and gy.max() >= part["y"].max()
        row, col = np.unravel_index(z.argmax(), z.shape)
        assert part["x"].min() <= gx[col] <= part["x"].max() and part["y"].min() <= gy[row] <= part["y"].max(), (
            f"{name}: densest at ({gx[col]:.2f}, {gy[row]:.2f}), points span x {part['x'].min():.2f}..{part['x'].max():.2f}")


def test_too_few_or_collinear_points_draw_no_contour(frame):
    few = frame[frame["bise"] == 0].copy()
    few.loc[few.index[:2], "bise"] = 1  # two unknown points: no density to draw
    assert [t.name for t in _contours(map_figure(few, "se", contour=True))] == ["known density"]
    line = frame.assign(y=frame["x"] * 2.0)  # every point on one line
    assert _contours(map_figure(line, "se", contour=True)) == []
