"""The sink layer: the early MLP that blows up the first token's norm.

Paper claim: one early MLP layer writes a huge vector on the first token (the attention sink).
The notebook's rule, kept here: run the first token alone, take the norm of each layer's MLP
output (``blocks.L.hook_mlp_out``) for layers ``0..max_layer-1`` and return the first layer above
``mean + n_sigma * std`` of those norms (``std`` unbiased, as ``torch.std``). When a reference
text is given, the same run reports the median MLP-output norm of the text's later tokens, so
the first token's excess can be read as a ratio. Causal attention makes position 0 of
``[first] + text`` identical to the lone first token, so one forward pass gives both.

Some models build their sink over several layers and no single layer passes the rule (Gemma-3
does). With a reference text, the result then falls back to the layer with the largest
first-token / later-token ratio and says so in ``method``; without one it is an error. A model
with no sink (a randomly initialised one, say) fails both: when even the largest ratio is below
``MIN_FALLBACK_RATIO`` (the first token's MLP output does not stand out from the others') it is an
error that says so, never a made-up layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses._figures import with_reference_line
from sinklens.errors import NoSinkError, SinklensError
from sinklens.results import Result
from sinklens.run.cache import act_name, l2_norms, run_cache
from sinklens.run.tokens import FirstToken, Token, first_token
from sinklens.settings import PAPER_MAX_LAYER, PAPER_N_SIGMA

SIGMA_RULE = "mean + n_sigma * std"
RATIO_FALLBACK = "largest first/later-token ratio (no layer passed mean + n_sigma * std)"
MIN_FALLBACK_RATIO = 2.0  # the fallback's layer must write at least twice as much on the first token as on the others


@dataclass
class SinkLayer(Result):
    """First-token MLP-output norms per layer and the layer the rule picks."""

    first_token: Token
    first_token_norms: Float[torch.Tensor, " layer"]
    other_token_norms: (
        Float[torch.Tensor, " layer"] | None
    )  # median over a reference text's later tokens
    n_sigma: float
    threshold: float
    sink_layer: int
    method: str = SIGMA_RULE

    @property
    def ratios(self) -> Float[torch.Tensor, " layer"] | None:
        return (
            None
            if self.other_token_norms is None
            else self.first_token_norms / self.other_token_norms
        )

    @property
    def sink_range(self) -> list[int]:
        """The layers a sink built over several layers spans: the contiguous run around the largest
        first-token MLP output whose first-token MLP output norms all exceed their mean over the
        searched layers (our rule; the paper's models build their sink in one layer)."""
        norms = self.first_token_norms
        above = (norms > norms.mean()).tolist()
        start = end = int(norms.argmax())
        while start > 0 and above[start - 1]:
            start -= 1
        while end + 1 < len(above) and above[end + 1]:
            end += 1
        return list(range(start, end + 1))

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "layer": range(len(self.first_token_norms)),
                "first_token_norm": self.first_token_norms.tolist(),
                "above_threshold": (self.first_token_norms > self.threshold).tolist(),
            }
        )
        if self.other_token_norms is not None:
            frame["other_token_median_norm"] = self.other_token_norms.tolist()
            ratios = self.ratios
            assert ratios is not None  # other_token_norms is set
            frame["ratio"] = ratios.tolist()
        return frame

    def plot(self) -> go.Figure:
        layers = list(range(len(self.first_token_norms)))
        fig = go.Figure()
        fig.add_bar(
            x=layers,
            y=self.first_token_norms.tolist(),
            name=f"first token {self.first_token.text!r}",
        )
        if self.other_token_norms is not None:
            fig.add_scatter(
                x=layers,
                y=self.other_token_norms.tolist(),
                mode="lines+markers",
                name="later tokens (median)",
            )
        return with_reference_line(
            fig,
            self.threshold,
            f"mean + {self.n_sigma:g} sigma",
            f"MLP output norm per layer: sink layer {self.sink_layer} ({self.method})",
            "Layer",
            "||blocks.L.hook_mlp_out||",
        )

    def summary(self) -> dict:
        return {
            "sink_layer": self.sink_layer,
            "method": self.method,
            "threshold": self.threshold,
            "n_sigma": self.n_sigma,
            "first_token_mlp_out_norms": self.first_token_norms.tolist(),
            "other_token_mlp_out_median_norms": None
            if self.other_token_norms is None
            else self.other_token_norms.tolist(),
        }


def sink_layer_threshold(
    norms: Float[torch.Tensor, " layer"], n_sigma: float = PAPER_N_SIGMA
) -> float:
    """``mean + n_sigma * std`` of per-layer norms (the notebook's heuristic)."""
    return float(norms.mean() + n_sigma * norms.std())


def find_sink_layer(
    model: TransformerBridge,
    *,
    first: FirstToken = "bos",
    max_layer: int | None = PAPER_MAX_LAYER,
    n_sigma: float = PAPER_N_SIGMA,
    reference: Int[torch.Tensor, "1 pos"] | None = None,
) -> SinkLayer:
    """Find the sink layer among layers ``0..max_layer-1`` (all layers if the model has fewer).

    ``reference`` is ``[first] + text`` token ids (see :func:`sinklens.run.tokens.text_tokens`); its
    position 0 must be the first token.
    """
    start = first_token(model, first)
    n_layers = min(max_layer or model.cfg.n_layers, model.cfg.n_layers)
    if n_layers < 2:
        raise SinklensError(
            f"max_layer={max_layer} leaves fewer than 2 layers to compare", "pass max_layer >= 2"
        )
    tokens = torch.tensor([[start.id]]) if reference is None else reference
    if int(tokens[0, 0]) != start.id:
        raise SinklensError(
            "the reference tokens do not start with the first token",
            "build them with text_tokens()",
        )
    names = [act_name("mlp_out", layer) for layer in range(n_layers)]
    cache = run_cache(model, tokens, names, reduce=l2_norms)
    norms = torch.stack([cache[n][0] for n in names]).cpu()  # [layer, pos]
    first_norms = norms[:, 0]
    threshold = sink_layer_threshold(first_norms, n_sigma)
    above = (first_norms > threshold).nonzero().flatten()
    others = norms[:, 1:].median(dim=-1).values if norms.shape[1] > 1 else None
    if len(above):
        return SinkLayer(start, first_norms, others, n_sigma, threshold, int(above[0]))
    if others is None:
        raise SinklensError(
            f"no layer in 0..{n_layers - 1} has a first-token MLP output norm above mean + {n_sigma} sigma "
            f"({threshold:.3g}); norms: {[round(x, 3) for x in first_norms.tolist()]}",
            "the model may have no single sink layer; pass a reference text to fall back to the largest "
            "first/later-token ratio, try another max_layer or n_sigma, or name the layer yourself",
        )
    ratios = first_norms / others
    layer = int(ratios.argmax())
    if ratios[layer] < MIN_FALLBACK_RATIO:
        raise NoSinkError(
            f"{model.cfg.model_name} shows no sink layer in layers 0..{n_layers - 1}: no first-token MLP output norm "
            f"passes mean + {n_sigma:g} sigma, and the largest first/later-token ratio is {float(ratios[layer]):.2f}x "
            f"(layer {layer}), below {MIN_FALLBACK_RATIO:g}x",
            "this model makes no attention sink of its first token (a randomly initialised model has none): "
            "check --first-token, or study a trained model",
        )
    return SinkLayer(start, first_norms, others, n_sigma, threshold, layer, RATIO_FALLBACK)
