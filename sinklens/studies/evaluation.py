"""A patch measured on one model: the study behind ``sinklens evaluate`` (:mod:`sinklens.present.evaluation_page` writes
its ``evaluation.json`` and ``evaluation.html``).

Four measurements, each a checkpointed step under ``OUT/.steps`` (an interrupted run resumes):

* **benchmarks**: the same multiple-choice items scored by the original and the patched model
  (:mod:`sinklens.analyses.benchmarks`), beside the paper's Table 2;
* **natural text**: perplexity with and without the patch and KL(original || patched);
* **norms**: the norm-vs-repetition curves at the sink layer and the first token's norm, with and
  without the patch, and the attention the first token receives;
* **divergence under generation** (:mod:`sinklens.analyses.divergence`).

Presets: ``smoke`` (minutes on a CPU: 20 items per task, one word, short generations) and ``full``
(200 items per task, 500 for LAMBADA, the paper's ``poem`` and the Fig. 2 words, longer
generations with sampled seeds; about an hour for a 135M model on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sinklens._io import check_output_dir
from sinklens.analyses.attention import AttentionReceived, attention_received
from sinklens.analyses.benchmarks import (
    PAPER_TABLE_2,
    BenchmarkComparison,
    compare_benchmarks,
    text_effect,
)
from sinklens.analyses.divergence import Divergence, divergence
from sinklens.analyses.norms import RepetitionCurves, norm_baseline, repetition_curves
from sinklens.defaults import EVALUATION_PRESETS as PRESETS
from sinklens.errors import SinklensError
from sinklens.load.benchmark_items import TASKS, load_items
from sinklens.load.models import placement
from sinklens.results import Steps, versions
from sinklens.run.sink_patch import SinkPatch
from sinklens.run.tokens import (
    check_context,
    default_words,
    encode,
    repeated_tokens,
    token,
    word_token,
)
from sinklens.settings import Settings
from sinklens.studies.setup import circuit_setup


@dataclass
class EvaluationConfig(Settings):
    """Everything an evaluation depends on: the model's settings (its spec, corpus, precision and device, and the
    first token when the patch names none), the patch file, the preset and the seed of the benchmark items;
    its JSON form keys the resume checkpoints."""

    patch: str = "patch.json"  # the file `sinklens patch` wrote
    preset: str = "smoke"
    seed: int = 0

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise SinklensError(
                f"unknown preset {self.preset!r}", f"use one of {', '.join(PRESETS)}"
            )
        super().check()
        self.load_patch()

    def load_patch(self) -> SinkPatch:
        return SinkPatch.load(self.patch)


@dataclass
class Evaluation:
    """What the evaluation measured: ``results`` is ``evaluation.json``; the rest are the results its page draws."""

    results: dict[str, Any]
    patch: SinkPatch
    benchmarks: BenchmarkComparison
    curves: tuple[RepetitionCurves, RepetitionCurves]  # original, patched
    received: tuple[AttentionReceived, AttentionReceived]  # original, patched
    divergence: Divergence


def evaluate_patch(
    config: EvaluationConfig, out: str | Path, *, progress: bool = False, verbose: bool = False
) -> Evaluation:
    """Measure ``config.patch`` on ``config.model``, each step checkpointed under ``out/.steps`` (an interrupted
    run resumes), and return ``evaluation.json``'s content with the results its page draws.

    One copy of the weights serves every measurement: the benchmarks, the natural text and generation run the
    Hugging Face model inside the bridge (``bridge.original_model``, with the patch installed there), the norms
    run the bridge; the two share their modules, so they never hold two patches at once."""
    config.check()
    patch = config.load_patch()
    out = check_output_dir(out)
    preset = PRESETS[config.preset]
    bridge = config.load_model(verbose=verbose)
    patch.check(bridge.cfg.n_layers, bridge.cfg.d_mlp, bridge.cfg.model_name)
    hf, tokenizer = bridge.original_model, bridge.tokenizer
    corpus = config.corpus_text()
    layer = max(patch.layers)
    given = patch.selection.get(
        "first_token"
    )  # None for a patch built by hand: measure which token is a sink
    setup = circuit_setup(
        bridge,
        corpus,
        config,
        neurons=False,
        first_token=config.first_token if given is None else given,
    )
    first, reference = setup.first.id, setup.reference
    words = (
        [token(bridge, i) for i in patch.selection["word_ids"]]
        if patch.selection.get("word_ids")
        else default_words(bridge)
    )
    generation_words = (
        [word_token(bridge, w) for w in preset["words"]]
        if preset["words"]
        else [word_token(bridge, "poem"), *words]
    )
    check_context(
        bridge,
        max(preset["n_repeats"], preset["teacher_repeats"], *preset["raw_repeats"])
        + 2
        + preset["new_tokens"],
    )
    # natural text in windows of fresh contexts, so it may be longer than the model's context
    text = torch.tensor([[first, *encode(bridge, corpus)[: preset["text_tokens"] - 1]]])
    fingerprint = config.fingerprint(bridge.cfg.model_name, patch=patch.to_json())
    with Steps(
        out, fingerprint, total=len(TASKS) + 6, desc="sinklens evaluate", progress=progress
    ) as step:

        def scored(task: str) -> BenchmarkComparison:
            n = preset["lambada"] if task == "lambada" else preset["items"]
            return compare_benchmarks(
                hf, tokenizer, patch, {task: load_items(task, n, seed=config.seed)}
            )

        benchmarks = BenchmarkComparison.merge(
            [step(f"benchmark_{task}", functools.partial(scored, task)) for task in TASKS]
        )
        natural = step("natural_text", lambda: text_effect(hf, text, patch))
        baseline = norm_baseline(bridge, layer, reference)
        curves = step(
            "curves_original",
            lambda: repetition_curves(
                bridge,
                words,
                layer=layer,
                baseline=baseline,
                n_repeats=preset["n_repeats"],
                first=first,
            ),
        )

        def patched(compute):
            with patch.installed(bridge):
                return compute()

        curves_patched = step(
            "curves_patched",
            lambda: patched(
                lambda: repetition_curves(
                    bridge,
                    words,
                    layer=layer,
                    baseline=baseline,
                    n_repeats=preset["n_repeats"],
                    first=first,
                    condition="patched",
                )
            ),
        )
        sinkiest = curves.words[max(range(len(words)), key=lambda i: curves.max_norms[i])]
        repeat = repeated_tokens(bridge, sinkiest.id, preset["n_repeats"], first=first)
        label = f"{sinkiest.text!r} x {preset['n_repeats']}"
        received = [
            step(
                "attention_original",
                lambda: attention_received(bridge, repeat, label=f"{label}, original"),
            ),
            step(
                "attention_patched",
                lambda: patched(
                    lambda: attention_received(bridge, repeat, label=f"{label}, patched")
                ),
            ),
        ]
        generated = step(
            "divergence",
            lambda: divergence(
                hf,
                tokenizer,
                bridge,
                patch,
                generation_words,
                first=first,
                sink_layer=layer,
                typical_norm=baseline.typical_norm,
                chat_copies=preset["chat_copies"],
                raw_repeats=preset["raw_repeats"],
                new_tokens=preset["new_tokens"],
                seeds=preset["seeds"],
                teacher_repeats=preset["teacher_repeats"],
            ),
        )
    first_patched = patched(lambda: norm_baseline(bridge, layer, reference)).first_token_norm
    results = {
        "model": {
            "spec": config.model,
            "name": patch.model or config.model,
            **placement(bridge),
            "n_layers": bridge.cfg.n_layers,
            "d_mlp": bridge.cfg.d_mlp,
        },
        "versions": versions(),
        "patch": patch.to_json(),
        "preset": config.preset,
        "summary": [],
        "benchmarks": benchmarks.summary(),
        "kl_natural_text": natural.summary()["kl_natural_text"],
        "natural_text": natural.summary(),
        "norms": {
            "layer": layer,
            "first_token": first,
            "typical_norm": baseline.typical_norm,
            "repeat_max_norm_original": max(curves.max_norms),
            "repeat_max_norm_patched": max(curves_patched.max_norms),
            "first_token_norm_original": baseline.first_token_norm,
            "first_token_norm_patched": first_patched,
            "words": [
                {"word": w.text, "original": a, "patched": b}
                for w, a, b in zip(curves.words, curves.max_norms, curves_patched.max_norms)
            ],
        },
        "attention": [r.summary() for r in received],
        "divergence": generated.summary(),
        "paper_table_2": PAPER_TABLE_2,
        "settings": dataclasses.asdict(config),
        "setup": setup.summary(),
    }
    results["summary"] = _headline(results, generated)
    return Evaluation(
        results, patch, benchmarks, (curves, curves_patched), (received[0], received[1]), generated
    )


def _headline(results: dict, generated) -> list[str]:
    norms, bench = results["norms"], results["benchmarks"]
    typical = norms["typical_norm"]
    worst = max(bench.items(), key=lambda kv: abs(kv[1]["delta"]))
    inside = sum(r["ci_low"] <= 0 <= r["ci_high"] for r in bench.values())
    frame = generated.to_frame()
    lines = [
        f"Patch: {results['patch']['hook']} / {results['patch']['value']} on {results['patch']['neurons']}.",
        f"Repeated tokens at the sink layer: largest norm {norms['repeat_max_norm_original']:,.1f} "
        f"({norms['repeat_max_norm_original'] / typical:.1f}x typical) without the patch, "
        f"{norms['repeat_max_norm_patched']:,.1f} ({norms['repeat_max_norm_patched'] / typical:.1f}x) with it; the first "
        f"token's norm {norms['first_token_norm_original']:,.0f} -> {norms['first_token_norm_patched']:,.0f}.",
        f"Natural text: perplexity {results['natural_text']['perplexity_original']:.3f} -> "
        f"{results['natural_text']['perplexity_patched']:.3f}, KL(original || patched) "
        f"{results['kl_natural_text']:.2e} nats per token.",
        f"Benchmarks ({results['preset']} preset): the accuracy change lies within its 95% paired interval of 0 on "
        f"{inside} of {len(bench)} tasks; the largest change is {100 * worst[1]['delta']:+.1f} points on {worst[0]} "
        f"(n={worst[1]['n']}).",
    ]
    for condition in ("original", "patched"):
        part = frame[frame["condition"] == condition]
        lines.append(
            f"Generation, {condition}: {int((part['repeats_before_divergence'] < part['new_tokens']).sum())} of "
            f"{len(part)} runs diverged within their {int(part['new_tokens'].max())} new tokens; median "
            f"repeats before diverging {float(part['repeats_before_divergence'].median()):.0f}."
        )
    return lines
