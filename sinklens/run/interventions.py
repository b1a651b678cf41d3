"""Hook functions that edit MLP neurons during a run: zero- and mean-ablation.

A neuron is a ``(layer, index)`` pair, ``index`` into ``d_mlp``; it is edited at
``blocks.{layer}.mlp.hook_post``, the activation that multiplies the neuron's ``W_out`` row (for a
gated MLP ``act(gate) * up``; zeroing it is the same as zeroing the gate, since the activation
functions used here map 0 to 0). The hooks returned here are ``(name, function)`` pairs for
:func:`sinklens.run.cache.run_cache` (``interventions=``) or ``model.hooks(fwd_hooks=...)``.

One call can ablate a different set of neurons in every batch row, which is how a search over
many candidate sets runs as a single forward pass instead of one pass per set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.errors import SinklensError
from sinklens.run.cache import Hook, act_name, as_index, check_layer, run_cache

Neuron = tuple[int, int]
"""A ``(layer, index)`` pair: MLP neuron ``index`` (into ``d_mlp``) of block ``layer``."""


def check_neurons(model: TransformerBridge, neurons: Sequence[Neuron]) -> list[Neuron]:
    """Raise one clear error for a neuron whose layer or index is out of range."""
    d_mlp = model.cfg.d_mlp
    checked = []
    for layer, index in neurons:
        layer, index = check_layer(model, layer), as_index(index, "neuron")
        assert d_mlp is not None  # a model with neurons has MLP blocks
        if not 0 <= index < d_mlp:
            raise SinklensError(
                f"neuron {index} of layer {layer} is out of range: {model.cfg.model_name} has d_mlp={d_mlp} "
                f"(neurons 0..{d_mlp - 1})",
                "pass neuron indices below d_mlp",
            )
        checked.append((int(layer), int(index)))
    return checked


def neuron_hook_name(layer: int) -> str:
    return act_name("post", layer)


def ablation_hooks(
    model: TransformerBridge,
    rows: Sequence[Sequence[Neuron]],
    *,
    values: Mapping[int, Float[torch.Tensor, " d_mlp"]] | None = None,
) -> list[Hook]:
    """Hooks that set the neurons of ``rows[b]`` in batch row ``b``, at every position.

    Pass one set (``[neurons]``) to edit every row the same way. Neurons are set to 0, or with
    ``values`` (layer -> a ``d_mlp`` vector, e.g. :func:`mean_activations`) to those values.
    """
    neurons: list[Any] = [tuple(neuron) for row in rows for neuron in row]
    # each neuron checked once: a search's rows repeat the same few
    checked = {key: check_neurons(model, [key])[0] for key in dict.fromkeys(neurons)}
    pairs = torch.tensor([checked[key] for key in neurons], dtype=torch.long).reshape(-1, 2)
    batch = torch.tensor([b for b, row in enumerate(rows) for _ in row], dtype=torch.long)
    hooks = []
    for layer in sorted({layer for layer, _ in checked.values()}):
        d_mlp = model.cfg.d_mlp
        assert d_mlp is not None  # check_neurons above read it as an int
        keep = torch.ones(len(rows), 1, d_mlp)
        here = pairs[:, 0] == layer
        keep[batch[here], 0, pairs[here, 1]] = 0.0
        value = None if values is None else values[layer]
        hooks.append((neuron_hook_name(layer), _edit(keep, value)))
    return hooks


def _edit(keep: torch.Tensor, value: torch.Tensor | None):
    def hook(activation: Float[torch.Tensor, "batch pos d_mlp"], hook) -> torch.Tensor:
        mask = keep.to(activation.device, activation.dtype)
        if mask.shape[0] not in (1, activation.shape[0]):
            raise SinklensError(
                f"the ablation has {mask.shape[0]} rows but the input has {activation.shape[0]}",
                "pass one neuron set per batch row, or a single set for all rows",
            )
        edited = activation * mask
        if value is not None:
            edited = edited + (1 - mask) * value.to(activation.device, activation.dtype)
        return edited

    return hook


def mean_activations(
    model: TransformerBridge, text: Int[torch.Tensor, "batch pos"], layers: Sequence[int]
) -> dict[int, Float[torch.Tensor, " d_mlp"]]:
    """Each neuron's mean activation over natural text, position 0 excluded (for mean-ablation)."""
    names = [neuron_hook_name(check_layer(model, layer)) for layer in layers]
    cache = run_cache(model, text, names)
    return {layer: cache[name][:, 1:].mean(dim=(0, 1)).cpu() for layer, name in zip(layers, names)}
