"""The report's study: every analysis of sinklens on one model, from one set of :class:`Settings`.

:func:`report_study` runs the Table-1 row (first token, sink layer, sink neurons, repetition curves intact
and ablated), the ablation study (Fig. 3), the attention received and the attention scores (Fig. 1), the
first-layer circuit and the sink census of the natural text, each a step checkpointed under ``OUT/.steps``
as soon as it is computed, so an interrupted report resumes where it stopped when run again with the same
settings (other settings start afresh). It returns a :class:`Report`: ``results.json``'s content, whose
top-level keys are stable for scripts (``model``, ``versions``, ``first_token``, ``sink_layer``,
``typical_norm``, ``first_token_norm``, ``words``, ``sink_neurons`` and ``sinks``), and the result objects
the page is drawn from (:mod:`sinklens.present.report_page` writes both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import check_output_dir
from sinklens.analyses.ablation import AblationStudy, ablation_study
from sinklens.analyses.attention import (
    AttentionReceived,
    AttentionScoreMaps,
    attention_received,
    attention_score_maps,
    fig1_inputs,
    paper_figure_layers,
)
from sinklens.analyses.norms import RepetitionCurves, norm_baseline, repetition_curves
from sinklens.analyses.sink_neurons import SEVERAL_LAYERS
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.load.registry import PAPER_TABLE_1
from sinklens.results import Steps, versions
from sinklens.run.cache import check_layer
from sinklens.run.tokens import check_context, repeated_tokens, words_to_tokens
from sinklens.settings import Settings
from sinklens.studies.census import SinkCensus, find_sinks
from sinklens.studies.circuit import FirstLayerCircuit, first_layer_circuit
from sinklens.studies.table import SinkTableRow, layer_range, sink_table_row


@dataclass
class Report:
    """What the report measured: ``results`` is ``results.json``; the rest are the results its page draws."""

    results: dict[str, Any]
    row: SinkTableRow
    curves: RepetitionCurves  # at the sink layer, or at the layer the settings name
    ablation: AblationStudy | None  # None where no sink neurons were found
    circuit: (
        FirstLayerCircuit | None
    )  # None where it was skipped (results["circuit"]["skipped"] says why)
    received: tuple[
        AttentionReceived, AttentionReceived
    ]  # natural text, the sinkiest word repeated
    score_maps: tuple[
        AttentionScoreMaps, AttentionScoreMaps
    ]  # regular text, a short repeat (Fig. 1)
    census: SinkCensus


def report_study(
    config: Settings,
    out: str | Path,
    *,
    model: TransformerBridge | None = None,
    progress: bool = False,
) -> Report:
    """Run every analysis of the report on ``config``'s model, each step checkpointed under ``out/.steps`` (an
    interrupted run resumes), and return the results: ``results.json``'s content and the result objects the
    page draws. Pass an already loaded ``model`` to skip loading."""
    config.check()
    out = check_output_dir(out)
    model = model or config.load_model()
    corpus = config.corpus_text()
    if config.words is not None:
        words_to_tokens(model, config.words)  # a bad word fails before any compute
    check_context(model, config.n_repeats + 1)
    for layer in [
        *(config.layers or []),
        *([] if config.sink_layer is None else [config.sink_layer]),
    ]:
        check_layer(model, layer)
    fingerprint = config.fingerprint(model.cfg.model_name)
    with Steps(out, fingerprint, total=9, desc="sinklens report", progress=progress) as step:
        row: SinkTableRow = step("table", lambda: sink_table_row(model, corpus, config))
        start, reference = row.setup.first.id, row.setup.reference
        curves = row.curves
        sink_layer = config.sink_layer
        if sink_layer is not None:
            baseline = norm_baseline(model, sink_layer, reference)
            curves = step(
                "curves",
                lambda: repetition_curves(
                    model,
                    row.curves.words,
                    layer=sink_layer,
                    baseline=baseline,
                    n_repeats=config.n_repeats,
                    first=start,
                    sink_fraction=config.sink_fraction,
                    progress=progress,
                ),
            )
        sinkiest = curves.words[max(range(len(curves.words)), key=lambda i: curves.max_norms[i])]
        repeated = repeated_tokens(model, sinkiest.id, config.n_repeats, first=start)
        repeat_label = f"{sinkiest.text!r} x {config.n_repeats}"
        neurons = row.neurons.sink_neurons
        study = (
            step(
                "ablation",
                lambda: ablation_study(
                    model, neurons, {"natural text": reference, repeat_label: repeated}
                ),
            )
            if neurons
            else None
        )
        received_text = step(
            "attention_text", lambda: attention_received(model, reference, label="natural text")
        )
        received_repeat = step(
            "attention_repeat", lambda: attention_received(model, repeated, label=repeat_label)
        )
        regular, short_repeat = fig1_inputs(model, corpus, sinkiest.id, first=start)
        fig1_layers = paper_figure_layers(model, curves.layer)
        regular_maps = step(
            "scores_text",
            lambda: attention_score_maps(model, regular, fig1_layers, label="regular text"),
        )
        repeat_maps = step(
            "scores_repeat",
            lambda: attention_score_maps(
                model, short_repeat, fig1_layers, label=f"{sinkiest.text!r} repeated"
            ),
        )
        circuit, circuit_skipped = (
            None,
            "no sink neurons were found, so there is no circuit to explain",
        )
        if row.neurons.sink_neurons:
            try:
                circuit = step(
                    "circuit", lambda: first_layer_circuit(model, corpus, config, table=row)
                )  # the row's circuit setup and curves, measured once
            except (
                SinklensError
            ) as exc:  # e.g. a corpus too short for the probe: the rest of the report stands
                circuit_skipped = str(exc)
        census = step(
            "sinks",
            lambda: find_sinks(model, reference, config, setup=row.setup, label="the natural text"),
        )

    table = row.summary()
    if config.sink_layer is not None:
        method = "given by the user"
    elif row.neurons.case == SEVERAL_LAYERS:
        method = (
            f"the last of layers {layer_range(row.neurons.layers)}, over which the first token's norm is built "
            "(see sink_neurons)"
        )
    elif row.neurons.sink_layer == row.sink.sink_layer:
        method = row.sink.method
    else:
        method = (
            f"the layer the sink-neuron search settled on ({row.neurons.case}; see sink_neurons)"
        )
    results = {
        "model": {
            "spec": config.model,
            "name": row.model,
            **placement(model),
            "n_layers": model.cfg.n_layers,
            "d_mlp": model.cfg.d_mlp,
            "n_ctx": model.cfg.n_ctx,
        },
        "versions": versions(),
        "summary": headline(row, curves) + circuit_headline(circuit),
        "first_token": table["first_token"],
        "sink_found": row.sink_found,
        "sink_layer": curves.layer,
        "sink_layer_method": method,
        "typical_norm": curves.baseline.typical_norm,
        "first_token_norm": curves.baseline.first_token_norm,
        "words": curves.summary()["words"],
        "sink_neurons": row.neurons.summary(),
        "table_row": {
            k: v for k, v in table.items() if k not in ("words", "first_token_candidates", "setup")
        },
        "first_token_candidates": row.choice.summary(),
        "settings": dataclasses.asdict(config),
        "sink_layer_detail": row.sink.summary(),
        "norm_baseline": curves.baseline.summary(),
        "repetition": {k: v for k, v in curves.summary().items() if k != "words"},
        "repetition_ablated": None if row.curves_ablated is None else row.curves_ablated.summary(),
        "ablation": None if study is None else study.summary(),
        "circuit": {"skipped": circuit_skipped}
        if circuit is None
        else {k: v for k, v in circuit.summary().items() if k != "setup"},
        "attention": [received_text.summary(), received_repeat.summary()],
        "attention_scores": [regular_maps.summary(), repeat_maps.summary()],
        "sinks": {k: v for k, v in census.summary().items() if k != "setup"},
        "paper_table_1": [dataclasses.asdict(r) for r in PAPER_TABLE_1.values()],
    }
    return Report(
        results,
        row,
        curves,
        study,
        circuit,
        (received_text, received_repeat),
        (regular_maps, repeat_maps),
        census,
    )


def headline(row: SinkTableRow, curves) -> list[str]:
    """The report's opening sentences, from the measured row (also in ``results.json["summary"]``)."""
    s = row.summary()
    lines = [f"Position 0 holds {s['first_token']['text']!r}: {s['first_token']['chosen_by']}."]
    if not row.sink_found:
        lines.append(
            "No sink found: no candidate first token rises an order of magnitude above the typical norm, "
            "so there is no sink layer or sink neuron to report."
        )
        return lines
    neurons = row.neurons
    if neurons.sink_neurons:
        lines.append(
            f"Sink ({neurons.case}, {layers_text(neurons.layers)}): sink neurons "
            f"{neurons.describe_neurons()}. Ablating them takes the first token's norm at layer {neurons.sink_layer} "
            f"from {neurons.first_token_norm:,.0f} to {neurons.first_token_norm_ablated:,.0f} (typical "
            f"{neurons.typical_norm:,.0f}), {float(neurons.removed_shares[neurons.n_sink]):.1%} of its excess."
        )
    else:
        lines.append(
            f"Sink layer {neurons.sink_layer}, but no set of up to {len(neurons.candidates)} neurons removes "
            f"{neurons.share:.0%} of the first token's excess norm (best: "
            f"{float(neurons.removed_shares.max()):.1%})."
        )
    typical = curves.baseline.typical_norm
    for word, stay, cross, peak in zip(
        curves.words, curves.repeats_to_sink, curves.first_crossings, curves.max_norms
    ):
        if stay is not None:
            text = f"enters the sink regime to stay after {stay} repeats (first crossing: {cross})"
        elif cross is not None:
            text = f"crosses into the sink regime at repeat {cross} but does not stay"
        else:
            text = f"never reaches the sink regime (at most {peak / typical:.1f}x typical)"
        lines.append(f"{word.text!r} x {curves.n_repeats}: {text}.")
    if row.curves_ablated is not None and row.curves_ablated.layer == curves.layer:
        reached = [
            w.text
            for w, c in zip(row.curves_ablated.words, row.curves_ablated.first_crossings)
            if c
        ]
        lines.append(
            "With the sink neurons ablated, "
            + (
                f"{', '.join(map(repr, reached))} still reach the sink regime."
                if reached
                else f"no word reaches the sink regime (largest norm "
                f"{max(row.curves_ablated.max_norms):,.0f}, threshold {curves.threshold:,.0f})."
            )
        )
    llama2 = PAPER_TABLE_1["meta-llama/Llama-2-7b-hf"]
    lines.append(
        f"The paper (Table 1): Llama-2-7B sinks at layer {llama2.sink_layer} through neurons "
        f"{', '.join(map(str, llama2.sink_neurons))}, and a repeated token becomes a sink after about "
        f"{llama2.repeats} repeats; the other models it studied use layer 1 or 2 and one or two neurons."
    )
    return lines


def circuit_headline(circuit: FirstLayerCircuit | None) -> list[str]:
    """The summary's sentences about how the model marks the first token."""
    if circuit is None:
        return []
    s = circuit.summary()
    if circuit.mark is None:
        lines = [
            f"No first-token mark: the sink neurons are as active on {s['first_token']['text']!r} after text as "
            f"alone (text removes {circuit.position_dependence:.1%}); the model makes a sink of the token, not of "
            "the first position, so a long run of another token cannot imitate it."
        ]
    else:
        heads = ", ".join(f"L{l}.{h}" for l, h in s["mark_heads"]) or "none"
        lines = [
            f"First-token mark: the sink neurons need these heads to see only the token itself: {heads} "
            f"(first attention layer: {', '.join(f'head {h}' for _, h in s['detect_others_heads']) or 'none'}); "
            f"path to the sink neurons: {' -> '.join(s['paths']) or 'none found'}."
        ]
    best = max(s["probe"], key=lambda p: p["balanced_accuracy"])
    lines.append(
        f"A linear probe tells the first token from later ones with {best['balanced_accuracy']:.1%} held-out "
        f"balanced accuracy at layer {best['layer']}; on {s['repeat_word']!r} repeats it calls "
        + ", ".join(f"{p['first_share_on_repeats']:.0%} at layer {p['layer']}" for p in s["probe"])
        + " first."
    )
    slopes = ", ".join(f"{w['word']!r} {w['slope']:.2f}" for w in s["convergence"])
    lines.append(
        f"The first attention layer's output on a long run converges to its output on the lone token with a "
        f"log-log slope of {slopes} (softmax leakage predicts -1)."
    )
    return lines


def layers_text(layers: list[int]) -> str:
    return f"layer{'s' if len(layers) > 1 else ''} {layer_range(layers)}"
