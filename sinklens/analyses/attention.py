"""Where attention goes: the first-token sink, and what repetition does to it.

Paper claim (Fig. 1): on regular text, layers after the sink layer put most attention on the
first token; on a long run of one token, the repeated tokens receive attention comparable to the
first token's. Two measurements, both reduced inside the hook so no ``[head, query, key]`` tensor
is kept for all layers:

* :func:`attention_received`: for every layer, head and key position, the mean attention that
  later queries pay to that key (``blocks.L.attn.hook_pattern``). Its column 0 is the sink; the
  share of heads whose column-0 mean exceeds ``epsilon`` is the epsilon-sink metric of Gu et al.
  (2024, "When Attention Sink Emerges", epsilon = 0.3).
* :func:`attention_score_maps`: pre-softmax scores (``blocks.L.attn.hook_attn_scores``) averaged
  over batch and heads, for a few layers, as in the paper's Fig. 1 heatmaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._figures import pattern_heatmap
from sinklens.load.corpus import text_lines
from sinklens.results import Result
from sinklens.run.cache import check_layer, run_cache
from sinklens.run.tokens import FirstToken, repeated_tokens, text_tokens

EPSILON = 0.3


def received_by_later_queries(pattern: Float[torch.Tensor, "batch head query_pos key_pos"]):
    """Mean over batch and over queries q > k of ``pattern[..., q, k]``; NaN for the last key."""
    n = pattern.shape[-1]
    strictly_later = torch.ones(n, n, dtype=torch.bool, device=pattern.device).tril(-1)
    totals = (pattern.float() * strictly_later).sum(dim=-2).mean(dim=0)  # [head, key_pos]
    counts = torch.arange(n - 1, -1, -1, device=pattern.device, dtype=torch.float32)
    return (totals / counts).cpu()  # the last key has no later query: 0/0 = NaN


@dataclass
class AttentionReceived(Result):
    """Mean attention each key position receives from later queries, per layer and head."""

    label: str
    layers: list[int]
    received: Float[torch.Tensor, "layer head key_pos"]
    epsilon: float

    @property
    def first_token(self) -> Float[torch.Tensor, " layer"]:
        """Attention received by position 0, mean over heads."""
        return self.received[:, :, 0].mean(dim=-1)

    @property
    def later_tokens(self) -> Float[torch.Tensor, " layer"]:
        """Attention received by a later position, mean over heads and positions 1..n-2."""
        return self.received[:, :, 1:-1].mean(dim=(-1, -2))

    @property
    def sink_head_share(self) -> Float[torch.Tensor, " layer"]:
        """Share of heads whose attention on position 0 exceeds ``epsilon`` (Gu et al.'s metric)."""
        return (self.received[:, :, 0] > self.epsilon).float().mean(dim=-1)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "input": self.label,
                "layer": self.layers,
                "received_by_first_token": self.first_token.tolist(),
                "received_by_later_token": self.later_tokens.tolist(),
                "sink_head_share": self.sink_head_share.tolist(),
            }
        )

    def plot(self) -> go.Figure:
        return plot_attention_received(self)

    def summary(self) -> dict:
        return {
            "input": self.label,
            "epsilon": self.epsilon,
            **self.to_frame().drop(columns="input").to_dict("list"),
        }


def attention_received(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    label: str = "",
    layers: Sequence[int] | None = None,
    epsilon: float = EPSILON,
) -> AttentionReceived:
    """Measure the attention received per key position in ``layers`` (default: all)."""
    layers = (
        list(range(model.cfg.n_layers))
        if layers is None
        else [check_layer(model, l) for l in layers]
    )
    names = [get_act_name("pattern", layer) for layer in layers]
    cache = run_cache(
        model, tokens, names, reduce=lambda _, pattern: received_by_later_queries(pattern)
    )
    return AttentionReceived(label, layers, torch.stack([cache[n] for n in names]), epsilon)


@dataclass
class AttentionScoreMaps(Result):
    """Pre-softmax attention scores, mean over batch and heads, for a few layers (Fig. 1)."""

    label: str
    layers: list[int]
    scores: Float[torch.Tensor, "layer query_pos key_pos"]  # NaN where the mask hides a key
    token_labels: list[str]  # the tokens of the first batch row

    def to_frame(self) -> pd.DataFrame:
        layer, query, key = torch.meshgrid(
            torch.tensor(self.layers),
            *(torch.arange(s) for s in self.scores.shape[1:]),
            indexing="ij",
        )
        return pd.DataFrame(
            {
                "input": self.label,
                "layer": layer.flatten().tolist(),
                "query_pos": query.flatten().tolist(),
                "key_pos": key.flatten().tolist(),
                "score": self.scores.flatten().tolist(),
            }
        ).dropna()

    def plot(self) -> go.Figure:
        return plot_attention_score_maps(self)

    def summary(self) -> dict:
        """Per layer: the mean score on key 0 and on the other visible keys (queries >= 1)."""
        first = self.scores[:, 1:, 0].nanmean(dim=-1)
        others = self.scores[:, 1:, 1:].nanmean(dim=(-1, -2))
        return {
            "input": self.label,
            "layers": self.layers,
            "mean_score_on_first": first.tolist(),
            "mean_score_on_others": others.tolist(),
        }


FIG1_LENGTH = 20  # the notebook's Fig. 1 inputs are 20 tokens long
FIG1_LINES = 4


def fig1_inputs(
    model: TransformerBridge,
    text: str,
    word: str | int,
    *,
    first: FirstToken = "bos",
    length: int = FIG1_LENGTH,
    n_lines: int = FIG1_LINES,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "1 pos"]]:
    """The notebook's Fig. 1 inputs: ``n_lines`` text lines cut to ``length`` tokens, and
    ``[first] + [word] * (length - 1)``. Lines come from the first lines of ``text`` with more than
    ``length`` tokens; if it has none, the start of ``text`` is used."""
    candidates = (
        text_tokens(model, line, first=first, max_tokens=length + 1) for line in text_lines(text)
    )
    lines = list(islice((t[:, :length] for t in candidates if t.shape[1] > length), n_lines))
    regular = (
        torch.cat(lines) if lines else text_tokens(model, text, first=first, max_tokens=length)
    )
    return regular, repeated_tokens(model, word, length - 1, first=first)


def paper_figure_layers(model: TransformerBridge, sink_layer: int) -> list[int]:
    """The notebook's Fig. 1 layers: sink, sink + 1, the middle of the rest, and the last."""
    last = model.cfg.n_layers - 1
    return sorted(
        {
            min(sink_layer, last),
            min(sink_layer + 1, last),
            (sink_layer + 1 + model.cfg.n_layers) // 2,
            last,
        }
    )


def _mean_visible_scores(scores: Float[torch.Tensor, "batch head query_pos key_pos"]):
    scores = scores.float()
    n = scores.shape[-1]
    visible = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    hidden = ~visible | (
        scores <= torch.finfo(scores.dtype).min / 2
    )  # causal and sliding-window masks
    return scores.masked_fill(hidden, float("nan")).nanmean(dim=(0, 1)).cpu()


def attention_score_maps(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    layers: Sequence[int],
    *,
    label: str = "",
) -> AttentionScoreMaps:
    """Mean pre-softmax score maps of ``tokens`` at ``layers`` (keep inputs short: maps are pos x pos)."""
    layers = [check_layer(model, l) for l in layers]
    names = [get_act_name("attn_scores", layer) for layer in layers]
    cache = run_cache(model, tokens, names, reduce=lambda _, scores: _mean_visible_scores(scores))
    labels = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return AttentionScoreMaps(label, layers, torch.stack([cache[n] for n in names]), labels)


def plot_attention_received(*results: AttentionReceived) -> go.Figure:
    """Attention received by the first token and by a later token, per layer, for one or more inputs."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["Attention received", "Share of sink heads"]
    )
    for result in results:
        fig.add_scatter(
            x=result.layers,
            y=result.first_token.tolist(),
            mode="lines+markers",
            name=f"{result.label}: first token",
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=result.layers,
            y=result.later_tokens.tolist(),
            mode="lines+markers",
            name=f"{result.label}: later token (mean)",
            line_dash="dot",
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=result.layers,
            y=result.sink_head_share.tolist(),
            mode="lines+markers",
            name=f"{result.label}: heads > {result.epsilon:g} on first",
            row=1,
            col=2,
        )
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
            fig.add_heatmap(
                z=scores.tolist(),
                colorscale="RdBu_r",
                zmid=0,
                showscale=False,
                row=i + 1,
                col=j + 1,
            )
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="Query position", col=1)
    fig.update_xaxes(title_text="Key position")
    fig.update_layout(height=300 * len(results), title="Mean pre-softmax attention scores")
    return fig


@dataclass
class AttentionPatterns(Result):
    """Every head's attention pattern at one layer, for one input (the first batch row)."""

    layer: int
    patterns: Float[torch.Tensor, "head query_pos key_pos"]
    token_labels: list[str]

    def to_frame(self) -> pd.DataFrame:
        head, query, key = torch.meshgrid(
            *(torch.arange(s) for s in self.patterns.shape), indexing="ij"
        )
        visible = key <= query
        return pd.DataFrame(
            {
                "layer": self.layer,
                "head": head[visible].tolist(),
                "query_pos": query[visible].tolist(),
                "key_pos": key[visible].tolist(),
                "weight": self.patterns[visible].tolist(),
            }
        )

    def plot(self) -> go.Figure:
        """One heatmap per head (query rows, key columns, weights 0 to 1 on one colour scale); hovering
        shows the query and key tokens. A figure that renders as a static image too, unlike circuitsvis."""
        n_heads = self.patterns.shape[0]
        cols = min(n_heads, 3)
        rows = -(-n_heads // cols)
        fig = make_subplots(
            rows=rows,
            cols=cols,
            subplot_titles=[f"head {h}" for h in range(n_heads)],
            horizontal_spacing=0.04,
            vertical_spacing=0.06,
        )
        labels = [f"{i}: {text!r}" for i, text in enumerate(self.token_labels)]
        for head, pattern in enumerate(self.patterns):
            fig.add_trace(
                pattern_heatmap(pattern, labels, show_scale=head == 0),
                row=head // cols + 1,
                col=head % cols + 1,
            )
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False, autorange="reversed")
        fig.update_layout(
            height=260 * rows + 80,
            title=f"Attention patterns of layer {self.layer}, "
            f"every head (rows: queries, columns: keys)",
        )
        return fig

    def summary(self) -> dict:
        """Per head: the mean weight on the first token and on the query's own position (queries >= 1)."""
        on_first = self.patterns[:, 1:, 0].mean(dim=-1)
        on_itself = self.patterns.diagonal(dim1=-2, dim2=-1)[:, 1:].mean(dim=-1)
        return {
            "layer": self.layer,
            "tokens": self.token_labels,
            "mean_weight_on_first": on_first.tolist(),
            "mean_weight_on_itself": on_itself.tolist(),
        }


def attention_patterns(
    model: TransformerBridge, tokens: Int[torch.Tensor, "batch pos"], layer: int
) -> AttentionPatterns:
    """Every head's attention pattern at ``layer`` on the first row of ``tokens`` (short prompts:
    the result is heads x pos x pos)."""
    name = get_act_name("pattern", check_layer(model, layer))
    pattern = run_cache(model, tokens[:1], [name])[name][0]
    labels = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return AttentionPatterns(layer, pattern.cpu(), labels)


def attention_heads_view(
    model: TransformerBridge, tokens: Int[torch.Tensor, "batch pos"], layer: int
):
    """A circuitsvis view of every head's attention pattern at ``layer`` (short prompts only). It needs
    a live notebook to render (JavaScript); :func:`attention_patterns` gives the same patterns as data and a
    plotly figure."""
    import circuitsvis as cv

    patterns = attention_patterns(model, tokens, layer)
    return cv.attention.attention_patterns(
        tokens=patterns.token_labels, attention=patterns.patterns
    )
