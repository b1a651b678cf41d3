"""The fused attention path gives the eager path's numbers, and steps aside whenever a run reads attention
internals: on a tiny model of each architecture, with sliding windows, grouped-query attention, biases
and query/key norms among them."""

from __future__ import annotations

import pytest
import torch

import sinklens as sl
from conftest import save_arch
from sinklens.load.fused_attention import use_fused_attention
from sinklens.run.interventions import ablation_hooks

N_LAYERS = 3


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gemma3", "gpt2"])
def arch_model(request, tmp_path_factory):
    path = save_arch(tmp_path_factory.mktemp(request.param), request.param, N_LAYERS)
    return request.param, sl.load_model(str(path), device="cpu")


def _tokens(model, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, length), generator=generator)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


NAMES = [
    f"blocks.{layer}.{hook}"
    for layer in range(N_LAYERS)
    for hook in ("hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_post", "attn.hook_z")
]


def _paths(model) -> list[str | None]:
    return [
        block.attn.sinklens_path if hasattr(block.attn, "sinklens_path") else "eager"
        for block in model.blocks
    ]


def _max_relative_difference(a, b, names) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in names)


def _both_paths(model, run):
    """``run()`` on the eager path, then on the fused path (what loading installs)."""
    try:
        use_fused_attention(model, False)
        eager = run()
    finally:
        fused_layers = use_fused_attention(model, True)
    return eager, run(), fused_layers


def test_fused_path_matches_eager(arch_model):
    architecture, model = arch_model
    tokens = _tokens(model, 24)  # longer than the sliding windows
    eager, fused, fused_layers = _both_paths(model, lambda: sl.run_cache(model, tokens, NAMES))
    if architecture == "gpt2":  # joint-QKV attention has no fused path: it always runs eager
        assert fused_layers == 0 and _max_relative_difference(fused, eager, NAMES) == 0.0
        return
    assert fused_layers == N_LAYERS and _paths(model) == ["fused"] * N_LAYERS
    assert _max_relative_difference(fused, eager, NAMES) <= 1e-5


def test_reading_a_pattern_takes_the_eager_path_on_that_layer_only(arch_model):
    architecture, model = arch_model
    tokens = _tokens(model)
    names = NAMES + ["blocks.1.attn.hook_pattern"]
    eager, fused, _ = _both_paths(model, lambda: sl.run_cache(model, tokens, names))
    expected = ["eager"] * N_LAYERS if architecture == "gpt2" else ["fused", "eager", "fused"]
    assert _paths(model) == expected
    assert _max_relative_difference(fused, eager, [*NAMES, "blocks.1.attn.hook_pattern"]) <= 1e-5
    reduced = sl.run_cache(
        model, tokens, ["blocks.2.attn.hook_attn_scores"], reduce=lambda name, a: a.amax(-1)
    )
    assert _paths(model)[2] == "eager" and reduced["blocks.2.attn.hook_attn_scores"].shape == (
        2,
        4,
        tokens.shape[1],
    )


def test_interventions_apply_on_the_fused_path(arch_model):
    """Zeroing a head's ``hook_z`` and ablating a neuron change the fused output as they change the eager one."""
    _, model = arch_model
    tokens = _tokens(model)

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    edits = [("blocks.0.attn.hook_z", zero_head), *ablation_hooks(model, [[(1, 3)]])]
    names = [f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    eager, fused, _ = _both_paths(
        model, lambda: sl.run_cache(model, tokens, names, interventions=edits)
    )
    clean = sl.run_cache(model, tokens, names)
    assert _max_relative_difference(fused, eager, names) <= 1e-5
    assert _max_relative_difference(fused, clean, names) > 1e-3  # the edits did something


def test_padded_batches_are_masked_the_same_way(arch_model):
    _, model = arch_model
    tokens = _tokens(model)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0  # left padding in the second row

    def logits():
        with torch.inference_mode():
            return model(tokens, attention_mask=mask)[mask.bool()]

    eager, fused, _ = _both_paths(model, logits)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_generation_is_unchanged(arch_model):
    _, model = arch_model
    prompt = _tokens(model, 6)[:1]

    def generate():
        return model.generate(
            prompt, max_new_tokens=8, do_sample=False, verbose=False, use_past_kv_cache=True
        )

    eager, fused, _ = _both_paths(model, generate)
    assert torch.equal(eager, fused)


def test_sink_layer_and_neurons_are_the_same_on_both_paths(tiny):
    reference = sl.text_tokens(tiny, "First Citizen: Before we proceed any further, hear me speak.")

    def find():
        sink = sl.find_sink_layer(tiny, reference=reference)
        neurons = sl.find_sink_neurons(tiny, reference, sink=sink, notebook_repeats=30)
        return sink, neurons

    (eager_sink, eager_neurons), (fused_sink, fused_neurons), _ = _both_paths(tiny, find)
    assert fused_sink.sink_layer == eager_sink.sink_layer
    assert fused_neurons.sink_neurons == eager_neurons.sink_neurons
    torch.testing.assert_close(
        fused_sink.first_token_norms, eager_sink.first_token_norms, rtol=1e-5, atol=0
    )
