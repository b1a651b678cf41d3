"""Activation patching: hooks that overwrite activations at chosen (row, position[, head]) entries.

A patch is a :class:`Site` (a hook name, and a head index for per-head hooks such as
``blocks.L.attn.hook_z``) plus, for each batch row, the position to overwrite and the value to
write there. Many patches of different sites run as one forward pass, one site per batch row;
:func:`patch_hooks` turns them into ``(name, function)`` pairs for :func:`run_cache`.

:func:`activation_gradients` gives the gradient of a scalar metric with respect to named
activations (for attribution patching, the linear approximation used to shortlist neurons
before patching them for real).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge

from sinklens.errors import SinklensError
from sinklens.results import value_type
from sinklens.run.cache import Hook, forward, run_cache, shared_prefix
from sinklens.run.traced_forward import is_traced


@value_type
@dataclass(frozen=True)
class Site:
    """A place to patch: a hook point, and a head for per-head hooks (``attn.hook_z``) or a neuron
    for MLP hooks (``mlp.hook_post``); ``index=None`` patches the whole activation vector."""

    name: str
    index: int | None = None

    @property
    def label(self) -> str:
        parts = self.name.split(".")
        layer = parts[1] if parts[0] == "blocks" else ""
        kind = {
            "hook_attn_out": "attn",
            "hook_mlp_out": "mlp",
            "hook_z": "head",
            "hook_post": "neuron",
            "hook_resid_pre": "resid",
        }.get(parts[-1], parts[-1])
        return f"L{layer} {kind}" + ("" if self.index is None else f" {self.index}")


@dataclass
class Patch:
    """Write ``value`` at ``site`` in batch row ``row``, position ``position``."""

    site: Site
    row: int
    position: int
    value: torch.Tensor


def patch_hooks(patches: Sequence[Patch]) -> list[Hook]:
    """One hook per hook name, writing all of that name's patches at once (into a copy)."""
    groups: dict[tuple[str, bool], list[Patch]] = defaultdict(list)
    for patch in patches:
        groups[(patch.site.name, patch.site.index is None)].append(patch)
    by_name: dict[str, list] = defaultdict(list)
    for (name, whole), group in groups.items():
        rows = torch.tensor([p.row for p in group])
        positions = torch.tensor([p.position for p in group])
        indices = None if whole else torch.tensor([p.site.index for p in group])
        by_name[name].append(
            (rows, positions, indices, torch.stack([p.value.detach().cpu() for p in group]))
        )

    def make(writes):
        def hook(activation: torch.Tensor, hook) -> torch.Tensor:
            activation = activation.clone()
            for rows, positions, indices, values in writes:
                values = values.to(activation.device, activation.dtype)
                if indices is None:
                    activation[rows, positions] = values
                else:
                    activation[rows, positions, indices] = values
            return activation

        return hook

    return [(name, make(writes)) for name, writes in by_name.items()]


TOKENS_PER_BATCH = 8192  # tokens a forward pass holds: rows of one input, each with its own patches


def patched_rows(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "1 pos"],
    row_patches: Sequence[Sequence[Patch]],
    names: Sequence[str],
    measure: Callable[[ActivationCache, int, int], Float[torch.Tensor, " batch"]],
    *,
    shared_until: int = 0,
    progress: bool = False,
    desc: str = "patched runs",
) -> Float[torch.Tensor, " row"]:
    """Run ``tokens`` once per entry of ``row_patches``, each row with its own patches (their ``row`` is
    ignored, their positions are ``tokens``'), many rows a forward pass, and return what ``measure(cache,
    start, n_rows)`` gives for each: ``cache`` holds the hooks ``names`` of a batch of ``n_rows`` rows, its
    positions starting at ``start``. Every activation-patching study of sinklens runs on this: the sweeps of
    :mod:`sinklens.analyses.patching_sweep` and the first-token mark's experiments.

    Every row is the same up to ``shared_until`` (the caller's promise: no patch writes and ``measure`` reads
    nothing before it), so that prefix runs once and each row computes only what follows it: the same numbers,
    far fewer tokens (a patch at the last of 1000 repeats costs one token per row instead of 1000)."""
    start = shared_until
    prefix = shared_prefix(model, tokens[:, :start], list(names)) if start > 0 else None
    rest = tokens[:, start:]
    # sized by the full length: each row holds the prefix's keys and values too
    size = max(1, TOKENS_PER_BATCH // max(tokens.shape[1], 1))
    out = []
    for first in tqdm(range(0, len(row_patches), size), desc=desc, disable=not progress):
        rows = row_patches[first : first + size]
        batch = [
            Patch(p.site, i, p.position - start, p.value) for i, r in enumerate(rows) for p in r
        ]
        cache = run_cache(
            model,
            rest.expand(len(rows), -1),
            names,
            interventions=patch_hooks(batch),
            prefix=prefix,
        )
        out.append(measure(cache, start, len(rows)).float().cpu())
    return torch.cat(out)


def read_site(cache, site: Site, row: int, position: int) -> torch.Tensor:
    """The value at ``site`` in a cache, for one row and position."""
    value = cache[site.name][row, position]
    return value if site.index is None else value[site.index]


def activation_gradients(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    metric: Callable[[dict[str, torch.Tensor]], Float[torch.Tensor, ""]],
    *,
    metric_names: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Gradient of ``metric(activations)`` with respect to each activation in ``names``.

    ``metric`` receives the activations of ``names`` and ``metric_names``. Each activation in
    ``names`` gets a zero-valued leaf added to it, so the gradient is the total one (through
    every later component), whatever the parameters' ``requires_grad``. The run stops after
    the deepest block named.
    """
    if is_traced(model):
        raise SinklensError(
            "gradients need the model here, and the nnsight backend runs without them (NDIF disables them)",
            "run it with the TransformerLens backend (leave out backend='nnsight')",
        )
    store: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def make(name: str, differentiate: bool):
        def hook(activation: torch.Tensor, hook) -> torch.Tensor | None:
            if differentiate:
                deltas[name] = torch.zeros_like(activation, requires_grad=True)
                activation = activation + deltas[name]
            store[name] = activation
            return activation if differentiate else None

        return hook

    hooks = [(n, make(n, True)) for n in names] + [
        (n, make(n, False)) for n in metric_names if n not in names
    ]
    with torch.enable_grad():
        forward(model, tokens, [*names, *metric_names], hooks=hooks)
        value = metric(store)
        grads = torch.autograd.grad(value, [deltas[n] for n in names])
    return {n: g.detach() for n, g in zip(names, grads)}
