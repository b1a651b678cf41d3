"""How each head of an attention layer treats a token's own key: the "detect others" behaviour.

Paper claim (Sec. 4.3): the heads of the first attention layer score a token's own key low (their
queries and keys are nearly orthogonal), so they attend to the *other* tokens; a token that sees
only itself, the first, gets a distinctive output. Per head, on each input (natural text, a long
run of one token), for every query position ``i >= 1``:

* attention to itself ``pattern[i, i]``, to the first token ``pattern[i, 0]`` and to the others;
  a head that ignores position would give itself one over the number of keys it sees (``1 / (i + 1)``
  without a sliding window), reported as ``uniform_self``;
* the *self-score gap*, the pre-softmax score of the token's own key minus the mean score of the
  other keys ``1 <= j < i`` it can see (the first key, the sink, left out, and keys a sliding
  window hides), with a 95% t-interval over positions. A negative gap is the paper's "scores its own key low".

These numbers describe behaviour; :mod:`sinklens.studies.circuit` measures which heads the sink
neurons actually depend on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._stats import mean_interval
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import check_layer, run_cache


@dataclass
class HeadBehaviour(Result):
    """Per input and head: attention to itself, to the first token and to the others, and the self-score gap."""

    layer: int
    labels: list[str]
    self_attention: Float[torch.Tensor, "input head"]
    first_attention: Float[torch.Tensor, "input head"]
    uniform_self: Float[torch.Tensor, " input"]
    score_gap: Float[torch.Tensor, "input head"]
    score_gap_low: Float[torch.Tensor, "input head"]
    score_gap_high: Float[torch.Tensor, "input head"]

    @property
    def other_attention(self) -> Float[torch.Tensor, "input head"]:
        return 1 - self.self_attention - self.first_attention

    def scores_own_key_low(self, input_index: int = 0) -> list[int]:
        """Heads whose self-score gap on that input is below 0 with 95% confidence."""
        return (self.score_gap_high[input_index] < 0).nonzero().flatten().tolist()

    def to_frame(self) -> pd.DataFrame:
        n_inputs, n_heads = self.self_attention.shape
        return pd.DataFrame(
            {
                "input": [label for label in self.labels for _ in range(n_heads)],
                "layer": self.layer,
                "head": list(range(n_heads)) * n_inputs,
                "self_attention": self.self_attention.flatten().tolist(),
                "uniform_self": self.uniform_self.repeat_interleave(n_heads).tolist(),
                "first_attention": self.first_attention.flatten().tolist(),
                "other_attention": self.other_attention.flatten().tolist(),
                "self_score_gap": self.score_gap.flatten().tolist(),
                "gap_ci_low": self.score_gap_low.flatten().tolist(),
                "gap_ci_high": self.score_gap_high.flatten().tolist(),
            }
        )

    def plot(self) -> go.Figure:
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                "Attention to itself (dashed: a uniform head)",
                "Own-key score minus other keys' (95% CI)",
            ],
        )
        heads = list(range(self.self_attention.shape[1]))
        for i, label in enumerate(self.labels):
            fig.add_bar(
                x=heads,
                y=self.self_attention[i].tolist(),
                name=label,
                legendgroup=label,
                row=1,
                col=1,
            )
            fig.add_scatter(
                x=[heads[0] - 0.5, heads[-1] + 0.5],
                y=[float(self.uniform_self[i])] * 2,
                mode="lines",
                line=dict(dash="dash"),
                showlegend=False,
                legendgroup=label,
                row=1,
                col=1,
            )
            error = dict(
                type="data",
                symmetric=False,
                array=(self.score_gap_high[i] - self.score_gap[i]).tolist(),
                arrayminus=(self.score_gap[i] - self.score_gap_low[i]).tolist(),
            )
            fig.add_scatter(
                x=heads,
                y=self.score_gap[i].tolist(),
                error_y=error,
                mode="markers",
                name=label,
                legendgroup=label,
                showlegend=False,
                row=1,
                col=2,
            )
        fig.add_hline(y=0, line_dash="dot", row=1, col=2)
        fig.update_xaxes(title_text="Head")
        fig.update_layout(
            title=f"Layer {self.layer}: does a token attend to itself or to the others?"
        )
        return fig

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "inputs": self.labels,
            "scores_own_key_low": self.scores_own_key_low(),
            "heads": self.to_frame().to_dict("records"),
        }


def head_behaviour(
    model: TransformerBridge, inputs: Mapping[str, Int[torch.Tensor, "1 pos"]], *, layer: int = 0
) -> HeadBehaviour:
    """Attention statistics of every head of ``layer`` on each input (label -> ``[first] + tokens``)."""
    layer = check_layer(model, layer)
    if not inputs or any(t.shape[1] < 3 for t in inputs.values()):
        raise SinklensError(
            "head behaviour needs inputs of at least 3 tokens",
            "pass natural text and a repeated sequence, [first] + tokens",
        )
    names = [get_act_name("pattern", layer), get_act_name("attn_scores", layer)]
    rows: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("self", "first", "gap", "low", "high")
    }
    uniform = []
    for tokens in inputs.values():
        cache = run_cache(model, tokens[:1], names)
        pattern, scores = (cache[n][0].cpu() for n in names)  # [head, query, key]
        n = pattern.shape[-1]
        query = torch.arange(1, n)
        rows["self"].append(pattern[:, query, query].mean(-1))
        rows["first"].append(pattern[:, 1:, 0].mean(-1))
        visible = (
            scores > torch.finfo(scores.dtype).min / 2
        )  # sliding-window layers hide distant keys
        uniform.append(
            float((1.0 / visible[0, query].sum(-1)).mean())
        )  # one over the keys a query can see
        others = torch.where(visible, scores, 0.0)
        gaps = torch.stack(
            [
                scores[:, i, i]
                - others[:, i, 1:i].sum(-1) / visible[:, i, 1:i].sum(-1).clamp(min=1)
                for i in range(2, n)
            ],
            dim=-1,
        )  # [head, i]
        intervals = [mean_interval(g) for g in gaps]
        for key, k in (("gap", 0), ("low", 1), ("high", 2)):
            rows[key].append(torch.tensor([iv[k] for iv in intervals]))
    stack = {key: torch.stack(value) for key, value in rows.items()}
    return HeadBehaviour(
        layer,
        list(inputs),
        stack["self"],
        stack["first"],
        torch.tensor(uniform),
        stack["gap"],
        stack["low"],
        stack["high"],
    )
