"""What MLP neurons write into the residual stream, and which of them write a position's norm.

The sink-neuron rule of :func:`~sinklens.analyses.sink_neurons.find_sink_neurons` ranks neurons by the norm of
what each writes (its activation times its ``W_out`` row, times the post-MLP norm's scale where the model has
one: :func:`write_scales`) and keeps the shortest prefix of the ranking whose zero-ablation removes a share of
the excess norm (:func:`removed_shares`). :func:`neurons_writing` applies that rule at any position (the sink
census uses it for every sink it finds); :func:`super_weights` cross-checks the candidates against the largest
``W_out`` entries (Yu et al. 2024).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.run.cache import SharedPrefix, act_name, run_cache, shared_prefix
from sinklens.run.interventions import Neuron, ablation_hooks, neuron_hook_name
from sinklens.settings import MAX_NEURONS, REMOVED_SHARE


def removed_shares(
    norms: torch.Tensor, intact: torch.Tensor | float, typical: float
) -> torch.Tensor:
    """Share of the excess norm (intact minus typical) that each ablated norm removes; 0 without an excess."""
    excess = float(intact) - typical
    return (intact - norms) / excess if excess > 0 else torch.zeros_like(norms)


def ranking_scores(
    criterion: str, paper: torch.Tensor, direct: torch.Tensor, notebook: torch.Tensor | None
):
    """The scores the ranking sorts: the notebook's, the paper's (one layer) or the direct contributions."""
    if criterion == "notebook":
        assert (
            notebook is not None
        )  # check_criterion allows "notebook" only where they are computed
        return notebook[None]
    return paper if paper.shape[0] == 1 else direct


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``scores``, best first; ties keep index order."""
    return scores.flatten().argsort(descending=True, stable=True)


def neurons_writing(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "1 pos"],
    position: int,
    layer: int,
    *,
    typical: float,
    share: float = REMOVED_SHARE,
    max_neurons: int = MAX_NEURONS,
    prefix: SharedPrefix | None = None,
) -> list[Neuron]:
    """The MLP neurons of ``layer`` that write the norm of token ``position`` of ``tokens``: the sink-neuron rule of
    :func:`find_sink_neurons` for any position. Neurons are ranked by the paper's criterion at that position (the
    norm of what each writes into the residual stream); the answer is the shortest prefix of the ranking whose
    zero-ablation there removes ``share`` of the position's excess norm over ``typical`` at the layer's output
    (empty when none does, or when there is no excess). ``prefix``: the keys and values of ``tokens[:, :position]``
    (:func:`~sinklens.run.cache.shared_prefix`, or a model cache cropped to it), so each ablation runs one token."""
    names = [neuron_hook_name(layer), act_name("resid_post", layer)]
    if hasattr(model.blocks[layer], "ln2_post"):
        names += [act_name(side, layer, "ln2_post") for side in ("in", "out")]
    here = tokens[:, position : position + 1]
    cache = (
        run_cache(model, here, names, prefix=prefix)
        if prefix is not None or position == 0
        else run_cache(model, tokens[:, : position + 1], names)
    )
    at = 0 if prefix is not None or position == 0 else position
    w_out = (
        model.blocks[layer].mlp.W_out.detach().float().cpu()
        * write_scales(cache, [layer], model, at)[0]
    )
    scores = cache[neuron_hook_name(layer)][0, at].cpu().abs() * w_out.norm(dim=-1)
    candidates = [(layer, int(n)) for n in ranked(scores[None])[:max_neurons]]
    rows = [candidates[:k] for k in range(len(candidates) + 1)]
    name = act_name("resid_post", layer)
    if prefix is None and position > 0:
        prefix = shared_prefix(model, tokens[:, :position], [name])
    norms = (
        run_cache(
            model,
            here.expand(len(rows), 1),
            [name],
            interventions=ablation_hooks(model, rows),
            prefix=prefix,
        )[name][:, 0]
        .norm(dim=-1)
        .cpu()
    )
    removed = removed_shares(norms, norms[0], typical)
    passing = (removed[1:] >= share).nonzero().flatten()
    return candidates[: int(passing[0]) + 1] if len(passing) and norms[0] > typical else []


def write_scales(
    cache, layers: list[int], model: TransformerBridge, position: int = 0
) -> list[torch.Tensor]:
    """Per layer, the factor (per residual dimension) between the MLP's raw output and what it adds
    to the residual stream at ``position``: 1 without a post-MLP norm, ``w / rms`` with one (Gemma's ``ln2_post``)."""
    scales = []
    for layer in layers:
        if act_name("in", layer, "ln2_post") in cache:
            raw = cache[act_name("in", layer, "ln2_post")][0, position]
            normed = cache[act_name("out", layer, "ln2_post")][0, position]
            scales.append(torch.where(raw != 0, normed / raw, torch.zeros_like(raw)).cpu())
        else:
            scales.append(torch.ones(model.cfg.d_model))
    return scales


def lower_median(values: torch.Tensor) -> torch.Tensor:
    """The lower median of each column (``values.median(dim=0)``, exactly). On the CPU numpy's
    partition selects it faster than torch's median (one thread, 11,008 neurons over 999 tokens:
    0.12 s against 0.21 s; 176 neurons: 1.5 ms against 4.1 ms); elsewhere torch's own."""
    if values.device.type != "cpu":
        return values.median(dim=0).values.cpu()
    k = (values.shape[0] - 1) // 2
    return torch.from_numpy(np.partition(values.numpy(), k, axis=0)[k].copy())


ENTRIES_AT_ONCE = 2**24  # W_out entries ranked in one step (super weights)


def super_weights(
    w_outs: dict[int, torch.Tensor], candidates: list[Neuron]
) -> tuple[list[int], list[float], list[int]]:
    """For each candidate, its ``W_out`` row's largest entry (a super weight, Yu et al. 2024): the
    residual dimension, the value, and its rank by size among all of the layer's ``W_out`` entries
    (1: the largest).

    The ranks come from one pass over each layer's entries on its own device: each entry is placed
    among the candidates' sorted sizes (``searchsorted``), and the counts above each size are a
    suffix sum of that histogram, exact integers, instead of one comparison of the whole matrix per
    candidate."""
    dims, values, ranks = [0] * len(candidates), [0.0] * len(candidates), [0] * len(candidates)
    for layer, w_out in w_outs.items():
        at = [i for i, (l, _) in enumerate(candidates) if l == layer]
        if not at:
            continue
        rows = w_out[[candidates[i][1] for i in at]]
        dim = rows.abs().argmax(dim=-1)
        value = rows.gather(1, dim[:, None])[:, 0]
        sizes = value.abs().sort()
        entries = w_out.abs().flatten()
        histogram = sum(
            torch.bincount(torch.searchsorted(sizes.values, chunk), minlength=len(at) + 1)
            for chunk in entries.split(ENTRIES_AT_ONCE)
        )
        assert isinstance(histogram, torch.Tensor)  # a sum over at least one chunk
        above = histogram.flip(0).cumsum(0).flip(0)[1:]  # per sorted size: the entries above it
        larger = torch.empty_like(above)
        larger[sizes.indices] = above
        for i, d, v, r in zip(at, dim.tolist(), value.tolist(), larger.tolist()):
            dims[i], values[i], ranks[i] = d, v, r + 1
    return dims, values, ranks
