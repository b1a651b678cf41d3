"""The live explorer (``sl.explore``) driven without a browser: set a control, read the figures.

Most tests use the tiny model's planted sink (layer ``SINK_LAYER``, neuron ``SINK_NEURON``). The
patch test uses a variant where a run of ``' the'`` looks more and more like a lone first token,
the paper's mechanism in miniature: layer 0's uniform "mark" head copies a dimension into the one
the sink neuron reads, and ``' the'`` carries twice the first token's share of it, so the longer
the run, the more the neuron fires on it, and the paper's patch (hold the neuron at the first
repeat's value) lowers the later repeats.
"""

import base64
import dataclasses
import html
import shutil
import sys

import plotly.graph_objects as go
import pytest
import torch

from conftest import CORPUS, SINK_LAYER, SINK_NEURON, build_hf_model, build_tokenizer
from sinklens import (
    SinklensError,
    attention_received,
    load_model,
    patch_for,
    repeated_tokens,
    run_cache,
    sink_table_row,
)
from sinklens.analyses.norms import resid_norms
from sinklens.present.explore import explore
from sinklens.present.explore_views import circuitsvis_bundle
from sinklens.studies import explorer_circuit as explore_study
from sinklens.studies.explorer_circuit import PATTERN_EDGE, explorer_circuit, pattern_window

REPEATS = 12


@pytest.fixture(scope="module")
def row(tiny):
    """The first token, sink layer and neurons and the typical norm, measured once for every explorer here."""
    return sink_table_row(tiny, CORPUS, words=["the"], n_repeats=REPEATS)


@pytest.fixture
def explorer(tiny, row):
    return explore(tiny, row, n_repeats=REPEATS)


@pytest.fixture
def forward_passes(monkeypatch):
    """Counts the explorer's forward passes (every one goes through run_cache)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return run_cache(*args, **kwargs)

    monkeypatch.setattr(explore_study, "run_cache", counting)
    return calls


@pytest.fixture(scope="module")
def growing(tmp_path_factory):
    """The tiny model where a run of ' the' drives the sink neuron up (see the module docstring)."""
    tokenizer = build_tokenizer()
    model = build_hf_model(tokenizer, mark_head=True)
    (the,) = tokenizer.encode(" the", add_special_tokens=False)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[the, 1] = 2 * embed[tokenizer.bos_token_id, 1]
    path = tmp_path_factory.mktemp("tiny-growing")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(str(path), device="cpu")


def _norm_trace(explorer, name="original"):
    return next(trace for trace in explorer.norm_figure.data if trace.name == name)


def _traces(figure):
    return [(trace.name, trace.x, trace.y) for trace in figure.data]


def test_the_views_show_the_analyses_numbers(tiny, explorer):
    tokens = repeated_tokens(tiny, "the", REPEATS)
    assert explorer.neurons == [(SINK_LAYER, SINK_NEURON)] and explorer.sink_layer == SINK_LAYER
    assert explorer.message.value == "" and explorer.error is None
    assert torch.allclose(
        torch.tensor(_norm_trace(explorer).y), resid_norms(tiny, tokens, SINK_LAYER)[0]
    )
    received = attention_received(
        tiny, tokens
    )  # every pattern read step by step, as the explorer used to
    attention, sink_heads = (torch.tensor(t.y) for t in explorer.attention_figure.data)
    assert torch.allclose(attention, received.first_token) and torch.equal(
        sink_heads, received.sink_head_share
    )
    assert explorer.runs[0].sinks == [
        0
    ]  # the first token, alone in the sink regime at the sink layer
    name = f"blocks.{SINK_LAYER}.mlp.hook_post"
    neuron = run_cache(tiny, tokens, [name])[name][0, :, SINK_NEURON]
    assert torch.allclose(torch.tensor(explorer.neuron_figure.data[0].y), neuron)
    assert (
        "<iframe" in explorer.pattern_html.value
        and "CircuitsVis.render(" in explorer.pattern_html.value
    )


def test_the_pattern_view_carries_circuitsvis_and_loads_nothing(explorer):
    """The head's pattern is drawn by circuitsvis' own bundle, inlined, so it draws offline."""
    page = explorer.pattern_html.value
    assert html.escape(circuitsvis_bundle()) in page and "CircuitsVis.AttentionPattern" in page
    around_the_bundle = page.replace(html.escape(circuitsvis_bundle()), "")
    assert "unpkg" not in around_the_bundle and "src=" not in around_the_bundle.replace(
        "srcdoc=", ""
    )
    assert (
        "</script" not in circuitsvis_bundle()
    )  # the inlined bundle cannot end its script element early


def test_moving_the_repeat_slider_reruns_and_redraws(tiny, explorer, forward_passes):
    explorer.repeats.value = 30
    trace = _norm_trace(explorer)
    assert len(trace.y) == 31 and list(explorer.norm_figure.layout.xaxis.range) == [0, 30]
    assert torch.allclose(
        torch.tensor(trace.y), resid_norms(tiny, repeated_tokens(tiny, "the", 30), SINK_LAYER)[0]
    )
    assert len(explorer.neuron_figure.data[0].y) == 31
    assert forward_passes == [(1, 31)] and explorer.last_update_seconds > 0


def test_moving_the_layer_reads_its_pattern_and_moving_the_head_redraws_from_memory(
    tiny, explorer, forward_passes
):
    """Only the layer shown runs attention step by step: another layer is one more forward pass (the attention to
    the first token is the same whichever layer runs which way), another head none."""
    pattern, attention = explorer.pattern_html.value, explorer.attention_figure.data[0].y
    explorer.layer.value = 4
    assert (
        explorer.pattern_html.value != pattern and "Layer 4, head 0" in explorer.pattern_html.value
    )
    assert explorer.attention_figure.layout.shapes[0].x0 == 4 and explorer.runs[0].layer == 4
    assert torch.allclose(
        torch.tensor(explorer.attention_figure.data[0].y), torch.tensor(attention), rtol=1e-5
    )
    assert forward_passes == [(1, REPEATS + 1)]
    explorer.head.value = 3
    assert "Layer 4, head 3" in explorer.pattern_html.value
    assert forward_passes == [(1, REPEATS + 1)] and explorer.error is None
    name = "blocks.4.attn.hook_pattern"  # what the view draws is the head's own pattern
    full = run_cache(tiny, repeated_tokens(tiny, "the", REPEATS), [name])[name][0, 3]
    assert torch.allclose(explorer.runs[0].pattern[3], full, atol=1e-6)


def test_the_runs_come_without_the_widget(tiny, row, explorer, forward_passes):
    """The circuit and the runs the explorer shows, from plain Python: the same numbers."""
    circuit = explorer_circuit(tiny, row, n_repeats=REPEATS)
    measured = (circuit.first, circuit.neurons, circuit.patch)
    assert measured == (explorer.first, explorer.neurons, explorer.patch)
    tokens = circuit.prompt_tokens("repeat", word="the", n_repeats=REPEATS)
    assert torch.equal(tokens, explorer.prompt_tokens())
    layer = explorer.layer.value
    original, patched = circuit.prompt_runs(tokens, layer, patched=True)
    shown = explorer.runs[0]
    assert (original.label, patched.label) == ("original", "patched")
    assert original.sinks == shown.sinks and original.token_texts == shown.token_texts
    for name in ("norms", "first_attention", "activations", "pattern"):
        assert torch.equal(getattr(original, name), getattr(shown, name))
    assert circuit.prompt_runs(tokens, layer)[0] is original  # from memory
    assert len(forward_passes) == 2
    explorer.prompt_mode.value = "cluster"
    assert torch.equal(circuit.prompt_tokens("cluster", length=REPEATS), explorer.prompt_tokens())


def test_a_long_prompt_shows_the_first_and_last_positions_of_the_pattern(explorer):
    explorer.repeats.value = 100
    window = pattern_window(101)
    assert window == [*range(PATTERN_EDGE), *range(101 - PATTERN_EDGE, 101)]
    assert explorer.runs[0].window == window and explorer.runs[0].pattern.shape[-2:] == (
        len(window),
        len(window),
    )
    assert (
        f"positions 0-{PATTERN_EDGE - 1} and {101 - PATTERN_EDGE}-100 of 101"
        in explorer.pattern_html.value
    )


def test_runs_are_remembered_across_patch_toggles_and_prompts(explorer, forward_passes):
    explorer.patch_toggle.value = True
    assert len(forward_passes) == 1  # only the patched run is new
    explorer.patch_toggle.value = False
    explorer.patch_toggle.value = True
    assert len(forward_passes) == 1
    explorer.repeats.value = 20
    assert len(forward_passes) == 3  # a new prompt with the patch on: original and patched
    explorer.repeats.value = REPEATS
    assert len(forward_passes) == 3


def test_the_patch_toggle_adds_patched_traces_and_lowers_the_sink_neuron_on_repeats(growing):
    explorer = explore(growing, text=CORPUS, n_repeats=60)
    assert explorer.neurons == [(SINK_LAYER, SINK_NEURON)]
    before = len(explorer.norm_figure.data)
    explorer.patch_toggle.value = True
    names = [t.name for t in explorer.norm_figure.data]
    assert explorer.error is None and len(names) > before and "patched" in names
    assert any(
        name.startswith("patched: sinks (") for name in names
    )  # the patched run's sinks marked too
    assert [t.name for t in explorer.neuron_figure.data] == [
        f"L{SINK_LAYER}.{SINK_NEURON} original",
        f"L{SINK_LAYER}.{SINK_NEURON} patched",
    ]
    original, patched = (torch.tensor(t.y) for t in explorer.neuron_figure.data)
    assert torch.equal(
        original[:2], patched[:2]
    )  # the first token and the first repeat keep their values
    assert (patched[2:] < original[2:]).all() and original[-1] > original[
        1
    ]  # the run grows; the patch holds it
    assert (
        torch.tensor(_norm_trace(explorer, "patched").y[2:])
        < torch.tensor(_norm_trace(explorer).y[2:])
    ).all()
    assert [t.name for t in explorer.attention_figure.data if t.name.endswith("first token")] == [
        "original: first token",
        "patched: first token",
    ]
    assert not hasattr(growing, "_sinklens_patch")  # installed for the patched run only
    explorer.patch_toggle.value = False
    assert len(explorer.norm_figure.data) == before


def test_a_cluster_sequence_draws_from_the_cluster_without_immediate_repeats(tiny, row):
    explorer = explore(tiny, row, cluster=["the", "you", "we"], n_repeats=REPEATS)
    explorer.prompt_mode.value = "cluster"
    ids = explorer.prompt_tokens()[0].tolist()
    pool = {
        tiny.tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in ("the", "you", "we")
    }
    assert explorer.cluster_tokens.value == "the, you, we"
    assert (
        ids[0] == tiny.tokenizer.bos_token_id and len(ids) == REPEATS + 1 and set(ids[1:]) <= pool
    )
    assert all(a != b for a, b in zip(ids[1:], ids[2:]))
    assert len(_norm_trace(explorer).y) == REPEATS + 1 and explorer.error is None
    explorer.cluster_seed.value = 1
    assert explorer.prompt_tokens()[0].tolist() != ids


@pytest.mark.parametrize(
    "control, value, message",
    [
        ("word", "", "is empty"),
        ("word", "xylophone", "tokens for this tokenizer"),
        ("word", " the", "surrounding whitespace"),
        ("text", "   ", "the prompt is empty"),
        ("text", CORPUS * 4, "longer than the context"),
        ("layer", 6, "layer 6 is out of range"),
        ("layer", -1, "layer -1 is out of range"),
        ("head", 4, "head 4 is out of range"),
        ("cluster_tokens", "the, the", "1 distinct token"),
        ("cluster_tokens", "the, 99999", "outside the vocabulary"),
    ],
)
def test_bad_input_shows_one_line_and_leaves_the_figures(explorer, capsys, control, value, message):
    mode = {"text": "text", "cluster_tokens": "cluster"}.get(control)
    if mode:
        explorer.prompt_mode.value = mode
    figures = [
        f.to_dict()
        for f in (explorer.norm_figure, explorer.attention_figure, explorer.neuron_figure)
    ]
    pattern = explorer.pattern_html.value
    getattr(explorer, control).value = value  # raises nothing
    assert message in explorer.message.value and "\n" not in explorer.message.value
    assert isinstance(explorer.error, SinklensError)
    assert [
        f.to_dict()
        for f in (explorer.norm_figure, explorer.attention_figure, explorer.neuron_figure)
    ] == figures
    assert explorer.pattern_html.value == pattern
    assert capsys.readouterr() == ("", "")


def test_a_good_input_after_a_bad_one_clears_the_message(explorer):
    explorer.layer.value = 60
    assert explorer.message.value
    explorer.layer.value = 1
    assert (
        explorer.message.value == ""
        and explorer.error is None
        and "Layer 1," in explorer.pattern_html.value
    )


def test_a_patch_installed_outside_the_explorer_is_refused(tiny, explorer):
    with explorer.patch.installed(tiny):
        explorer.repeats.value = 25
    assert (
        "already installed" in explorer.message.value
        and len(_norm_trace(explorer).y) == REPEATS + 1
    )


def test_without_the_notebook_extra_the_explorer_says_what_to_install(tiny, row, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(SinklensError, match=r"notebook extra.*pip install 'sinklens\[notebook\]'"):
        explore(tiny, row)


def test_it_opens_on_the_prompt_layer_head_and_patch_state_asked_for(tiny, row, forward_passes):
    explorer = explore(
        tiny, row, prompt_mode="text", text=CORPUS[:200], layer=4, head=3, patched=True
    )
    assert (
        explorer.error is None
        and explorer.prompt_mode.value == "text"
        and explorer.patch_toggle.value
    )
    assert (
        "Layer 4, head 3" in explorer.pattern_html.value
        and explorer.attention_figure.layout.shapes[0].x0 == 4
    )
    assert [run.label for run in explorer.runs] == ["original", "patched"]
    assert explorer.runs[0].token_texts[1:] == [
        tiny.tokenizer.decode([t])
        for t in tiny.tokenizer.encode(CORPUS[:200], add_special_tokens=False)
    ]
    assert len(forward_passes) == 2  # the prompt, original and patched


@pytest.mark.parametrize(
    "opening, message",
    [
        (dict(prompt_mode="words"), "unknown prompt mode 'words'"),
        (dict(layer=6), "layer 6 is out of range"),
        (dict(head=4), "head 4 is out of range"),
    ],
)
def test_a_bad_opening_is_refused_before_the_circuit_is_measured(
    tiny, opening, message, forward_passes
):
    with pytest.raises(SinklensError, match=message):
        explore(tiny, **opening)
    assert forward_passes == []


def test_opening_patched_without_a_patch_is_refused(tiny, row):
    no_neurons = dataclasses.replace(
        row,
        setup=dataclasses.replace(row.setup, neurons=dataclasses.replace(row.neurons, n_sink=0)),
    )
    with pytest.raises(SinklensError, match="no patch to open on"):
        explore(tiny, no_neurons, patched=True)


def test_another_view_of_the_same_circuit_measures_nothing_again(explorer, forward_passes):
    explorer.word.value = "you"
    forward_passes.clear()
    layer = explorer.layer.value
    view = explorer.opened_at(layer=layer, head=1, patched=True)
    assert (view.first, view.neurons, view.baseline, view.patch) == (
        explorer.first,
        explorer.neurons,
        explorer.baseline,
        explorer.patch,
    )
    assert (
        view.word.value == "you"
        and view.repeats.value == REPEATS
        and view.prompt_mode.value == "repeat"
    )
    assert f"Layer {layer}, head 1" in view.pattern_html.value and len(view.runs) == 2
    assert forward_passes == [
        (1, REPEATS + 1)
    ]  # the patched run only: no measurement, the original run is shared
    text_view = explorer.opened_at(prompt_mode="text", text="First Citizen: speak")
    assert text_view.prompt_mode.value == "text" and not text_view.patch_toggle.value
    assert len(_norm_trace(text_view).y) == len(text_view.prompt_tokens()[0])


def test_the_static_figure_stacks_the_four_views_as_they_stand(explorer):
    explorer.patch_toggle.value = True
    stacked = explorer.static_figure().data
    views = [
        *explorer.norm_figure.data,
        *explorer.attention_figure.data,
        *explorer.neuron_figure.data,
    ]
    lines, heatmaps = stacked[: len(views)], stacked[len(views) :]
    assert [(t.name, list(t.y)) for t in lines] == [(t.name, list(t.y)) for t in views]
    assert (
        len({(t.xaxis, t.yaxis) for t in lines}) == 4
    )  # norms, attention's two panels, neurons: each its own axes
    assert {t.legend for t in lines} == {
        "legend",
        "legend2",
        "legend3",
    }  # a legend beside each view
    assert [h.type for h in heatmaps] == ["heatmap"] * 2  # the head's pattern, original and patched
    head = explorer.head.value
    for heatmap, run in zip(heatmaps, explorer.runs):
        pattern = run.pattern[head]
        unseen = torch.ones_like(pattern, dtype=torch.bool).triu(1)  # keys after the query: blank
        assert torch.allclose(
            torch.tensor(heatmap.z), pattern.masked_fill(unseen, float("nan")), equal_nan=True
        )
        assert float(pattern[unseen].abs().max()) == 0.0


def test_it_displays_as_one_widget_with_a_static_image(explorer):
    bundle = explorer._repr_mimebundle_()
    assert (
        bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    )
    if shutil.which("chromium") is None and "image/png" not in bundle:
        pytest.skip(f"no chromium for kaleido's static image: {bundle['text/plain']}")
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")


def test_an_explorer_that_drew_nothing_says_so_instead_of_an_image(tiny, row):
    explorer = explore(tiny, row, word="xylophone")
    assert "tokens for this tokenizer" in explorer.message.value
    text = explorer._repr_mimebundle_()["text/plain"]
    assert "no static image" in text and "drawn nothing yet" in text and "xylophone" in text


def test_the_word_can_be_a_token_or_a_token_id(tiny, row):
    """A token whose text does not read back as one mid-text word is shown, and typed, as its id."""
    (the,) = tiny.tokenizer.encode(" the", add_special_tokens=False)
    n_piece = next(
        i for i in range(tiny.cfg.d_vocab) if tiny.tokenizer.decode([i]) == "n"
    )  # no leading space
    assert explore(tiny, row, word=the, n_repeats=REPEATS).word.value == "the"
    explorer = explore(tiny, row, word=n_piece, n_repeats=REPEATS)
    assert explorer.word.value == str(n_piece) and explorer.error is None
    assert explorer.prompt_tokens()[0, 1:].tolist() == [n_piece] * REPEATS
    explorer.word.value = "the"
    assert explorer.prompt_tokens()[0, 1:].tolist() == [the] * REPEATS


def test_without_a_static_image_the_plain_text_says_why(explorer, monkeypatch):
    def no_browser(*args, **kwargs):
        raise RuntimeError("no Chrome found")

    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    bundle = explorer._repr_mimebundle_()
    assert "image/png" not in bundle and "application/vnd.jupyter.widget-view+json" in bundle
    assert (
        bundle["text/plain"]
        == "sinklens explorer (no static image of its views: RuntimeError: no Chrome found)"
    )


def test_a_patch_for_another_model_is_refused_when_the_explorer_is_built(tiny, row):
    foreign = dataclasses.replace(patch_for(tiny, [(SINK_LAYER, SINK_NEURON)]), n_layers=12)
    with pytest.raises(SinklensError, match="does not fit"):
        explore(tiny, row, patch=foreign)
