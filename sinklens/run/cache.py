"""The one way sinklens runs a model: named hooks only, stopping after the last layer needed.

A 1000-token run that caches every hook point takes gigabytes even on a 135M model, so every
analysis names the hooks it reads. Attention patterns are reduced inside the hook when only a
summary is needed (``reduce``), so the ``[batch, head, query, key]`` tensor is never stored.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Int
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge

from sinklens.errors import SinklensError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
Hook = tuple[str, Callable]
"""A ``(hook name, hook function)`` pair, as ``model.hooks(fwd_hooks=...)`` takes them."""


def as_index(value, what: str) -> int:
    """``value`` as a Python int (numpy and torch integers welcome), or one clear error."""
    try:
        return operator.index(value)
    except TypeError:
        raise SinklensError(f"{what} {value!r} is not an integer", f"pass the {what} as a whole number") from None


def check_layer(model: TransformerBridge, layer: int) -> int:
    """Raise if ``layer`` is not a 0-based block index of ``model``."""
    n_layers = model.cfg.n_layers
    layer = as_index(layer, "layer")
    if not 0 <= layer < n_layers:
        raise SinklensError(
            f"layer {layer} is out of range: {model.cfg.model_name} has layers 0..{n_layers - 1}",
            "pass a 0-based layer index below n_layers",
        )
    return layer


def stop_layer(model: TransformerBridge, names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every block ``names`` refer to (None: run them all)."""
    blocks = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    if len(blocks) < len(names):
        return None
    last = max(blocks) + 1
    return None if last >= model.cfg.n_layers else last


def run_cache(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    *,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    interventions: Sequence[Hook] = (),
) -> ActivationCache:
    """Run ``tokens`` and return an ``ActivationCache`` holding only the hooks in ``names``.

    With ``reduce``, each activation is replaced by ``reduce(name, activation)`` inside the hook
    and only that is stored. ``interventions`` are ``(hook name, hook function)`` pairs that edit
    activations during this run only (see :mod:`sinklens.run.interventions`); cached values are
    read after them. The forward pass stops after the deepest block named.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        if (m := _BLOCK.match(name)) is not None:
            check_layer(model, int(m.group(1)))
    tokens = tokens.to(model.cfg.device)
    stop = stop_layer(model, names)
    with torch.inference_mode(), model.hooks(fwd_hooks=list(interventions)):
        if reduce is None:
            _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop)
            return cache
        store: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(activation: torch.Tensor, hook) -> None:
                store[name] = reduce(name, activation)

            return hook

        model.run_with_hooks(tokens, fwd_hooks=[(n, make_hook(n)) for n in names], stop_at_layer=stop)
    return ActivationCache(store, model)
