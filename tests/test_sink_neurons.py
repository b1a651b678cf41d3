"""Sink neurons, the first-token choice, the ablation study and the Table-1 row, on tiny models
whose answer is planted (see conftest.py)."""

import json

import pytest
import torch

from conftest import (
    CORPUS,
    N_LAYERS,
    SECOND_SINK_LAYER,
    SECOND_SINK_NEURON,
    SINK_LAYER,
    SINK_NEURON,
    build_tokenizer,
    save_tiny,
)
from sinklens import SinklensError, load_model, run_cache, text_tokens
from sinklens.analyses.ablation import ablation_study, paper_ablation_layers
from sinklens.analyses.first_token import choose_first_token
from sinklens.analyses.sink_neurons import (
    NOT_FOUND,
    SEVERAL_LAYERS,
    SINGLE_LAYER,
    find_sink_neurons,
)
from sinklens.cli import main
from sinklens.errors import NoSinkError
from sinklens.results import load_result, save_result
from sinklens.run.interventions import ablation_hooks, mean_activations
from sinklens.run.tokens import repeated_tokens
from sinklens.studies.table import sink_table_row


@pytest.fixture(scope="module")
def reference(tiny):
    return text_tokens(tiny, CORPUS)


@pytest.fixture(scope="module")
def found(tiny, reference):
    return find_sink_neurons(tiny, reference)


def _load(path, **plant):
    return load_model(str(save_tiny(path, **plant)), device="cpu")


def test_finds_the_planted_neuron_and_removes_the_sink(found):
    assert found.case == SINGLE_LAYER and found.layers == [SINK_LAYER]
    assert found.sink_neurons == [(SINK_LAYER, SINK_NEURON)]
    assert found.first_token_norm > 1e3 * found.typical_norm
    assert float(found.removed_shares[1]) > 0.99
    frame = found.to_frame()
    assert len(frame) == 64 and frame.iloc[0][["layer", "neuron", "rank"]].tolist() == [
        SINK_LAYER,
        SINK_NEURON,
        1,
    ]
    assert frame["sink_neuron"].sum() == 1
    assert found.plot().data
    summary = found.summary()
    assert summary["sink_neurons_by_layer"] == {str(SINK_LAYER): [SINK_NEURON]}
    assert json.dumps(summary)


def test_scores_and_filter_match_a_direct_computation(tiny, reference, found):
    post_name, resid_name = (
        f"blocks.{SINK_LAYER}.mlp.hook_post",
        f"blocks.{SINK_LAYER}.hook_resid_post",
    )
    cache = run_cache(tiny, reference, [post_name, resid_name])
    post, resid = cache[post_name][0, 0], cache[resid_name][0, 0]
    w_out = tiny.blocks[SINK_LAYER].mlp.W_out.detach()
    assert torch.allclose(found.paper_scores[0], post.abs() * w_out.norm(dim=-1), rtol=1e-4)
    # At the sink layer itself, ablating neurons subtracts what they write: the filter's forward passes agree.
    for k in (1, 3):
        neurons = [n for _, n in found.candidates[:k]]
        expected = (resid - (post[neurons, None] * w_out[neurons]).sum(0)).norm()
        assert float(found.cumulative_norms[k]) == pytest.approx(float(expected), rel=1e-3)
    assert float(found.individual_norms[0]) == pytest.approx(
        float(found.cumulative_norms[1]), rel=1e-5
    )


def test_the_notebook_rule_misses_a_neuron_that_fires_only_on_the_first_token(
    tiny, reference, found
):
    # The planted neuron reads a direction only the first token has, so at the last repeat of ' the'
    # its gate is 0: the notebook's top 2 leave it out, and its criterion cannot find it.
    assert SINK_NEURON not in found.notebook_neurons
    assert "' the' x 255" in found.notebook_input  # the notebook's 1000 repeats, cut to the context
    by_notebook = find_sink_neurons(
        tiny, reference, layers=SINK_LAYER, criterion="notebook", max_neurons=4
    )
    assert by_notebook.criterion == "notebook" and by_notebook.case == NOT_FOUND
    assert (SINK_LAYER, SINK_NEURON) not in by_notebook.candidates


def test_a_permuted_copy_gives_the_same_neuron_renumbered(tmp_path, found):
    from transformers import AutoModelForCausalLM

    tiny_path = save_tiny(tmp_path / "orig")
    hf = AutoModelForCausalLM.from_pretrained(tiny_path)
    perm = torch.randperm(hf.config.intermediate_size, generator=torch.Generator().manual_seed(1))
    mlp = hf.model.layers[SINK_LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    hf.save_pretrained(tmp_path / "permuted")
    build_tokenizer().save_pretrained(tmp_path / "permuted")
    permuted = load_model(str(tmp_path / "permuted"), device="cpu")
    result = find_sink_neurons(permuted, text_tokens(permuted, CORPUS))
    new_index = int((perm == SINK_NEURON).nonzero())
    assert result.sink_neurons == [(SINK_LAYER, new_index)]
    assert torch.allclose(result.paper_scores[0], found.paper_scores[0][perm], rtol=1e-4, atol=1e-6)


def test_a_sink_built_over_two_layers_is_found_as_pairs(tmp_path):
    model = _load(tmp_path, two_layers=True)
    result = find_sink_neurons(model, text_tokens(model, CORPUS))
    assert result.case == SEVERAL_LAYERS and result.layers == [SINK_LAYER, SECOND_SINK_LAYER]
    assert result.sink_neurons_by_layer == {
        SINK_LAYER: [SINK_NEURON],
        SECOND_SINK_LAYER: [SECOND_SINK_NEURON],
    }
    assert (
        float(result.removed_shares[1]) < 0.9 <= float(result.removed_shares[2])
    )  # neither half is enough alone
    row = sink_table_row(model, CORPUS, words=["the"], n_repeats=20)
    assert row.summary()["sink_layer"] == SECOND_SINK_LAYER
    assert row.summary()["sink_neurons_by_layer"] == {
        str(SINK_LAYER): [SINK_NEURON],
        str(SECOND_SINK_LAYER): [SECOND_SINK_NEURON],
    }


def test_a_bos_the_model_does_not_make_a_sink_is_replaced_by_the_token_it_does(tmp_path):
    model = _load(tmp_path, sink_token="</s>")
    choice = choose_first_token(model, CORPUS)
    assert choice.token.text == "</s>" and choice.sink_found
    frame = choice.to_frame().set_index("token")
    assert not frame.loc["<s>", "becomes_sink"] and frame.loc["</s>", "becomes_sink"]
    assert "BOS is not a sink" in choice.reason
    row = sink_table_row(model, CORPUS, words=["the"], n_repeats=20).summary()
    assert (
        row["first_token"]["text"] == "</s>"
        and "BOS is not a sink" in row["first_token"]["chosen_by"]
    )
    assert row["sink_neurons"] == [SINK_NEURON]
    given = choose_first_token(model, CORPUS, given="bos")
    assert (
        given.token.text == "<s>" and not given.sink_found and "given by the user" in given.reason
    )


def test_a_model_without_a_sink_says_so(tmp_path, long_corpus_file, capsys):
    model = _load(tmp_path, plant_sink=False)
    choice = choose_first_token(model, CORPUS)
    assert not choice.sink_found and choice.reason.startswith("no sink found")
    with pytest.raises(NoSinkError, match="shows no sink layer"):  # never a made-up layer
        sink_table_row(model, CORPUS, words=["the"], n_repeats=20)
    study = ["--model", str(tmp_path), "--corpus", str(long_corpus_file), "--corpus-chars", "400"]
    for command in (
        ["table", "--n-repeats", "20"],
        ["neurons"],
        ["sink-layer"],
        ["circuit", "--n-repeats", "20"],
        ["patch", "--n-repeats", "20", "--out", str(tmp_path / "p.json")],
    ):
        assert main([*command, *study]) == 2
        err = [
            line for line in capsys.readouterr().err.splitlines() if line.startswith("sinklens:")
        ]
        assert len(err) == 1 and "shows no sink layer" in err[0], (command, err)


def test_ablation_hooks_edit_each_row_separately(tiny, reference):
    name = f"blocks.{SINK_LAYER}.hook_resid_post"
    tokens = reference.repeat(2, 1)
    both = run_cache(
        tiny, tokens, [name], interventions=ablation_hooks(tiny, [[(SINK_LAYER, SINK_NEURON)], []])
    )[name]
    intact = run_cache(tiny, reference, [name])[name]
    ablated = run_cache(
        tiny, reference, [name], interventions=ablation_hooks(tiny, [[(SINK_LAYER, SINK_NEURON)]])
    )
    assert torch.allclose(both[1], intact[0]) and torch.allclose(
        both[0], ablated[name][0], atol=1e-5
    )
    assert both[0, 0].norm() < 1e-2 * both[1, 0].norm()
    means = mean_activations(tiny, reference, [SINK_LAYER])
    to_mean = ablation_hooks(tiny, [[(SINK_LAYER, SINK_NEURON)]], values=means)
    post = f"blocks.{SINK_LAYER}.mlp.hook_post"
    edited = run_cache(tiny, reference, [post], interventions=to_mean)[post][0, :, SINK_NEURON]
    assert torch.allclose(edited, means[SINK_LAYER][SINK_NEURON].expand_as(edited))


def test_ablation_study_removes_the_first_token_norm_and_keeps_the_rest(tiny, reference):
    repeat = repeated_tokens(tiny, "the", 30)
    study = ablation_study(tiny, [(SINK_LAYER, SINK_NEURON)], {"text": reference, "repeat": repeat})
    assert study.layers == paper_ablation_layers(tiny, SINK_LAYER) == [2, 3, 4]
    text = study.norms[0]  # [condition, layer, pos]
    assert text.shape == (2, 3, reference.shape[1])
    assert (
        text[1, :, 0] < 1e-2 * text[0, :, 0]
    ).all()  # the first token's norm is gone at every layer
    assert torch.allclose(
        text[1, 0, 1:], text[0, 0, 1:], rtol=1e-3, atol=1e-4
    )  # later tokens untouched at the sink layer
    assert study.first_token_attention.shape == (2, 2, N_LAYERS)
    activation = study.activations[1][0]
    assert activation[0] > 1e3 and activation[1:].abs().max() < 1.0  # fires on the first token only
    summary = study.summary()
    at_sink = summary["inputs"][0]["layers"]["2"]
    assert at_sink["first_token_norm_ablated"] < 1e-2 * at_sink["first_token_norm_intact"]
    assert (
        len(study.plot().data) == 2 * 2 * 3
        and study.plot_attention().data
        and study.plot_activations().data
    )


def test_results_round_trip_through_a_file(tmp_path, found):
    save_result(found, tmp_path / "neurons.pt")
    loaded = load_result(tmp_path / "neurons.pt")
    assert loaded.sink_neurons == found.sink_neurons and loaded.to_frame().equals(found.to_frame())


def test_table_row_with_the_neurons_ablated(tiny):
    row = sink_table_row(tiny, CORPUS, words=["the", "you"], n_repeats=25)
    summary = row.summary()
    assert summary["sink_neurons"] == [SINK_NEURON] and summary["case"] == SINGLE_LAYER
    assert summary["first_token_norm_ablated"] < 1e-2 * summary["first_token_norm"]
    assert (
        row.curves_ablated.threshold == row.curves.threshold
    )  # one sink regime, from the intact model
    assert summary["repeat_max_norm_ablated"] == pytest.approx(max(row.curves_ablated.max_norms))
    assert row.plot().data


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, r: find_sink_neurons(m, r, layers=[]), "layer range is empty"),
        (
            lambda m, r: find_sink_neurons(m, r, layers=[N_LAYERS]),
            f"layer {N_LAYERS} is out of range",
        ),
        (lambda m, r: find_sink_neurons(m, r, share=1.5), "share must be in"),
        (lambda m, r: find_sink_neurons(m, r, criterion="vibes"), "unknown criterion"),
        (
            lambda m, r: ablation_hooks(m, [[(SINK_LAYER, 64)]]),
            "neuron 64 of layer 2 is out of range",
        ),
        (
            lambda m, r: ablation_study(m, [(SINK_LAYER, 1)], {"t": r}, mode="mean"),
            "mean-ablation needs",
        ),
        (lambda m, r: sink_table_row(m, CORPUS, words=[]), "word list is empty"),
        (
            lambda m, r: find_sink_neurons(m, r, layers=[2, 3], criterion="notebook"),
            "ranks the neurons of one layer",
        ),
        (lambda m, r: find_sink_neurons(m, r[:, :1]), "no token after the first"),
        (
            # a non-integer neuron index on purpose
            lambda m, r: ablation_hooks(m, [[(SINK_LAYER, 2.5)]]),  # type: ignore[list-item]
            "neuron 2.5 is not an integer",
        ),
        (
            lambda m, r: ablation_study(
                m, [(SINK_LAYER, 1)], {"t": r}, mode="mean", mean_values={0: torch.zeros(64)}
            ),
            r"no means for layer\(s\) \[2\]",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tiny, reference, call, message):
    with pytest.raises(SinklensError, match=message) as info:
        call(tiny, reference)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_the_notebook_criterion_needs_a_gated_mlp(tmp_path, corpus_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    reference = text_tokens(model, CORPUS)
    with pytest.raises(SinklensError, match="non-gated MLP.*criterion='paper'"):
        find_sink_neurons(model, reference, layers=1, criterion="notebook")
    result = find_sink_neurons(model, reference, layers=1)  # the paper's criterion works on any MLP
    assert result.notebook_scores is None and len(result.to_frame()) == model.cfg.d_mlp
    capsys.readouterr()
    code = main(
        [
            "neurons",
            "--model",
            str(tmp_path),
            "--layers",
            "1",
            "--criterion",
            "notebook",
            "--corpus",
            str(corpus_file),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert (
        code == 2 and err.startswith("sinklens: error: the notebook criterion") and "\n" not in err
    )


def test_numpy_and_torch_integers_are_accepted_as_layers_and_neurons(tiny, reference):
    import numpy as np

    hooks = ablation_hooks(tiny, [[(np.int64(SINK_LAYER), torch.tensor(SINK_NEURON))]])
    assert [name for name, _ in hooks] == [f"blocks.{SINK_LAYER}.mlp.hook_post"]
    assert find_sink_neurons(tiny, reference, layers=np.int64(SINK_LAYER)).sink_neurons == [
        (SINK_LAYER, SINK_NEURON)
    ]


def test_a_first_token_that_is_not_a_sink_gets_no_sink_neurons(tiny, reference):
    # Position 0 holds a text token, which the tiny model does not make a sink: no excess norm to remove.
    text_first = text_tokens(tiny, CORPUS, first=int(reference[0, 1]))
    result = find_sink_neurons(tiny, text_first, layers=SINK_LAYER)
    assert result.case == NOT_FOUND and result.sink_neurons == []
    assert torch.isfinite(result.removed_shares).all() and json.dumps(result.summary())
