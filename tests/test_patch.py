"""Every exact property of the sink-neuron patch, on the tiny model (TransformerBridge and plain HF)."""

import dataclasses
import json

import pytest
import torch

from conftest import CORPUS, SINK_LAYER, SINK_NEURON, save_tiny
from sinklens import SinklensError, load_model, run_cache, text_tokens
from sinklens.load.models import load_hf_model
from sinklens.run.sink_patch import SinkPatch, installed_patch, patch_for

NEURONS = [SINK_NEURON, 7, 11]
PAIRS = [(SINK_LAYER, n) for n in NEURONS]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    model, tokenizer = load_hf_model(str(tiny_dir), device="cpu")
    return model, tokenizer


@pytest.fixture(params=["up", "gate", "post"])
def patch(request, tiny):
    return patch_for(tiny, PAIRS, hook=request.param)


def _tokens(tiny, n=24):
    return text_tokens(tiny, CORPUS)[:, :n]


def test_every_later_position_takes_the_first_after_start_value_and_the_first_is_untouched(
    tiny, patch
):
    tokens = _tokens(tiny)
    intact = run_cache(tiny, tokens, [patch.hook_name(SINK_LAYER)])[patch.hook_name(SINK_LAYER)][0][
        :, NEURONS
    ]
    with patch.installed(tiny):
        clamped = run_cache(tiny, tokens, [patch.hook_name(SINK_LAYER)])[
            patch.hook_name(SINK_LAYER)
        ][0][:, NEURONS]
    assert torch.equal(clamped[0], intact[0])  # the first position is never touched
    assert torch.equal(clamped[1:], intact[1].expand_as(clamped[1:]))
    assert not torch.equal(
        intact[1:], intact[1].expand_as(intact[1:])
    )  # the clamp did change something


def test_removing_restores_the_model_bit_for_bit_and_installing_twice_does_not_stack(tiny, patch):
    tokens = _tokens(tiny)
    before = tiny(tokens)
    point = tiny.hook_dict[patch.hook_name(SINK_LAYER)]
    hooks_before = len(point._forward_hooks)
    first = patch.install(tiny)
    assert patch.install(tiny) is first and len(point._forward_hooks) == hooks_before + 1
    patched = tiny(tokens)
    other = dataclasses.replace(patch, neurons=((SINK_LAYER, SINK_NEURON),))
    second = other.install(tiny)  # another patch replaces the first
    assert len(point._forward_hooks) == hooks_before + 1 and first.handles == []
    second.remove()
    assert torch.equal(tiny(tokens), before) and not torch.equal(patched, before)
    assert len(point._forward_hooks) == hooks_before and not hasattr(tiny, "_sinklens_patch")


def test_bridge_and_hugging_face_paths_give_the_same_logits(tiny, hf, patch):
    model, _ = hf
    tokens = _tokens(tiny)
    with patch.installed(tiny):
        bridge = tiny(tokens)
    with patch.installed(model):
        plain = model(tokens).logits
    assert torch.allclose(bridge, plain, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits, plain, atol=1e-4)  # removed again


def test_prefill_then_decode_with_a_kv_cache_equals_recomputing(hf, patch):
    model, _ = hf
    prompt = torch.tensor([[0, 55, 71, 102, 33]])
    outputs = {}
    with patch.installed(model):
        for use_cache in (True, False):
            out = model.generate(
                prompt,
                max_new_tokens=8,
                do_sample=False,
                use_cache=use_cache,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=1,
            )
            outputs[use_cache] = out
    assert torch.equal(outputs[True].sequences, outputs[False].sequences)
    for cached, recomputed in zip(outputs[True].scores, outputs[False].scores):
        assert torch.allclose(cached, recomputed, atol=1e-4)


def test_a_one_token_prompt_takes_its_value_from_the_first_generated_token(hf):
    model, _ = hf
    patch = patch_for(model, PAIRS, hook="post")
    prompt = torch.tensor([[0]])
    with patch.installed(model):
        cached = model.generate(
            prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=1
        )
        recomputed = model.generate(
            prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=1
        )
    assert torch.equal(cached, recomputed)


def test_left_padded_rows_are_clamped_from_their_own_first_token(hf, patch):
    model, _ = hf
    short, long = [0, 55, 71, 102], [0, 33, 12, 99, 200, 64, 18]
    padded = torch.tensor([[1] * (len(long) - len(short)) + short, long])
    mask = (torch.arange(len(long))[None] >= torch.tensor([[len(long) - len(short)], [0]])).long()
    with patch.installed(model), torch.no_grad():
        together = model(padded, attention_mask=mask).logits
        alone = [model(torch.tensor([row])).logits[0] for row in (short, long)]
    assert torch.allclose(together[0, -len(short) :], alone[0], atol=1e-4)
    assert torch.allclose(together[1], alone[1], atol=1e-4)


def test_a_calibrated_patch_writes_its_values(tiny):
    values = [0.5, -1.0, 2.0]
    patch = patch_for(tiny, PAIRS, hook="post", value="calibrated", values=values)
    tokens = _tokens(tiny)
    with patch.installed(tiny):
        clamped = run_cache(tiny, tokens, [patch.hook_name(SINK_LAYER)])[
            patch.hook_name(SINK_LAYER)
        ][0][:, NEURONS]
    assert torch.equal(clamped[1:], torch.tensor(values).expand(tokens.shape[1] - 1, -1))


def test_the_json_file_round_trips_and_refuses_another_model(tiny, tmp_path, patch):
    path = tmp_path / "patch.json"
    patch.save(path)
    loaded = SinkPatch.load(path)
    assert loaded == patch and json.loads(path.read_text())["format"] == "sinklens-patch/1"
    unplanted = load_model(
        str(save_tiny(tmp_path / "unplanted", plant_sink=False)), device="cpu"
    )  # same shape: fits
    loaded.install(unplanted).remove()
    small = dataclasses.replace(loaded, d_mlp=32)
    with pytest.raises(SinklensError, match="does not fit.*sinklens patch --model"):
        small.install(tiny)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "something else"}', "is not a sinklens patch"),
        ('{"format": "sinklens-patch/1", "model": "m"}', "is incomplete"),
    ],
)
def test_a_bad_patch_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "patch.json"
    path.write_text(content)
    with pytest.raises(SinklensError, match=message) as info:
        SinkPatch.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(SinklensError, match="does not exist"):
        SinkPatch.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"neurons": ((SINK_LAYER, 64),)}, "out of range"),
        ({"neurons": ((6, 1),)}, "out of range"),
        ({"hook": "down"}, "unknown patch hook"),
        ({"value": "calibrated"}, "one value per neuron"),
        ({"neurons": ()}, "clamps no neuron"),
    ],
)
def test_a_bad_patch_is_one_clear_error(tiny, change, message):
    with pytest.raises(SinklensError, match=message):
        dataclasses.replace(patch_for(tiny, PAIRS), **change)


def test_a_patch_over_two_layers_clamps_each(tiny):
    patch = patch_for(tiny, [(1, 3), (SINK_LAYER, SINK_NEURON)], hook="post")
    tokens = _tokens(tiny)
    names = [patch.hook_name(1), patch.hook_name(SINK_LAYER)]
    with patch.installed(tiny):
        cache = run_cache(tiny, tokens, names)
    for name, neuron in zip(names, (3, SINK_NEURON)):
        values = cache[name][0, :, neuron]
        assert torch.equal(values[1:], values[1].expand_as(values[1:]))
    assert "layer 1: [3]; layer 2: [5]" in patch.describe()


def test_a_bridge_and_the_model_inside_it_hold_one_patch_between_them(tiny_dir):
    """The bridge's hook points and the Hugging Face modules inside it are the same computation: a patch installed
    through one replaces a patch installed through the other, so a clamp is never applied twice."""
    bridge = load_model(str(tiny_dir), device="cpu")
    inner = bridge.original_model
    tokens = _tokens(bridge)
    up, gate = (patch_for(bridge, PAIRS, hook=hook) for hook in ("up", "gate"))
    with torch.inference_mode():
        with gate.installed(bridge):
            gate_only = inner(tokens).logits
        with up.installed(inner):
            up_only = inner(tokens).logits
        first = up.install(inner)
        second = gate.install(bridge)  # replaces the first
        assert first.handles == [] and installed_patch(inner) is second is installed_patch(bridge)
        assert torch.equal(inner(tokens).logits, gate_only) and not torch.equal(gate_only, up_only)
        second.remove()
        assert installed_patch(inner) is None and torch.equal(inner(tokens).logits, bridge(tokens))
