import math

import pytest
import torch

from conftest import CORPUS, N_LAYERS, SINK_LAYER, save_tiny
from sinklens import (
    SinklensError,
    attention_patterns,
    attention_received,
    attention_score_maps,
    find_sink_layer,
    load_result,
    norm_baseline,
    repeated_tokens,
    repetition_curves,
    run_cache,
    save_result,
    text_tokens,
)
from sinklens.analyses.attention import fig1_inputs, paper_figure_layers
from sinklens.analyses.norms import (
    first_crossing,
    repeats_to_stay,
    resid_norms,
    sink_threshold,
)
from sinklens.analyses.sink_layer import (
    RATIO_FALLBACK,
    SIGMA_RULE,
    sink_layer_threshold,
)
from sinklens.load.models import load_model
from sinklens.run.cache import shared_prefix, stop_layer


def test_run_cache_keeps_only_the_named_hooks_and_stops_early(tiny):
    tokens = text_tokens(tiny, "Speak, speak.")
    names = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    cache = run_cache(tiny, tokens, names)
    assert set(names) <= set(cache.keys())
    assert not any(k.startswith(("blocks.2.", "blocks.3.")) for k in cache.keys())
    assert cache["blocks.0.mlp.hook_post"].shape == (1, tokens.shape[1], tiny.cfg.d_mlp)
    assert stop_layer(tiny, names) == 2
    assert stop_layer(tiny, [f"blocks.{N_LAYERS - 1}.hook_resid_post"]) == N_LAYERS
    assert stop_layer(tiny, ["ln_final.hook_normalized"]) is None


@pytest.mark.parametrize("prefixed", [False, True])
def test_a_run_through_the_last_block_stops_before_the_final_norm(tiny, prefixed):
    """The unembedding is never run for hooks in the blocks (a model built with its first layers only
    need never read its head), and the cached values are those of the whole forward pass."""
    tokens = text_tokens(tiny, "Speak, speak. You are all resolved rather to die than to famish?")
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    calls = []
    with tiny.hooks(fwd_hooks=[("unembed.hook_in", lambda x, hook: calls.append(hook.name))]):
        prefix = shared_prefix(tiny, tokens[:, :4], [last]) if prefixed else None
        stopped = run_cache(tiny, tokens[:, 4:] if prefixed else tokens, [last], prefix=prefix)[
            last
        ]
    assert calls == []
    _, whole = tiny.run_with_cache(tokens, names_filter=[last, "unembed.hook_in"])
    assert (
        "unembed.hook_in" in whole
    )  # the unembedding's hook point exists and fires on a whole run
    torch.testing.assert_close(stopped, whole[last][:, 4:] if prefixed else whole[last])


def test_run_cache_reduces_inside_the_hook(tiny):
    tokens = text_tokens(tiny, "Speak, speak.")
    name = "blocks.1.attn.hook_pattern"
    full = run_cache(tiny, tokens, [name])[name]
    reduced = run_cache(tiny, tokens, [name], reduce=lambda n, x: x[..., 0].mean())[name]
    assert torch.allclose(reduced, full[..., 0].mean())


@pytest.mark.parametrize(
    "pattern", [False, True]
)  # fused attention, and the eager path a pattern hook takes
def test_a_shared_prefix_runs_once_and_gives_the_full_runs_numbers(tiny, pattern):
    tokens = text_tokens(tiny, "First Citizen: Before we proceed any further, hear me speak.")
    k = tokens.shape[1] - 3
    rows = torch.cat(
        [tokens.expand(3, -1)[:, :k], torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])], dim=1
    )
    names = ["blocks.2.hook_resid_post", "blocks.2.mlp.hook_post"] + (
        ["blocks.1.attn.hook_pattern"] if pattern else []
    )

    def double_row_1(activation, hook):  # an intervention at a position after the prefix
        activation[1, -2] *= 2.0
        return activation

    full = run_cache(tiny, rows, names, interventions=[("blocks.1.hook_resid_post", double_row_1)])
    prefix = shared_prefix(tiny, rows[:1, :k], names)
    rest = run_cache(
        tiny,
        rows[:, k:],
        names,
        interventions=[("blocks.1.hook_resid_post", double_row_1)],
        prefix=prefix,
    )
    for name in names:
        assert (
            rest[name].shape[1] == 3
            if "pattern" not in name
            else rest[name].shape[-2:] == (3, tokens.shape[1])
        )
        expected = full[name][:, k:] if "pattern" not in name else full[name][..., k:, :]
        torch.testing.assert_close(rest[name], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(SinklensError, match="fewer blocks"):
        run_cache(tiny, rows[:, k:], ["blocks.4.hook_resid_post"], prefix=prefix)


def test_layer_out_of_range_is_a_clear_error(tiny):
    with pytest.raises(SinklensError, match=f"layer {N_LAYERS} is out of range.*0..{N_LAYERS - 1}"):
        resid_norms(tiny, text_tokens(tiny, "Speak"), N_LAYERS)
    with pytest.raises(SinklensError, match="out of range"):
        attention_received(tiny, text_tokens(tiny, "Speak"), layers=[-1])


def test_sink_layer_finds_the_planted_sink(tiny):
    result = find_sink_layer(tiny, reference=text_tokens(tiny, CORPUS))
    assert result.sink_layer == SINK_LAYER and result.method == SIGMA_RULE
    assert result.ratios[SINK_LAYER] > 1e4 and result.ratios[:SINK_LAYER].max() < 10
    assert result.threshold == pytest.approx(sink_layer_threshold(result.first_token_norms))
    alone = find_sink_layer(tiny)  # the lone first token gives the same norms (causal attention)
    assert torch.allclose(alone.first_token_norms, result.first_token_norms, rtol=1e-4)
    frame = result.to_frame()
    assert list(frame["above_threshold"]) == [layer == SINK_LAYER for layer in range(N_LAYERS)]
    assert result.plot().data


def test_mean_plus_two_sigma_rule():
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 100.0, 1.0])
    assert sink_layer_threshold(norms) == pytest.approx(float(norms.mean() + 2 * norms.std()))
    assert sink_layer_threshold(norms) < 100.0


def test_no_sink_layer_falls_back_to_the_largest_ratio_or_is_a_clear_error(tiny, tmp_path):
    result = find_sink_layer(
        tiny, n_sigma=100.0, reference=text_tokens(tiny, CORPUS)
    )  # no layer passes the rule
    assert (
        result.method == RATIO_FALLBACK
        and result.sink_layer == int(result.ratios.argmax()) == SINK_LAYER
    )
    with pytest.raises(SinklensError, match="no layer in 0..5 has a first-token MLP output norm"):
        find_sink_layer(tiny, n_sigma=100.0)
    unplanted = load_model(
        str(save_tiny(tmp_path, plant_sink=False)), device="cpu"
    )  # random weights: no sink
    with pytest.raises(
        SinklensError,
        match=r"shows no sink layer in layers 0..5: .* largest first/later-token ratio "
        r"is 1\.\d\dx \(layer \d\), below 2x\. Fix: this model makes no",
    ):
        find_sink_layer(unplanted, n_sigma=3.0, reference=text_tokens(unplanted, CORPUS))


def test_resid_norms_match_the_hf_hidden_states(tiny):
    tokens = text_tokens(tiny, CORPUS[:80])
    with torch.no_grad():
        hidden = tiny.original_model(tokens, output_hidden_states=True).hidden_states
    for layer in (0, SINK_LAYER, N_LAYERS - 2):
        assert torch.allclose(
            resid_norms(tiny, tokens, layer), hidden[layer + 1].norm(dim=-1), rtol=1e-4
        )


def test_norm_baseline_and_repetition_curves(tiny):
    baseline = norm_baseline(tiny, SINK_LAYER, text_tokens(tiny, CORPUS))
    assert baseline.first_token_norm > 1e3 * baseline.typical_norm  # the planted sink
    curves = repetition_curves(
        tiny, ["the", "you"], layer=SINK_LAYER, baseline=baseline, n_repeats=40
    )
    assert curves.norms.shape == (2, 41)
    assert curves.first_token_norm == pytest.approx(baseline.first_token_norm, rel=1e-4)
    expected = resid_norms(tiny, repeated_tokens(tiny, "you", 40), SINK_LAYER)[0]
    assert torch.allclose(curves.norms[1], expected)
    # The planted sink reads a BOS-only direction, so repeats never reach it.
    assert curves.repeats_to_sink == [None, None]
    frame = curves.to_frame()
    assert list(frame["word"]) == [" the", " you"] and (frame["n_repeats"] == 40).all()
    summary = curves.summary()["words"][0]
    assert set(summary) == {
        "word",
        "token_id",
        "n_repeats",
        "max_norm",
        "repeats_to_sink",
        "first_crossing",
    }
    assert len(curves.plot().data) > 2


def test_sink_threshold_first_crossing_and_repeats_to_stay():
    threshold = sink_threshold(first_norm=1000.0, typical=10.0, sink_fraction=0.5)
    assert threshold == pytest.approx(100.0)
    norms = torch.tensor([1000.0, 5.0, 50.0, 120.0, 80.0, 200.0, 150.0])
    assert first_crossing(norms, threshold) == 3
    assert repeats_to_stay(norms, threshold) == 5  # dips out at repeat 4, then stays from repeat 5
    assert first_crossing(norms, 5000.0) is None and repeats_to_stay(norms, 5000.0) is None
    assert (
        first_crossing(norms, 1.0) == 1 and repeats_to_stay(norms, 1.0) == 1
    )  # position 0 never counts
    assert (
        repeats_to_stay(torch.tensor([1000.0, 200.0, 300.0, 50.0]), threshold) is None
    )  # ends below


def test_attention_received_matches_the_full_pattern(tiny):
    tokens = repeated_tokens(tiny, "the", 12)
    result = attention_received(tiny, tokens, label="repeat")
    pattern = run_cache(tiny, tokens, ["blocks.3.attn.hook_pattern"])["blocks.3.attn.hook_pattern"][
        0
    ]
    n = tokens.shape[1]
    for key in (0, 5):
        expected = pattern[:, key + 1 :, key].mean(dim=-1)
        assert torch.allclose(result.received[3, :, key], expected, atol=1e-6)
    assert torch.isnan(result.received[:, :, n - 1]).all()
    share = result.sink_head_share
    assert ((share >= 0) & (share <= 1)).all()
    expected_share = (pattern[:, 1:, 0].mean(dim=-1) > result.epsilon).float().mean()
    assert share[3] == pytest.approx(float(expected_share))
    assert len(result.to_frame()) == N_LAYERS


def test_attention_score_maps_average_visible_scores(tiny):
    tokens = torch.cat([text_tokens(tiny, CORPUS)[:, :8], repeated_tokens(tiny, "the", 7)])
    layers = paper_figure_layers(tiny, SINK_LAYER)
    assert layers == [2, 3, 4, 5]
    maps = attention_score_maps(tiny, tokens, layers, label="mixed")
    scores = run_cache(tiny, tokens, ["blocks.4.attn.hook_attn_scores"])[
        "blocks.4.attn.hook_attn_scores"
    ]
    assert torch.allclose(maps.scores[2, 3, :4], scores[:, :, 3, :4].mean(dim=(0, 1)), atol=1e-5)
    assert torch.isnan(maps.scores[:, 3, 4:]).all()  # keys after the query are masked
    assert len(maps.token_labels) == 8
    assert maps.to_frame()["score"].notna().all()
    summary = maps.summary()
    assert math.isfinite(summary["mean_score_on_first"][0])


def test_attention_patterns_are_every_heads_weights_as_data_and_one_figure(tiny):
    tokens = repeated_tokens(tiny, "the", 7)
    patterns = attention_patterns(tiny, tokens, SINK_LAYER)
    expected = run_cache(tiny, tokens, ["blocks.2.attn.hook_pattern"])[
        "blocks.2.attn.hook_pattern"
    ][0]
    assert torch.allclose(patterns.patterns, expected)
    assert patterns.token_labels[0] == "<s>" and len(patterns.token_labels) == 8
    frame = patterns.to_frame()
    assert len(frame) == tiny.cfg.n_heads * 8 * 9 // 2  # only the keys a query sees
    assert frame.groupby(["head", "query_pos"])["weight"].sum().round(5).eq(1).all()
    fig = patterns.plot()
    assert len(fig.data) == tiny.cfg.n_heads
    assert math.isnan(fig.data[0].z[0][1])  # a key after its query is left blank
    assert len(patterns.summary()["mean_weight_on_first"]) == tiny.cfg.n_heads


def test_results_round_trip_through_a_file(tiny, tmp_path):
    result = find_sink_layer(tiny, reference=text_tokens(tiny, CORPUS))
    save_result(result, tmp_path / "r.pt")
    loaded = load_result(tmp_path / "r.pt")
    assert type(loaded) is type(result) and loaded.first_token == result.first_token
    assert torch.equal(loaded.first_token_norms, result.first_token_norms)
    assert loaded.to_frame().equals(result.to_frame())


def test_fig1_inputs_are_text_lines_and_a_short_repeat(tiny):
    regular, repeat = fig1_inputs(tiny, CORPUS, "the")
    assert regular.shape[1] == 20 and 1 <= regular.shape[0] <= 4
    assert (regular[:, 0] == tiny.tokenizer.bos_token_id).all()
    assert repeat.shape == (1, 20) and len(set(repeat[0, 1:].tolist())) == 1
    short, _ = fig1_inputs(
        tiny, "Speak.\nAll:\nSpeak.", "the"
    )  # no line is long enough: the text's start
    assert short.shape[0] == 1 and short.shape[1] < 20
