"""Hidden-state norms at the sink layer, on natural text and on long runs of one token.

Paper claim (Fig. 2/6): repeating some tokens drives their hidden-state norm at the sink layer
(``blocks.L.hook_resid_post``) up to the first token's, i.e. the repeats become sinks; other
tokens never get there. :func:`norm_baseline` measures the two reference lines on natural text:
the first token's norm and the *typical* norm (mean over the later tokens; the paper used the
first 1000 characters of Tiny Shakespeare). :func:`repetition_curves` measures
``[first] + [word] * n`` for each word and reports after how many repeats a word reaches the sink
regime, the norms above ``typical + sink_fraction * (first - typical)`` in log space (0.9 of the
way from typical to the first token). The paper judged "repeats needed" by eye from its curves;
this threshold is ours, stated so that a reader can recompute it. Norms that climb to the regime
can dip out again (on SmolLM2, ``' poem'`` right after ``<|im_start|>`` is a sink at its first
repeat, drops at the second and crosses again at the fourth), so two counts are reported: the
repeat from which the norm stays in the regime to the end of the run (``repeats_to_sink``) and
the first crossing (``first_crossing``).

Curves can be measured under interventions (neurons ablated, a patch): the sink regime then stays
defined by the intact model's baseline, so curves with and without compare on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses._figures import with_reference_line
from sinklens.results import Result
from sinklens.run.cache import Hook, act_name, check_layer, l2_norms, run_cache
from sinklens.run.tokens import FirstToken, Token, first_token, repeated_tokens, token
from sinklens.settings import SINK_FRACTION


def resid_norms(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    layer: int,
    *,
    interventions: Sequence[Hook] = (),
) -> Float[torch.Tensor, "batch pos"]:
    """L2 norm of ``blocks.{layer}.hook_resid_post`` at every position (under ``interventions``, if any)."""
    name = act_name("resid_post", check_layer(model, layer))
    cache = run_cache(model, tokens, [name], interventions=interventions, reduce=l2_norms)
    return cache[name].cpu()


@dataclass
class NormBaseline(Result):
    """Norms of natural text at one layer: the first token's and the typical (mean later) norm."""

    layer: int
    first_token: Token
    token_norms: Float[torch.Tensor, " pos"]

    @property
    def first_token_norm(self) -> float:
        return float(self.token_norms[0])

    @property
    def typical_norm(self) -> float:
        return float(self.token_norms[1:].mean())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"position": range(len(self.token_norms)), "norm": self.token_norms.tolist()}
        )

    def plot(self) -> go.Figure:
        fig = go.Figure(go.Scatter(y=self.token_norms.tolist(), mode="lines", name="token norm"))
        return with_reference_line(
            fig,
            self.typical_norm,
            "typical",
            f"Natural-text norms at layer {self.layer}",
            "Position",
            "Hidden state norm",
        )

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "typical_norm": self.typical_norm,
            "first_token_norm": self.first_token_norm,
            "n_tokens": len(self.token_norms),
        }


def norm_baseline(
    model: TransformerBridge, layer: int, text: Int[torch.Tensor, "1 pos"]
) -> NormBaseline:
    """Measure ``text`` (``[first] + tokens``, see :func:`sinklens.run.tokens.text_tokens`) at ``layer``."""
    return NormBaseline(layer, token(model, int(text[0, 0])), resid_norms(model, text, layer)[0])


def sink_threshold(
    first_norm: float, typical: float, sink_fraction: float = SINK_FRACTION
) -> float:
    """The norm at ``sink_fraction`` of the way from typical to the first token, in log space."""
    return math.exp(math.log(typical) + sink_fraction * (math.log(first_norm) - math.log(typical)))


def first_crossing(norms: Float[torch.Tensor, " pos"], threshold: float) -> int | None:
    """The smallest repeat count n >= 1 with ``norms[n] >= threshold`` (position 0 is the first token)."""
    hits = (norms[1:] >= threshold).nonzero().flatten()
    return int(hits[0]) + 1 if len(hits) else None


def repeats_to_stay(norms: Float[torch.Tensor, " pos"], threshold: float) -> int | None:
    """The smallest repeat count n >= 1 from which every later norm is ``>= threshold`` (None if the
    last repeat is below it)."""
    below = (norms[1:] < threshold).nonzero().flatten()
    if not len(below):
        return 1
    last_below = int(below[-1]) + 1
    return last_below + 1 if last_below < len(norms) - 1 else None


@dataclass
class RepetitionCurves(Result):
    """Sink-layer norms of ``[first] + [word] * n`` for several words, with the text baseline."""

    layer: int
    first_token: Token
    words: list[Token]
    norms: Float[
        torch.Tensor, "word pos"
    ]  # position 0 is the first token, position n the n-th repeat
    baseline: NormBaseline  # measured on the intact model: it defines the sink regime
    sink_fraction: float
    condition: str = "original"  # what the model ran under, e.g. "sink neurons ablated"

    @property
    def n_repeats(self) -> int:
        return self.norms.shape[1] - 1

    @property
    def first_token_norm(self) -> float:
        """The first token's norm in these runs (under the interventions, if any)."""
        return float(self.norms[0, 0])

    @property
    def threshold(self) -> float:
        """The sink regime's lower edge, from the intact model's baseline."""
        return sink_threshold(
            self.baseline.first_token_norm, self.baseline.typical_norm, self.sink_fraction
        )

    @property
    def repeats_to_sink(self) -> list[int | None]:
        """Per word, the repeat from which the norm stays in the sink regime (None: it does not)."""
        return [repeats_to_stay(row, self.threshold) for row in self.norms]

    @property
    def first_crossings(self) -> list[int | None]:
        """Per word, the first repeat whose norm enters the sink regime."""
        return [first_crossing(row, self.threshold) for row in self.norms]

    @property
    def max_norms(self) -> list[float]:
        return self.norms[:, 1:].max(dim=-1).values.tolist()

    def to_frame(self) -> pd.DataFrame:
        """One row per word: its token, the largest repeat norm and the repeats to the sink regime."""
        typical = self.baseline.typical_norm
        return pd.DataFrame(
            {
                "word": [w.text for w in self.words],
                "token_id": [w.id for w in self.words],
                "n_repeats": self.n_repeats,
                "max_norm": self.max_norms,
                "max_over_typical": [m / typical for m in self.max_norms],
                "repeats_to_sink": pd.array(self.repeats_to_sink, dtype="Int64"),
                "first_crossing": pd.array(self.first_crossings, dtype="Int64"),
            }
        )

    def plot(self) -> go.Figure:
        return plot_repetition_curves(self)

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "condition": self.condition,
            "sink_fraction": self.sink_fraction,
            "sink_threshold_norm": self.threshold,
            "words": [
                {
                    "word": w.text,
                    "token_id": w.id,
                    "n_repeats": self.n_repeats,
                    "max_norm": m,
                    "repeats_to_sink": r,
                    "first_crossing": c,
                }
                for w, m, r, c in zip(
                    self.words, self.max_norms, self.repeats_to_sink, self.first_crossings
                )
            ],
        }


def repetition_curves(
    model: TransformerBridge,
    words: Sequence[Token | str | int],
    *,
    layer: int,
    baseline: NormBaseline,
    n_repeats: int = 1000,
    first: FirstToken = "bos",
    sink_fraction: float = SINK_FRACTION,
    interventions: Sequence[Hook] = (),
    condition: str = "original",
    progress: bool = False,
) -> RepetitionCurves:
    """Norm-vs-repetition curves at ``layer`` for each word (one forward pass per word).

    ``words`` are :class:`Token` objects, single-token words (mid-text form) or token ids.
    ``interventions`` edit the model during the runs (e.g. :func:`sinklens.run.interventions.ablation_hooks`);
    name them in ``condition``. ``baseline`` should come from the intact model.
    """
    start = first_token(model, first)
    sequences = [
        repeated_tokens(model, w.id if isinstance(w, Token) else w, n_repeats, first=first)
        for w in words
    ]
    tokens = [token(model, int(seq[0, -1])) for seq in sequences]
    if progress:
        sequences = tqdm(sequences, desc=f"repetition curves ({condition})")
    rows = [resid_norms(model, seq, layer, interventions=interventions)[0] for seq in sequences]
    return RepetitionCurves(
        layer, start, tokens, torch.stack(rows), baseline, sink_fraction, condition
    )


def plot_repetition_curves(*results: RepetitionCurves) -> go.Figure:
    """One panel per word: norm vs number of repeats for each condition, with the intact model's
    first-token, typical and sink-regime lines (the paper's Fig. 2)."""
    first = results[0]
    words = first.words
    cols = min(len(words), 3)
    rows = -(-len(words) // cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[repr(w.text) for w in words], shared_yaxes=True
    )
    x = list(range(first.norms.shape[1]))
    lines = [
        (first.baseline.first_token_norm, f"first token {first.first_token.text!r}", "firebrick"),
        (first.baseline.typical_norm, "typical", "gray"),
        (first.threshold, "sink regime", "orange"),
    ]
    colors = ["steelblue", "seagreen", "purple", "darkorange"]
    for i in range(len(words)):
        r, c = divmod(i, cols)
        for k, result in enumerate(results):
            fig.add_scatter(
                x=x,
                y=result.norms[i].tolist(),
                mode="lines",
                name=result.condition,
                legendgroup=result.condition,
                showlegend=i == 0 and len(results) > 1,
                line_color=colors[k % len(colors)],
                row=r + 1,
                col=c + 1,
            )
        for value, name, color in lines:
            fig.add_scatter(
                x=[0, x[-1]],
                y=[value, value],
                mode="lines",
                name=name,
                legendgroup=name,
                showlegend=i == 0,
                line=dict(color=color, dash="dash"),
                row=r + 1,
                col=c + 1,
            )
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="Number of repetitions")
    fig.update_yaxes(title_text="Hidden state norm", col=1)
    fig.update_layout(
        title=f"Hidden-state norm at the sink layer ({first.layer}) vs repetitions",
        height=320 * rows,
    )
    return fig
