"""The one-command report as a page: ``report.html`` and ``results.json`` from
:mod:`sinklens.studies.report`.

The page opens with the findings a model owner reads first, a few sentences in plain words
(:func:`findings`: the first token the model makes a sink and how big, the sink layer and neurons
and what zeroing them removes, which repeated words reach the sink regime and when, what the
first-token circuit says, and the paper's row beside them), with ``results.json``'s summary
sentences one click away, then one section per analysis. The page fits a 1,280 px window: wide
tables scroll in their own box. :func:`run_report` is what ``sinklens report`` runs: the study,
then both files.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import check_output_dir, write_json, write_text
from sinklens.analyses.attention import plot_attention_received, plot_attention_score_maps
from sinklens.analyses.norms import plot_repetition_curves
from sinklens.present.page import page, section, versions_text
from sinklens.settings import Settings
from sinklens.studies.circuit import FirstLayerCircuit
from sinklens.studies.report import Report, layers_text, report_study

TOP_NEURONS_SHOWN = 20


def run_report(
    config: Settings,
    out: str | Path,
    *,
    model: TransformerBridge | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every analysis of ``config`` (:func:`~sinklens.studies.report.report_study`) and write
    ``report.html`` and ``results.json`` into ``out``. Pass an already loaded ``model`` to skip
    loading. Returns the ``results.json`` content."""
    config.check()
    out = check_output_dir(out)
    report = report_study(config, out, model=model, progress=progress)
    write_json(out / "results.json", report.results)
    write_text(out / "report.html", render_report(report))
    return report.results


def render_report(report: Report) -> str:
    """The report's self-contained HTML page."""
    results, row, curves, study = report.results, report.row, report.curves, report.ablation
    circuit, received, maps, census = (
        report.circuit,
        report.received,
        report.score_maps,
        report.census,
    )
    model = results["model"]
    neurons = row.neurons
    first = results["first_token"]
    ranked_by = (
        "the notebook criterion"
        if neurons.criterion == "notebook"
        else "their contribution to the first token"
    )
    curve_sets = [curves] + (
        [row.curves_ablated]
        if row.curves_ablated and row.curves_ablated.layer == curves.layer
        else []
    )
    sections = [
        section(
            "Table 1, this model beside the paper",
            "Repeats: the fewest repeats after which a word of the list stays in the sink regime "
            "(none when no word stays). The paper's rows are Yona et al. (2025), Table 1.",
            row.plot(),
            frame=row.to_frame(),
        ),
        section(
            "Which first token is a sink",
            "Norm of each candidate for position 0, over the typical norm of natural text, per "
            f"layer. A candidate is a sink when it reaches {row.choice.min_ratio:g}x. "
            f"{html.escape(row.choice.reason)}.",
            row.choice.plot(),
            frame=row.choice.to_frame(),
        ),
        section(
            "Sink layer",
            f"MLP output norm of the lone first token {html.escape(repr(first['text']))} (id "
            f"{first['id']}) per layer, and the median over the later tokens of natural text. The "
            f"paper's rule picks the first layer above mean + {row.sink.n_sigma:g} sigma: <b>layer "
            f"{row.sink.sink_layer}</b> ({html.escape(row.sink.method)}). Measurements below use "
            f"layer {results['sink_layer']} ({html.escape(results['sink_layer_method'])}).",
            row.sink.plot(),
            frame=row.sink.to_frame(),
        ),
        section(
            "Sink neurons",
            f"Candidates ranked by {ranked_by} "
            f"({neurons.case}, {layers_text(neurons.layers)}); the sink neurons are the shortest "
            f"prefix whose zero-ablation removes {neurons.share:.0%} of the first token's excess "
            f"norm. Found: <b>{html.escape(neurons.describe_neurons())}</b>. "
            f"{_notebook_rule(neurons)} Massive activation dimensions of the first token: "
            f"{neurons.massive_dims}; w_out_top_dim is each neuron's largest W_out entry (its "
            "super weight).",
            neurons.plot(),
            frame=neurons.to_frame().head(TOP_NEURONS_SHOWN),
        ),
    ]
    if study is not None:
        sections.append(
            section(
                "Ablating the sink neurons (paper Fig. 3)",
                f"Residual norms per position at layers {study.layers}, intact and with the sink "
                "neurons set to 0 at every position; the attention later queries pay to the first "
                "token; the sink neurons' activation along each input.",
                study.plot(),
                study.plot_attention(),
                study.plot_activations(),
            )
        )
    sections.append(
        _circuit_section(circuit)
        if circuit is not None
        else section(
            "How the model marks the first token (paper Sec. 4.3, Fig. 4, Fig. 5)",
            f"Skipped: {html.escape(results['circuit']['skipped'])}",
        )
    )
    sections += [
        section(
            "Hidden-state norm vs repetitions (paper Fig. 2/6)",
            f"Norm of <code>blocks.{curves.layer}.hook_resid_post</code> for [first token] + "
            f"[word] x {curves.n_repeats}, intact"
            + (" and with the sink neurons ablated" if len(curve_sets) > 1 else "")
            + f". Typical norm {results['typical_norm']:.4g}, first-token norm "
            f"{results['first_token_norm']:.4g}; the sink regime starts {curves.sink_fraction:g} "
            "of the way from typical to the first token in log space (norm "
            f"{curves.threshold:.4g}).",
            plot_repetition_curves(*curve_sets),
            frame=curves.to_frame(),
        ),
        section(
            "Attention received per layer",
            "Mean attention weight that later queries put on the first token and on a later "
            "token, and the share of heads whose mean attention on the first token exceeds "
            f"{received[0].epsilon:g} (Gu et al. 2024).",
            plot_attention_received(*received),
            frame=_side_by_side(*received),
        ),
        section(
            "Attention scores: regular text vs a repeated token (paper Fig. 1)",
            "Pre-softmax scores averaged over heads (and over the text lines), masked keys blank.",
            plot_attention_score_maps(*maps),
        ),
        section(
            "Every sink in natural text",
            "Positions of the natural text whose norm enters the sink regime at some layer (the "
            "first token's included): where each appears, how many layers it stays, the mean "
            "weight later queries pay it there, its cosine with the first token, and the neurons "
            f"that write it (the sink-neuron rule at its position). {len(census.sinks)} "
            f"sink{'s' * (len(census.sinks) != 1)} in {census.tokens.shape[1]} tokens.",
            census.plot(),
            frame=census.to_frame(),
        ),
    ]
    return page(
        f"sinklens report: {model['name']}",
        f"Model spec <code>{html.escape(model['spec'])}</code>, {model['n_layers']} layers, "
        f"{model['dtype']} on {model['device']}. "
        f"{html.escape(versions_text(results['versions']))}. Every number here is in "
        "<code>results.json</code>.",
        results["summary"],
        sections,
        findings=findings(report),
    )


ROLES = {
    "bos": "the tokenizer's BOS token",
    "eos": "the EOS token",
    "end of turn": "an end-of-turn token",
    "text": "the text's own first token",
    "given": "the first token you gave",
}
PAPER_MODEL = "meta-llama/Llama-2-7b-hf"  # the paper's row shown when this model is not in Table 1


def findings(report: Report) -> list[str]:
    """The report's findings in a few short sentences of plain words (plain text, not HTML): the
    sink token and its size, the sink layer and neurons and what zeroing them removes, the repeated
    words, the circuit and the paper's row. Drawn from ``results.json`` (and the sink-neuron search
    where it is not there); ``results["summary"]`` keeps every sentence in full."""
    results = report.results
    lines = [_sink_token(results)]
    if results["sink_found"]:
        lines += [_sink_neurons(report), _repeats(results), _circuit(results)]
    lines.append(_paper(results))
    return [line for line in lines if line]


def _sink_token(results: dict[str, Any]) -> str:
    choice = results["first_token_candidates"]
    candidates = choice["candidates"]
    if not results["sink_found"]:
        top = max(candidates, key=lambda c: c["peak_ratio"])
        return (
            f"No attention sink: no candidate first token grows to {choice['min_ratio']:g}x a "
            f"typical token's norm (the closest, {top['token']!r}, reaches "
            f"{top['peak_ratio']:.3g}x at layer {top['peak_layer']}), so there is no sink layer or "
            "sink neuron to report."
        )
    chosen = next(c for c in candidates if c["chosen"])
    role = chosen["role"].split("/")[0]
    return (
        f"The sink is the first token, {chosen['token']!r} ({ROLES.get(role, role)}): its hidden "
        f"state grows to {chosen['peak_ratio']:,.0f}x the norm of a typical token."
    )


def _sink_neurons(report: Report) -> str:
    found = report.results["sink_neurons"]
    by_layer = {int(k): v for k, v in found["sink_neurons_by_layer"].items()}
    n = sum(len(v) for v in by_layer.values())
    if not n:
        best = float(report.row.neurons.removed_shares.max())
        return (
            f"Its norm jumps at layer {found['sink_layer']}, but no small set of MLP neurons makes "
            f"it: zeroing up to {len(found['candidates'])} of them removes at most {best:.0%} of "
            "it."
        )
    count = {1: "one MLP neuron", 2: "two MLP neurons"}.get(n, f"{n} MLP neurons")
    if len(by_layer) == 1:
        ((layer, ids),) = by_layer.items()
        where = f"at layer {layer} by {count}, {_and(map(str, ids))}"
    else:
        listed = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in by_layer.items())
        where = f"over {layers_text(found['layers'])} by {count} ({listed})"
    return (
        f"It is made {where}: zeroing {'it' if n == 1 else 'them'} removes "
        f"{found['removed_share']:.1%} of its excess norm ({found['first_token_norm']:,.0f} -> "
        f"{found['first_token_norm_ablated']:,.0f}; typical {found['typical_norm']:,.0f})."
    )


def _repeats(results: dict[str, Any]) -> str:
    words = results["words"]
    if not words:
        return ""
    n = max(w["n_repeats"] for w in words)
    stay = [w for w in words if w["repeats_to_sink"] is not None]
    touch = [w for w in words if w["repeats_to_sink"] is None and w["first_crossing"] is not None]
    touching = (
        f"{_and(repr(w['word']) for w in touch)} only touch{'es' * (len(touch) == 1)} it "
        f"(at repeat{'s' * (len(touch) > 1)} {_and(str(w['first_crossing']) for w in touch)})"
    )
    if stay:
        after = _and(f"{w['word']!r} after {w['repeats_to_sink']:,} repeats" for w in stay)
        text = f"Repeated words become sinks like the first token: {after}" + (
            f"; {touching}" if touch else ""
        )
    elif touch:
        text = f"No repeated word stays in the sink regime within {n:,} repeats; {touching}"
    else:
        top = max(words, key=lambda w: w["max_norm"])
        return (
            f"No repeated word reaches the sink regime within {n:,} repeats (the closest, "
            f"{top['word']!r}, peaks at {top['max_norm'] / results['typical_norm']:.1f}x typical)."
        )
    ablated = results["repetition_ablated"]
    if ablated is None or ablated["layer"] != results["sink_layer"]:
        return text + "."
    still = [w["word"] for w in ablated["words"] if w["first_crossing"] is not None]
    return text + (
        f"; with the sink neurons zeroed, {_and(map(repr, still))} still "
        f"reach{'es' * (len(still) == 1)} it."
        if still
        else "; with the sink neurons zeroed, none does."
    )


def _circuit(results: dict[str, Any]) -> str:
    circuit = results["circuit"]
    if "skipped" in circuit:
        return f"How the model finds the first token was not traced: {circuit['skipped']}."
    if circuit["first_token_dependence"]["mark_traced"]:
        heads = [f"L{layer}.{head}" for layer, head in circuit["mark_heads"]]
        mark = (
            f"the sink neurons need {len(heads)} attention head{'s' * (len(heads) != 1)} to see "
            f"that the token stands first ({', '.join(heads)})"
            if heads
            else "no single attention head carries the sink neurons' first-position mark"
        )
    else:
        mark = (
            f"the sink neurons fire on {circuit['first_token']['text']!r} wherever it stands: the "
            "model makes a sink of the token, not of position 0"
        )
    best = max(circuit["probe"], key=lambda p: p["balanced_accuracy"])
    where = "the embeddings" if best["layer"] == "embed" else f"layer {best['layer']}"
    return (
        f"How the model finds the first token: {mark}; a linear probe tells the first token from "
        f"later ones best at {where} ({best['balanced_accuracy']:.0%} balanced accuracy) and there "
        f"calls {best['first_share_on_repeats']:.0%} of {circuit['repeat_word']!r} repeats a first "
        "token."
    )


def _paper(results: dict[str, Any]) -> str:
    own = results["table_row"]["paper_table_1"]
    if own is not None:
        row, intro = own, "The paper's row for this model (Yona et al. 2025, Table 1): sink"
    else:
        row = next(r for r in results["paper_table_1"] if r["model"] == PAPER_MODEL)
        intro = "For comparison, the paper (Yona et al. 2025, Table 1) finds Llama-2-7B's sink"
    return (
        f"{intro} at layer {row['sink_layer']} through "
        f"neuron{'s' * (len(row['sink_neurons']) > 1)} {_and(map(str, row['sink_neurons']))}, and "
        f"a repeated token a sink after about {row['repeats']:,} repeats."
    )


def _and(items) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _circuit_section(circuit: FirstLayerCircuit) -> str:
    s = circuit.summary()
    figures = [circuit.heads.plot()] + ([circuit.mark.plot()] if circuit.mark is not None else [])
    figures += [circuit.detectors.plot(), circuit.probe.plot(), circuit.convergence.plot()]
    marked = (
        "Patching each attention layer, head and MLP before the sink neurons between the lone "
        "first token and the same token after 1-32 tokens of text (necessity, sufficiency, "
        "necessity with every other head set to its first-token value; each with a norm-matched "
        "random placebo). Components that carry the mark: "
        f"{html.escape(', '.join(s['paths']) or 'none')}."
        if circuit.mark is not None
        else f"The sink neurons are as active on the first token after text as alone (text removes "
        f"{circuit.position_dependence:.1%} of their activation): there is no first-token mark to "
        "patch."
    )
    return section(
        "How the model marks the first token (paper Sec. 4.3, Fig. 4, Fig. 5)",
        f"{marked} First attention layer, per head: attention to itself against a uniform head, "
        "and its own key's score against the others'. Then the first-detector neurons (Fig. 4) on "
        f"{circuit.detectors.n_chunks} three-word chunks, the linear probe per layer and its "
        f"verdict on {html.escape(repr(circuit.repeat_word.text))} repeats, and the convergence of "
        "the first layer's output on a long run to the lone token's (Fig. 5).",
        *figures,
        frame=circuit.to_frame(),
    )


def _notebook_rule(neurons) -> str:
    if neurons.notebook_neurons is None:
        return (
            "The notebook's rule (top 2 of the gate pre-activation at the last repeat) is not "
            "available here: it ranks one layer of a gated MLP."
        )
    return (
        f"The notebook's rule (top 2 of the gate pre-activation at the last of "
        f"{html.escape(neurons.notebook_input)}) gives {neurons.notebook_neurons}."
    )


def _side_by_side(*results):
    """One row per layer, the inputs' columns next to each other (prefixed by input)."""
    frames = [
        r.to_frame().drop(columns="input").set_index("layer").add_prefix(f"{r.label}: ")
        for r in results
    ]
    return pd.concat(frames, axis=1).reset_index()
