"""Runs on the nnsight backend: hook names become module sites, hooks become edits inside one trace.

:func:`~sinklens.run.cache.run_cache` and :func:`~sinklens.run.cache.forward` hand a
:class:`~sinklens.load.traced.TracedModel` here. One trace visits the sites the run needs in the order the model
computes them (nnsight requires it), applies each intervention hook to the value there and writes the result
back, keeps each cached value (or what ``reduce`` makes of it) in float32, and stops the model after the last
site, so a run that reads layer 3 computes no further, here or on the server. A shared prefix
(:func:`~sinklens.run.cache.shared_prefix`) is run again with every row (a server keeps no keys and values
between requests); hooks and cached values see only the positions after it, as on the bridge.

Everything the trace body reads travels to the server on a remote run: the plan is plain tuples, the hook
functions are shipped by value (:func:`~sinklens.load.ndif.register_for_remote`), and only the values kept
come back. A hook that reports through Python state (filling a dict of its caller) would do so on the server
only, so readings come back through ``names`` and ``reduce``, never through hooks.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from jaxtyping import Int

from sinklens.errors import SinklensError
from sinklens.load.ndif import register_for_remote, require_nnsight
from sinklens.load.traced import Site, TracedModel, remote_errors, trace_outcome

Reduce = Callable[[str, torch.Tensor], Any]


def is_traced(model: Any) -> TypeGuard[TracedModel]:
    """Whether ``model`` runs on the nnsight backend."""
    return isinstance(model, TracedModel)


def _plan(
    model: TracedModel, reads: Mapping[str, Reduce | None], edits: Sequence[tuple[str, Callable]]
) -> list[tuple]:
    """The trace's steps in the order the model computes their sites: ``(module path, io, [(edit function,
    hook stand-in)], [(hook name, reduce)])``, plain values that travel to a server as they are."""
    steps: dict[tuple[str, str], tuple[Site, list, list]] = {}
    for name, function in edits:
        site = model.site(name)
        if site.io == "weights":
            raise SinklensError(
                f"the nnsight backend reads attention patterns but does not edit them ({name})",
                "edit the attention's output (hook_attn_out) instead, or run it with the "
                "TransformerLens backend",
            )
        # each hook function sees its own hook name, as a TransformerLens hook point gives it
        steps.setdefault((site.path, site.io), (site, [], []))[1].append(
            (function, types.SimpleNamespace(name=name))
        )
    for name, reduce in reads.items():
        site = model.site(name)
        steps.setdefault((site.path, site.io), (site, [], []))[2].append((name, reduce))
    ordered = sorted(steps.values(), key=lambda step: step[0].order)
    if reads:  # edits after the last site read change nothing read: the run stops before them
        last = max(model.site(name).order for name in reads)
        ordered = [step for step in ordered if step[0].order <= last]
    return [(site.path, site.io, fns, kept) for site, fns, kept in ordered]


def traced_run(
    model: TracedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    reads: Mapping[str, Reduce | None],
    edits: Sequence[tuple[str, Callable]] = (),
    prefix: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run ``tokens`` (after ``prefix``, one row of tokens every row continues) with the ``edits`` hooks
    applied, and return each hook of ``reads`` (what its reduce makes of it, or the activation) in float32,
    on the CPU."""
    nnsight = require_nnsight()
    if model.remote is not None:
        register_for_remote()
    start = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        tokens = torch.cat([prefix.cpu().expand(tokens.shape[0], -1), tokens.cpu()], dim=1)
    tokens = tokens.to(
        model.cfg.device
    )  # a remote model's device is the CPU: the ids travel from there
    plan = _plan(model, reads, edits)
    model.use_attention("eager" if any(io == "weights" for _, io, *_ in plan) else "sdpa")
    envoy, backend = model.envoy, model.trace_backend()
    saved: dict[str, Any] = {}
    with remote_errors(model), torch.no_grad():
        with envoy.trace(tokens, backend=backend) as tracer:
            saved = nnsight.save({})
            for path, io, functions, kept in plan:
                module = envoy.get(path)
                whole = module.input if io == "input" else module.output
                value = whole[1 if io == "weights" else 0] if isinstance(whole, tuple) else whole
                axis = 2 if io == "weights" else 1
                part = value.narrow(axis, start, value.shape[axis] - start)
                for function, hook in functions:
                    edited = function(part, hook)
                    part = part if edited is None else edited
                if functions:
                    if start:
                        part = torch.cat([value.narrow(axis, 0, start), part], dim=axis)
                    value = part
                    if io == "input":
                        module.input = value
                    else:
                        module.output = (value, *whole[1:]) if isinstance(whole, tuple) else value
                for name, reduce in kept:
                    found = part if reduce is None else reduce(name, part)
                    if isinstance(found, torch.Tensor):
                        found = found.detach().cpu()
                        found = found.float() if found.is_floating_point() else found
                        if found.untyped_storage().nbytes() > found.nbytes:  # a view: send only it
                            found = found.clone()
                    saved[name] = found
            tracer.stop()
    return trace_outcome(model, backend, saved, f"a run of {tuple(tokens.shape)} tokens")
