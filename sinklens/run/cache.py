"""The one way sinklens runs a model: named hooks only, stopping after the last layer needed.

A 1000-token run that caches every hook point takes gigabytes even on a 135M model, so every
analysis names the hooks it reads. Attention patterns are reduced inside the hook when only a
summary is needed (``reduce``), so the ``[batch, head, query, key]`` tensor is never stored. Many
rows that share a beginning and differ only after it (activation patching at the last position)
compute the beginning once (:func:`shared_prefix`).
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.exceptions import StopAtLayerException

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
    """The block before which a run can stop and still reach every hook in ``names``: one past the
    deepest block they name (``n_layers`` when that is the last block), or None when a name lies
    outside the blocks (the final norm, the unembedding) and the whole model must run."""
    blocks = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    if len(blocks) < len(names):
        return None
    return max(blocks) + 1


_FINAL_NORM_INPUT = "ln_final.hook_in"


def _raise_stop(activation: torch.Tensor, hook) -> None:
    raise StopAtLayerException(activation)


def _stop_at(model: TransformerBridge, stop: int | None) -> tuple[int | None, list[Hook]]:
    """How to run ``model`` no further than block ``stop - 1`` (:func:`stop_layer`; None: the whole model): the
    ``stop_at_layer`` to pass TransformerLens and hooks to add. TransformerLens stops only before a block, so a run
    that needs the last block would go on through the final norm and the unembedding: a vocabulary-sized matmul
    for nothing, and for a model built with its first layers only (``load_model(n_layers=...)``) a head that
    need never be read. A hook on the final norm's input ends such a run there instead."""
    if stop is None or stop < model.cfg.n_layers:
        return stop, []
    return None, ([(_FINAL_NORM_INPUT, _raise_stop)] if _FINAL_NORM_INPUT in model.hook_dict else [])


def forward(model: TransformerBridge, tokens: Int[torch.Tensor, "batch pos"], names: Sequence[str], *,
            hooks: Sequence[Hook] = (), prefix: SharedPrefix | None = None, **kwargs: Any) -> None:
    """The one forward pass every sinklens run makes: ``hooks`` in place, and the run stopped after the deepest
    block that ``names`` need (:func:`stop_layer`). With ``prefix`` (:func:`shared_prefix`) every row of
    ``tokens`` continues it. ``kwargs`` go to the model (``past_key_values``, ``return_type``, ...)."""
    stop = stop_layer(model, names)
    if prefix is not None:
        kwargs["past_key_values"] = _continuing(prefix, tokens.shape[0], stop)
    stop_at, stoppers = _stop_at(model, stop)
    model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[*hooks, *stoppers], stop_at_layer=stop_at, **kwargs)


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values of a prefix that every row of later runs starts with, computed once
    (:func:`shared_prefix`); ``stop`` is the block it stopped before (:func:`stop_layer`; None: it ran whole)."""

    past: Any  # a Hugging Face cache holding each layer's keys and values
    stop: int | None


def shared_prefix(model: TransformerBridge, tokens: Int[torch.Tensor, "1 prefix"], names: Sequence[str]) -> SharedPrefix:
    """Run ``tokens`` once, through the blocks that ``names`` need, keeping their keys and values, so that
    runs of many rows that all start with it (``run_cache(..., prefix=...)``) compute only what follows.
    Hooks and interventions do not touch the prefix: use it where they act on later positions only."""
    from transformers import DynamicCache

    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] < 1:
        raise SinklensError(f"a shared prefix is one row of at least one token, not shape {tuple(tokens.shape)}",
                            "pass tokens[:1, :k]")
    past = DynamicCache(config=model.original_model.config)
    with torch.inference_mode():
        forward(model, tokens, names, past_key_values=past, return_type=None)
    return SharedPrefix(past, stop_layer(model, names))


def _continuing(prefix: SharedPrefix, rows: int, stop: int | None):
    """A copy of the prefix's keys and values for ``rows`` rows of a run stopping before block ``stop`` (it
    appends to it)."""
    if prefix.stop is not None and (stop is None or stop > prefix.stop):
        raise SinklensError("the shared prefix was run through fewer blocks than this run needs",
                            "build it with shared_prefix() from the same hook names")
    past = copy.deepcopy(prefix.past)
    past.batch_repeat_interleave(rows)
    return past


def run_cache(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    *,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    interventions: Sequence[Hook] = (),
    prefix: SharedPrefix | None = None,
) -> ActivationCache:
    """Run ``tokens`` and return an ``ActivationCache`` holding only the hooks in ``names``.

    With ``reduce``, each activation is replaced by ``reduce(name, activation)`` inside the hook
    and only that is stored. ``interventions`` are ``(hook name, hook function)`` pairs that edit
    activations during this run only (see :mod:`sinklens.run.interventions`); cached values are
    read after them. The forward pass stops after the deepest block named.

    With ``prefix`` (:func:`shared_prefix`), every row of ``tokens`` continues that prefix: its keys
    and values are reused instead of recomputed, and the cache's positions (and the positions
    interventions see) start after it. The numbers are those of running ``prefix + tokens`` in full.

    Cached values (and what ``reduce`` returns) are float32 whatever the model's dtype, so every
    statistic and threshold computed from them is float32 too.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        if (m := _BLOCK.match(name)) is not None:
            check_layer(model, int(m.group(1)))
    store: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(activation: torch.Tensor, hook) -> None:
            store[name] = _float32(activation if reduce is None else reduce(name, activation))

        return hook

    with torch.inference_mode():
        forward(model, tokens, names, hooks=[*interventions, *((n, make_hook(n)) for n in names)], prefix=prefix)
    return ActivationCache(store, model)


def _float32(value):
    """Floating-point tensors as float32 (what ``reduce`` returns may also be a tuple of them, or anything else)."""
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
