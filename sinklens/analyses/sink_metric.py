"""The sink as a patching metric: the sink neurons' activation, summed with the signs they have on the lone
first token (:class:`SinkMetric`); whether the sink depends on the token being first at all
(:func:`first_token_dependence`); and patched runs of one input, many rows a forward pass, that compute their
shared beginning once (:func:`run_rows`). :mod:`sinklens.analyses.first_token_mark` builds on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge

from sinklens.defaults import MARK_CONTEXTS
from sinklens.errors import SinklensError
from sinklens.run.activation_patching import Patch, patch_hooks
from sinklens.run.cache import run_cache, shared_prefix
from sinklens.run.interventions import Neuron, check_neurons, neuron_hook_name
from sinklens.run.tokens import encode

N_CONTEXTS = MARK_CONTEXTS
TOKENS_PER_BATCH = 8192
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


def row_batches(n_rows: int, length: int):
    size = max(1, TOKENS_PER_BATCH // max(length, 1))
    return [range(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def run_rows(
    model, tokens, row_patches: list[list[Patch]], position: int, metric: SinkMetric
) -> torch.Tensor:
    """Run ``tokens`` once per entry of ``row_patches`` (batched), each with its patches; the metric at ``position``.

    Every row is the same up to the first position a patch writes or the metric reads, so that
    prefix runs once and each row computes only what follows it (the same numbers, far fewer tokens:
    a patch at the last of 1000 repeats costs one token per row instead of 1000)."""
    start = min([position, *(p.position for r in row_patches for p in r)])
    prefix = shared_prefix(model, tokens[:, :start], metric.names) if start > 0 else None
    rest = tokens[:, start:]
    out = []
    for rows in row_batches(
        len(row_patches), tokens.shape[1]
    ):  # sized by the full length: each row holds the prefix's keys and values
        batch = [
            Patch(p.site, i, p.position - start, p.value)
            for i, r in enumerate(rows)
            for p in row_patches[r]
        ]
        cache = run_cache(
            model,
            rest.expand(len(rows), -1),
            metric.names,
            interventions=patch_hooks(batch),
            prefix=prefix,
        )
        out.append(metric(cache, range(len(rows)), [position - start] * len(rows)))
    return torch.cat(out)
