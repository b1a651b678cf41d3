"""One row of the paper's Table 1 for any model: sink layer, sink neurons, repeats needed.

Paper (Table 1): per model, the number of repeats that induce a sink, the sink layer and the sink
neurons (Llama-2-7B: 1000 repeats, layer 1, neurons 7890 and 10411). :func:`sink_table_row` runs
the whole chain on one model: it chooses the first token the model makes a sink
(:mod:`sinklens.analyses.first_token`), finds the sink layer and neurons
(:mod:`sinklens.analyses.sink_neurons`), measures the norm curves of repeated words at the sink
layer intact and with the sink neurons ablated (:mod:`sinklens.analyses.norms`), and reports the
fewest repeats after which a word stays in the sink regime. Where no candidate first token
becomes a sink, the row says "no sink found" instead of a layer; the measurements behind it are
still made (on the tokenizer's BOS, or the most sink-like candidate), so the numbers can be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.first_token import FirstTokenChoice, choose_first_token
from sinklens.analyses.norms import NormBaseline, RepetitionCurves, norm_baseline, repetition_curves
from sinklens.analyses.sink_layer import SinkLayerResult, find_sink_layer
from sinklens.analyses.sink_neurons import (
    SINGLE_LAYER,
    SinkNeuronsResult,
    check_criterion,
    check_layers,
    find_sink_neurons,
)
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.load.registry import PAPER_TABLE_1, paper_record
from sinklens.results import Result
from sinklens.run.interventions import ablation_hooks
from sinklens.run.tokens import FirstToken, check_context, default_words, encode, text_tokens, words_to_tokens
from sinklens.settings import (
    AUTO,
    MAX_NEURONS,
    MIN_SINK_RATIO,
    PAPER_MAX_LAYER,
    PAPER_N_SIGMA,
    REMOVED_SHARE,
    SINK_FRACTION,
)

ABLATED = "sink neurons ablated"
NO_SINK = "no sink found"


def layer_range(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


@dataclass
class SinkTableRow(Result):
    """The chain behind one Table-1 row (``curves_ablated`` is None when no sink neurons were found)."""

    model: str
    choice: FirstTokenChoice
    sink: SinkLayerResult
    neurons: SinkNeuronsResult
    baseline: NormBaseline
    curves: RepetitionCurves
    curves_ablated: RepetitionCurves | None
    placement: dict[str, str] = field(default_factory=dict)  # dtype, device, layers loaded (load.models.placement)

    @property
    def sink_found(self) -> bool:
        """Whether the first token becomes a sink at all (:mod:`sinklens.analyses.first_token`)."""
        return self.choice.sink_found

    @property
    def repeats_to_sink(self) -> tuple[int | None, str | None]:
        """The fewest repeats after which a word stays in the sink regime, and that word."""
        reached = [(r, w.text) for r, w in zip(self.curves.repeats_to_sink, self.curves.words) if r is not None]
        return min(reached) if reached else (None, None)

    def to_frame(self) -> pd.DataFrame:
        """The row in the paper's Table-1 columns, with the norms behind it."""
        s = self.summary()
        neurons = "; ".join(f"L{layer}: {', '.join(map(str, ids))}" for layer, ids in s["sink_neurons_by_layer"].items())
        return pd.DataFrame([{
            "Model": self.model,
            "Repeats": s["repeats_to_sink"],
            "Sink-Layer": layer_range(s["sink_layers"]) if self.sink_found else NO_SINK,
            "Sink-Neurons IDs": ", ".join(map(str, s["sink_neurons"])) if s["case"] == SINGLE_LAYER else neurons,
            "first token": s["first_token"]["text"],
            "case": s["case"],
            "typical norm": s["typical_norm"],
            "first-token norm": s["first_token_norm"],
            "first-token norm, ablated": s["first_token_norm_ablated"],
            "max repeat norm": s["repeat_max_norm"],
            "max repeat norm, ablated": s["repeat_max_norm_ablated"],
        }])

    def plot(self) -> go.Figure:
        """This row beside the paper's Table 1."""
        rows = [(r.model, r.repeats, r.sink_layer, ", ".join(map(str, r.sink_neurons))) for r in PAPER_TABLE_1.values()]
        ours = self.to_frame().iloc[0]
        rows.append((f"{self.model} (sinklens)", ours["Repeats"], ours["Sink-Layer"], ours["Sink-Neurons IDs"]))
        columns = list(zip(*rows))
        fig = go.Figure(go.Table(header={"values": ["Model", "Repeats", "Sink-Layer", "Sink-Neurons IDs"]},
                                 cells={"values": [[("-" if v is None else v) for v in col] for col in columns]}))
        fig.update_layout(title="Table 1 of Yona et al. (2025) and this model's row")
        return fig

    def summary(self) -> dict:
        """The row as JSON (the keys of ``sinklens table --json``)."""
        repeats, word = self.repeats_to_sink
        neurons, curves, found = self.neurons, self.curves, self.sink_found
        crossings = [c for c in curves.first_crossings if c is not None]
        record = paper_record(self.model)
        return {
            "model": self.model,
            **self.placement,
            "first_token": {"id": self.choice.token.id, "text": self.choice.token.text,
                            "chosen_by": self.choice.reason},
            "sink_found": found,
            "case": neurons.case if found else NO_SINK,
            "sink_layer": neurons.sink_layer if found else None,
            "sink_layers": neurons.layers if found else [],
            "sink_neurons": neurons.sink_neurons_by_layer.get(neurons.sink_layer, []) if found else [],
            "sink_neurons_by_layer": {str(k): v for k, v in neurons.sink_neurons_by_layer.items()} if found else {},
            "measured_at_layer": neurons.sink_layer,
            "first_token_norm": self.baseline.first_token_norm,
            "first_token_norm_ablated": neurons.first_token_norm_ablated if neurons.sink_neurons else None,
            "typical_norm": self.baseline.typical_norm,
            "repeat_max_norm": max(curves.max_norms),
            "repeat_max_norm_ablated": max(self.curves_ablated.max_norms) if self.curves_ablated else None,
            "repeats_to_sink": repeats,
            "repeats_to_sink_word": word,
            "first_crossing": min(crossings) if crossings else None,
            "n_repeats": curves.n_repeats,
            "words": [
                {**w, "max_norm_ablated": None if self.curves_ablated is None else self.curves_ablated.max_norms[i]}
                for i, w in enumerate(curves.summary()["words"])
            ],
            "first_token_candidates": self.choice.summary()["candidates"],
            "paper_table_1": None if record is None else {
                "repeats": record.repeats, "sink_layer": record.sink_layer, "sink_neurons": list(record.sink_neurons)},
        }


def sink_table_row(
    model: TransformerBridge,
    text: str,
    *,
    words: Sequence[str | int] | None = None,
    n_repeats: int = 1000,
    first: FirstToken = AUTO,
    layers: int | Sequence[int] | None = None,
    criterion: str = "paper",
    share: float = REMOVED_SHARE,
    max_neurons: int = MAX_NEURONS,
    max_layer: int | None = PAPER_MAX_LAYER,
    n_sigma: float = PAPER_N_SIGMA,
    min_ratio: float = MIN_SINK_RATIO,
    sink_fraction: float = SINK_FRACTION,
    progress: bool = False,
) -> SinkTableRow:
    """Measure one Table-1 row. ``text`` is natural text for the typical norm (the paper: the first
    1000 characters of Tiny Shakespeare); ``words`` default to the tokens of "Another one bites the dust"."""
    if words is not None and not words:
        raise SinklensError("the word list is empty", "pass at least one word, or None for the paper's words")
    tokens = default_words(model) if words is None else words_to_tokens(model, words)
    check_context(model, n_repeats + 1)  # a too-long run or a bad setting fails before any forward pass
    check_context(model, len(encode(model, text)) + 1)
    check_criterion(model, criterion, layers)
    if layers is not None:
        check_layers(model, layers)
    source = getattr(model, "sinklens_source", None)
    name = source.name if source else model.cfg.model_name
    with tqdm(total=5, desc="sinklens table", disable=not progress) as steps:
        choice = choose_first_token(model, text, given=None if first == AUTO else first, max_layer=max_layer,
                                    min_ratio=min_ratio)
        start = choice.token.id
        steps.update()
        reference = text_tokens(model, text, first=start)
        sink = find_sink_layer(model, first=start, max_layer=max_layer, n_sigma=n_sigma, reference=reference)
        steps.update()
        neurons = find_sink_neurons(model, reference, layers=layers, criterion=criterion, share=share,
                                    max_neurons=max_neurons, notebook_repeats=n_repeats, sink=sink)
        steps.update()
        layer = neurons.sink_layer
        baseline = norm_baseline(model, layer, reference)
        curves = repetition_curves(model, tokens, layer=layer, baseline=baseline, n_repeats=n_repeats, first=start,
                                   sink_fraction=sink_fraction)
        steps.update()
        ablated = None
        if neurons.sink_neurons and choice.sink_found:
            ablated = repetition_curves(model, tokens, layer=layer, baseline=baseline, n_repeats=n_repeats,
                                        first=start, sink_fraction=sink_fraction, interventions=ablation_hooks(model, [neurons.sink_neurons]),
                                        condition=ABLATED)
        steps.update()
    return SinkTableRow(name, choice, sink, neurons, baseline, curves, ablated, placement(model))
