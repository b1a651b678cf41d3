"""Small plotly helpers shared by the analyses' ``plot()`` methods (figures are returned, never shown)."""

from __future__ import annotations

import math

import plotly.graph_objects as go


def with_reference_line(fig: go.Figure, y: float, label: str, title: str, x_title: str, y_title: str) -> go.Figure:
    """A dashed horizontal line at ``y`` and the titles, on a log y axis."""
    fig.add_hline(y=y, line_dash="dash", annotation_text=label)
    fig.layout.annotations[-1].y = math.log10(y)  # on a log axis plotly places annotations by log10, shapes by value
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, yaxis_type="log")
    return fig
