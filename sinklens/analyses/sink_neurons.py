"""The sink neurons: the few MLP neurons that write the first token's huge norm.

Paper claim (Yona et al. 2025, Sec. 4.2, Table 1): in the sink layer's MLP a sparse set of
neurons (one or two on Llama-1/2/3 and Mistral) blows up the first token's hidden state; ablating
them removes the sink. This module ranks every neuron of the sink layer and keeps the smallest
set that is causally responsible:

* **Ranking, the paper's criterion**: neuron j's contribution to the first token's residual
  stream, ``|hook_post_j(first token)| * ||W_out[j]||`` (the norm of what the neuron writes; with
  a norm after the MLP, as Gemma's ``ln2_post``, ``W_out[j]`` is first scaled by that norm's
  per-dimension factor at the first token, so the score is still what reaches the stream).
* **Ranking, the authors' notebook's criterion** (``criterion="notebook"``):
  ``|hook_pre_j| * ||W_out[j]||`` at the last position of ``[first] + [' the'] * n``. It reads
  the gate pre-activation of a gated MLP, so it is refused on other MLP types. The notebook
  kept its top 2; that rule is reported beside ours, so a reader sees where the two differ.
* **Causal filter**: the sink neurons are the shortest prefix of the ranking whose zero-ablation
  (``blocks.L.mlp.hook_post`` set to 0) removes at least ``share`` of the first token's *excess*
  norm at the sink layer, the first-token norm minus the typical norm of natural text. The
  default, 90%, asks that the ablated first token keep at most a tenth of its excess: no longer
  a sink by any reading, while a set that leaves a large part behind has not found the cause.
  Every candidate's own ablation effect is reported too.

Some models build the first token's norm over several adjacent layers (Gemma-3-270M does); no
single layer passes the sink-layer rule and no neurons of one layer remove the excess. Then the
search ranks ``(layer, neuron)`` pairs over a layer range by their *direct contribution to the
first token's norm at the end of the range* (the projection of what the neuron writes onto the
first token's hidden-state direction there), and the filter ablates pairs. The result's
``case`` says which situation was found.

Two independent signatures are reported for every candidate, to cross-check the search: the
residual dimensions where the first token's massive activations sit (Sun et al. 2024), and the
largest entry of the neuron's ``W_out`` row, its "super weight" (Yu et al. 2024).

All ablations run on the lone first token (causal attention makes it identical to position 0 of
any input), every candidate set in its own batch row of one forward pass, stopping after the
last layer searched.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.neuron_writes import (
    lower_median,
    ranked,
    ranking_scores,
    removed_shares,
    super_weights,
    write_scales,
)
from sinklens.analyses.sink_layer import SIGMA_RULE, SinkLayer, find_sink_layer
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import act_name, check_layer, run_cache
from sinklens.run.interventions import Neuron, ablation_hooks, neuron_hook_name
from sinklens.run.tokens import Token, repeated_tokens, token
from sinklens.settings import (
    MAX_NEURONS,
    PAPER_MAX_LAYER,
    PAPER_N_SIGMA,
    REMOVED_SHARE,
    check_criterion_name,
)

NOTEBOOK_WORD = "the"
NOTEBOOK_K = 2
N_MASSIVE_DIMS = 3
SINGLE_LAYER = "single layer"
SEVERAL_LAYERS = "several layers"
NOT_FOUND = "not found"


@dataclass
class SinkNeurons(Result):
    """Ranked neurons of the searched layers, the causal filter's curve and the sink neurons.

    Tensors are indexed ``[i, neuron]`` with ``i`` the position of the layer in ``layers``.
    ``cumulative_norms[k]`` is the first token's norm at the sink layer with the top ``k``
    candidates ablated (``k = 0`` is the intact model); ``individual_norms[i]`` with candidate
    ``i`` ablated alone.
    """

    first_token: Token
    case: str
    layers: list[int]
    criterion: str
    paper_scores: Float[torch.Tensor, "layer d_mlp"]
    direct_contributions: Float[torch.Tensor, "layer d_mlp"]
    text_activations: Float[
        torch.Tensor, "layer d_mlp"
    ]  # median |hook_post| over natural text's later tokens
    notebook_scores: Float[torch.Tensor, " d_mlp"] | None
    notebook_input: str
    candidates: list[Neuron]
    cumulative_norms: Float[torch.Tensor, " k"]
    individual_norms: Float[torch.Tensor, " candidate"]
    typical_norm: float
    share: float
    n_sink: int
    massive_dims: list[int]
    massive_values: Float[torch.Tensor, " dim"]
    w_out_top_dims: list[int]  # per candidate: the d_model index of its largest |W_out| entry
    w_out_top_values: Float[torch.Tensor, " candidate"]
    w_out_top_ranks: list[
        int
    ]  # that entry's rank by |value| among all of its layer's W_out entries

    def __post_init__(self) -> None:
        self.candidates = [
            (layer, index) for layer, index in self.candidates
        ]  # lists after a round trip through a file

    @property
    def sink_layer(self) -> int:
        """The layer where the first token's norm is measured: the (last) layer searched."""
        return self.layers[-1]

    @property
    def sink_neurons(self) -> list[Neuron]:
        return self.candidates[: self.n_sink]

    @property
    def sink_neurons_by_layer(self) -> dict[int, list[int]]:
        by_layer: dict[int, list[int]] = {}
        for layer, index in sorted(self.sink_neurons):
            by_layer.setdefault(layer, []).append(index)
        return by_layer

    @property
    def first_token_norm(self) -> float:
        return float(self.cumulative_norms[0])

    @property
    def first_token_norm_ablated(self) -> float:
        return float(self.cumulative_norms[self.n_sink])

    @property
    def removed_shares(self) -> Float[torch.Tensor, " k"]:
        """Share of the first token's excess norm removed by ablating the top k candidates."""
        return removed_shares(self.cumulative_norms, self.cumulative_norms[0], self.typical_norm)

    @property
    def individual_shares(self) -> Float[torch.Tensor, " candidate"]:
        return removed_shares(self.individual_norms, self.cumulative_norms[0], self.typical_norm)

    @property
    def notebook_neurons(self) -> list[int] | None:
        """The notebook's rule as written: the top 2 by the notebook criterion at the sink layer."""
        if self.notebook_scores is None:
            return None
        return self.notebook_scores.topk(NOTEBOOK_K).indices.tolist()

    def to_frame(self) -> pd.DataFrame:
        """Every searched (layer, neuron), ranked as the filter took them."""
        n_layers, d_mlp = self.paper_scores.shape
        frame = pd.DataFrame(
            {
                "layer": [layer for layer in self.layers for _ in range(d_mlp)],
                "neuron": list(range(d_mlp)) * n_layers,
                "paper_score": self.paper_scores.flatten().tolist(),
                "direct_contribution": self.direct_contributions.flatten().tolist(),
                "text_activation": self.text_activations.flatten().tolist(),
            }
        )
        if self.notebook_scores is not None:
            frame["notebook_score"] = self.notebook_scores.tolist()
        order = {neuron: i for i, neuron in enumerate(self.candidates)}
        rank = torch.empty(frame.shape[0], dtype=torch.long)
        rank[ranked(self.ranking_scores())] = torch.arange(1, frame.shape[0] + 1)
        frame["rank"] = rank.tolist()
        extra = {
            "ablated_share": self.individual_shares.tolist(),
            "w_out_top_dim": self.w_out_top_dims,
            "w_out_top_value": self.w_out_top_values.tolist(),
            "w_out_top_rank": self.w_out_top_ranks,
        }
        for column, values in extra.items():
            picked = [
                values[order[(l, n)]] if (l, n) in order else None
                for l, n in zip(frame["layer"], frame["neuron"])
            ]
            frame[column] = pd.array(
                picked,
                dtype="Int64" if column in ("w_out_top_dim", "w_out_top_rank") else "Float64",
            )
        frame["sink_neuron"] = [
            (l, n) in set(self.sink_neurons) for l, n in zip(frame["layer"], frame["neuron"])
        ]
        return frame.sort_values("rank").reset_index(drop=True)

    def candidate_frame(self) -> pd.DataFrame:
        """The rows of :meth:`to_frame` for the candidates the filter tried, in its order."""
        frame = self.to_frame().set_index(["layer", "neuron"])
        return frame.loc[self.candidates].reset_index()

    def ranking_scores(self) -> torch.Tensor:
        return ranking_scores(
            self.criterion, self.paper_scores, self.direct_contributions, self.notebook_scores
        )

    def plot(self) -> go.Figure:
        top = min(len(self.candidates), 20)
        labels = [f"L{layer}.{index}" for layer, index in self.candidates[:top]]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                "First-token norm with the top-k candidates ablated",
                "Each candidate ablated alone",
            ],
        )
        fig.add_scatter(
            x=list(range(len(self.cumulative_norms))),
            y=self.cumulative_norms.tolist(),
            mode="lines+markers",
            name="first-token norm",
            row=1,
            col=1,
        )
        target = self.first_token_norm - self.share * (self.first_token_norm - self.typical_norm)
        for value, name, color in (
            (self.typical_norm, "typical", "gray"),
            (target, f"{self.share:.0%} of the excess removed", "orange"),
        ):
            fig.add_scatter(
                x=[0, len(self.cumulative_norms) - 1],
                y=[value, value],
                mode="lines",
                name=name,
                line=dict(color=color, dash="dash"),
                row=1,
                col=1,
            )
        colors = ["firebrick" if i < self.n_sink else "steelblue" for i in range(top)]
        fig.add_bar(
            x=labels,
            y=self.individual_shares[:top].tolist(),
            marker_color=colors,
            name="share of the excess removed",
            row=1,
            col=2,
        )
        fig.update_yaxes(type="log", title_text="||blocks.L.hook_resid_post||", row=1, col=1)
        fig.update_xaxes(title_text="Top-k candidates ablated", row=1, col=1)
        fig.update_yaxes(title_text="Share of the excess norm removed", row=1, col=2)
        fig.update_layout(
            title=f"Sink neurons ({self.case}, layers {self.layers[0]}-{self.sink_layer}): "
            f"{self.describe_neurons()}"
        )
        return fig

    def describe_neurons(self) -> str:
        if not self.sink_neurons:
            return "none found"
        return "; ".join(
            f"layer {layer}: {', '.join(map(str, indices))}"
            for layer, indices in self.sink_neurons_by_layer.items()
        )

    def summary(self) -> dict:
        return {
            "case": self.case,
            "criterion": self.criterion,
            "layers": self.layers,
            "sink_layer": self.sink_layer,
            "sink_neurons": [list(n) for n in self.sink_neurons],
            "sink_neurons_by_layer": {str(k): v for k, v in self.sink_neurons_by_layer.items()},
            "share_threshold": self.share,
            "removed_share": float(self.removed_shares[self.n_sink]),
            "first_token_norm": self.first_token_norm,
            "first_token_norm_ablated": self.first_token_norm_ablated,
            "typical_norm": self.typical_norm,
            "notebook_rule": None
            if self.notebook_scores is None
            else {"input": self.notebook_input, "top": self.notebook_neurons},
            "massive_dims": [
                {"dim": d, "value": v}
                for d, v in zip(self.massive_dims, self.massive_values.tolist())
            ],
            "candidates": self.candidate_frame().to_dict("records"),
        }


def _layer_list(layers: Any) -> list:  # Any: an int, numpy or torch integer, or a sequence of them
    """One layer (any integer type) or several, as a list."""
    try:
        return [operator.index(layers)]
    except TypeError:
        return list(layers)


def check_layers(model: TransformerBridge, layers: int | Sequence[int]) -> list[int]:
    """The layers to search, sorted; one clear error for an empty range or a layer out of range."""
    layers = _layer_list(layers)
    if not layers:
        raise SinklensError(
            "the layer range is empty", "pass at least one layer, e.g. layers=[3, 4, 5]"
        )
    return sorted({check_layer(model, layer) for layer in layers})


def check_criterion(
    model: TransformerBridge | None, criterion: str, layers: Sequence[int] | int | None = None
) -> None:
    """Raise one clear error for an unknown criterion, the notebook's over several layers, or the
    notebook's on a model without a gated MLP (``model=None`` checks only what needs no model)."""
    check_criterion_name(criterion, None if layers is None else _layer_list(layers))
    if model is None:
        return
    if criterion == "notebook" and not getattr(model.cfg, "gated_mlp", False):
        raise SinklensError(
            f"the notebook criterion reads a gated MLP's gate pre-activation (hook_pre), and {model.cfg.model_name} "
            "has a non-gated MLP",
            "use criterion='paper' (CLI: --criterion paper), which works on every MLP type",
        )


def find_sink_neurons(
    model: TransformerBridge,
    reference: Int[torch.Tensor, "1 pos"],
    *,
    layers: int | Sequence[int] | None = None,
    criterion: str = "paper",
    share: float = REMOVED_SHARE,
    max_neurons: int = MAX_NEURONS,
    notebook_word: str | int = NOTEBOOK_WORD,
    notebook_repeats: int = 1000,
    sink: SinkLayer | None = None,
    max_layer: int | None = PAPER_MAX_LAYER,
    n_sigma: float = PAPER_N_SIGMA,
) -> SinkNeurons:
    """Find the sink neurons of the first token of ``reference`` (``[first] + natural text``).

    ``layers``: one layer (single-layer search), a list of layers (a sink built over several
    layers), or None to decide from the data: the sink layer when the paper's rule finds one and
    its neurons pass the filter, else the run of layers where the first token's MLP outputs stand
    out (:attr:`SinkLayer.sink_range`). ``sink`` reuses a :func:`find_sink_layer` result.
    """
    if not 0 < share <= 1:
        raise SinklensError(
            f"share must be in (0, 1], got {share}", "pass the share of the excess norm to remove"
        )
    if max_neurons < 1:
        raise SinklensError(
            f"max_neurons must be at least 1, got {max_neurons}", "pass a positive number"
        )
    check_criterion(model, criterion, layers)
    if reference.shape[1] < 2:
        raise SinklensError(
            "the reference has no token after the first",
            "pass [first] + natural text (text_tokens)",
        )
    search: dict[str, Any] = dict(
        reference=reference,
        criterion=criterion,
        share=share,
        max_neurons=max_neurons,
        notebook_word=notebook_word,
        notebook_repeats=notebook_repeats,
    )
    if layers is not None:
        return _search(model, check_layers(model, layers), **search)
    if sink is None:
        sink = find_sink_layer(
            model,
            first=int(reference[0, 0]),
            max_layer=max_layer,
            n_sigma=n_sigma,
            reference=reference,
        )
    elif sink.first_token.id != int(reference[0, 0]):
        raise SinklensError(
            "the sink-layer result is for another first token than the reference",
            "run find_sink_layer with the reference's first token, or pass sink=None",
        )
    single = _search(model, [sink.sink_layer], **search)
    if (sink.method == SIGMA_RULE and single.case != NOT_FOUND) or criterion == "notebook":
        return single
    span = sink.sink_range
    spread = _search(model, span, **search) if span != [sink.sink_layer] else single
    if (
        spread.case != NOT_FOUND
        or single.case == NOT_FOUND
        and spread.removed_shares.max() >= single.removed_shares.max()
    ):
        return spread  # several layers carry the sink, or neither search finds it and the span does better
    return single


def _search(
    model: TransformerBridge,
    layers: list[int],
    *,
    reference: Int[torch.Tensor, "1 pos"],
    criterion: str,
    share: float,
    max_neurons: int,
    notebook_word: str | int,
    notebook_repeats: int,
) -> SinkNeurons:
    end = layers[-1]
    first = int(reference[0, 0])
    post_norm = [layer for layer in layers if hasattr(model.blocks[layer], "ln2_post")]
    names = [neuron_hook_name(layer) for layer in layers] + [act_name("resid_post", end)]
    names += [act_name(side, layer, "ln2_post") for layer in post_norm for side in ("in", "out")]
    cache = run_cache(model, reference, names)
    resid = cache[act_name("resid_post", end)][0]
    typical = float(resid[1:].norm(dim=-1).mean())
    direction = resid[0] / resid[0].norm()
    paper, direct, text = [], [], []
    # Each layer's W_out, its statistics and the activations stay on the model's device; only
    # vectors of d_mlp come back (a 7B layer's W_out is 45M numbers, which the last release copied
    # to the CPU and scanned there, once per candidate for the super weights' ranks).
    w_outs = {layer: model.blocks[layer].mlp.W_out.detach().float() for layer in layers}
    for layer, scale in zip(layers, write_scales(cache, layers, model)):
        w_out = w_outs[layer]
        post = cache[neuron_hook_name(layer)][0].to(w_out.device)
        w_out = w_out * scale.to(w_out.device)  # what each neuron writes into the stream, per unit
        paper.append((post[0].abs() * w_out.norm(dim=-1)).cpu())
        direct.append((post[0] * (w_out @ direction.to(w_out.device))).cpu())
        if post.shape[0] > 1:
            text.append(lower_median(post[1:].abs()))
        else:
            text.append(torch.zeros(post.shape[1]))
    paper_scores, direct_contributions = torch.stack(paper), torch.stack(direct)
    resid = resid.cpu()

    notebook_scores, notebook_input = None, ""
    if len(layers) == 1 and getattr(model.cfg, "gated_mlp", False):
        n_repeats = min(
            notebook_repeats, model.cfg.n_ctx - 1
        )  # a side measurement: fit it to the context
        repeat = repeated_tokens(model, notebook_word, n_repeats, first=first)
        name = act_name("pre", end)
        last = run_cache(
            model, repeat, [name], reduce=lambda _, pre: pre[:, -1]
        )  # only the last position
        gate = last[name][0].to(w_outs[end].device)
        notebook_scores = (gate.abs() * w_outs[end].norm(dim=-1)).cpu()
        notebook_input = f"{token(model, first).text!r} + {token(model, int(repeat[0, -1])).text!r} x {n_repeats}"
    case = SINGLE_LAYER if len(layers) == 1 else SEVERAL_LAYERS
    ranking = ranking_scores(criterion, paper_scores, direct_contributions, notebook_scores)
    order = ranked(ranking)[:max_neurons].tolist()
    d_mlp = ranking.shape[1]
    candidates = [(layers[i // d_mlp], i % d_mlp) for i in order]

    rows = [candidates[:k] for k in range(len(candidates) + 1)] + [[c] for c in candidates]
    lone = torch.full((len(rows), 1), first, dtype=torch.long)
    name = act_name("resid_post", end)
    norms = run_cache(model, lone, [name], interventions=ablation_hooks(model, rows))[name][
        :, 0
    ].norm(dim=-1)
    norms = norms.cpu()
    cumulative, individual = norms[: len(candidates) + 1], norms[len(candidates) + 1 :]
    removed = removed_shares(cumulative, cumulative[0], typical)
    passing = (
        (removed[1:] >= share).nonzero().flatten() if cumulative[0] > typical else torch.zeros(0)
    )
    n_sink = int(passing[0]) + 1 if len(passing) else 0

    massive = resid[0].abs().topk(min(N_MASSIVE_DIMS, resid.shape[-1]))
    top_dims, top_values, top_ranks = super_weights(w_outs, candidates)
    return SinkNeurons(
        first_token=token(model, first),
        case=case if n_sink else NOT_FOUND,
        layers=layers,
        criterion=criterion,
        paper_scores=paper_scores,
        direct_contributions=direct_contributions,
        text_activations=torch.stack(text),
        notebook_scores=notebook_scores,
        notebook_input=notebook_input,
        candidates=candidates,
        cumulative_norms=cumulative,
        individual_norms=individual,
        typical_norm=typical,
        share=share,
        n_sink=n_sink,
        massive_dims=massive.indices.tolist(),
        massive_values=resid[0, massive.indices],
        w_out_top_dims=top_dims,
        w_out_top_values=torch.tensor(top_values),
        w_out_top_ranks=top_ranks,
    )
