"""The patch's evaluation on the tiny model: benchmark scoring against a plain per-choice forward,
paired comparisons, natural-text KL, divergence under generation, and `sinklens evaluate` end to end.

Benchmark items are built here (the real data is exercised by the integration tests)."""

import contextlib
import json

import pytest
import torch

from conftest import CORPUS, SINK_LAYER, SINK_NEURON, build_tokenizer
from sinklens.analyses.benchmarks import (
    BenchmarkComparison,
    ItemScores,
    accuracy,
    compare_benchmarks,
    score_items,
    text_effect,
)
from sinklens.analyses.divergence import Generation, divergence
from sinklens.analyses.norms import resid_norms
from sinklens.analyses.sink_patch_choice import kl_divergence
from sinklens.cli import main
from sinklens.load import models as models_module
from sinklens.load.benchmark_items import Item
from sinklens.load.models import load_hf_model
from sinklens.run.sink_patch import SinkPatch, patch_for
from sinklens.run.tokens import repeated_tokens, text_tokens, word_token
from sinklens.studies import evaluation as evaluation_module

ITEMS = [
    Item(
        "toy",
        "0",
        ("First Citizen:",) * 3,
        (" Before we proceed", " speak", " resolved, resolved."),
        0,
    ),
    Item("toy", "1", ("All:",) * 2, (" Speak, speak.", " We know't"), 0),
    Item(
        "toy", "2", ("Let us kill him, and",) * 2, (" we'll have corn", " the patricians good"), 0
    ),
    Item(
        "letters",
        "3",
        ("You are all resolved rather to die than to",) * 4,
        (" the", " you", " we", " all"),
        1,
    ),
    Item(
        "winogrande",
        "4",
        ("We are accounted poor", "We are accounted rich"),
        (" citizens, the patricians good.",) * 2,
        0,
    ),
]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return load_hf_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def patch(tiny):
    return patch_for(tiny, [(SINK_LAYER, SINK_NEURON), (SINK_LAYER, 7)], hook="post")


def _plain_score(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One choice scored alone, with no batching, padding or shared rows: its log-likelihood, and
    whether greedy decoding yields it."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = (
        context[: len(context) - spaces],
        context[len(context) - spaces :] + continuation,
    )
    prefix = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor(
        [
            (
                [tokenizer.bos_token_id]
                if tokenizer("a").input_ids[0] == tokenizer.bos_token_id
                else []
            )
            + whole
        ]
    )
    start = ids.shape[1] - (len(whole) - len(prefix))
    with torch.inference_mode():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    targets = range(start, ids.shape[1])
    return (
        float(sum(logprobs[p - 1, ids[0, p]] for p in targets)),
        all(int(logprobs[p - 1].argmax()) == int(ids[0, p]) for p in targets),
    )


@pytest.mark.parametrize("patched", [False, True])
def test_batched_scores_equal_each_choice_scored_alone(hf, patch, patched, monkeypatch):
    """Shared contexts run once with their choices packed after them, rows padded and batched: the
    same log-likelihoods and greedy flags as each choice run alone, with and without the patch."""
    model, tokenizer = hf
    import sinklens.analyses.benchmarks as benchmarks

    monkeypatch.setattr(
        benchmarks, "TOKENS_PER_BATCH", 40
    )  # several batches, padded rows of different lengths
    with patch.installed(model) if patched else contextlib.nullcontext():
        scores = score_items(model, tokenizer, ITEMS)
        for item, score in zip(ITEMS, scores):
            alone = [
                _plain_score(model, tokenizer, c, k)
                for c, k in zip(item.contexts, item.continuations)
            ]
            assert score.logprob == pytest.approx([a for a, _ in alone], abs=1e-4)
            assert score.greedy == [g for _, g in alone]
            assert all(n >= 1 for n in score.n_tokens)


def test_shared_contexts_are_packed_within_the_exact_length():
    from sinklens.analyses.benchmarks import _rows

    tokenizer = build_tokenizer()
    rows = _rows(tokenizer, ITEMS, [], max_packed=10_000)
    assert [len(r.continuations) for r in rows] == [
        3,
        2,
        2,
        0,
        1,
        1,
    ]  # toy items packed, letters, WinoGrande split
    limit = (
        max(len(r.inputs) for r in rows[:3]) - 1
    )  # e.g. a sliding window shorter than the longest packed row
    assert len(_rows(tokenizer, ITEMS, [], max_packed=limit)) > len(rows)


def test_accuracy_takes_the_best_choice_and_normalises_by_characters():
    item = Item("toy", "0", ("q",) * 2, (" a", " much longer"), 1)
    scores = [ItemScores([-1.0, -3.0], [1, 2], [True, False])]
    assert accuracy([item], scores).tolist() == [0.0]  # raw log-likelihood prefers the short choice
    assert accuracy([item], scores, normalised=True).tolist() == [1.0]  # -1/2 < -3/12
    lambada = Item("lambada", "1", ("text",), (" word",), 0)
    assert accuracy([lambada], [ItemScores([-9.0], [1], [True])]).tolist() == [
        1.0
    ]  # greedy decoding decides


def test_comparison_is_paired_and_zero_for_the_same_model(hf, patch):
    model, tokenizer = hf
    items = {"toy": ITEMS}
    scores = score_items(model, tokenizer, ITEMS)
    same = BenchmarkComparison(["toy"], items, {"toy": scores}, {"toy": scores}).summary()["toy"]
    assert (
        same["delta"] == same["ci_low"] == same["ci_high"] == 0.0 and same["logprob_change"] == 0.0
    )
    compared = compare_benchmarks(model, tokenizer, patch, items)
    assert not hasattr(model, "_sinklens_patch")  # removed afterwards
    with patch.installed(model):
        patched = score_items(model, tokenizer, ITEMS)
    assert [s.logprob for s in compared.patched["toy"]] == [s.logprob for s in patched]
    row = compared.summary()["toy"]
    changes = torch.tensor(
        [b - a for s, t in zip(scores, patched) for a, b in zip(s.logprob, t.logprob)]
    )
    assert row["logprob_change"] == pytest.approx(float(changes.mean()))
    assert row["logprob_change_abs"] > 0  # the patch does move the tiny model's scores
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    merged = BenchmarkComparison.merge(
        [
            compared,
            BenchmarkComparison(
                ["other"], {"other": ITEMS[:2]}, {"other": scores[:2]}, {"other": scores[:2]}
            ),
        ]
    )
    assert merged.tasks == ["toy", "other"] and merged.summary()["toy"] == row


def test_natural_text_effect_is_the_kl_of_the_two_models(tiny, hf, patch):
    model, _ = hf
    tokens = text_tokens(tiny, CORPUS)
    effect = text_effect(model, tokens, patch, window=32)
    assert (
        effect.kl.shape == effect.nll_original.shape == (tokens.shape[1] - 1,)
    )  # every text token predicted
    with torch.inference_mode():
        original = model(input_ids=tokens[:, :32]).logits
        with patch.installed(model):
            patched = model(input_ids=tokens[:, :32]).logits
    assert effect.kl[:31] == pytest.approx(kl_divergence(original, patched)[0, :31], abs=1e-6)
    assert float(effect.kl[0]) == pytest.approx(
        0.0, abs=1e-7
    )  # position 0 of a window is never patched
    summary = effect.summary()
    assert summary["kl_natural_text"] > 0 and summary["perplexity_original"] > 1


def test_divergence_counts_repeats_before_the_first_other_token():
    generation = Generation(
        "w",
        "raw",
        3,
        "original",
        "greedy",
        4,
        torch.tensor([1, 7, 7, 7, 7, 7, 9, 7]),
        7,
        "",
        torch.ones(8),
    )
    assert (
        generation.repeats_before_divergence == 2
        and generation.non_target_share == pytest.approx(1 / 4)
    )
    never = Generation(
        "w",
        "raw",
        3,
        "original",
        "greedy",
        4,
        torch.tensor([1, 7, 7, 7, 7, 7]),
        7,
        "",
        torch.ones(6),
    )
    assert never.repeats_before_divergence == 2 and never.non_target_share == 0


def test_divergence_generates_with_and_without_the_patch(tiny, hf, patch):
    model, tokenizer = hf
    word = word_token(tiny, "speak")
    result = divergence(
        model,
        tokenizer,
        tiny,
        patch,
        [word],
        first=tokenizer.bos_token_id,
        sink_layer=SINK_LAYER,
        typical_norm=1.0,
        raw_repeats=(8,),
        new_tokens=6,
        seeds=(0,),
        teacher_repeats=12,
    )
    frame = result.to_frame()
    assert (
        len(frame) == 2 * 2
    )  # original/patched x greedy/sampled; no chat template on the tiny tokenizer
    greedy = result.generations[0]
    expected = model.generate(
        torch.tensor([greedy.tokens[: greedy.prompt_length].tolist()]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )[0]
    assert torch.equal(greedy.tokens, expected)
    assert result.continue_probability.shape == (2, 1, 12)
    assert ((result.continue_probability >= 0) & (result.continue_probability <= 1)).all()
    assert greedy.sink_norms.shape == greedy.tokens.shape
    json.dumps(result.summary())


def test_chat_prompt_starts_the_assistant_turn_with_copies_of_the_word(tiny, hf):
    import copy

    from sinklens.analyses.divergence import _chat_prompt

    _, tokenizer = hf
    assert (
        _chat_prompt(tokenizer, word_token(tiny, "speak"), 3) is None
    )  # no chat template: raw form only
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    word = word_token(tiny, "speak")
    prompt = _chat_prompt(chat, word, 3)
    assert prompt[-2:] == [word.id, word.id] and chat.decode(prompt).endswith(
        "<s>assistant:speak speak speak"
    )
    assert chat.decode(prompt).startswith('<s>user: Repeat the word "speak" forever.')


SMALL = {
    "items": 3,
    "lambada": 3,
    "text_tokens": 64,
    "words": ("speak",),
    "chat_copies": 3,
    "raw_repeats": (8,),
    "new_tokens": 4,
    "seeds": (),
    "teacher_repeats": 10,
    "n_repeats": 40,
}


@pytest.fixture
def evaluation_inputs(tiny, tmp_path, monkeypatch):
    """A patch file for the tiny model, a small preset and items built here instead of the real data."""
    monkeypatch.setitem(evaluation_module.PRESETS, "smoke", SMALL)
    calls = []

    def toy_items(task, n, seed=0):
        calls.append(task)
        return [
            Item(task, f"{task}-{i}", item.contexts, item.continuations, item.gold)
            for i, item in enumerate(ITEMS[:n])
        ]

    monkeypatch.setattr(evaluation_module, "load_items", toy_items)
    path = tmp_path / "patch.json"
    patch_for(
        tiny,
        [(SINK_LAYER, SINK_NEURON)],
        hook="post",
        selection={
            "first_token": tiny.tokenizer.bos_token_id,
            "word_ids": [word_token(tiny, "speak").id, word_token(tiny, "we").id],
        },
    ).save(path)
    return path, calls


def test_evaluate_writes_the_evaluation_and_resumes(
    tiny, tiny_dir, corpus_file, evaluation_inputs, tmp_path, capsys, monkeypatch
):
    path, calls = evaluation_inputs
    loads = []
    monkeypatch.setattr(models_module, "_hf_pair", _counting(loads, models_module._hf_pair))
    out = tmp_path / "evaluation"
    args = [
        "evaluate",
        "--model",
        str(tiny_dir),
        "--patch",
        str(path),
        "--corpus",
        str(corpus_file),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert (
        len(loads) == 1
    )  # one copy of the weights: the bridge, and the Hugging Face model inside it
    assert "Repeated tokens at the sink layer" in capsys.readouterr().out
    results = json.loads((out / "evaluation.json").read_text())
    assert set(results["benchmarks"]) == set(evaluation_module.TASKS)
    for row in results["benchmarks"].values():
        assert {"n", "acc_original", "acc_patched", "delta", "ci_low", "ci_high"} <= set(
            row
        ) and row["n"] == 3
    norms = results["norms"]
    assert norms["first_token_norm_patched"] == pytest.approx(
        norms["first_token_norm_original"], rel=1e-6
    )
    patch = SinkPatch.load(path)
    runs = [
        repeated_tokens(tiny, i, SMALL["n_repeats"], first=tiny.tokenizer.bos_token_id)
        for i in patch.selection["word_ids"]
    ]
    with patch.installed(tiny):
        patched = max(float(resid_norms(tiny, r, SINK_LAYER)[0, 1:].max()) for r in runs)
    assert norms["repeat_max_norm_patched"] == pytest.approx(patched, rel=1e-5)
    assert results["kl_natural_text"] >= 0
    assert {g["condition"] for g in results["divergence"]["generations"]} == {"original", "patched"}
    html = (out / "evaluation.html").read_text()
    assert "LLaMa-2-7B-HF" in html and "Divergence under generation" in html
    calls.clear()
    assert main(args) == 0  # every step resumes from its checkpoint
    assert (
        calls == []
        and json.loads((out / "evaluation.json").read_text())["benchmarks"] == results["benchmarks"]
    )


def _counting(calls: list, function):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted


def test_evaluate_bad_input_is_one_line(tiny_dir, evaluation_inputs, tmp_path, capsys, monkeypatch):
    path, _ = evaluation_inputs
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    base = ["evaluate", "--model", str(tiny_dir), "--out", str(tmp_path / "out")]
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    cases = [
        (["--patch", str(path), "--preset", "huge"], "invalid choice: 'huge'"),
        (["--patch", str(tmp_path / "missing.json")], "missing.json"),
        (["--patch", str(corrupt)], "corrupt.json"),
        (["--patch", str(path), "--out", str(path)], "is an existing file"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("sinklens: error:") and message in err[0], err


def test_evaluate_refuses_a_patch_for_another_model(tiny_dir, tmp_path, capsys):
    path = tmp_path / "other.json"
    SinkPatch("other-model", 30, 8192, ((SINK_LAYER, 5000),), hook="post").save(path)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_dir),
                "--patch",
                str(path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "was found on other-model" in err[0] and "d_mlp=8192" in err[0], err


def _choice(tiny, repeat_ratios, kls, first_changes=None):
    """A patch choice with planted measurements (typical norm 1): one candidate per hook x value."""
    from sinklens.analyses.sink_patch_choice import SinkPatchChoice, _choose
    from sinklens.run.sink_patch import HOOKS, VALUES

    candidates = [
        patch_for(
            tiny,
            [(SINK_LAYER, SINK_NEURON)],
            hook=h,
            value=v,
            values=[0.0] if v == "calibrated" else None,
        )
        for h in HOOKS
        for v in VALUES
    ]
    firsts = torch.tensor([100.0 * (1 + c) for c in (first_changes or [0.0] * len(candidates))])
    result = SinkPatchChoice(
        candidates,
        SINK_LAYER,
        [],
        1,
        8,
        1.0,
        100.0,
        80.0,
        torch.tensor(repeat_ratios),
        firsts,
        torch.tensor(kls),
        3.0,
        0,
        "",
    )
    result.chosen, result.reason = _choose(result)
    return result


def test_the_paper_clamp_is_chosen_when_it_meets_the_target(tiny):
    result = _choice(tiny, [2.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert (result.patch.hook, result.patch.value) == (
        "up",
        "first_after_start",
    ) and "paper's clamp" in result.reason
    assert result.patch.selection["chosen"] == {"hook": "up", "value": "first_after_start"}


def test_otherwise_the_passing_candidate_with_the_smallest_kl_and_the_reason_says_why(tiny):
    result = _choice(
        tiny,
        [70.0, 2.0, 2.5, 2.9, 9.0, 1.0],
        [0.1, 0.3, 0.2, 0.4, 0.1, 0.9],
        first_changes=[0, 0, 0, 0, 0, 0.5],
    )  # the last one breaks the first token
    assert result.meets_target() == [False, True, True, True, False, False]
    assert (result.patch.hook, result.patch.value) == ("gate", "first_after_start")
    assert "70.00x typical" in result.reason and "smallest KL" in result.reason


def test_when_nothing_meets_the_target_the_closest_is_chosen_and_called_short(tiny):
    result = _choice(tiny, [72.0, 3.4, 3.41, 3.39, 3.43, 3.44], [0.1] * 6)
    assert (result.patch.hook, result.patch.value) == ("gate", "calibrated")
    assert "no candidate keeps repeats within 3x" in result.reason and "3.39x" in result.reason


def test_patch_command_writes_a_patch_that_loads_and_fits(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "patch.json"
    study = ["--model", str(tiny_dir), "--corpus", str(corpus_file), "--n-repeats", "30"]
    assert main(["patch", *study, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    patch = SinkPatch.load(out)
    assert printed["neurons"] == [[SINK_LAYER, SINK_NEURON]] and patch.neurons == (
        (SINK_LAYER, SINK_NEURON),
    )
    assert len(patch.selection["candidates"]) == 6 and patch.selection["reason"]
    assert patch.selection["first_token"] == 0  # the tiny tokenizer's <s>
    assert (
        main(["patch", *study, "--out", str(out), "--hook", "post", "--value", "calibrated"]) == 0
    )
    text = capsys.readouterr().out
    assert "chosen:" in text and "why: the only candidate asked for (post / calibrated)" in text
    assert SinkPatch.load(out).values is not None


def test_patch_command_bad_input_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    for extra, message in [
        (["--out", str(tmp_path)], "is a directory"),
        (["--hook", "down"], "invalid choice: 'down'"),
        (["--out", str(tmp_path / "no" / "dir" / "p.json"), "--n-repeats", "0"], "not a positive"),
    ]:
        assert main(["patch", "--model", str(tiny_dir), *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("sinklens: error:") and message in err[0], err


def test_evaluate_runs_in_bfloat16(tiny_dir, corpus_file, evaluation_inputs, tmp_path, capsys):
    path, _ = evaluation_inputs
    out = tmp_path / "evaluation"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_dir),
                "--patch",
                str(path),
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    results = json.loads((out / "evaluation.json").read_text())
    assert (
        results["model"]["dtype"] == "bfloat16" and results["norms"]["repeat_max_norm_patched"] > 0
    )
