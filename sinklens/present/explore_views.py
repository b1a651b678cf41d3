"""The sink explorer's views (:func:`sinklens.explore`), drawn from the runs of a prompt
(:class:`~sinklens.studies.explorer_circuit.PromptRun`): plotly figures and a circuitsvis page that work
without the widget, in any notebook or saved to a file.

Given the runs of one prompt (original, and patched if asked for; see
:mod:`sinklens.studies.explorer_circuit`), four views draw them, each run in its own colour or line style:

* :func:`plot_norms`: the hidden-state norm per position at the sink layer, against the first
  token's, the typical and the sink-regime norms of natural text (:mod:`sinklens.analyses.norms`),
  the positions the prompt holds in the sink regime marked as its sinks;
* :func:`plot_first_token_attention`: the attention later queries pay to the first token per layer,
  and the share of heads that pay it more than 0.3 (the report's attention-received figure without
  its later-token line), the chosen layer marked;
* :func:`plot_neuron_activations`: the sink neurons' activations (``blocks.L.mlp.hook_post``) along
  the positions;
* :func:`pattern_page`: the chosen head's attention pattern drawn by circuitsvis, on the first and
  last positions of long prompts. circuitsvis' own browser bundle, shipped in the circuitsvis
  package, is inlined in the page, so it draws offline (its default HTML loads the bundle from a
  CDN). The page makes its frame as tall as what circuitsvis draws, so no row is cut off.
  :func:`plot_pattern` draws the same pattern as plotly heatmaps.

Each view is a figure of its own, meant to stack in one column so that they fit a 1,280 px window;
:func:`stack_figures` stacks figures into one, each keeping its axes and legend: the explorer's
static image, which notebook viewers without a kernel show.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Sequence
from importlib import resources
from itertools import cycle

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinklens.analyses._figures import pattern_heatmap
from sinklens.analyses.attention import EPSILON
from sinklens.analyses.norms import NormBaseline, sink_threshold
from sinklens.studies.explorer_circuit import PATTERN_EDGE, PromptRun

COLORS = ("steelblue", "seagreen", "purple", "darkorange", "crimson", "teal")
PATTERN_FRAME, PATTERN_ROW = 260, 16  # pattern view pixels: title and key axis; each query row
LEGEND_COLUMN = 0.78  # share of a stacked figure's width left of the legends
BAND_TITLE, BAND_AXIS, STACK_MARGIN = 70, 70, 30  # pixels above a band's plots, below them, around


def plot_norms(runs: Sequence[PromptRun], baseline: NormBaseline) -> go.Figure:
    """Norm per position at the sink layer for each run, with the natural text's first-token,
    typical and sink-regime norms (the regime as :mod:`sinklens.analyses.norms` defines it)."""
    fig = go.Figure()
    for run, color in zip(runs, COLORS):
        texts = _hover_texts(run)
        fig.add_scatter(
            y=run.norms.tolist(),
            text=texts,
            mode="lines",
            name=run.label,
            line_color=color,
            hovertemplate="position %{x}: %{text}<br>norm %{y:.4g}",
        )
        if run.sinks:  # the positions this run holds in the sink regime at the sink layer
            fig.add_scatter(
                x=run.sinks,
                y=run.norms[run.sinks].tolist(),
                text=[texts[p] for p in run.sinks],
                mode="markers",
                name=f"{run.label}: sinks ({len(run.sinks)})",
                marker=dict(color=color, symbol="x", size=9),
                hovertemplate="sink at position %{x}: %{text}<br>norm %{y:.4g}",
            )
    last = len(runs[0].norms) - 1
    threshold = sink_threshold(baseline.first_token_norm, baseline.typical_norm)
    # plotly reads tags such as <s> in labels
    first = html.escape(repr(baseline.first_token.text), quote=False)
    for value, name, color in (
        (baseline.first_token_norm, f"first token {first}", "firebrick"),
        (threshold, "sink regime", "orange"),
        (baseline.typical_norm, "typical", "gray"),
    ):
        fig.add_scatter(
            x=[0, last],
            y=[value, value],
            mode="lines",
            name=f"{name} ({value:.4g})",
            line=dict(color=color, dash="dash"),
            hoverinfo="skip",
        )
    fig.update_layout(
        title=f"Hidden-state norm per position at the sink layer ({baseline.layer})",
        xaxis_title="Position",
        yaxis_title="||hook_resid_post||",
        yaxis_type="log",
        height=360,
        xaxis_range=[0, last],
    )
    return fig


def plot_first_token_attention(runs: Sequence[PromptRun], layer: int) -> go.Figure:
    """Per layer, the attention later queries pay the first token (mean over heads) and the share
    of heads paying it more than ``EPSILON`` (the report's figure, without its later-token line),
    each run, ``layer`` marked."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["Attention to the first token", "Share of sink heads"]
    )
    layers = list(range(len(runs[0].first_attention)))
    for run, color in zip(runs, COLORS):
        fig.add_scatter(
            x=layers,
            y=run.first_attention.mean(dim=-1).tolist(),
            mode="lines+markers",
            name=f"{run.label}: first token",
            line_color=color,
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=layers,
            y=(run.first_attention > EPSILON).float().mean(dim=-1).tolist(),
            mode="lines+markers",
            name=f"{run.label}: heads > {EPSILON:g}",
            line=dict(color=color, dash="dot"),
            row=1,
            col=2,
        )
    fig.update_yaxes(type="log", title_text="Mean attention weight", row=1, col=1)
    fig.update_yaxes(range=[0, 1], title_text="Share of heads", row=1, col=2)
    fig.update_xaxes(title_text="Layer")
    fig.add_vline(x=layer, line_dash="dot", line_color="gray")
    fig.update_layout(
        title=f"Attention received by the first token per layer (layer {layer} marked)", height=360
    )
    return fig


def plot_neuron_activations(runs: Sequence[PromptRun]) -> go.Figure:
    """Each sink neuron's activation along the prompt, one line style per run."""
    fig = go.Figure()
    for run, dash in zip(runs, ("solid", "dot")):
        for (layer, index), values, color in zip(run.neurons, run.activations, cycle(COLORS)):
            fig.add_scatter(
                y=values.tolist(),
                text=_hover_texts(run),
                mode="lines",
                name=f"L{layer}.{index} {run.label}",
                line=dict(color=color, dash=dash),
                hovertemplate="position %{x}: %{text}<br>%{y:.4g}",
            )
    title = "Sink neurons' activation (mlp.hook_post) along the prompt"
    fig.update_layout(
        title=title if runs[0].neurons else "No sink neurons were found",
        xaxis_title="Position",
        yaxis_title="Activation",
        height=360,
    )
    return fig


def _hover_texts(run: PromptRun) -> list[str]:
    return [html.escape(repr(text), quote=False) for text in run.token_texts]


@functools.cache
def circuitsvis_bundle() -> str:
    """circuitsvis' prebuilt browser bundle, read from the installed circuitsvis package (the same
    code its CDN serves), so that the pattern view draws without a network. ``</script`` is escaped
    so that the bundle can sit inside a ``<script>`` element."""
    bundle = (
        resources.files("circuitsvis")
        .joinpath("dist", "cdn", "iife.js")
        .read_text(encoding="utf-8")
    )
    return bundle.replace("</script", "<\\/script")


def _shown_positions(run: PromptRun) -> str:
    window, n = run.window, len(run.token_texts)
    if len(window) < n:
        first, last = window[:PATTERN_EDGE], window[PATTERN_EDGE:]
        return f"positions {first[0]}-{first[-1]} and {last[0]}-{last[-1]} of {n}"
    return f"all {n} positions"


def _pattern_labels(run: PromptRun) -> list[str]:
    return [f"{run.token_texts[p]} ({p})" for p in run.window]


# The pattern's frame takes the height of what circuitsvis draws (the page is the frame's own, so it
# may set it), whatever the number of positions shown: no row is cut off at the bottom.
_FIT_FRAME = (
    "const fit = () => { if (window.frameElement) window.frameElement.style.height = "
    "document.documentElement.scrollHeight + 'px'; }; "
    "new ResizeObserver(fit).observe(document.body); fit();"
)


def pattern_page(runs: Sequence[PromptRun], layer: int, head: int) -> str:
    """A self-contained HTML page with head ``head`` of ``layer`` drawn by circuitsvis for each run,
    side by side. circuitsvis' script is inlined (:func:`circuitsvis_bundle`): the page loads
    nothing."""
    columns, draws = [], []
    for i, run in enumerate(runs):
        props = {"tokens": _pattern_labels(run), "attention": run.pattern[head].tolist()}
        # a token such as "</script>" stays data
        script_safe = json.dumps(props).replace("<", "\\u003c")
        columns.append(
            f"<div style='flex:1'><b>{html.escape(run.label)}</b><div id='pattern-{i}'></div></div>"
        )
        draws.append(
            f"CircuitsVis.render('pattern-{i}', CircuitsVis.AttentionPattern, {script_safe});"
        )
    caption = f"Layer {layer}, head {head}: {_shown_positions(runs[0])}."
    return (
        f"<!DOCTYPE html><meta charset='utf-8'>"
        f"<p style='font-family:sans-serif'>{caption}</p>"
        f"<div style='display:flex;gap:16px'>{''.join(columns)}</div>"
        f"<script>{circuitsvis_bundle()}</script><script>{''.join(draws)}{_FIT_FRAME}</script>"
    )


def plot_pattern(runs: Sequence[PromptRun], layer: int, head: int) -> go.Figure:
    """Head ``head`` of ``layer`` as a heatmap per run: the pattern view as a plotly figure, for
    the explorer's static image."""
    fig = make_subplots(
        rows=1, cols=len(runs), subplot_titles=[run.label for run in runs], horizontal_spacing=0.15
    )
    for column, run in enumerate(runs, start=1):
        heatmap = pattern_heatmap(run.pattern[head], _pattern_labels(run), show_scale=False)
        fig.add_trace(heatmap, row=1, col=column)
    fig.update_yaxes(autorange="reversed", tickfont_size=8, title_text="Query")
    fig.update_xaxes(tickfont_size=8, title_text="Key")
    fig.update_layout(
        title=f"Attention pattern of layer {layer}, head {head} ({_shown_positions(runs[0])})",
        height=520,
    )
    return fig


def stack_figures(figures: Sequence[go.Figure], width: int = 1000) -> go.Figure:
    """Plotly figures one above the other in one figure, each in a band as tall as its own
    ``height``, keeping its axes, shapes, annotations, title and legend (on its right): several
    figures as one static image. Each figure's x and y axes are expected in make_subplots' pairs
    (xN with yN)."""
    heights = [figure.layout.height or 400 for figure in figures]
    plot_height = sum(heights)
    stacked = go.Figure()
    stacked.update_layout(
        width=width,
        height=plot_height + 2 * STACK_MARGIN,
        template=figures[0].layout.template,
        margin=dict(l=70, r=10, t=STACK_MARGIN, b=STACK_MARGIN),
    )
    band_top, next_number = plot_height, 1
    for index, figure in enumerate(figures):
        layout = figure.layout.to_plotly_json()
        inner_top = (band_top - BAND_TITLE) / plot_height
        inner_bottom = (band_top - heights[index] + BAND_AXIS) / plot_height
        title_y = band_top / plot_height
        band_top -= heights[index]
        suffixes = sorted(
            {key[5:] for key in layout if re.fullmatch(r"[xy]axis\d*", key)} | {""},
            key=lambda suffix: int(suffix or 1),
        )
        # the pair xN, yN -> a fresh pair
        numbers = {suffix: next_number + i for i, suffix in enumerate(suffixes)}
        next_number += len(suffixes)

        def to_paper(axis: str, value: float, low=inner_bottom, high=inner_top) -> float:
            return value * LEGEND_COLUMN if axis == "x" else low + value * (high - low)

        def ref(name: str, numbers: dict[str, int] = numbers) -> str:
            axis, _, domain = name.partition(" ")
            if axis == "paper":
                return axis
            number = numbers[axis[1:]]
            return f"{axis[0]}{'' if number == 1 else number}{' domain' if domain else ''}"

        for suffix in suffixes:
            for letter in "xy":
                axis = dict(layout.get(f"{letter}axis{suffix}", {}))
                # its own pair, not the first
                axis.setdefault("anchor", f"{'y' if letter == 'x' else 'x'}{suffix}")
                axis["domain"] = [to_paper(letter, end) for end in axis.get("domain", (0, 1))]
                if axis["anchor"] != "free":
                    axis["anchor"] = ref(axis["anchor"])
                number = numbers[suffix]
                stacked.layout[f"{letter}axis{'' if number == 1 else number}"] = axis
        legend = "legend" if index == 0 else f"legend{index + 1}"
        for trace in figure.data:
            trace = trace.to_plotly_json()
            trace.update(
                xaxis=ref(trace.get("xaxis", "x")),
                yaxis=ref(trace.get("yaxis", "y")),
                legend=legend,
            )
            stacked.add_trace(trace)
        stacked.layout[legend] = dict(
            x=LEGEND_COLUMN + 0.02, y=inner_top, xanchor="left", yanchor="top", font_size=11
        )
        for shape in layout.get("shapes", ()):
            shape = dict(shape)
            for letter in "xy":
                name = shape.get(f"{letter}ref", letter)
                shape[f"{letter}ref"] = ref(name)
                if name == "paper":
                    for end in (f"{letter}0", f"{letter}1"):
                        shape[end] = to_paper(letter, shape[end])
            stacked.add_shape(shape)
        for note in layout.get("annotations", ()):  # make_subplots' subplot titles among them
            note = dict(note)
            for letter in "xy":
                name = note.get(f"{letter}ref", letter)
                note[f"{letter}ref"] = ref(name)
                if name == "paper":
                    note[letter] = to_paper(letter, note[letter])
            stacked.add_annotation(note)
        if figure.layout.title.text:
            stacked.add_annotation(
                text=f"<b>{figure.layout.title.text}</b>",
                x=0,
                y=title_y,
                xref="paper",
                yref="paper",
                xanchor="left",
                yanchor="top",
                showarrow=False,
                font_size=15,
            )
    return stacked
