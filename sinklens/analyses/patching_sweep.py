"""Activation patching sweeps: which layers, positions and heads carry what makes a run differ.

Activation patching localises a computation: run a *corrupted* input, overwrite one activation with its value
from a *clean* run of an input of the same length, and measure how much of the clean behaviour comes back.
Done for every site of one kind, it maps where the difference is carried. Here the behaviour is a metric of the
sink circuit (or any callable), and the result is normalised so that 1 is the clean run's value and 0 the
corrupted run's:

    restored = (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))

Site kinds (TransformerLens hook names, 0-based layers):

* ``resid_pre``: the residual stream before block L, per (layer, position): ``blocks.L.hook_resid_pre``;
* ``attn_out`` / ``mlp_out``: a block's attention or MLP output, per (layer, position);
* ``heads``: one attention head's output at every position, per (layer, head): ``blocks.L.attn.hook_z``;
* ``head_positions``: one head at one position, per (layer, head, position).

These are the sweeps of TransformerLens' ``patching.get_act_patch_resid_pre``, ``get_act_patch_attn_out``,
``get_act_patch_mlp_out``, ``get_act_patch_attn_head_out_all_pos`` and ``get_act_patch_attn_head_out_by_pos``
(the tests show the same numbers on the bridge). They differ in how they run: TransformerLens makes one forward
pass per site and runs every model to the end; here many sites run in one forward pass (one site per batch row,
:mod:`sinklens.run.activation_patching`), the run stops after the last layer the metric reads, the metric reads
only the hooks it names, and sites after that layer, which cannot change the metric, are not run. The sweeps
and the paper's first-token mark experiments (:mod:`sinklens.analyses.first_token_mark`, whose clean and
corrupted runs differ in length) run on one engine, :func:`~sinklens.run.activation_patching.patched_rows`.

Metrics (:class:`PatchingMetric`): the first token's norm at the sink layer (:func:`first_token_norm`), the sink
neurons' activation at a position (:func:`sink_neuron_activation`), the attention later queries pay a position
(:func:`attention_to`), a logit difference (:func:`logit_difference`), or any function of the cached hooks.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.defaults import PATCHING_SITES
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.activation_patching import Patch, Site, patched_rows, read_site
from sinklens.run.cache import check_layer, run_cache
from sinklens.run.interventions import Neuron, neuron_hook_name

HOOKS = {
    "resid_pre": "resid_pre",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "heads": "z",
    "head_positions": "z",
}
MIN_DIFFERENCE = (
    1e-6  # relative: a clean and corrupted metric closer than this cannot be normalised
)
LOGITS = "unembed.hook_out"
Cache = ActivationCache | dict[str, torch.Tensor]  # what a metric reads: the cached hooks, by name


@dataclass
class PatchingMetric:
    """What a sweep measures: ``function(cache)`` gives one number per batch row from the hooks in ``names``
    (float32, as :func:`~sinklens.run.cache.run_cache` caches them)."""

    label: str
    names: list[str]
    function: Callable[[Cache], Float[torch.Tensor, " batch"]]


def first_token_norm(layer: int) -> PatchingMetric:
    """The first token's hidden-state norm after block ``layer`` (the sink layer): the sink itself."""
    name = get_act_name("resid_post", layer)
    return PatchingMetric(
        f"first token's norm at layer {layer}", [name], lambda cache: cache[name][:, 0].norm(dim=-1)
    )


def sink_neuron_activation(neurons: Sequence[Neuron], position: int = 0) -> PatchingMetric:
    """The summed activation (``mlp.hook_post``) of the sink ``neurons`` at ``position``."""
    by_name: dict[str, list[int]] = {}
    for layer, index in neurons:  # checked against the model by the sweep's first run
        by_name.setdefault(neuron_hook_name(layer), []).append(index)

    def measure(cache: Cache) -> torch.Tensor:
        return torch.stack(
            [cache[name][:, position, indices].sum(-1) for name, indices in by_name.items()]
        ).sum(0)

    described = ", ".join(f"L{layer}.{index}" for layer, index in neurons)
    return PatchingMetric(
        f"sink neurons {described} at position {position}", list(by_name), measure
    )


def attention_to(position: int, layers: Sequence[int]) -> PatchingMetric:
    """The mean attention the queries after ``position`` pay to it, over the heads of ``layers``."""
    names = [get_act_name("pattern", layer) for layer in layers]

    def measure(cache: Cache) -> torch.Tensor:
        paid = [cache[name][:, :, position + 1 :, position].mean(dim=(1, 2)) for name in names]
        return torch.stack(paid).mean(0)

    return PatchingMetric(
        f"attention to position {position} in layers {list(layers)}", names, measure
    )


def logit_difference(answer: int, wrong: int, position: int = -1) -> PatchingMetric:
    """``logit[answer] - logit[wrong]`` at ``position`` (default: the last)."""
    return PatchingMetric(
        f"logit difference {answer} - {wrong} at position {position}",
        [LOGITS],
        lambda cache: cache[LOGITS][:, position, answer] - cache[LOGITS][:, position, wrong],
    )


@dataclass
class PatchingSweep(Result):
    """The metric restored by patching each site of one kind from the clean run into the corrupted one."""

    site: str
    metric: str
    layers: list[int]
    positions: list[int] | None  # None for ``heads`` (every position at once)
    heads: list[int] | None  # None for the per-position kinds without heads
    clean_tokens: Int[torch.Tensor, "1 pos"]
    corrupted_tokens: Int[torch.Tensor, "1 pos"]
    clean_value: float
    corrupted_value: float
    values: Float[torch.Tensor, "layer ..."]  # the metric with each site patched
    position_labels: list[str]

    @property
    def restored(self) -> Float[torch.Tensor, "layer ..."]:
        """The metric with each site patched, normalised: 1 is the clean value, 0 the corrupted."""
        return (self.values - self.corrupted_value) / (self.clean_value - self.corrupted_value)

    def _axes(self) -> list[tuple[str, list]]:
        axes: list[tuple[str, list]] = [("layer", self.layers)]
        if self.heads is not None:
            axes.append(("head", self.heads))
        if self.positions is not None:
            axes.append(("position", self.positions))
        return axes

    def to_frame(self) -> pd.DataFrame:
        """One row per site: its layer (and head, position), the metric patched and restored."""
        axes = self._axes()
        index = pd.MultiIndex.from_product(
            [values for _, values in axes], names=[name for name, _ in axes]
        )
        frame = index.to_frame(index=False)
        frame["value"] = self.values.flatten().tolist()
        frame["restored"] = self.restored.flatten().tolist()
        if self.positions is not None:
            labels = dict(zip(self.positions, self.position_labels))
            frame.insert(len(axes), "token", frame["position"].map(labels))
        return frame

    def plot(self) -> go.Figure:
        """A heatmap of ``restored``: layers (or layer.head) down, positions (or heads) across, 0 white, 1 the
        clean run's colour."""
        restored = self.restored
        rows = [f"L{layer}" for layer in self.layers]
        if self.site == "head_positions":
            rows = [f"L{layer}.{head}" for layer in self.layers for head in self.heads or []]
            restored = restored.flatten(0, 1)
        if self.positions is not None:
            columns = [
                f"{p} {html.escape(t, quote=False)}"
                for p, t in zip(self.positions, self.position_labels)
            ]
        else:
            columns = [f"head {h}" for h in self.heads or []]
        fig = go.Figure(
            go.Heatmap(
                z=restored.tolist(),
                x=columns,
                y=rows,
                zmid=0,
                colorscale="RdBu",
                colorbar_title="restored",
                hovertemplate="%{y}, %{x}<br>restored %{z:.3f}<extra></extra>",
            )
        )
        fig.update_layout(
            title=f"Patching {self.site}: {self.metric} restored (1: clean, 0: corrupted)",
            yaxis_autorange="reversed",
        )
        return fig

    def summary(self) -> dict:
        return {
            "site": self.site,
            "metric": self.metric,
            "layers": self.layers,
            "positions": self.positions,
            "heads": self.heads,
            "clean_value": self.clean_value,
            "corrupted_value": self.corrupted_value,
            "restored": self.restored.tolist(),
            "clean_tokens": self.clean_tokens[0].tolist(),
            "corrupted_tokens": self.corrupted_tokens[0].tolist(),
            "position_labels": self.position_labels,
        }


def _sites(
    model: TransformerBridge, site: str, layers: Sequence[int], positions: Sequence[int]
) -> tuple[list[list[tuple[Site, int]]], list[int] | None, list[int] | None]:
    """Every site of the kind as the (site, position) writes of one batch row, in the result's order."""
    heads = list(range(model.cfg.n_heads)) if site in ("heads", "head_positions") else None
    rows: list[list[tuple[Site, int]]] = []
    for layer in layers:
        name = get_act_name(HOOKS[site], layer)
        if site == "heads":
            rows += [[(Site(name, head), p) for p in positions] for head in heads or []]
        elif site == "head_positions":
            rows += [[(Site(name, head), p)] for head in heads or [] for p in positions]
        else:
            rows += [[(Site(name), p)] for p in positions]
    return rows, heads, None if site == "heads" else list(positions)


@torch.no_grad()
def patching_sweep(
    model: TransformerBridge,
    clean: Int[torch.Tensor, "1 pos"],
    corrupted: Int[torch.Tensor, "1 pos"],
    metric: PatchingMetric,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    progress: bool = False,
) -> PatchingSweep:
    """Patch each ``site`` of ``layers`` x ``positions`` (x heads) from ``clean`` into ``corrupted`` and measure
    ``metric``, normalised so 1 is the clean value and 0 the corrupted.

    ``layers`` default to every layer up to the last one the metric reads (a later site cannot change it);
    ``positions`` to every position. The clean and corrupted inputs must have the same length, and their
    metrics must differ, else there is nothing to restore.
    """
    if site not in PATCHING_SITES:
        raise SinklensError(
            f"unknown site kind {site!r}", f"pass one of {', '.join(PATCHING_SITES)}"
        )
    if clean.shape != corrupted.shape or clean.shape[0] != 1:
        raise SinklensError(
            f"the clean and corrupted inputs differ in shape ({tuple(clean.shape)} and "
            f"{tuple(corrupted.shape)})",
            "pass two inputs of one row each, of equal length",
        )
    n_pos = clean.shape[1]
    deepest = max(
        (int(n.split(".")[1]) for n in metric.names if n.startswith("blocks.")),
        default=model.cfg.n_layers - 1,
    )
    layers = (
        list(range(deepest + 1))
        if layers is None
        else [check_layer(model, layer) for layer in layers]
    )
    positions = list(range(n_pos)) if positions is None else list(positions)
    if any(not 0 <= p < n_pos for p in positions):
        raise SinklensError(f"positions must lie in 0..{n_pos - 1}", "pass positions of the inputs")
    names = [get_act_name(HOOKS[site], layer) for layer in layers]
    clean_cache = run_cache(model, clean, [*names, *metric.names])
    clean_value = float(metric.function(clean_cache)[0])
    corrupted_value = float(metric.function(run_cache(model, corrupted, metric.names))[0])
    if abs(clean_value - corrupted_value) <= MIN_DIFFERENCE * max(
        abs(clean_value), abs(corrupted_value), 1e-12
    ):
        raise SinklensError(
            f"the metric is the same on both inputs ({clean_value:.6g}): there is nothing to restore",
            "pass a corrupted input that changes the metric, or another metric",
        )
    rows, heads, kept_positions = _sites(model, site, layers, positions)
    row_patches = [
        [Patch(s, 0, p, read_site(clean_cache, s, 0, p)) for s, p in writes] for writes in rows
    ]
    values = patched_rows(
        model,
        corrupted,
        row_patches,
        metric.names,
        lambda cache, start, n_rows: metric.function(cache),
        progress=progress,
        desc=f"patching {site}",
    )
    shape = [
        len(layers),
        *([len(heads)] if heads is not None else []),
        *([len(kept_positions)] if kept_positions is not None else []),
    ]
    texts = [model.tokenizer.decode([int(t)]) for t in clean[0]]
    return PatchingSweep(
        site,
        metric.label,
        layers,
        kept_positions,
        heads,
        clean.cpu(),
        corrupted.cpu(),
        clean_value,
        corrupted_value,
        values.reshape(shape),
        [texts[p] for p in positions],
    )
