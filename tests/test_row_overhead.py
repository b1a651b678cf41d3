"""What the Table-1 row does between its forward passes, made cheaper without changing a number:
hooks attached straight to their hook points (``run_with_hooks`` rebuilt its hook dictionary on
every call), runs stopped by a hook on the next block's input, tokens and hook names remembered,
ablation masks built at once, and the sink neurons' statistics computed on the model's device. Each
is tested against the way it replaced; speed is ``bench/bench_overhead.py``'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens.utilities import get_act_name

import sinklens.run.cache as cache_module
from conftest import CORPUS, N_LAYERS, SINK_LAYER, SINK_NEURON
from sinklens.analyses.neuron_writes import lower_median, super_weights
from sinklens.run.cache import act_name, run_cache, shared_prefix
from sinklens.run.interventions import ablation_hooks
from sinklens.run.tokens import encode, text_tokens

NAMES = [
    f"blocks.{layer}.{hook}"
    for layer in (0, 2, 3)
    for hook in ("hook_resid_post", "hook_mlp_out", "mlp.hook_post")
]


def _through_run_with_hooks(monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "_lean_hooks", lambda model, hooks: None)


def _no_hooks_left(model) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks
        for m in model.modules()
        if type(m).__name__ == "HookPoint"
    )


@pytest.mark.parametrize(
    "names",
    [
        NAMES,
        [f"blocks.{N_LAYERS - 1}.hook_resid_post"],
        ["blocks.1.attn.hook_pattern"],
        ["ln_final.hook_normalized"],
    ],
)
def test_the_lean_path_gives_what_run_with_hooks_gives(tiny, monkeypatch, names):
    tokens = text_tokens(tiny, CORPUS)[:, :40].expand(3, -1)
    interventions = ablation_hooks(
        tiny, [[(SINK_LAYER, SINK_NEURON)], [], [(3, 1), (SINK_LAYER, 7)]]
    )
    lean = run_cache(tiny, tokens, names, interventions=interventions)
    assert _no_hooks_left(tiny)
    with monkeypatch.context() as patched:
        _through_run_with_hooks(patched)
        plain = run_cache(tiny, tokens, names, interventions=interventions)
    for name in names:
        assert torch.equal(lean[name], plain[name]), name


def test_a_shared_prefix_continues_the_same_on_both_paths(tiny, monkeypatch):
    tokens = text_tokens(tiny, CORPUS)[:, :30]
    names = ["blocks.3.hook_resid_post"]
    prefix = shared_prefix(tiny, tokens[:, :20], names)
    lean = run_cache(tiny, tokens[:, 20:].expand(2, -1), names, prefix=prefix)
    with monkeypatch.context() as patched:
        _through_run_with_hooks(patched)
        plain = run_cache(
            tiny,
            tokens[:, 20:].expand(2, -1),
            names,
            prefix=shared_prefix(tiny, tokens[:, :20], names),
        )
    whole = run_cache(tiny, tokens, names)
    assert torch.equal(lean[names[0]], plain[names[0]])
    torch.testing.assert_close(lean[names[0]][0], whole[names[0]][0, 20:], rtol=1e-5, atol=1e-5)


def test_gradients_through_hooked_norms_are_the_same_on_both_paths(tiny, monkeypatch):
    """TransformerLens' norms keep their graph only where its own hook lists hold a hook: the lean path
    attaches hooks through them, so attribution through a norm's hook points works as before."""
    from sinklens.run.activation_patching import activation_gradients

    tokens = text_tokens(tiny, CORPUS)[:, :16]
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_scale", "blocks.0.hook_resid_post"]

    def metric(store):
        return store["blocks.2.hook_resid_post"][0, 0].norm()

    lean = activation_gradients(
        tiny, tokens, names, metric, metric_names=["blocks.2.hook_resid_post"]
    )
    with monkeypatch.context() as patched:
        _through_run_with_hooks(patched)
        plain = activation_gradients(
            tiny, tokens, names, metric, metric_names=["blocks.2.hook_resid_post"]
        )
    for name in names:
        assert lean[name].abs().sum() > 0 and torch.equal(lean[name], plain[name]), name
    assert _no_hooks_left(tiny) and all(
        not point.fwd_hooks for point in cache_module.hook_points(tiny).values()
    )


def test_a_run_stops_after_the_last_block_it_reads_and_leaves_no_hook(tiny):
    finished = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: finished.append(i))
        for i, block in enumerate(tiny.blocks)
    ]
    try:
        run_cache(tiny, torch.tensor([[1, 5, 9]]), ["blocks.2.hook_resid_post"])
        assert finished == [0, 1, 2]
        finished.clear()
        called = []
        later = [("blocks.4.hook_resid_post", lambda activation, hook: called.append(hook.name))]
        run_cache(
            tiny, torch.tensor([[1, 5, 9]]), ["blocks.1.hook_resid_post"], interventions=later
        )
        assert finished == [0, 1] and called == []  # a hook past the stop is never attached
    finally:
        for handle in handles:
            handle.remove()
    assert _no_hooks_left(tiny)


def test_a_hook_that_raises_leaves_no_hook_behind(tiny):
    def broken(activation, hook):
        raise RuntimeError("broken hook")

    with pytest.raises(RuntimeError, match="broken hook"):
        run_cache(
            tiny,
            torch.tensor([[1, 5, 9]]),
            ["blocks.2.hook_resid_post"],
            interventions=[("blocks.1.hook_resid_post", broken)],
        )
    assert _no_hooks_left(tiny)


def test_names_the_lean_path_does_not_know_get_transformerlens_own_errors(tiny):
    with pytest.raises(KeyError, match="does not exist"):
        run_cache(tiny, torch.tensor([[1, 5, 9]]), ["blocks.0.hook_no_such_thing"])
    with pytest.raises(ValueError, match="use_attn_result"):
        run_cache(tiny, torch.tensor([[1, 5, 9]]), ["blocks.0.attn.hook_result"])
    assert _no_hooks_left(tiny)


def test_hook_names_are_transformerlens_own():
    for args in [
        ("resid_post", 3),
        ("mlp_out", 0),
        ("post", 2),
        ("pre", 1),
        ("in", 4, "ln2_post"),
        ("embed",),
    ]:
        assert act_name(*args) == get_act_name(*args)


def test_ablation_masks_are_the_rows_neurons(tiny):
    rows = [
        [],
        [(SINK_LAYER, SINK_NEURON)],
        [(SINK_LAYER, 3), (4, 7), (SINK_LAYER, 3)],
        [(np.int64(4), 2)],
    ]
    hooks = dict(ablation_hooks(tiny, rows))
    assert sorted(hooks) == [act_name("post", SINK_LAYER), act_name("post", 4)]
    seen = torch.ones(len(rows), 2, tiny.cfg.d_mlp)
    for layer in (SINK_LAYER, 4):
        edited = hooks[act_name("post", layer)](seen, None)
        expected = torch.ones_like(seen)
        for b, row in enumerate(rows):
            for l, index in row:
                if l == layer:
                    expected[b, :, index] = 0.0
        assert torch.equal(edited, expected), layer
    with pytest.raises(Exception, match="out of range"):
        ablation_hooks(tiny, [[(SINK_LAYER, tiny.cfg.d_mlp)]])


@pytest.mark.parametrize("rows", [9, 10, 1])
def test_the_lower_median_is_torchs(rows):
    values = torch.randn(rows, 37, generator=torch.Generator().manual_seed(rows)).abs()
    values[:, 3] = 1.0  # ties
    assert torch.equal(lower_median(values), values.median(dim=0).values)


def test_super_weight_ranks_are_the_counts_of_larger_entries():
    generator = torch.Generator().manual_seed(0)
    w_outs = {
        2: torch.randn(50, 16, generator=generator),
        3: torch.randn(50, 16, generator=generator),
    }
    w_outs[2][7] = torch.tensor([0.5] * 16)  # ties within a row: argmax takes the first
    w_outs[3][4, 5] = w_outs[3].abs().max() + 1.0  # the layer's largest entry
    candidates = [(2, 7), (3, 4), (2, 1), (3, 9), (2, 7)]
    dims, values, ranks = super_weights(w_outs, candidates)
    for (layer, index), dim, value, rank in zip(candidates, dims, values, ranks):
        w_out = w_outs[layer]
        assert dim == int(w_out[index].abs().argmax()) and value == float(w_out[index, dim])
        assert rank == int((w_out.abs() > abs(w_out[index, dim])).sum()) + 1
    assert ranks[1] == 1 and dims[0] == 0


def test_encodings_are_remembered_as_fresh_lists_and_forgotten_when_tokens_are_added(tiny_dir):
    from sinklens import load_model

    model = load_model(str(tiny_dir), device="cpu")
    first = encode(model, CORPUS[:80])
    first.append(-1)
    assert encode(model, CORPUS[:80]) == model.tokenizer.encode(
        CORPUS[:80], add_special_tokens=False
    )
    model.tokenizer.add_tokens(["Citizen"])
    assert encode(model, CORPUS[:80]) == model.tokenizer.encode(
        CORPUS[:80], add_special_tokens=False
    )
