"""The sink as a patching metric: the sink neurons' activation, summed with the signs they have on the lone
first token (:class:`SinkMetric`); whether the sink depends on the token being first at all
(:func:`first_token_dependence`); and patched runs of one input at the metric's position (:func:`run_rows`, on the engine every patching
study shares, :func:`~sinklens.run.activation_patching.patched_rows`). :mod:`sinklens.analyses.first_token_mark` builds on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge

from sinklens.defaults import MARK_CONTEXTS
from sinklens.errors import SinklensError
from sinklens.run.activation_patching import Patch, patched_rows
from sinklens.run.cache import run_cache
from sinklens.run.interventions import Neuron, check_neurons, neuron_hook_name
from sinklens.run.tokens import encode

N_CONTEXTS = MARK_CONTEXTS
MAX_CONTEXT = 32  # tokens of text before the token in the longest corrupted run


class SinkMetric:
    """The sink neurons' activation, summed with the signs they have on the lone first token."""

    def __init__(self, model: TransformerBridge, first: int, sink_neurons: Sequence[Neuron]):
        by_layer: dict[int, list[int]] = {}
        for layer, index in check_neurons(model, sink_neurons):
            by_layer.setdefault(layer, []).append(index)
        self.neurons = {
            neuron_hook_name(layer): indices for layer, indices in sorted(by_layer.items())
        }
        self.names = list(self.neurons)
        self.layer = max(by_layer)
        lone = run_cache(model, torch.tensor([[first]]), self.names)
        self.signs = {
            name: torch.sign(lone[name][0, 0, idx].cpu()) for name, idx in self.neurons.items()
        }

    def __call__(self, cache, rows: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        total = torch.zeros(len(rows))
        for name, indices in self.neurons.items():
            total += (
                cache[name][list(rows), list(positions)][:, indices].cpu() * self.signs[name]
            ).sum(-1)
        return total

    def at_lone_token(self, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same sum at row 0, position 0, differentiable."""
        total = sum(
            (
                activations[name][0, 0, idx].float() * self.signs[name].to(activations[name].device)
            ).sum()
            for name, idx in self.neurons.items()
        )
        assert isinstance(total, torch.Tensor)  # a sum over at least one neuron
        return total


def first_token_dependence(
    model: TransformerBridge,
    first: int,
    text: str,
    sink_neurons: Sequence[Neuron],
    *,
    n_contexts: int = N_CONTEXTS,
) -> tuple[float, torch.Tensor]:
    """The sink metric on the lone first token, and on it after each context of ``text`` (1 to 32
    tokens): whether the sink depends on the token being first at all."""
    metric = SinkMetric(model, first, sink_neurons)
    lone = run_cache(model, torch.tensor([[first]]), metric.names)
    contexts = mark_contexts(model, text, n_contexts)
    text_ids = encode(model, text)
    later = [
        metric(
            run_cache(model, torch.tensor([[first, *text_ids[:k], first]]), metric.names),
            [0],
            [k + 1],
        )[0]
        for k in contexts
    ]
    return float(metric(lone, [0], [0])[0]), torch.stack(later)


def mark_contexts(model: TransformerBridge, text: str, n_contexts: int) -> list[int]:
    n_text = len(encode(model, text))
    if n_text < n_contexts + 1 or n_contexts < 2:
        raise SinklensError(
            f"the text has {n_text} tokens, too few for {n_contexts} contexts",
            "pass a longer natural text (a few hundred characters) and n_contexts >= 2",
        )
    return sorted({int(k) for k in np.linspace(1, min(MAX_CONTEXT, n_text), n_contexts)})


def run_rows(
    model: TransformerBridge,
    tokens: torch.Tensor,
    row_patches: list[list[Patch]],
    position: int,
    metric: SinkMetric,
) -> torch.Tensor:
    """Run ``tokens`` once per entry of ``row_patches``, each with its patches; the metric at ``position``
    (:func:`~sinklens.run.activation_patching.patched_rows`, every row's beginning computed once, up to the first
    position a patch writes or the metric reads)."""
    start = min([position, *(p.position for r in row_patches for p in r)])

    def measure(cache, offset: int, n_rows: int) -> torch.Tensor:
        return metric(cache, range(n_rows), [position - offset] * n_rows)

    return patched_rows(model, tokens, row_patches, metric.names, measure, shared_until=start)
