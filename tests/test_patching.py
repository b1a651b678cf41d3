"""Activation-patching sweeps: the planted sink localised on the tiny model, the same numbers as TransformerLens'
own patching functions on the bridge, bad input refused in one line, and the command."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import patching as tl_patching

from conftest import CORPUS, SINK_LAYER, SINK_NEURON
from sinklens.analyses.patching_sweep import (
    LOGITS,
    PatchingMetric,
    first_token_norm,
    logit_difference,
    patching_sweep,
    sink_neuron_activation,
)
from sinklens.cli import main
from sinklens.errors import SinklensError
from sinklens.settings import Settings
from sinklens.studies.patching import patching_study

CLEAN = torch.tensor([[1, 40, 41, 42, 43, 44]])
CORRUPTED = torch.tensor([[45, 40, 41, 42, 43, 44]])


@pytest.fixture(scope="module")
def settings(corpus_file):
    return Settings(corpus=str(corpus_file), corpus_chars=400, n_repeats=20)


def test_the_first_token_carries_the_sink_to_the_sink_layer(tiny, settings):
    sweep = patching_study(settings, model=tiny).sweep
    restored = sweep.restored
    assert sweep.layers == list(range(SINK_LAYER + 1)) and sweep.positions == list(
        range(restored.shape[1])
    )
    assert restored.shape == (SINK_LAYER + 1, 17)
    assert (restored[:, 0] >= 0.9).all(), restored[
        :, 0
    ]  # the first token's own stream carries the sink
    assert (
        restored[:, 1:].abs() < 0.1
    ).all()  # a later position cannot reach position 0 (causal attention)
    frame = sweep.to_frame()
    assert len(frame) == restored.numel() and {"layer", "position", "token", "restored"} <= set(
        frame
    )
    assert sweep.plot().data[0].z is not None


def test_the_sink_neurons_need_the_first_token_and_nothing_after_it(tiny, settings):
    sweep = patching_study(settings, model=tiny, metric="sink_neurons").sweep
    restored = sweep.restored
    assert sweep.layers == list(range(SINK_LAYER + 1)) and "sink neurons L2.5" in sweep.metric
    assert (restored[:, 0] > 0.9).all() and (restored[:, 1:].abs() < 0.1).all()
    # the sink layer's MLP output comes after the neurons it is made of: patching it changes nothing
    after = patching_study(
        settings, model=tiny, site="mlp_out", metric="sink_neurons"
    ).sweep.restored
    assert after[SINK_LAYER].abs().max() < 1e-6


@pytest.mark.parametrize(
    "site, tl_function",
    [
        ("resid_pre", "get_act_patch_resid_pre"),
        ("attn_out", "get_act_patch_attn_out"),
        ("mlp_out", "get_act_patch_mlp_out"),
        ("heads", "get_act_patch_attn_head_out_all_pos"),
        ("head_positions", "get_act_patch_attn_head_out_by_pos"),
    ],
)
def test_the_same_numbers_as_transformer_lens_patching(tiny, site, tl_function):
    answer, wrong = 7, 9
    sweep = patching_sweep(tiny, CLEAN, CORRUPTED, logit_difference(answer, wrong), site=site)
    _, clean_cache = tiny.run_with_cache(CLEAN)
    theirs = getattr(tl_patching, tl_function)(
        tiny, CORRUPTED, clean_cache, lambda logits: logits[0, -1, answer] - logits[0, -1, wrong]
    )
    if site == "head_positions":  # TransformerLens orders (layer, position, head)
        theirs = theirs.transpose(1, 2)
    torch.testing.assert_close(sweep.values, theirs.float(), rtol=1e-4, atol=1e-4)


def test_a_metric_of_any_hooks(tiny):
    name = "blocks.1.hook_resid_post"
    custom = PatchingMetric(
        "norm of position 3", [name], lambda cache: cache[name][:, 3].norm(dim=-1)
    )
    sweep = patching_sweep(tiny, CLEAN, CORRUPTED, custom, positions=[0, 3, 5])
    assert sweep.layers == [0, 1] and sweep.positions == [0, 3, 5]
    assert torch.allclose(
        sweep.restored[:, 2], torch.zeros(2), atol=1e-5
    )  # position 5 comes after 3
    assert sweep.restored[0, 0] == pytest.approx(
        1.0, abs=1e-4
    )  # the one token that differs, before layer 0
    assert sweep.restored[0, 1] == pytest.approx(
        0.0, abs=1e-4
    )  # position 3's own token is the same in both


@pytest.mark.parametrize(
    "clean, corrupted, metric, error",
    [
        (CLEAN, CORRUPTED[:, :4], None, "differ in shape"),
        (CLEAN, CLEAN, None, "nothing to restore"),
    ],
)
def test_bad_pairs_are_refused(tiny, clean, corrupted, metric, error):
    with pytest.raises(SinklensError, match=error):
        patching_sweep(tiny, clean, corrupted, metric or first_token_norm(SINK_LAYER))


def test_unknown_site_and_positions_out_of_range(tiny):
    with pytest.raises(SinklensError, match="unknown site kind"):
        patching_sweep(tiny, CLEAN, CORRUPTED, first_token_norm(SINK_LAYER), site="neurons")
    with pytest.raises(SinklensError, match="positions must lie"):
        patching_sweep(
            tiny,
            CLEAN,
            CORRUPTED,
            sink_neuron_activation([(SINK_LAYER, SINK_NEURON)]),
            positions=[9],
        )


def test_the_command_prints_the_sweep(tiny_dir, corpus_file, capsys):
    study = ["--model", str(tiny_dir), "--corpus", str(corpus_file), "--corpus-chars", "400"]
    assert main(["patching", *study, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["site"] == "resid_pre" and result["layers"] == list(range(SINK_LAYER + 1))
    restored = torch.tensor(result["restored"])
    assert (
        restored.shape == (len(result["layers"]), len(result["positions"]))
        and (restored[:, 0] >= 0.9).all()
    )
    assert main(["patching", *study, "--site", "heads"]) == 0
    assert "restored by patching each heads site" in capsys.readouterr().out
    assert main(["patching", *study, "--position", "2"]) == 2
    assert "--position has no effect" in capsys.readouterr().err
    assert main(["patching", *study, "--clean", CORPUS[:40], "--corrupted", CORPUS[:12]]) == 2
    assert "same token length" in capsys.readouterr().err
    assert LOGITS == "unembed.hook_out"
