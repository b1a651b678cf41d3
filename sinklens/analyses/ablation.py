"""What the sink neurons do: hidden-state norms and attention with and without them (paper Fig. 3).

Paper claim (Sec. 4.2, Fig. 3): zero-ablating the sink neurons removes the first token's huge
norm and the growth of the repeated tokens' norms, at the sink layer and in the layers after it,
which shows that the repeats are pushed up by the same neurons as the first token. This module
runs each input twice, intact and with the neurons ablated at every position (set to 0, or to
their mean over natural text), and records:

* the residual norm per position (``blocks.L.hook_resid_post``) at a few layers, by default the
  paper's: the sink layer, the middle of the model and the third-to-last layer;
* the attention that later queries pay to the first token, per layer (mean over heads of
  ``blocks.L.attn.hook_pattern``, reduced inside the hook);
* the sink neurons' own activation (``blocks.L.mlp.hook_post``) along each input in the intact
  run, so the first token's values can be read beside the repeats'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.attention import received_by_later_queries
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import check_layer, run_cache
from sinklens.run.interventions import (
    Neuron,
    ablation_hooks,
    check_neurons,
    neuron_hook_name,
)

CONDITIONS = ("intact", "ablated")
MODES = ("zero", "mean")


def paper_ablation_layers(model: TransformerBridge, sink_layer: int) -> list[int]:
    """The notebook's Fig. 3 layers: the sink layer, the middle of the model, the third-to-last layer."""
    n = model.cfg.n_layers
    return sorted({sink_layer, (sink_layer + n) // 2, max(n - 3, sink_layer)})


@dataclass
class AblationStudy(Result):
    """Norms, first-token attention and neuron activations of each input, intact and ablated."""

    neurons: list[Neuron]
    mode: str
    labels: list[str]
    layers: list[int]
    norms: list[Float[torch.Tensor, "condition layer pos"]]  # one tensor per input
    first_token_attention: Float[torch.Tensor, "condition input layer"] | None  # all layers 0..n-1
    activations: list[Float[torch.Tensor, "neuron pos"]]  # intact run, one tensor per input

    def __post_init__(self) -> None:
        self.neurons = [(layer, index) for layer, index in self.neurons]

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per input, condition, layer and position."""
        frames = []
        for label, norms in zip(self.labels, self.norms):
            for c, condition in enumerate(CONDITIONS):
                for i, layer in enumerate(self.layers):
                    frames.append(
                        pd.DataFrame(
                            {
                                "input": label,
                                "condition": condition,
                                "layer": layer,
                                "position": range(norms.shape[-1]),
                                "norm": norms[c, i].tolist(),
                            }
                        )
                    )
        return pd.concat(frames, ignore_index=True)

    def plot(self) -> go.Figure:
        """The paper's Fig. 3: norm per position, intact and ablated, one row per input and a column per layer."""
        titles = [f"{label}, layer {layer}" for label in self.labels for layer in self.layers]
        fig = make_subplots(rows=len(self.labels), cols=len(self.layers), subplot_titles=titles)
        for r, norms in enumerate(self.norms):
            for c in range(len(self.layers)):
                for k, (condition, color) in enumerate(zip(CONDITIONS, ("steelblue", "firebrick"))):
                    fig.add_scatter(
                        y=norms[k, c].tolist(),
                        mode="lines",
                        name=condition,
                        legendgroup=condition,
                        showlegend=r == 0 and c == 0,
                        line_color=color,
                        row=r + 1,
                        col=c + 1,
                    )
        fig.update_yaxes(type="log")
        fig.update_xaxes(title_text="Position")
        fig.update_yaxes(title_text="||hook_resid_post||", col=1)
        fig.update_layout(
            title=f"Hidden-state norms with the sink neurons {self.mode}-ablated",
            height=280 * len(self.labels),
        )
        return fig

    def plot_attention(self) -> go.Figure:
        fig = go.Figure()
        if self.first_token_attention is None:
            return fig
        for i, label in enumerate(self.labels):
            for k, condition in enumerate(CONDITIONS):
                fig.add_scatter(
                    y=self.first_token_attention[k, i].tolist(),
                    mode="lines+markers",
                    name=f"{label}, {condition}",
                    line_dash="solid" if k == 0 else "dot",
                )
        fig.update_layout(
            title="Attention later queries pay to the first token (mean over heads)",
            xaxis_title="Layer",
            yaxis_title="Attention weight",
            yaxis_range=[0, 1],
        )
        return fig

    def plot_activations(self) -> go.Figure:
        fig = make_subplots(rows=len(self.labels), cols=1, subplot_titles=self.labels)
        for r, activations in enumerate(self.activations):
            for (layer, index), values in zip(self.neurons, activations):
                fig.add_scatter(
                    y=values.tolist(),
                    mode="lines",
                    name=f"L{layer}.{index}",
                    legendgroup=f"{layer}.{index}",
                    showlegend=r == 0,
                    row=r + 1,
                    col=1,
                )
        fig.update_xaxes(title_text="Position")
        fig.update_yaxes(title_text="hook_post")
        fig.update_layout(
            title="Sink neurons' activation along each input (intact model)",
            height=250 * len(self.labels),
        )
        return fig

    def summary(self) -> dict:
        inputs = []
        for i, (label, norms, activations) in enumerate(
            zip(self.labels, self.norms, self.activations)
        ):
            entry = {
                "input": label,
                "layers": {
                    str(layer): {
                        f"{measure}_{condition}": value
                        for c, condition in enumerate(CONDITIONS)
                        for measure, value in (
                            ("first_token_norm", float(norms[c, j, 0])),
                            ("max_later_norm", float(norms[c, j, 1:].max())),
                            ("mean_later_norm", float(norms[c, j, 1:].mean())),
                        )
                    }
                    for j, layer in enumerate(self.layers)
                },
                "neuron_activation": [
                    {
                        "neuron": list(n),
                        "first_token": float(a[0]),
                        "later_max": float(a[1:].max()),
                        "later_median": float(a[1:].median()),
                    }
                    for n, a in zip(self.neurons, activations)
                ],
            }
            if self.first_token_attention is not None:
                entry["first_token_attention"] = {
                    c: self.first_token_attention[k, i].tolist() for k, c in enumerate(CONDITIONS)
                }
            inputs.append(entry)
        return {
            "neurons": [list(n) for n in self.neurons],
            "mode": self.mode,
            "layers": self.layers,
            "inputs": inputs,
        }


def ablation_study(
    model: TransformerBridge,
    neurons: Sequence[Neuron],
    inputs: Mapping[str, Int[torch.Tensor, "1 pos"]],
    *,
    layers: Sequence[int] | None = None,
    mode: str = "zero",
    mean_values: Mapping[int, Float[torch.Tensor, " d_mlp"]] | None = None,
    attention: bool = True,
    progress: bool = False,
) -> AblationStudy:
    """Run each of ``inputs`` (label -> token ids) intact and with ``neurons`` ablated.

    ``layers`` default to :func:`paper_ablation_layers` of the deepest neuron's layer. ``mode="mean"``
    sets the neurons to ``mean_values`` (:func:`sinklens.run.interventions.mean_activations`).
    ``attention=True`` runs every layer to record the first token's attention; without it the runs
    stop after the deepest layer in ``layers``.
    """
    neurons = check_neurons(model, neurons)
    if not neurons:
        raise SinklensError(
            "no neurons to ablate", "pass at least one (layer, neuron) pair, e.g. the sink neurons"
        )
    if not inputs:
        raise SinklensError("no inputs to run", "pass at least one input, label -> token ids")
    if mode not in MODES:
        raise SinklensError(f"unknown ablation mode {mode!r}", f"pass one of {', '.join(MODES)}")
    if mode == "mean" and mean_values is None:
        raise SinklensError(
            "mean-ablation needs the neurons' mean activations",
            "pass mean_values=sinklens.run.interventions.mean_activations(model, text, layers)",
        )
    if (
        mode == "mean"
        and mean_values is not None
        and (  # not None: checked just above
            missing := sorted({layer for layer, _ in neurons} - set(mean_values))
        )
    ):
        raise SinklensError(
            f"mean_values has no means for layer(s) {missing}",
            "compute them for every ablated layer: mean_activations(model, text, layers)",
        )
    sink_layer = max(layer for layer, _ in neurons)
    layers = (
        paper_ablation_layers(model, sink_layer)
        if layers is None
        else sorted({check_layer(model, l) for l in layers})
    )
    norm_names = [get_act_name("resid_post", layer) for layer in layers]
    pattern_names = (
        [get_act_name("pattern", layer) for layer in range(model.cfg.n_layers)] if attention else []
    )
    neuron_names = sorted({neuron_hook_name(layer) for layer, _ in neurons})
    hooks = ablation_hooks(model, [neurons], values=mean_values if mode == "mean" else None)

    def reduce(name: str, activation: torch.Tensor) -> torch.Tensor:
        if name in pattern_names:
            return received_by_later_queries(activation)[:, 0].mean()
        if name in norm_names:
            return activation[0].float().norm(dim=-1).cpu()
        return activation[0].float().cpu()

    norms, attention_rows, activations = [], [], []
    for tokens in tqdm(inputs.values(), desc="ablation study", disable=not progress):
        runs = [
            run_cache(model, tokens, norm_names + pattern_names + neuron_names, reduce=reduce),
            run_cache(
                model, tokens, norm_names + pattern_names, reduce=reduce, interventions=hooks
            ),
        ]
        norms.append(torch.stack([torch.stack([run[name] for name in norm_names]) for run in runs]))
        if attention:
            attention_rows.append(
                torch.stack([torch.stack([run[name] for name in pattern_names]) for run in runs])
            )
        activations.append(
            torch.stack(
                [runs[0][neuron_hook_name(layer)][:, index].clone() for layer, index in neurons]
            )
        )
    first_attention = torch.stack(attention_rows, dim=1).float().cpu() if attention else None
    return AblationStudy(neurons, mode, list(inputs), layers, norms, first_attention, activations)
