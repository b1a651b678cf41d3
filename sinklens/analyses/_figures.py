"""Small plotly helpers shared by the analyses' ``plot()`` methods (figures are returned, never shown)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float


def with_reference_line(
    fig: go.Figure, y: float, label: str, title: str, x_title: str, y_title: str
) -> go.Figure:
    """A dashed horizontal line at ``y`` and the titles, on a log y axis."""
    fig.add_hline(y=y, line_dash="dash", annotation_text=label)
    fig.layout.annotations[-1].y = math.log10(
        y
    )  # on a log axis plotly places annotations by log10, shapes by value
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, yaxis_type="log")
    return fig


def pattern_heatmap(
    pattern: Float[torch.Tensor, "query key"], labels: Sequence[str], *, show_scale: bool = True
) -> go.Heatmap:
    """One attention pattern as a heatmap: queries as rows, keys as columns, weights on one 0-to-1 scale, the keys a
    query cannot see left blank, and the tokens (escaped: plotly reads tags in labels) in the hover."""
    n = pattern.shape[-1]
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    labels = [html.escape(label, quote=False) for label in labels]
    return go.Heatmap(
        z=pattern.float().masked_fill(hidden, float("nan")).tolist(),
        x=labels,
        y=labels,
        zmin=0,
        zmax=1,
        colorscale="Blues",
        showscale=show_scale,
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
    )
