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

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.norms import RepetitionCurves, repetition_curves
from sinklens.analyses.sink_neurons import SINGLE_LAYER
from sinklens.load.models import placement
from sinklens.load.registry import PAPER_TABLE_1, paper_record
from sinklens.results import Result
from sinklens.run.interventions import ablation_hooks
from sinklens.run.tokens import check_context, default_words, words_to_tokens
from sinklens.settings import Settings
from sinklens.studies.setup import CircuitSetup, OnSetup, circuit_setup

ABLATED = "sink neurons ablated"
NO_SINK = "no sink found"


class _NoProgress(contextlib.AbstractContextManager):
    """What the row's steps report to when no bar is shown (a disabled tqdm still costs its
    setup)."""

    def update(self, n: int = 1) -> None:
        pass

    def __exit__(self, *exc) -> None:
        return None


def layer_range(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


@dataclass
class SinkTableRow(OnSetup, Result):
    """The chain behind one Table-1 row (``curves_ablated`` is None when no sink neurons were found)."""

    setup: CircuitSetup
    curves: RepetitionCurves
    curves_ablated: RepetitionCurves | None
    placement: dict[str, str] = field(
        default_factory=dict
    )  # dtype, device, layers loaded (load.models.placement)

    @property
    def sink_found(self) -> bool:
        """Whether the first token becomes a sink at all (:mod:`sinklens.analyses.first_token`)."""
        return self.choice.sink_found

    @property
    def repeats_to_sink(self) -> tuple[int | None, str | None]:
        """The fewest repeats after which a word stays in the sink regime, and that word."""
        reached = [
            (r, w.text)
            for r, w in zip(self.curves.repeats_to_sink, self.curves.words)
            if r is not None
        ]
        return min(reached) if reached else (None, None)

    def to_frame(self) -> pd.DataFrame:
        """The row in the paper's Table-1 columns, with the norms behind it."""
        s = self.summary()
        neurons = "; ".join(
            f"L{layer}: {', '.join(map(str, ids))}"
            for layer, ids in s["sink_neurons_by_layer"].items()
        )
        return pd.DataFrame(
            [
                {
                    "Model": self.model,
                    "Repeats": s["repeats_to_sink"],
                    "Sink-Layer": layer_range(s["sink_layers"]) if self.sink_found else NO_SINK,
                    "Sink-Neurons IDs": ", ".join(map(str, s["sink_neurons"]))
                    if s["case"] == SINGLE_LAYER
                    else neurons,
                    "first token": s["first_token"]["text"],
                    "case": s["case"],
                    "typical norm": s["typical_norm"],
                    "first-token norm": s["first_token_norm"],
                    "first-token norm, ablated": s["first_token_norm_ablated"],
                    "max repeat norm": s["repeat_max_norm"],
                    "max repeat norm, ablated": s["repeat_max_norm_ablated"],
                }
            ]
        )

    def plot(self) -> go.Figure:
        """This row beside the paper's Table 1."""
        rows = [
            (r.model, r.repeats, r.sink_layer, ", ".join(map(str, r.sink_neurons)))
            for r in PAPER_TABLE_1.values()
        ]
        ours = self.to_frame().iloc[0]
        rows.append(
            (
                f"{self.model} (sinklens)",
                ours["Repeats"],
                ours["Sink-Layer"],
                ours["Sink-Neurons IDs"],
            )
        )
        columns = list(zip(*rows))
        fig = go.Figure(
            go.Table(
                header={"values": ["Model", "Repeats", "Sink-Layer", "Sink-Neurons IDs"]},
                cells={"values": [[("-" if v is None else v) for v in col] for col in columns]},
            )
        )
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
            "first_token": {
                "id": self.choice.token.id,
                "text": self.choice.token.text,
                "chosen_by": self.choice.reason,
            },
            "sink_found": found,
            "case": neurons.case if found else NO_SINK,
            "sink_layer": neurons.sink_layer if found else None,
            "sink_layers": neurons.layers if found else [],
            "sink_neurons": neurons.sink_neurons_by_layer.get(neurons.sink_layer, [])
            if found
            else [],
            "sink_neurons_by_layer": {str(k): v for k, v in neurons.sink_neurons_by_layer.items()}
            if found
            else {},
            "measured_at_layer": neurons.sink_layer,
            "first_token_norm": self.baseline.first_token_norm,
            "first_token_norm_ablated": neurons.first_token_norm_ablated
            if neurons.sink_neurons
            else None,
            "typical_norm": self.baseline.typical_norm,
            "repeat_max_norm": max(curves.max_norms),
            "repeat_max_norm_ablated": max(self.curves_ablated.max_norms)
            if self.curves_ablated
            else None,
            "repeats_to_sink": repeats,
            "repeats_to_sink_word": word,
            "first_crossing": min(crossings) if crossings else None,
            "n_repeats": curves.n_repeats,
            "words": [
                {
                    **w,
                    "max_norm_ablated": None
                    if self.curves_ablated is None
                    else self.curves_ablated.max_norms[i],
                }
                for i, w in enumerate(curves.summary()["words"])
            ],
            "first_token_candidates": self.choice.summary()["candidates"],
            "setup": self.setup.summary(),
            "paper_table_1": None
            if record is None
            else {
                "repeats": record.repeats,
                "sink_layer": record.sink_layer,
                "sink_neurons": list(record.sink_neurons),
            },
        }


def sink_table_row(
    model: TransformerBridge,
    text: str | None = None,
    settings: Settings | None = None,
    *,
    setup: CircuitSetup | None = None,
    progress: bool = False,
    **choices: Any,
) -> SinkTableRow:
    """Measure one Table-1 row. ``text`` is natural text (default: the settings' corpus; the paper: Tiny
    Shakespeare), its first ``corpus_chars`` characters giving the typical norm; ``settings`` (or ``choices``
    in place of its fields, :meth:`~sinklens.settings.Settings.of`) decide the circuit setup
    (:func:`~sinklens.studies.setup.circuit_setup`; pass ``setup`` to reuse one measured with the same
    settings) and the repeated ``words`` (default: the tokens of "Another one bites the dust"), ``n_repeats``
    and ``sink_fraction``."""
    settings = Settings.of(settings, **choices)
    settings.check_analysis()
    tokens = (
        default_words(model) if settings.words is None else words_to_tokens(model, settings.words)
    )
    check_context(
        model, settings.n_repeats + 1
    )  # a too-long run or a bad setting fails before any forward pass
    with tqdm(total=3, desc="sinklens table") if progress else _NoProgress() as steps:
        setup = setup or circuit_setup(model, text, settings)
        steps.update()
        curves_of: dict[str, Any] = dict(
            layer=setup.sink_layer,
            baseline=setup.baseline,
            n_repeats=settings.n_repeats,
            first=setup.first.id,
            sink_fraction=settings.sink_fraction,
        )
        curves = repetition_curves(model, tokens, **curves_of)
        steps.update()
        ablated = None
        if setup.sink_neurons and setup.sink_found:
            ablated = repetition_curves(
                model,
                tokens,
                **curves_of,
                condition=ABLATED,
                interventions=ablation_hooks(model, [setup.sink_neurons]),
            )
        steps.update()
    return SinkTableRow(setup, curves, ablated, placement(model))
