"""Plotly figures for sinklens results. Functions return figures and never show them."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinklens.attention import AttentionReceived, AttentionScoreMaps
from sinklens.norms import NormBaseline, RepetitionCurves
from sinklens.sink_layer import SinkLayerResult


def plot_sink_layer(result: SinkLayerResult) -> go.Figure:
    layers = list(range(len(result.first_token_norms)))
    fig = go.Figure()
    fig.add_bar(x=layers, y=result.first_token_norms.tolist(), name=f"first token {result.first_token.text!r}")
    if result.other_token_norms is not None:
        fig.add_scatter(x=layers, y=result.other_token_norms.tolist(), mode="lines+markers", name="later tokens (median)")
    return _with_reference_line(
        fig, result.threshold, f"mean + {result.n_sigma:g} sigma",
        f"MLP output norm per layer: sink layer {result.sink_layer} ({result.method})", "Layer",
        "||blocks.L.hook_mlp_out||",
    )


def plot_norm_baseline(result: NormBaseline) -> go.Figure:
    fig = go.Figure(go.Scatter(y=result.token_norms.tolist(), mode="lines", name="token norm"))
    return _with_reference_line(
        fig, result.typical_norm, "typical", f"Natural-text norms at layer {result.layer}", "Position",
        "Hidden state norm",
    )


def _with_reference_line(fig: go.Figure, y: float, label: str, title: str, x_title: str, y_title: str) -> go.Figure:
    """A dashed horizontal line at ``y`` and the titles, on a log y axis."""
    fig.add_hline(y=y, line_dash="dash", annotation_text=label)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, yaxis_type="log")
    return fig


def plot_repetition_curves(result: RepetitionCurves) -> go.Figure:
    """One panel per word: norm vs number of repeats, with the first-token and typical lines (Fig. 2)."""
    n = len(result.words)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[repr(w.text) for w in result.words], shared_yaxes=True)
    x = list(range(result.norms.shape[1]))
    lines = [
        (result.first_token_norm, f"first token {result.first_token.text!r}", "firebrick"),
        (result.baseline.typical_norm, "typical", "gray"),
        (result.threshold, "sink regime", "orange"),
    ]
    for i, row in enumerate(result.norms):
        r, c = divmod(i, cols)
        fig.add_scatter(x=x, y=row.tolist(), mode="lines", name=result.words[i].text, showlegend=False,
                        line_color="steelblue", row=r + 1, col=c + 1)
        for value, name, color in lines:
            fig.add_scatter(x=[0, x[-1]], y=[value, value], mode="lines", name=name, legendgroup=name,
                            showlegend=i == 0, line=dict(color=color, dash="dash"), row=r + 1, col=c + 1)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="Number of repetitions")
    fig.update_yaxes(title_text="Hidden state norm", col=1)
    fig.update_layout(title=f"Hidden-state norm at the sink layer ({result.layer}) vs repetitions", height=320 * rows)
    return fig


def plot_attention_received(*results: AttentionReceived) -> go.Figure:
    """Attention received by the first token and by a later token, per layer, for one or more inputs."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Attention received", "Share of sink heads"])
    for result in results:
        fig.add_scatter(x=result.layers, y=result.first_token.tolist(), mode="lines+markers",
                        name=f"{result.label}: first token", row=1, col=1)
        fig.add_scatter(x=result.layers, y=result.later_tokens.tolist(), mode="lines+markers",
                        name=f"{result.label}: later token (mean)", line_dash="dot", row=1, col=1)
        fig.add_scatter(x=result.layers, y=result.sink_head_share.tolist(), mode="lines+markers",
                        name=f"{result.label}: heads > {result.epsilon:g} on first", row=1, col=2)
    fig.update_yaxes(type="log", title_text="Mean attention weight", row=1, col=1)
    fig.update_yaxes(range=[0, 1], title_text="Share of heads", row=1, col=2)
    fig.update_xaxes(title_text="Layer")
    return fig


def plot_attention_score_maps(*results: AttentionScoreMaps) -> go.Figure:
    """Heatmaps of mean pre-softmax scores: one row per input, one column per layer (Fig. 1)."""
    cols = len(results[0].layers)
    titles = [f"{r.label}, layer {layer}" for r in results for layer in r.layers]
    fig = make_subplots(rows=len(results), cols=cols, subplot_titles=titles)
    for i, result in enumerate(results):
        for j, scores in enumerate(result.scores):
            fig.add_heatmap(z=scores.tolist(), colorscale="RdBu_r", zmid=0, showscale=False,
                            row=i + 1, col=j + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="Query position", col=1)
    fig.update_xaxes(title_text="Key position")
    fig.update_layout(height=300 * len(results), title="Mean pre-softmax attention scores")
    return fig


def attention_heads_view(model, tokens, layer: int):
    """A circuitsvis view of every head's attention pattern at ``layer`` (short prompts only)."""
    import circuitsvis as cv

    from sinklens.activations import run_cache

    name = f"blocks.{layer}.attn.hook_pattern"
    pattern = run_cache(model, tokens[:1], [name])[name][0]
    labels = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return cv.attention.attention_patterns(tokens=labels, attention=pattern.cpu())
