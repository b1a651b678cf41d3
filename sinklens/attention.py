"""E2: where attention goes: the first-token sink, and what repetition does to it.

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
import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.activations import check_layer, run_cache
from sinklens.corpus import text_lines
from sinklens.results import Result
from sinklens.tokens import FirstToken, repeated_tokens, text_tokens

EPSILON = 0.3


def _received_by_later_queries(pattern: Float[torch.Tensor, "batch head query_pos key_pos"]):
    """Mean over batch and over queries q > k of ``pattern[..., q, k]``; NaN for the last key."""
    n = pattern.shape[-1]
    strictly_later = torch.ones(n, n, dtype=torch.bool, device=pattern.device).tril(-1)
    totals = (pattern.float() * strictly_later).sum(dim=-2).mean(dim=0)  # [head, key_pos]
    counts = torch.arange(n - 1, -1, -1, device=pattern.device, dtype=torch.float32)
    return (totals / counts).cpu()  # the last key has no later query: 0/0 = NaN


@dataclass
class AttentionReceived(Result):
    """Mean attention each key position receives from later queries, per layer and head."""

    kind = "attention_received"
    label: str
    layers: list[int]
    received: Float[torch.Tensor, "layer head key_pos"]
    epsilon: float

    @property
    def first_token(self) -> Float[torch.Tensor, "layer"]:
        """Attention received by position 0, mean over heads."""
        return self.received[:, :, 0].mean(dim=-1)

    @property
    def later_tokens(self) -> Float[torch.Tensor, "layer"]:
        """Attention received by a later position, mean over heads and positions 1..n-2."""
        return self.received[:, :, 1:-1].mean(dim=(-1, -2))

    @property
    def sink_head_share(self) -> Float[torch.Tensor, "layer"]:
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

    def summary(self) -> dict:
        return {"input": self.label, "epsilon": self.epsilon, **self.to_frame().drop(columns="input").to_dict("list")}


def attention_received(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    label: str = "",
    layers: Sequence[int] | None = None,
    epsilon: float = EPSILON,
) -> AttentionReceived:
    """Measure the attention received per key position in ``layers`` (default: all)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    cache = run_cache(model, tokens, names, reduce=lambda _, pattern: _received_by_later_queries(pattern))
    return AttentionReceived(label, layers, torch.stack([cache[n] for n in names]), epsilon)


@dataclass
class AttentionScoreMaps(Result):
    """Pre-softmax attention scores, mean over batch and heads, for a few layers (Fig. 1)."""

    kind = "attention_score_maps"
    label: str
    layers: list[int]
    scores: Float[torch.Tensor, "layer query_pos key_pos"]  # NaN where the mask hides a key
    token_labels: list[str]  # the tokens of the first batch row

    def to_frame(self) -> pd.DataFrame:
        layer, query, key = torch.meshgrid(
            torch.tensor(self.layers), *(torch.arange(s) for s in self.scores.shape[1:]), indexing="ij"
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

    def summary(self) -> dict:
        """Per layer: the mean score on key 0 and on the other visible keys (queries >= 1)."""
        first = self.scores[:, 1:, 0].nanmean(dim=-1)
        others = self.scores[:, 1:, 1:].nanmean(dim=(-1, -2))
        return {"input": self.label, "layers": self.layers, "mean_score_on_first": first.tolist(),
                "mean_score_on_others": others.tolist()}


FIG1_LENGTH = 20  # the notebook's Fig. 1 inputs are 20 tokens long
FIG1_LINES = 4


def fig1_inputs(
    model: TransformerBridge, text: str, word: str | int, *, first: FirstToken = "bos", length: int = FIG1_LENGTH,
    n_lines: int = FIG1_LINES,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "1 pos"]]:
    """The notebook's Fig. 1 inputs: ``n_lines`` text lines cut to ``length`` tokens, and
    ``[first] + [word] * (length - 1)``. Lines come from the first lines of ``text`` with more than
    ``length`` tokens; if it has none, the start of ``text`` is used."""
    candidates = (text_tokens(model, line, first=first, max_tokens=length + 1) for line in text_lines(text))
    lines = list(islice((t[:, :length] for t in candidates if t.shape[1] > length), n_lines))
    regular = torch.cat(lines) if lines else text_tokens(model, text, first=first, max_tokens=length)
    return regular, repeated_tokens(model, word, length - 1, first=first)


def paper_figure_layers(model: TransformerBridge, sink_layer: int) -> list[int]:
    """The notebook's Fig. 1 layers: sink, sink + 1, the middle of the rest, and the last."""
    last = model.cfg.n_layers - 1
    return sorted({min(sink_layer, last), min(sink_layer + 1, last), (sink_layer + 1 + model.cfg.n_layers) // 2, last})


def _mean_visible_scores(scores: Float[torch.Tensor, "batch head query_pos key_pos"]):
    scores = scores.float()
    n = scores.shape[-1]
    visible = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    hidden = ~visible | (scores <= torch.finfo(scores.dtype).min / 2)  # causal and sliding-window masks
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
    names = [f"blocks.{layer}.attn.hook_attn_scores" for layer in layers]
    cache = run_cache(model, tokens, names, reduce=lambda _, scores: _mean_visible_scores(scores))
    labels = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return AttentionScoreMaps(label, layers, torch.stack([cache[n] for n in names]), labels)
