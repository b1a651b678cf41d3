"""Fused attention under the bridge's hooks: PyTorch's ``scaled_dot_product_attention`` whenever a
forward pass reads no attention internals, TransformerLens' step-by-step attention when it does.

TransformerLens 4.3 reimplements attention in Python for every rotary architecture (Llama, Mistral,
Qwen, Gemma, ...) so that ``hook_attn_scores`` and ``hook_pattern`` can fire: it materialises the
``[batch, head, query, key]`` scores and an fp32 softmax on every layer, about twice the time of a
plain Hugging Face forward on a 1000-token run. Most sinklens runs read residual norms and MLP
neurons and never look at a pattern, so they pay for nothing.

:func:`use_fused_attention` gives each attention component a switch, decided afresh on every
forward pass and per layer:

* **fused**: no hook is attached to any of the layer's attention-internal hook points (scores,
  pattern, rotated queries and keys, normed queries and keys, rotary cos/sin, per-head results,
  split inputs). The wrapped Hugging Face attention module runs with its SDPA implementation
  (grouped-query attention, sliding windows and padding masks as the architecture defines them).
  Its projections are the bridge's own components, so ``hook_q``, ``hook_k``, ``hook_v`` and
  ``hook_z`` fire, and edits there (patching a head's ``hook_z``, say) still change the output;
  ``hook_in`` and ``hook_out`` fire around it as before.
* **eager**: a hook on any of those points (``run_cache(..., ["blocks.3.attn.hook_pattern"])``),
  training mode, or one of the bridge's per-head switches (``set_use_attn_result`` and
  friends) runs TransformerLens' own attention for that layer, exactly as without sinklens.

Both compute the same function: on every architecture the test suite builds, cached activations
agree to float32 rounding (relative difference below 1e-5). Layers whose Hugging Face attention has
no SDPA form (logit soft-capping as in Gemma-2, learned sink logits as in GPT-OSS) and attention
components other than TransformerLens' rotary one (GPT-2's joint QKV, say) always run eager.
``model.blocks[i].attn.sinklens_path`` records which path a layer took last. A fused layer returns
no attention weights to Hugging Face's ``output_attentions``: read patterns through ``hook_pattern``.

A fused layer can still report the weights every query pays to a few chosen keys (:func:`key_weights`):
the kernel runs a second time with the values replaced by one indicator column per chosen key, so its
output *is* those weights, exactly, without the ``[query, key]`` matrix ever being formed. The attention
paid to the first token, or to a handful of sinks, then costs one more fused kernel per layer instead of
step-by-step attention everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)

AttentionPath = Literal["fused", "eager"]
_AROUND = ("hook_in", "hook_out")  # fire on both paths
_PER_HEAD_SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_attn_in")


class FusedPositionEmbeddingsAttentionBridge(PositionEmbeddingsAttentionBridge):
    """TransformerLens' rotary attention component, run fused (SDPA) while its internals are unobserved."""

    sinklens_path: AttentionPath | None = None
    sinklens_key_weights: KeyWeights | None = None  # set by key_weights()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the wrapped Hugging Face attention, set when TransformerLens built the bridge (Any: its
        # layer_idx is a plain attribute that nn.Module.__getattr__ would type as Tensor | Module)
        hf_attention: Any = self.original_component
        if self._internals_observed():
            self.sinklens_path = "eager"
            request = self.sinklens_key_weights
            with (
                nullcontext()
                if request is None
                else _reading_pattern(self, request, hf_attention.layer_idx)
            ):
                return super().forward(*args, **kwargs)
        self.sinklens_path = "fused"
        if "hidden_states" in kwargs:
            hidden_states = kwargs.pop("hidden_states")
        else:
            hidden_states, args = args[0], args[1:]
        request = self.sinklens_key_weights
        with nullcontext() if request is None else _reporting(request, hf_attention.layer_idx):
            output, weights = type(hf_attention).forward(
                hf_attention, self.hook_in(hidden_states), *args, **kwargs
            )
        return self.hook_out(output), weights

    def _internals_observed(self) -> bool:
        if self.training:
            return True
        if any(getattr(self.config, switch, False) for switch in _PER_HEAD_SWITCHES):
            return True
        return any(
            hook._forward_hooks or hook._forward_pre_hooks for hook in self._internal_hook_points()
        )

    def _internal_hook_points(self) -> list[HookPoint]:
        return [
            m
            for name, m in self.named_children()
            if isinstance(m, HookPoint) and name not in _AROUND
        ]


@dataclass
class KeyWeights:
    """A request for the attention weights every query pays to chosen key positions, per fused layer.

    ``keys(layer)`` gives the key positions for a layer (None or empty: none); it is asked when the layer
    runs, so it may depend on what earlier layers' hooks saw in the same forward pass. ``found[layer]`` is
    then ``[batch, head, query, len(keys)]`` (float32): the weight each query of each head pays to each key
    (0 where the mask hides it), and ``asked[layer]`` the positions."""

    keys: Callable[[int], torch.Tensor | None]
    found: dict[int, torch.Tensor] = field(default_factory=dict)
    asked: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def key_weights(
    model: TransformerBridge, keys: Callable[[int], torch.Tensor | None]
) -> Iterator[KeyWeights]:
    """While open, every attention layer also measures the weights its queries pay to ``keys(layer)`` (see
    :class:`KeyWeights`): a fused layer with one more kernel on indicator values, a layer that runs step by step
    (its pattern is read, or it has no fused form) from its ``hook_pattern``."""
    request = KeyWeights(keys)
    fused = [m for m in model.modules() if isinstance(m, FusedPositionEmbeddingsAttentionBridge)]
    others = [
        (layer, block.attn)
        for layer, block in enumerate(model.blocks)
        if block.attn not in fused and hasattr(block.attn, "hook_pattern")
    ]
    for module in fused:
        module.sinklens_key_weights = request
    with ExitStack() as readers:
        for layer, module in others:
            readers.enter_context(_reading_pattern(module, request, layer))
        try:
            yield request
        finally:
            for module in fused:
                module.sinklens_key_weights = None


@contextmanager
def _reading_pattern(module: Any, request: KeyWeights, layer: int) -> Iterator[None]:
    """Answer ``request`` for ``layer`` from the pattern ``module`` forms on its step-by-step path."""

    def read(hook_point, args, pattern: torch.Tensor) -> None:
        keys = request.keys(layer)
        if keys is not None and len(keys):
            request.found[layer] = pattern[..., keys.to(pattern.device)].float()
            request.asked[layer] = keys

    handle = module.hook_pattern.register_forward_hook(read)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _reporting(request: KeyWeights, layer: int) -> Iterator[None]:
    """Run one Hugging Face attention call with its SDPA function answering ``request`` for ``layer`` too: the
    kernel runs again on indicator values, one column per asked key (chunks of the head size)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    keys = request.keys(layer)
    if keys is None or len(keys) == 0:
        yield
        return
    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    overridden = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping

    def sdpa_reporting(module, query, key, value, attention_mask, **kwargs):
        output = plain(module, query, key, value, attention_mask, **kwargs)
        positions = keys.to(value.device)
        width = value.shape[-1]
        parts = []
        for start in range(0, len(positions), width):
            chunk = positions[start : start + width]
            indicator = torch.zeros_like(value)
            indicator[:, :, chunk, torch.arange(len(chunk), device=value.device)] = 1.0
            weights, _ = plain(
                module, query, key, indicator, attention_mask, **kwargs
            )  # [batch, query, head, width]
            parts.append(weights[..., : len(chunk)])
        request.found[layer] = torch.cat(parts, dim=-1).transpose(1, 2).float()
        request.asked[layer] = positions
        return output

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_reporting
    try:
        yield
    finally:
        if overridden:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = plain
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


def _has_sdpa_form(hf_attention: Any) -> bool:
    config = getattr(hf_attention, "config", None)
    softcap = getattr(hf_attention, "attn_logit_softcapping", None) or getattr(
        config, "attn_logit_softcapping", None
    )
    return softcap is None and getattr(hf_attention, "sinks", None) is None


def use_fused_attention(model: TransformerBridge, enabled: bool = True) -> int:
    """Switch ``model``'s attention layers to fused-when-unobserved (or back to always eager) and
    return how many layers can take the fused path. :func:`sinklens.load_model` calls it."""
    fused = FusedPositionEmbeddingsAttentionBridge
    layers = [
        m
        for m in model.modules()
        if type(m) in (PositionEmbeddingsAttentionBridge, fused)
        and _has_sdpa_form(m.original_component)
    ]
    enabled = enabled and bool(layers) and _set_implementation(model.original_model, "sdpa")
    if not enabled:
        _set_implementation(model.original_model, "eager")  # as TransformerLens boots it
    for layer in layers:
        layer.__class__ = fused if enabled else PositionEmbeddingsAttentionBridge
    return len(layers) if enabled else 0


def _set_implementation(hf_model: Any, implementation: str) -> bool:
    """Which masks Hugging Face builds follows the implementation: none where causality suffices (so
    SDPA takes its causal kernel), boolean otherwise. The eager path accepts both."""
    try:
        hf_model.set_attn_implementation(implementation)
    except (ValueError, ImportError):  # the architecture has no such implementation
        return False
    return True
