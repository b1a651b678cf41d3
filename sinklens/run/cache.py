"""The one way sinklens runs a model: named hooks only, stopping after the last layer needed.

A 1000-token run that caches every hook point takes gigabytes even on a 135M model, so every
analysis names the hooks it reads. Attention patterns are reduced inside the hook when only a
summary is needed (``reduce``), so the ``[batch, head, query, key]`` tensor is never stored. Many
rows that share a beginning and differ only after it (activation patching at the last position)
compute the beginning once (:func:`shared_prefix`).

Every run goes through :func:`forward`, which attaches its hooks straight to the model's hook
points, found through a table built once per model (:func:`hook_points`): TransformerLens'
``run_with_hooks`` rebuilds its hook dictionary and alias map on every call, about 1.7 ms a call,
more than the rest of a Table-1 row's bookkeeping together (``bench/bench_overhead.py``). A name the
table does not hold, a hook that TransformerLens gates off, or a model in compatibility mode goes
through ``run_with_hooks`` as before, with its errors.
"""

from __future__ import annotations

import copy
import functools
import operator
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map
from transformer_lens.model_bridge.exceptions import StopAtLayerException
from transformer_lens.model_bridge.generalized_components.base import alias_generation
from transformer_lens.utilities import get_act_name

from sinklens.errors import SinklensError
from sinklens.run.traced_forward import is_traced, traced_run

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
Hook = tuple[str, Callable]
"""A ``(hook name, hook function)`` pair, as ``model.hooks(fwd_hooks=...)`` takes them."""


@functools.lru_cache(maxsize=4096)
def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' ``get_act_name`` (``act_name("resid_post", 3)`` is
    ``blocks.3.hook_resid_post``), remembered: it parses its arguments afresh on every call, about 8
    microseconds, and a study names the same few dozen hooks in every forward pass."""
    return get_act_name(name, layer, layer_type)


def as_index(value, what: str) -> int:
    """``value`` as a Python int (numpy and torch integers welcome), or one clear error."""
    try:
        return operator.index(value)
    except TypeError:
        raise SinklensError(
            f"{what} {value!r} is not an integer", f"pass the {what} as a whole number"
        ) from None


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


_POINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_points(model: TransformerBridge) -> dict[str, HookPoint]:
    """Every hook name of ``model`` (aliases included) and the hook point it names, as
    ``model.hook_dict`` resolves them, built once per model and rebuilt when its hook registry
    changes."""
    registry = model._hook_registry
    key = (id(registry), len(registry), alias_generation())
    cached = _POINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    hook_dict = model.hook_dict
    aliases = build_alias_to_canonical_map(hook_dict)
    points = {name: point for name, point in hook_dict.items() if isinstance(point, HookPoint)}
    points |= {alias: points[canon] for alias, canon in aliases.items() if canon in points}
    driver = getattr(model, "_driver", None)
    blocked: frozenset = getattr(driver, "non_fireable_hook_points", frozenset())
    points = {
        name: point
        for name, point in points.items()
        if name not in blocked and (point.name or name) not in blocked
    }
    _POINTS[model] = (key, points)
    return points


def _stop_at(model: TransformerBridge, stop: int | None) -> tuple[int | None, list[Hook]]:
    """How to run ``model`` no further than block ``stop - 1`` (:func:`stop_layer`; None: the whole model): the
    ``stop_at_layer`` to pass TransformerLens and hooks to add.

    A hook on block ``stop``'s input ends the run there, as ``stop_at_layer`` would, without
    TransformerLens arming and disarming a flag on every block around each run (about 0.2 ms a run).
    TransformerLens stops only before a block, so a run that needs the last block would go on
    through the final norm and the unembedding: a vocabulary-sized matmul for nothing, and for a
    model built with its first layers only (``load_model(n_layers=...)``) a head that need never be
    read. A hook on the final norm's input ends such a run there instead."""
    if stop is None:
        return None, []
    name = f"blocks.{stop}.hook_in" if stop < model.cfg.n_layers else _FINAL_NORM_INPUT
    if name in hook_points(model):
        return None, [(name, _raise_stop)]
    return (stop, []) if stop < model.cfg.n_layers else (None, [])


def _reached(name, stop: int | None) -> bool:
    """Whether a run stopping before block ``stop`` reaches the hook point ``name``
    (``run_with_hooks`` leaves a hook on a later block off, and so does :func:`forward`)."""
    block = _BLOCK.match(name) if isinstance(name, str) else None
    return stop is None or block is None or int(block.group(1)) < stop


def _lean_hooks(
    model: TransformerBridge, hooks: Sequence[Hook]
) -> list[tuple[HookPoint, Callable]] | None:
    """``hooks`` as ``(hook point, function)`` pairs to attach, or None where one of them is not for
    the lean path (see the module's docstring)."""
    if getattr(model, "compatibility_mode", False):
        return None
    points = hook_points(model)
    found = []
    for name, function in hooks:
        point = points.get(name) if isinstance(name, str) else None
        if point is None:
            return None
        if model._gated_hook_reason(point.name or name):
            return None
        found.append((point, function))
    return found


def forward(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    *,
    hooks: Sequence[Hook] = (),
    prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> None:
    """The one forward pass every sinklens run makes: ``hooks`` in place, and the run stopped after
    the deepest block that ``names`` need (:func:`stop_layer`). With ``prefix``
    (:func:`shared_prefix`) every row of ``tokens`` continues it. ``kwargs`` go to the model
    (``past_key_values``, ``return_type``, ...). A GPU that runs out of memory is one
    :class:`~sinklens.errors.SinklensError` naming the model's size, the free memory and the
    fixes."""
    if is_traced(model):  # the nnsight backend: hooks become edits in a trace (run.traced_forward)
        if set(kwargs) - {"return_type"}:
            raise SinklensError(
                f"the nnsight backend runs tokens only, not {', '.join(sorted(kwargs))}",
                "pass a shared_prefix() as prefix, or run it with the TransformerLens backend",
            )
        if hooks and model.remote is not None:
            raise SinklensError(
                f"forward() hooks on {model.cfg.model_name} would run on the server, and what they record "
                "there never comes back",
                "read activations with run_cache(names, reduce=...) and edit them with its interventions",
            )
        traced_run(model, tokens, {}, hooks, None if prefix is None else prefix.tokens)
        return
    stop = stop_layer(model, names)
    if prefix is not None:
        kwargs["past_key_values"] = _continuing(prefix, tokens.shape[0], stop)
    stop_at, stoppers = _stop_at(model, stop)
    hooks = [(name, function) for name, function in hooks if _reached(name, stop)] + stoppers
    fwd_hooks: list[Any] = list(hooks)
    tokens = tokens.to(model.cfg.device)
    try:
        lean = _lean_hooks(model, hooks)
        if lean is None:
            model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop_at, **kwargs)
            return
        attached = []
        try:
            for point, function in lean:  # TransformerLens' own hooks, which its components consult
                attached.append((point, point.add_hook(function, dir="fwd")))
            model.forward(tokens, stop_at_layer=stop_at, **kwargs)
        except StopAtLayerException:
            pass  # TransformerLens catches it inside the model; this is in case a version does not
        finally:
            for point, handle in attached:
                handle.hook.remove()
                point.fwd_hooks[:] = [kept for kept in point.fwd_hooks if kept is not handle]
    except torch.OutOfMemoryError as exc:
        from sinklens.load.device_memory import out_of_memory

        what = f"running a forward pass of {tokens.shape[0]} x {tokens.shape[1]} tokens"
        raise out_of_memory(model, what) from exc


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values of a prefix that every row of later runs starts with, computed once
    (:func:`shared_prefix`); ``stop`` is the block it stopped before (:func:`stop_layer`; None: it ran whole).
    On the nnsight backend only its ``tokens`` are kept: each run computes them again (a server keeps no
    keys and values between requests)."""

    past: Any  # a Hugging Face cache holding each layer's keys and values
    stop: int | None
    tokens: torch.Tensor | None = None


def shared_prefix(
    model: TransformerBridge, tokens: Int[torch.Tensor, "1 prefix"], names: Sequence[str]
) -> SharedPrefix:
    """Run ``tokens`` once, through the blocks that ``names`` need, keeping their keys and values, so that
    runs of many rows that all start with it (``run_cache(..., prefix=...)``) compute only what follows.
    Hooks and interventions do not touch the prefix: use it where they act on later positions only."""
    from transformers import DynamicCache

    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] < 1:
        raise SinklensError(
            f"a shared prefix is one row of at least one token, not shape {tuple(tokens.shape)}",
            "pass tokens[:1, :k]",
        )
    stop = stop_layer(model, names)
    if is_traced(model):
        return SharedPrefix(None, stop, tokens.cpu())
    # TransformerLens types original_model as nn.Module, so its .config reads as Tensor | Module
    past = DynamicCache(config=model.original_model.config)  # type: ignore[arg-type]
    with torch.inference_mode():
        forward(model, tokens, names, past_key_values=past, return_type=None)
    return SharedPrefix(past, stop)


def _continuing(prefix: SharedPrefix, rows: int, stop: int | None):
    """A copy of the prefix's keys and values for ``rows`` rows of a run stopping before block ``stop`` (it
    appends to it)."""
    if prefix.stop is not None and (stop is None or stop > prefix.stop):
        raise SinklensError(
            "the shared prefix was run through fewer blocks than this run needs",
            "build it with shared_prefix() from the same hook names",
        )
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
    if is_traced(model):
        reads = {name: reduce for name in names}
        found = traced_run(
            model, tokens, reads, interventions, None if prefix is None else prefix.tokens
        )
        return ActivationCache(found, model)
    store: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(activation: torch.Tensor, hook) -> None:
            store[name] = _float32(activation if reduce is None else reduce(name, activation))

        return hook

    with torch.inference_mode():
        forward(
            model,
            tokens,
            names,
            hooks=[*interventions, *((n, make_hook(n)) for n in names)],
            prefix=prefix,
        )
    return ActivationCache(store, model)


def l2_norms(name: str, activation: torch.Tensor) -> torch.Tensor:
    """A ``reduce`` for :func:`run_cache`: each position's L2 norm in float32, what
    ``cache[name].norm(dim=-1)`` gives, computed as the hook fires, so the activations themselves
    are never stored."""
    return torch.linalg.vector_norm(activation.float(), dim=-1)


def _float32(value):
    """Floating-point tensors as float32 (what ``reduce`` returns may also be a tuple of them, or anything else)."""
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
