"""The one-command report: every analysis on one model, as ``report.html`` and ``results.json``.

Each step's result is checkpointed under ``OUT/.steps/`` as soon as it is computed, so an
interrupted report resumes where it stopped when run again with the same settings (other
settings start afresh). ``results.json`` keeps stable top-level keys for scripts: ``model``,
``versions``, ``first_token``, ``sink_layer``, ``typical_norm``, ``first_token_norm`` and ``words``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import write_json, write_text
from sinklens.analyses.attention import (
    attention_received,
    attention_score_maps,
    fig1_inputs,
    paper_figure_layers,
    plot_attention_received,
    plot_attention_score_maps,
)
from sinklens.analyses.norms import SINK_FRACTION, norm_baseline, repetition_curves
from sinklens.analyses.sink_layer import PAPER_MAX_LAYER, PAPER_N_SIGMA, find_sink_layer
from sinklens.errors import SinklensError
from sinklens.load.corpus import read_text, shakespeare
from sinklens.load.models import load_model
from sinklens.load.registry import DEFAULT_MODEL, paper_record
from sinklens.results import Result, load_result, save_result
from sinklens.run.cache import check_layer
from sinklens.run.tokens import default_words, first_token, repeated_tokens, text_tokens, words_to_tokens

PAPER_CORPUS_CHARS = 1000  # the notebook's typical norm uses the first 1000 characters


@dataclass
class ReportConfig:
    """Everything a report depends on; its JSON form keys the resume checkpoints."""

    model: str = DEFAULT_MODEL
    words: list[str] | None = None  # None: the tokens of "Another one bites the dust"
    n_repeats: int = 1000
    first_token: str = "bos"
    corpus: str | None = None  # a text file; None: the opening of Coriolanus (Tiny Shakespeare)
    corpus_chars: int = PAPER_CORPUS_CHARS
    max_layer: int = PAPER_MAX_LAYER
    n_sigma: float = PAPER_N_SIGMA
    sink_fraction: float = SINK_FRACTION
    sink_layer: int | None = None  # None: detect it; else use this layer (detection still reported)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class _Checkpoints:
    """Step results saved under ``OUT/.steps``, valid for one config fingerprint."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir = out / ".steps"
        stamp = self.dir / "fingerprint"
        if not stamp.is_file() or stamp.read_text() != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            write_text(stamp, fingerprint)

    def get(self, name: str, compute: Callable[[], Result]) -> Result:
        path = self.dir / f"{name}.pt"
        if path.is_file():
            return load_result(path)
        result = compute()
        save_result(result, path)
        return result


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("sinklens", "transformer-lens", "transformers", "torch")}


def run_report(
    config: ReportConfig, out: str | Path, *, model: TransformerBridge | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run every analysis of ``config`` and write ``report.html`` and ``results.json`` into ``out``.

    Pass an already loaded ``model`` to skip loading. Returns the ``results.json`` content.
    """
    out = Path(out)
    if config.words is not None and not config.words:
        raise SinklensError("the word list is empty", "pass at least one word, or None for the paper's words")
    model = model or load_model(config.model)
    corpus = read_text(config.corpus) if config.corpus else shakespeare()
    start = first_token(model, config.first_token)
    words = default_words(model) if config.words is None else words_to_tokens(model, config.words)
    for word in words:  # fail on a bad repeat count or a too-long input before any compute
        repeated_tokens(model, word.id, config.n_repeats, first=config.first_token)
    reference = text_tokens(model, corpus[: config.corpus_chars], first=config.first_token)
    steps = _Checkpoints(out, config.fingerprint())
    bar = tqdm(total=7, desc="sinklens report", disable=not progress)

    def step(name: str, compute: Callable[[], Result]) -> Result:
        bar.set_postfix_str(name)
        result = steps.get(name, compute)
        bar.update()
        return result

    sink = step("sink_layer", lambda: find_sink_layer(
        model, first=config.first_token, max_layer=config.max_layer, n_sigma=config.n_sigma, reference=reference))
    layer = sink.sink_layer if config.sink_layer is None else check_layer(model, config.sink_layer)
    method = sink.method if config.sink_layer is None else "given by the user"
    baseline = step("baseline", lambda: norm_baseline(model, layer, reference))
    curves = step("curves", lambda: repetition_curves(
        model, words, layer=layer, baseline=baseline, n_repeats=config.n_repeats, first=config.first_token,
        sink_fraction=config.sink_fraction, progress=progress))
    sinkiest = curves.words[max(range(len(curves.words)), key=lambda i: curves.max_norms[i])]
    repeated = repeated_tokens(model, sinkiest.id, config.n_repeats, first=config.first_token)
    received_text = step("attention_text", lambda: attention_received(model, reference, label="natural text"))
    received_repeat = step("attention_repeat", lambda: attention_received(
        model, repeated, label=f"{sinkiest.text!r} x {config.n_repeats}"))
    regular, short_repeat = fig1_inputs(model, corpus, sinkiest.id, first=config.first_token)
    fig1_layers = paper_figure_layers(model, layer)
    regular_maps = step("scores_text", lambda: attention_score_maps(model, regular, fig1_layers, label="regular text"))
    repeat_maps = step("scores_repeat", lambda: attention_score_maps(
        model, short_repeat, fig1_layers, label=f"{sinkiest.text!r} repeated"))
    bar.close()
    maps = (regular_maps, repeat_maps)

    source = getattr(model, "sinklens_source", None)
    model_name = source.name if source else model.cfg.model_name
    record = paper_record(model_name)
    results = {
        "model": {"spec": config.model, "name": model_name,
                  "n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp, "n_ctx": model.cfg.n_ctx},
        "versions": _versions(),
        "first_token": {"id": start.id, "text": start.text},
        "sink_layer": layer,
        "sink_layer_method": method,
        "typical_norm": baseline.typical_norm,
        "first_token_norm": baseline.first_token_norm,
        "words": curves.summary()["words"],
        "settings": dataclasses.asdict(config),
        "sink_layer_detail": sink.summary(),
        "norm_baseline": baseline.summary(),
        "repetition": {k: v for k, v in curves.summary().items() if k != "words"},
        "attention": [received_text.summary(), received_repeat.summary()],
        "attention_scores": [regular_maps.summary(), repeat_maps.summary()],
        "paper_table_1": dataclasses.asdict(record) if record else None,
    }
    write_json(out / "results.json", results)
    write_text(out / "report.html", _render_html(results, sink, curves, received_text, received_repeat, maps))
    return results


def _side_by_side(*results):
    """One row per layer, the inputs' columns next to each other (prefixed by input)."""
    frames = [r.to_frame().drop(columns="input").set_index("layer").add_prefix(f"{r.label}: ") for r in results]
    return pd.concat(frames, axis=1).reset_index()


def _section(title: str, text: str, figure=None, frame=None, first_figure: bool = False) -> str:
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p>{text}</p>"]
    if figure is not None:
        parts.append(figure.to_html(full_html=False, include_plotlyjs=True if first_figure else False))
    if frame is not None:
        parts.append(frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", classes="table"))
    return "\n".join(parts)


def _render_html(results, sink, curves, received_text, received_repeat, maps) -> str:
    model = results["model"]
    first = results["first_token"]
    record = results["paper_table_1"]
    paper = (f"The paper's Table 1 gives sink layer {record['sink_layer']} and sink neurons "
             f"{record['sink_neurons']} for this model." if record else
             "This model is not in the paper's Table 1, so there is no published value to compare with.")
    sections = [
        _section(
            "Sink layer",
            f"MLP output norm of the lone first token {html.escape(repr(first['text']))} (id {first['id']}) per "
            f"layer, and the median over the later tokens of natural text. The sink layer is the first layer "
            f"above mean + {sink.n_sigma:g} sigma of the first-token norms; if none is, the layer with the largest "
            f"first/later-token ratio. Detected: <b>layer {sink.sink_layer}</b>, by {html.escape(sink.method)}; "
            f"the analyses below use layer {results['sink_layer']} ({html.escape(results['sink_layer_method'])}). "
            f"{paper}",
            sink.plot(), sink.to_frame(), first_figure=True,
        ),
        _section(
            "Hidden-state norm vs repetitions (paper Fig. 2/6)",
            f"Norm of <code>blocks.{curves.layer}.hook_resid_post</code> for [first token] + [word] x "
            f"{curves.n_repeats}. Typical norm (natural text) {results['typical_norm']:.4g}; first-token norm "
            f"{results['first_token_norm']:.4g}. A word reaches the sink regime at the first repeat whose log-norm "
            f"passes {curves.sink_fraction:g} of the way from typical to the first token "
            f"(norm {curves.threshold:.4g}).",
            curves.plot(), curves.to_frame(),
        ),
        _section(
            "Attention received per layer",
            "Mean attention weight that later queries put on the first token and on a later token, and the "
            f"share of heads whose mean attention on the first token exceeds {received_text.epsilon:g} "
            "(Gu et al. 2024).",
            plot_attention_received(received_text, received_repeat),
            _side_by_side(received_text, received_repeat),
        ),
        _section(
            "Attention scores: regular text vs a repeated token (paper Fig. 1)",
            "Pre-softmax scores averaged over heads (and over the text lines), masked keys blank.",
            plot_attention_score_maps(*maps),
        ),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sinklens report: {html.escape(model['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;}} .table{{border-collapse:collapse;font-size:0.85em}}
.table td,.table th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>sinklens report: {html.escape(model['name'])}</h1>
<p>Model spec <code>{html.escape(results['model']['spec'])}</code>, {model['n_layers']} layers. {html.escape(versions)}.
Every number here is in <code>results.json</code>.</p>
{''.join(sections)}
</body></html>
"""
