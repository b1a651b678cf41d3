"""The sink census on the tiny model with a second sink planted: a delimiter whose own neuron, in a middle layer,
blows up its norm wherever it stands."""

from __future__ import annotations

import json

import pytest
import torch

import sinklens as sl
from conftest import (
    CORPUS,
    DELIMITER,
    DELIMITER_LAYER,
    DELIMITER_NEURON,
    N_LAYERS,
    SINK_LAYER,
    SINK_NEURON,
    build_hf_model,
    build_tokenizer,
    plant_delimiter_sink,
)
from sinklens.cli import main
from sinklens.load.fused_attention import use_fused_attention
from sinklens.studies.census import find_sinks

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def delimited_dir(tmp_path_factory):
    """The tiny model with the delimiter sink planted, and a chat template (turn markers around each message)."""
    path = tmp_path_factory.mktemp("tiny-delimited")
    tokenizer = build_tokenizer()
    model = build_hf_model(tokenizer)
    plant_delimiter_sink(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def delimited(delimited_dir):
    return sl.load_model(str(delimited_dir), device="cpu")


@pytest.fixture(scope="module")
def census(delimited, long_corpus_file):
    settings = sl.Settings(corpus=str(long_corpus_file), corpus_chars=400)
    return find_sinks(delimited, sl.text_tokens(delimited, CORPUS[:300]), settings)


def test_the_census_finds_the_first_token_and_the_planted_delimiter_sinks(delimited, census):
    tokens = census.tokens[0].tolist()
    colons = [
        p for p, t in enumerate(tokens) if t == delimited.tokenizer.convert_tokens_to_ids(DELIMITER)
    ]
    assert len(colons) >= 3 and [s.position for s in census.sinks] == [
        0,
        *colons,
    ]  # nothing else is a sink
    first, *delimiters = census.sinks
    assert (first.token, first.first_layer, first.n_layers) == (
        "<s>",
        SINK_LAYER,
        N_LAYERS - SINK_LAYER,
    )
    assert first.neurons == ((SINK_LAYER, SINK_NEURON),) and first.first_token_neurons
    for sink in delimiters:
        assert (sink.token, sink.first_layer, sink.n_layers) == (
            DELIMITER,
            DELIMITER_LAYER,
            N_LAYERS - DELIMITER_LAYER,
        )
        assert (
            sink.neurons == ((DELIMITER_LAYER, DELIMITER_NEURON),) and not sink.first_token_neurons
        )
        assert 0 < sink.attention_share < 1 and sink.peak_ratio > 10
    assert (
        census.in_regime[:DELIMITER_LAYER, colons].sum() == 0
    )  # not a sink before its neuron fires


def test_the_attention_a_sink_takes_is_what_every_pattern_says(delimited, census):
    """The fused kernel's indicator columns give the mean weight later queries pay each sink, as patterns do."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(N_LAYERS)]
    patterns = sl.run_cache(delimited, census.tokens, names)
    for sink in census.sinks:
        layers = range(
            sink.first_layer + 1, min(sink.first_layer + sink.n_layers, N_LAYERS - 1) + 1
        )
        paid = [
            float(patterns[names[layer]][0, :, sink.position + 1 :, sink.position].mean())
            for layer in layers
        ]
        assert sink.attention_share == pytest.approx(sum(paid) / len(paid), rel=1e-5)


def test_the_census_is_the_same_on_the_eager_path(delimited, long_corpus_file, census):
    try:
        use_fused_attention(delimited, False)
        eager = find_sinks(delimited, census.tokens, setup=census.setup)
    finally:
        use_fused_attention(delimited, True)
    assert [s.position for s in eager.sinks] == [s.position for s in census.sinks]
    torch.testing.assert_close(eager.norms, census.norms, rtol=1e-5, atol=1e-3)
    for step_by_step, fused in zip(eager.sinks, census.sinks):  # read from the patterns there
        assert step_by_step.attention_share == pytest.approx(fused.attention_share, rel=1e-5)
        assert step_by_step.neurons == fused.neurons


def test_the_result_is_a_table_a_figure_and_json(census):
    frame = census.to_frame()
    assert (
        list(frame["position"]) == [s.position for s in census.sinks]
        and frame["neurons"][0] == "L2.5"
    )
    figure = census.plot()
    assert figure.data[0].type == "heatmap" and len(figure.data[0].z) == N_LAYERS
    assert list(figure.data[1].x) == [s.position for s in census.sinks]
    summary = json.loads(json.dumps(census.summary()))
    assert summary["sinks"][0]["neurons"] == [[SINK_LAYER, SINK_NEURON]]
    assert summary["sink_regime"]["layers"] == list(range(SINK_LAYER, N_LAYERS))


def test_sinks_command_prints_json_and_reads_a_chat_in_the_models_template(
    delimited_dir, long_corpus_file, tmp_path, capsys
):
    study = [
        "sinks",
        "--model",
        str(delimited_dir),
        "--corpus",
        str(long_corpus_file),
        "--corpus-chars",
        "400",
    ]
    assert main([*study, "--json"]) == 0
    sinks = json.loads(capsys.readouterr().out)["sinks"]
    required = {"position", "token", "first_layer", "n_layers", "attention_share", "neurons"}
    assert all(required <= set(s) for s in sinks) and sinks[0]["position"] == 0
    chat = tmp_path / "chat.json"
    chat.write_text(
        json.dumps(
            [{"role": "user", "content": "Speak, speak."}, {"role": "assistant", "content": "All"}]
        )
    )
    assert main([*study, "--chat", str(chat), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    positions = {s["position"]: s["token"] for s in out["sinks"]}
    assert (
        positions[0] == "<s>" and list(positions.values()).count(DELIMITER) == 2
    )  # "user:", "assistant:"
    text = tmp_path / "text.txt"
    text.write_text("We know't: we know't.")
    assert main([*study, "--text", str(text)]) == 0
    assert "sinks in text.txt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"role": "user", "content": "hi"}',
            "is not a list of messages with a string role and content",
        ),
        ('[{"role": "user"}]', "is not a list of messages with a string role and content"),
        ("[not json", "is not JSON"),
    ],
)
def test_a_chat_file_that_is_not_a_message_list_is_one_line(
    delimited_dir, tmp_path, capsys, monkeypatch, content, message
):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    chat = tmp_path / "chat.json"
    chat.write_text(content)
    assert main(["sinks", "--model", str(delimited_dir), "--chat", str(chat)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and "Fix:" in err[0], err


def test_a_model_without_a_chat_template_is_one_line(tiny_dir, long_corpus_file, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    assert (
        main(
            [
                "sinks",
                "--model",
                str(tiny_dir),
                "--corpus",
                str(long_corpus_file),
                "--corpus-chars",
                "400",
                "--chat",
                str(chat),
            ]
        )
        == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sinklens")]
    assert len(err) == 1 and "has no chat template" in err[0], err
    assert main(["sinks", "--chat", str(chat), "--text", str(chat)]) == 2  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err
