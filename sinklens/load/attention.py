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
"""

from __future__ import annotations

from typing import Any, Literal

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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._internals_observed():
            self.sinklens_path = "eager"
            return super().forward(*args, **kwargs)
        self.sinklens_path = "fused"
        if "hidden_states" in kwargs:
            hidden_states = kwargs.pop("hidden_states")
        else:
            hidden_states, args = args[0], args[1:]
        hf_attention = self.original_component
        output, weights = type(hf_attention).forward(hf_attention, self.hook_in(hidden_states), *args, **kwargs)
        return self.hook_out(output), weights

    def _internals_observed(self) -> bool:
        if self.training:
            return True
        if any(getattr(self.config, switch, False) for switch in _PER_HEAD_SWITCHES):
            return True
        return any(hook._forward_hooks or hook._forward_pre_hooks for hook in self._internal_hook_points())

    def _internal_hook_points(self) -> list[HookPoint]:
        return [m for name, m in self.named_children() if isinstance(m, HookPoint) and name not in _AROUND]


def _has_sdpa_form(hf_attention: Any) -> bool:
    config = getattr(hf_attention, "config", None)
    softcap = getattr(hf_attention, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    return softcap is None and getattr(hf_attention, "sinks", None) is None


def use_fused_attention(model: TransformerBridge, enabled: bool = True) -> int:
    """Switch ``model``'s attention layers to fused-when-unobserved (or back to always eager) and
    return how many layers can take the fused path. :func:`sinklens.load_model` calls it."""
    fused = FusedPositionEmbeddingsAttentionBridge
    layers = [m for m in model.modules() if type(m) in (PositionEmbeddingsAttentionBridge, fused)
              and _has_sdpa_form(m.original_component)]
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
