"""The first-layer circuit on a tiny model whose answer is planted: head ``MARK_HEAD`` of layer 0
marks the first token (it attends uniformly and copies a dimension only the first token has into
the one the sink neuron reads), and head ``DETECT_HEAD`` scores a token's own key low (see
conftest.py)."""

import json

import numpy as np
import pytest
import torch

from conftest import (
    CORPUS,
    DETECT_HEAD,
    MARK_HEAD,
    N_LAYERS,
    SINK_LAYER,
    SINK_NEURON,
    save_tiny,
)
from sinklens import SinklensError, load_model, repeated_tokens, run_cache, text_tokens
from sinklens.analyses.convergence import convergence
from sinklens.analyses.first_detector import (
    _separation,
    first_detector_neurons,
    word_chunks,
)
from sinklens.analyses.first_token_mark import first_token_mark_patching
from sinklens.analyses.heads import head_behaviour
from sinklens.analyses.probe import train_first_token_probe
from sinklens.cli import main
from sinklens.results import load_result, save_result
from sinklens.studies.circuit import first_layer_circuit

LONG_TEXT = CORPUS * 4  # enough 3-word chunks for the probe


@pytest.fixture(scope="module")
def marked_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-mark"), mark_head=True)


@pytest.fixture(scope="module")
def marked(marked_dir):
    return load_model(str(marked_dir), device="cpu")


@pytest.fixture(scope="module")
def patched(marked):
    return first_token_mark_patching(
        marked, marked.tokenizer.bos_token_id, CORPUS, [(SINK_LAYER, SINK_NEURON)], n_contexts=6
    )


def test_head_behaviour_sees_the_uniform_and_the_detect_others_heads(marked):
    behaviour = head_behaviour(
        marked, {"text": text_tokens(marked, CORPUS), "repeat": repeated_tokens(marked, "the", 40)}
    )
    assert behaviour.scores_own_key_low() == [DETECT_HEAD]
    # The marking head scores every key 0: it attends uniformly, so to itself exactly as a uniform head.
    assert float(behaviour.self_attention[0, MARK_HEAD]) == pytest.approx(
        float(behaviour.uniform_self[0]), rel=1e-4
    )
    assert float(behaviour.score_gap[0, MARK_HEAD]) == pytest.approx(0.0, abs=1e-5)
    assert float(behaviour.self_attention[0, DETECT_HEAD]) < 0.1 * float(behaviour.uniform_self[0])
    frame = behaviour.to_frame()
    assert (
        len(frame) == 2 * marked.cfg.n_heads
        and behaviour.plot().data
        and json.dumps(behaviour.summary())
    )


def test_mark_patching_names_the_planted_head_and_nothing_else(patched):
    assert patched.mark_heads() == [(0, MARK_HEAD)]
    frame = patched.to_frame().set_index("component")
    head = frame.loc[f"L0 head {MARK_HEAD}"]
    for experiment in ("necessity", "sufficiency", "in_context"):
        assert head[experiment] == pytest.approx(
            1.0, abs=0.05
        )  # it alone makes the first token first
        assert head[experiment] - head[f"{experiment}_placebo"] > 0.5
    others = frame[~frame.index.isin([f"L0 head {MARK_HEAD}", "L0 attn"])]
    assert others[["necessity", "in_context"]].abs().max().max() < 0.05
    assert [s.label for s in patched.mark_sites] == ["L0 attn", f"L0 head {MARK_HEAD}"]


def test_neuron_attribution_agrees_with_real_patching(patched):
    real = patched.neuron_necessity.mean(-1)
    assert len(patched.neurons) == 10
    assert np.corrcoef(patched.neuron_attribution.numpy(), real.numpy())[0, 1] > 0.9


def test_mark_patching_round_trips_and_summarises(patched, tmp_path):
    save_result(patched, tmp_path / "mark.pt")
    loaded = load_result(tmp_path / "mark.pt")
    assert loaded.mark_heads() == patched.mark_heads() and loaded.to_frame().equals(
        patched.to_frame()
    )
    summary = patched.summary()
    assert summary["path"] == ["L0 attn", f"L0 head {MARK_HEAD}"] and json.dumps(summary)
    assert patched.plot().data


def test_no_mark_to_trace_is_a_clear_error(tiny):
    # In the plain tiny model the sink neuron reads the first token's embedding: it fires wherever that token is.
    with pytest.raises(SinklensError, match="no mark to trace"):
        first_token_mark_patching(
            tiny, tiny.tokenizer.bos_token_id, CORPUS, [(SINK_LAYER, SINK_NEURON)], n_contexts=3
        )


def test_separation_is_the_area_under_the_roc_curve():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    first, later = torch.randn(50, 4, generator=generator), torch.randn(100, 4, generator=generator)
    first[:, 2] += 10  # a planted column that separates perfectly
    auc = _separation(first, later)
    labels = np.r_[np.ones(50), np.zeros(100)]
    for column in range(4):
        expected = roc_auc_score(labels, torch.cat([first[:, column], later[:, column]]).numpy())
        assert float(auc[column]) == pytest.approx(expected, abs=1e-6)
    assert int(torch.maximum(auc, 1 - auc).argmax()) == 2


def test_first_detector_neurons_rank_by_separation(marked):
    repeat = repeated_tokens(marked, "the", 30)
    result = first_detector_neurons(
        marked, LONG_TEXT, repeat, sink_layer=SINK_LAYER, top=5, repeat_label="the"
    )
    assert result.layers == list(range(SINK_LAYER))  # the layers before the sink layer
    chunks = word_chunks(marked, LONG_TEXT)
    assert result.n_chunks == chunks.shape[0] and result.top_values.shape == (5, chunks.shape[0], 3)
    layer, neuron = result.top[0]
    values = result.top_values[0]
    assert float(result.separation[layer, neuron]) == float(result.separation.max())
    assert float(result.auc[layer, neuron]) == pytest.approx(
        float(_separation(values[:, :1], values[:, 1:].reshape(-1, 1))[0])
    )
    along = run_cache(marked, repeat, [f"blocks.{layer}.mlp.hook_pre"])[
        f"blocks.{layer}.mlp.hook_pre"
    ][0, :, neuron]
    assert torch.allclose(result.repeat_values[0], along)
    assert result.plot().data and json.dumps(result.summary())


def test_probe_is_seeded_saves_and_predicts(marked, tmp_path):
    repeat = repeated_tokens(marked, "the", 30)
    probe = train_first_token_probe(marked, LONG_TEXT, repeat, max_layer=SINK_LAYER, seed=3)
    again = train_first_token_probe(marked, LONG_TEXT, repeat, max_layer=SINK_LAYER, seed=3)
    assert torch.equal(probe.weights, again.weights) and torch.equal(probe.accuracy, again.accuracy)
    assert probe.layers == [None, 0, 1, 2] and ((probe.accuracy >= 0) & (probe.accuracy <= 1)).all()
    save_result(probe, tmp_path / "probe.pt")
    loaded = load_result(tmp_path / "probe.pt")
    features = run_cache(marked, repeat, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"][
        0
    ]
    assert torch.equal(loaded.predict(features, 2), probe.repeat_first[2])
    shares = probe.first_share_on_repeats()
    assert {"layer", "repeats", "n", "first_share", "ci_low", "ci_high"} <= set(shares[0])
    assert probe.plot().data and json.dumps(probe.summary())


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, r: train_first_token_probe(
                m, LONG_TEXT, r, max_layer=SINK_LAYER, layers=[SINK_LAYER + 1]
            ),
            "past the sink layer",
        ),
        (
            lambda m, r: train_first_token_probe(m, CORPUS[:300], r, max_layer=SINK_LAYER),
            "too few to train a probe",
        ),
        (
            lambda m, r: first_detector_neurons(m, CORPUS[:100], r, sink_layer=SINK_LAYER),
            "too few to rank neurons",
        ),
        (lambda m, r: head_behaviour(m, {"x": r[:, :2]}), "at least 3 tokens"),
        (lambda m, r: convergence(m, ["the"], n_repeats=5), "nothing to fit"),
        (lambda m, r: convergence(m, ["dust"]), "'dust' is"),
        (lambda m, r: head_behaviour(m, {"x": r}, layer=N_LAYERS), "out of range"),
    ],
)
def test_bad_input_is_one_clear_error(marked, call, message):
    with pytest.raises(SinklensError, match=message) as info:
        call(marked, repeated_tokens(marked, "the", 30))
    assert "\n" not in str(info.value)


def test_convergence_follows_softmax_leakage_on_uniform_heads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "uniform", mark_head=True)
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight.zero_()  # every layer-0 head attends uniformly
    hf.save_pretrained(path)
    model = load_model(str(path), device="cpu")
    result = convergence(model, ["the"], prefix="Speak", n_repeats=100)
    n_prefix = 1 + len(model.tokenizer.encode("Speak", add_special_tokens=False))
    n = torch.arange(1, 101)
    assert torch.allclose(
        result.leaked[0], n_prefix / (n_prefix + n).float(), atol=1e-5
    )  # exactly the leak formula
    assert result.slopes()[" the"]["leaked_attention"]["slope"] == pytest.approx(-1.0, abs=0.15)
    assert result.l2[0, 0, -1] < result.l2[0, 0, 0]  # the distance to the lone token shrinks
    assert json.dumps(result.summary()) and result.plot().data


def test_circuit_command_names_the_planted_head(marked_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LONG_TEXT)
    assert (
        main(
            [
                "circuit",
                "--model",
                str(marked_dir),
                "--corpus",
                str(corpus),
                "--words",
                "the",
                "you",
                "--n-repeats",
                "40",
                "--contexts",
                "4",
                "--corpus-chars",
                "400",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["detect_others_heads"] == [[0, MARK_HEAD]]
    assert {"head_effects", "probe", "first_detector_neurons", "convergence"} <= set(summary)
    assert all({"accuracy", "first_share_on_repeats"} <= set(p) for p in summary["probe"])
    assert all("slope" in w for w in summary["convergence"])
    effects = {(h["layer"], h["head"]): h for h in summary["head_effects"]}
    assert (
        effects[(0, MARK_HEAD)]["in_context"] > effects[(0, MARK_HEAD)]["in_context_placebo"] + 0.5
    )
    assert (
        main(
            [
                "circuit",
                "--model",
                str(marked_dir),
                "--corpus",
                str(corpus),
                "--words",
                "the",
                "--n-repeats",
                "40",
                "--contexts",
                "4",
                "--corpus-chars",
                "400",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"detect-others heads (layer 0 heads the sink neurons need): [[0, {MARK_HEAD}]]" in out


def test_circuit_refuses_a_model_without_a_sink(tmp_path):
    model = load_model(str(save_tiny(tmp_path, plant_sink=False)), device="cpu")
    with pytest.raises(SinklensError, match="shows no sink layer"):
        first_layer_circuit(model, LONG_TEXT, words=["the"], n_repeats=20, corpus_chars=400)
