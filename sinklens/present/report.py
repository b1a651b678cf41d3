"""The one-command report: every analysis on one model, as ``report.html`` and ``results.json``.

The page opens with a summary a model owner reads first (the first token the model makes a
sink, the sink layer and neurons, which words turn into sinks and after how many repeats, and the
paper's numbers beside them), then one section per analysis.

Each step's result is checkpointed under ``OUT/.steps/`` as soon as it is computed, so an
interrupted report resumes where it stopped when run again with the same settings (other
settings start afresh). ``results.json`` keeps stable top-level keys for scripts: ``model``,
``versions``, ``first_token``, ``sink_layer``, ``typical_norm``, ``first_token_norm``, ``words``,
``sink_neurons`` and ``sinks`` (the sink census of the natural text).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import check_output_dir, write_json, write_text
from sinklens.analyses.ablation import ablation_study
from sinklens.analyses.attention import (
    attention_received,
    attention_score_maps,
    fig1_inputs,
    paper_figure_layers,
    plot_attention_received,
    plot_attention_score_maps,
)
from sinklens.analyses.norms import (
    norm_baseline,
    plot_repetition_curves,
    repetition_curves,
)
from sinklens.analyses.sink_neurons import SEVERAL_LAYERS
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.load.registry import PAPER_TABLE_1
from sinklens.present._page import Checkpoints, page, section, versions, versions_text
from sinklens.results import Result
from sinklens.run.cache import check_layer
from sinklens.run.tokens import check_context, repeated_tokens, words_to_tokens
from sinklens.settings import Settings
from sinklens.studies.census import SinkCensus, find_sinks
from sinklens.studies.circuit import FirstLayerCircuit, first_layer_circuit
from sinklens.studies.table import SinkTableRow, layer_range, sink_table_row

TOP_NEURONS_SHOWN = 20


def run_report(
    config: Settings, out: str | Path, *, model: TransformerBridge | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run every analysis of ``config`` and write ``report.html`` and ``results.json`` into ``out``.

    Pass an already loaded ``model`` to skip loading. Returns the ``results.json`` content.
    """
    config.check()
    out = check_output_dir(out)
    model = model or config.load_model()
    corpus = config.corpus_text()
    if config.words is not None:
        words_to_tokens(model, config.words)  # a bad word fails before any compute
    check_context(model, config.n_repeats + 1)
    for layer in [*(config.layers or []), *([] if config.sink_layer is None else [config.sink_layer])]:
        check_layer(model, layer)
    steps = Checkpoints(out, config.fingerprint(model.cfg.model_name))
    with tqdm(total=9, desc="sinklens report", disable=not progress) as bar:

        def step(name: str, compute: Callable[[], Result]) -> Result:
            bar.set_postfix_str(name)
            result = steps.get(name, compute)
            bar.update()
            return result

        row: SinkTableRow = step("table", lambda: sink_table_row(model, corpus, config))
        start, reference = row.setup.first.id, row.setup.reference
        curves = row.curves
        if config.sink_layer is not None:
            baseline = norm_baseline(model, config.sink_layer, reference)
            curves = step("curves", lambda: repetition_curves(
                model, row.curves.words, layer=config.sink_layer, baseline=baseline, n_repeats=config.n_repeats,
                first=start, sink_fraction=config.sink_fraction, progress=progress))
        sinkiest = curves.words[max(range(len(curves.words)), key=lambda i: curves.max_norms[i])]
        repeated = repeated_tokens(model, sinkiest.id, config.n_repeats, first=start)
        repeat_label = f"{sinkiest.text!r} x {config.n_repeats}"
        neurons = row.neurons.sink_neurons
        study = step("ablation", lambda: ablation_study(
            model, neurons, {"natural text": reference, repeat_label: repeated})) if neurons else None
        received_text = step("attention_text", lambda: attention_received(model, reference, label="natural text"))
        received_repeat = step("attention_repeat", lambda: attention_received(model, repeated, label=repeat_label))
        regular, short_repeat = fig1_inputs(model, corpus, sinkiest.id, first=start)
        fig1_layers = paper_figure_layers(model, curves.layer)
        regular_maps = step("scores_text", lambda: attention_score_maps(model, regular, fig1_layers,
                                                                        label="regular text"))
        repeat_maps = step("scores_repeat", lambda: attention_score_maps(
            model, short_repeat, fig1_layers, label=f"{sinkiest.text!r} repeated"))
        circuit, circuit_skipped = None, "no sink neurons were found, so there is no circuit to explain"
        if row.neurons.sink_neurons:
            try:
                circuit = step("circuit", lambda: first_layer_circuit(
                    model, corpus, config, table=row))  # the row's circuit setup and curves, measured once
            except SinklensError as exc:  # e.g. a corpus too short for the probe: the rest of the report stands
                circuit_skipped = str(exc)
        census = step("sinks", lambda: find_sinks(model, reference, config, setup=row.setup, label="the natural text"))

    table = row.summary()
    if config.sink_layer is not None:
        method = "given by the user"
    elif row.neurons.case == SEVERAL_LAYERS:
        method = (f"the last of layers {layer_range(row.neurons.layers)}, over which the first token's norm is built "
                  "(see sink_neurons)")
    elif row.neurons.sink_layer == row.sink.sink_layer:
        method = row.sink.method
    else:
        method = f"the layer the sink-neuron search settled on ({row.neurons.case}; see sink_neurons)"
    results = {
        "model": {"spec": config.model, "name": row.model, **placement(model),
                  "n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp, "n_ctx": model.cfg.n_ctx},
        "versions": versions(),
        "summary": headline(row, curves) + _circuit_headline(circuit),
        "first_token": table["first_token"],
        "sink_found": row.sink_found,
        "sink_layer": curves.layer,
        "sink_layer_method": method,
        "typical_norm": curves.baseline.typical_norm,
        "first_token_norm": curves.baseline.first_token_norm,
        "words": curves.summary()["words"],
        "sink_neurons": row.neurons.summary(),
        "table_row": {k: v for k, v in table.items() if k not in ("words", "first_token_candidates", "setup")},
        "first_token_candidates": row.choice.summary(),
        "settings": dataclasses.asdict(config),
        "sink_layer_detail": row.sink.summary(),
        "norm_baseline": curves.baseline.summary(),
        "repetition": {k: v for k, v in curves.summary().items() if k != "words"},
        "repetition_ablated": None if row.curves_ablated is None else row.curves_ablated.summary(),
        "ablation": None if study is None else study.summary(),
        "circuit": {"skipped": circuit_skipped} if circuit is None else
        {k: v for k, v in circuit.summary().items() if k != "setup"},
        "attention": [received_text.summary(), received_repeat.summary()],
        "attention_scores": [regular_maps.summary(), repeat_maps.summary()],
        "sinks": {k: v for k, v in census.summary().items() if k != "setup"},
        "paper_table_1": [dataclasses.asdict(r) for r in PAPER_TABLE_1.values()],
    }
    write_json(out / "results.json", results)
    page = _render_html(results, row, curves, study, circuit, (received_text, received_repeat),
                        (regular_maps, repeat_maps), census)
    write_text(out / "report.html", page)
    return results


def headline(row: SinkTableRow, curves) -> list[str]:
    """The report's opening sentences, from the measured row (also in ``results.json["summary"]``)."""
    s = row.summary()
    lines = [f"Position 0 holds {s['first_token']['text']!r}: {s['first_token']['chosen_by']}."]
    if not row.sink_found:
        lines.append("No sink found: no candidate first token rises an order of magnitude above the typical norm, "
                     "so there is no sink layer or sink neuron to report.")
        return lines
    neurons = row.neurons
    if neurons.sink_neurons:
        lines.append(
            f"Sink ({neurons.case}, {_layers_text(neurons.layers)}): sink neurons "
            f"{neurons.describe_neurons()}. Ablating them takes the first token's norm at layer {neurons.sink_layer} "
            f"from {neurons.first_token_norm:,.0f} to {neurons.first_token_norm_ablated:,.0f} (typical "
            f"{neurons.typical_norm:,.0f}), {float(neurons.removed_shares[neurons.n_sink]):.1%} of its excess.")
    else:
        lines.append(f"Sink layer {neurons.sink_layer}, but no set of up to {len(neurons.candidates)} neurons removes "
                     f"{neurons.share:.0%} of the first token's excess norm (best: "
                     f"{float(neurons.removed_shares.max()):.1%}).")
    typical = curves.baseline.typical_norm
    for word, stay, cross, peak in zip(curves.words, curves.repeats_to_sink, curves.first_crossings, curves.max_norms):
        if stay is not None:
            text = f"enters the sink regime to stay after {stay} repeats (first crossing: {cross})"
        elif cross is not None:
            text = f"crosses into the sink regime at repeat {cross} but does not stay"
        else:
            text = f"never reaches the sink regime (at most {peak / typical:.1f}x typical)"
        lines.append(f"{word.text!r} x {curves.n_repeats}: {text}.")
    if row.curves_ablated is not None and row.curves_ablated.layer == curves.layer:
        reached = [w.text for w, c in zip(row.curves_ablated.words, row.curves_ablated.first_crossings) if c]
        lines.append("With the sink neurons ablated, " + (f"{', '.join(map(repr, reached))} still reach the sink regime."
                     if reached else f"no word reaches the sink regime (largest norm "
                                     f"{max(row.curves_ablated.max_norms):,.0f}, threshold {curves.threshold:,.0f})."))
    llama2 = PAPER_TABLE_1["meta-llama/Llama-2-7b-hf"]
    lines.append(f"The paper (Table 1): Llama-2-7B sinks at layer {llama2.sink_layer} through neurons "
                 f"{', '.join(map(str, llama2.sink_neurons))}, and a repeated token becomes a sink after about "
                 f"{llama2.repeats} repeats; the other models it studied use layer 1 or 2 and one or two neurons.")
    return lines


def _circuit_headline(circuit: FirstLayerCircuit | None) -> list[str]:
    """The summary's sentences about how the model marks the first token."""
    if circuit is None:
        return []
    s = circuit.summary()
    if circuit.mark is None:
        lines = [f"No first-token mark: the sink neurons are as active on {s['first_token']['text']!r} after text as "
                 f"alone (text removes {circuit.position_dependence:.1%}); the model makes a sink of the token, not of "
                 "the first position, so a long run of another token cannot imitate it."]
    else:
        heads = ", ".join(f"L{l}.{h}" for l, h in s["mark_heads"]) or "none"
        lines = [f"First-token mark: the sink neurons need these heads to see only the token itself: {heads} "
                 f"(first attention layer: {', '.join(f'head {h}' for _, h in s['detect_others_heads']) or 'none'}); "
                 f"path to the sink neurons: {' -> '.join(s['paths']) or 'none found'}."]
    best = max(s["probe"], key=lambda p: p["balanced_accuracy"])
    lines.append(f"A linear probe tells the first token from later ones with {best['balanced_accuracy']:.1%} held-out "
                 f"balanced accuracy at layer {best['layer']}; on {s['repeat_word']!r} repeats it calls "
                 + ", ".join(f"{p['first_share_on_repeats']:.0%} at layer {p['layer']}" for p in s["probe"]) + " first.")
    slopes = ", ".join(f"{w['word']!r} {w['slope']:.2f}" for w in s["convergence"])
    lines.append(f"The first attention layer's output on a long run converges to its output on the lone token with a "
                 f"log-log slope of {slopes} (softmax leakage predicts -1).")
    return lines


def _circuit_section(circuit: FirstLayerCircuit) -> str:
    s = circuit.summary()
    figures = [circuit.heads.plot()] + ([circuit.mark.plot()] if circuit.mark is not None else [])
    figures += [circuit.detectors.plot(), circuit.probe.plot(), circuit.convergence.plot()]
    marked = (f"Patching each attention layer, head and MLP before the sink neurons between the lone first token and "
              f"the same token after 1-32 tokens of text (necessity, sufficiency, necessity with every other head "
              f"set to its first-token value; each with a norm-matched random placebo). Components that carry the "
              f"mark: {html.escape(', '.join(s['paths']) or 'none')}." if circuit.mark is not None else
              f"The sink neurons are as active on the first token after text as alone (text removes "
              f"{circuit.position_dependence:.1%} of their activation): there is no first-token mark to patch.")
    return section(
        "How the model marks the first token (paper Sec. 4.3, Fig. 4, Fig. 5)",
        f"{marked} First attention layer, per head: attention to itself against a uniform head, and its own key's "
        f"score against the others'. Then the first-detector neurons (Fig. 4) on {circuit.detectors.n_chunks} "
        f"three-word chunks, the linear probe per layer and its verdict on {html.escape(repr(circuit.repeat_word.text))} "
        "repeats, and the convergence of the first layer's output on a long run to the lone token's (Fig. 5).",
        *figures, frame=circuit.to_frame())


def _notebook_rule(neurons) -> str:
    if neurons.notebook_neurons is None:
        return ("The notebook's rule (top 2 of the gate pre-activation at the last repeat) is not available here: it "
                "ranks one layer of a gated MLP.")
    return (f"The notebook's rule (top 2 of the gate pre-activation at the last of "
            f"{html.escape(neurons.notebook_input)}) gives {neurons.notebook_neurons}.")


def _layers_text(layers: list[int]) -> str:
    return f"layer{'s' if len(layers) > 1 else ''} {layer_range(layers)}"


def _side_by_side(*results):
    """One row per layer, the inputs' columns next to each other (prefixed by input)."""
    frames = [r.to_frame().drop(columns="input").set_index("layer").add_prefix(f"{r.label}: ") for r in results]
    return pd.concat(frames, axis=1).reset_index()


def _render_html(results, row: SinkTableRow, curves, study, circuit, received, maps, census: SinkCensus) -> str:
    model = results["model"]
    neurons = row.neurons
    first = results["first_token"]
    curve_sets = [curves] + ([row.curves_ablated] if row.curves_ablated and row.curves_ablated.layer == curves.layer
                             else [])
    sections = [
        section("Table 1, this model beside the paper",
                 "Repeats: the fewest repeats after which a word of the list stays in the sink regime (none when no "
                 "word stays). The paper's rows are Yona et al. (2025), Table 1.", row.plot(), frame=row.to_frame()),
        section("Which first token is a sink",
                 "Norm of each candidate for position 0, over the typical norm of natural text, per layer. A candidate "
                 f"is a sink when it reaches {row.choice.min_ratio:g}x. {html.escape(row.choice.reason)}.",
                 row.choice.plot(), frame=row.choice.to_frame()),
        section("Sink layer",
                 f"MLP output norm of the lone first token {html.escape(repr(first['text']))} (id {first['id']}) per "
                 f"layer, and the median over the later tokens of natural text. The paper's rule picks the first "
                 f"layer above mean + {row.sink.n_sigma:g} sigma: <b>layer {row.sink.sink_layer}</b> "
                 f"({html.escape(row.sink.method)}). Measurements below use layer {results['sink_layer']} "
                 f"({html.escape(results['sink_layer_method'])}).",
                 row.sink.plot(), frame=row.sink.to_frame()),
        section("Sink neurons",
                 f"Candidates ranked by {'the notebook criterion' if neurons.criterion == 'notebook' else 'their contribution to the first token'}"
                 f" ({neurons.case}, {_layers_text(neurons.layers)}); the sink neurons are the shortest prefix whose "
                 f"zero-ablation removes {neurons.share:.0%} of the first token's excess norm. Found: "
                 f"<b>{html.escape(neurons.describe_neurons())}</b>. {_notebook_rule(neurons)} Massive activation "
                 f"dimensions of the first token: "
                 f"{neurons.massive_dims}; w_out_top_dim is each neuron's largest W_out entry (its super weight).",
                 neurons.plot(), frame=neurons.to_frame().head(TOP_NEURONS_SHOWN)),
    ]
    if study is not None:
        sections.append(section(
            "Ablating the sink neurons (paper Fig. 3)",
            f"Residual norms per position at layers {study.layers}, intact and with the sink neurons set to 0 at every "
            "position; the attention later queries pay to the first token; the sink neurons' activation along "
            "each input.", study.plot(), study.plot_attention(), study.plot_activations()))
    sections.append(_circuit_section(circuit) if circuit is not None else section(
        "How the model marks the first token (paper Sec. 4.3, Fig. 4, Fig. 5)",
        f"Skipped: {html.escape(results['circuit']['skipped'])}"))
    sections += [
        section("Hidden-state norm vs repetitions (paper Fig. 2/6)",
                 f"Norm of <code>blocks.{curves.layer}.hook_resid_post</code> for [first token] + [word] x "
                 f"{curves.n_repeats}, intact" + (" and with the sink neurons ablated" if len(curve_sets) > 1 else "")
                 + f". Typical norm {results['typical_norm']:.4g}, first-token norm {results['first_token_norm']:.4g}; "
                 f"the sink regime starts {curves.sink_fraction:g} of the way from typical to the first token in log "
                 f"space (norm {curves.threshold:.4g}).", plot_repetition_curves(*curve_sets),
                 frame=curves.to_frame()),
        section("Attention received per layer",
                 "Mean attention weight that later queries put on the first token and on a later token, and the "
                 f"share of heads whose mean attention on the first token exceeds {received[0].epsilon:g} "
                 "(Gu et al. 2024).", plot_attention_received(*received), frame=_side_by_side(*received)),
        section("Attention scores: regular text vs a repeated token (paper Fig. 1)",
                 "Pre-softmax scores averaged over heads (and over the text lines), masked keys blank.",
                 plot_attention_score_maps(*maps)),
        section("Every sink in natural text",
                 f"Positions of the natural text whose norm enters the sink regime at some layer (the first token's "
                 f"included): where each appears, how many layers it stays, the mean weight later queries pay it "
                 f"there, its cosine with the first token, and the neurons that write it (the sink-neuron rule at its "
                 f"position). {len(census.sinks)} sink{'s' * (len(census.sinks) != 1)} in "
                 f"{census.tokens.shape[1]} tokens.", census.plot(), frame=census.to_frame()),
    ]
    return page(f"sinklens report: {model['name']}", f"Model spec <code>{html.escape(model['spec'])}</code>, "
                f"{model['n_layers']} layers, {model['dtype']} on {model['device']}. "
                f"{html.escape(versions_text(results['versions']))}. Every number here is in <code>results.json</code>.",
                results["summary"], sections)
