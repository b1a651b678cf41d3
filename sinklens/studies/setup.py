"""The circuit setup every study starts from: which token the model makes a sink, where, and through which neurons.

Before a Table-1 row, the first-layer circuit, a vocabulary scan, the explorer, a patch or its evaluation can
measure anything, the same chain is measured on natural text: the first token the model makes a sink
(:mod:`sinklens.analyses.first_token`), the sink layer (:mod:`sinklens.analyses.sink_layer`), the sink
neurons found by ablation (:mod:`sinklens.analyses.sink_neurons`) and the typical norm there
(:mod:`sinklens.analyses.norms`). :func:`circuit_setup` measures it once, with every choice taken from one
:class:`~sinklens.settings.Settings`, so that a flag means the same in every study; the
:class:`CircuitSetup` it returns records those settings beside what they found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.first_token import FirstTokenChoice, choose_first_token
from sinklens.analyses.norms import NormBaseline, norm_baseline
from sinklens.analyses.sink_layer import SinkLayer, find_sink_layer
from sinklens.analyses.sink_neurons import (
    SinkNeurons,
    check_criterion,
    check_layers,
    find_sink_neurons,
)
from sinklens.results import Result
from sinklens.run.tokens import Token, text_tokens
from sinklens.settings import Settings


class OnSetup:
    """What a study's result tells of the circuit setup it started from (its ``setup`` field)."""

    setup: CircuitSetup

    @property
    def model(self) -> str:
        return self.setup.model

    @property
    def choice(self) -> FirstTokenChoice:
        return self.setup.choice

    @property
    def sink(self) -> SinkLayer:
        return self.setup.sink

    @property
    def neurons(self) -> SinkNeurons:
        neurons = self.setup.neurons
        assert neurons is not None  # the studies built on OnSetup all search for the sink neurons
        return neurons

    @property
    def baseline(self) -> NormBaseline:
        return self.setup.baseline


@dataclass
class CircuitSetup(Result):
    """The first token, the natural-text reference (``[first] + text``), the sink layer, the sink neurons (None
    when only the sink layer was asked for) and the norm baseline at the layer the neurons settled on, with the
    settings that chose them (``dataclasses.asdict`` of a :class:`~sinklens.settings.Settings`)."""

    model: str
    choice: FirstTokenChoice
    reference: Int[torch.Tensor, "1 pos"]
    sink: SinkLayer
    neurons: SinkNeurons | None
    baseline: NormBaseline
    settings: dict[str, Any]

    @property
    def first(self) -> Token:
        return self.choice.token

    @property
    def sink_found(self) -> bool:
        return self.choice.sink_found

    @property
    def sink_layer(self) -> int:
        """The layer the measurements use: where the sink neurons settled (the sink layer's rule otherwise)."""
        return self.sink.sink_layer if self.neurons is None else self.neurons.sink_layer

    @property
    def sink_neurons(self) -> list[tuple[int, int]]:
        return [] if self.neurons is None else self.neurons.sink_neurons

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "model": self.model,
                    "first token": self.first.text,
                    "first token id": self.first.id,
                    "sink found": self.sink_found,
                    "sink layer": self.sink_layer,
                    "sink neurons": ", ".join(
                        f"L{layer}.{neuron}" for layer, neuron in self.sink_neurons
                    ),
                    "typical norm": self.baseline.typical_norm,
                    "first-token norm": self.baseline.first_token_norm,
                }
            ]
        )

    def plot(self) -> go.Figure:
        """The sink layer's evidence: the lone first token's MLP output norm per layer."""
        return self.sink.plot()

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "first_token": {
                "id": self.first.id,
                "text": self.first.text,
                "chosen_by": self.choice.reason,
            },
            "sink_found": self.sink_found,
            "sink_layer": self.sink_layer,
            "sink_layer_rule": self.sink.summary(),
            "sink_neurons": [list(n) for n in self.sink_neurons],
            "typical_norm": self.baseline.typical_norm,
            "first_token_norm": self.baseline.first_token_norm,
            "reference_tokens": int(self.reference.shape[1]),
            "first_token_candidates": self.choice.summary(),
            "neurons": None if self.neurons is None else self.neurons.summary(),
            "settings": self.settings,
        }


def circuit_setup(
    model: TransformerBridge,
    text: str | None = None,
    settings: Settings | None = None,
    *,
    neurons: bool = True,
    **choices: Any,
) -> CircuitSetup:
    """Measure the circuit setup of ``model`` on natural ``text`` (default: the settings' corpus), its first
    ``settings.corpus_chars`` characters after the first token.

    ``settings`` (default: :class:`~sinklens.settings.Settings`'s defaults) decides the first token
    (``first_token``, ``min_ratio``), the sink layer (``max_layer``, ``n_sigma``) and the sink neurons
    (``layers``, ``criterion``, ``share``, ``max_neurons``; the notebook's criterion ranks at the last of
    ``n_repeats`` repeats); ``choices`` replace its fields (``circuit_setup(model, n_sigma=1.5)``). With
    ``neurons=False`` only the first token and the sink layer are measured. The model's own dtype and
    device are used; the settings' ``model``, ``dtype`` and ``device`` name what to load, not this model. Text
    longer than the model's context is cut to it."""
    settings = Settings.of(settings, **choices)
    settings.check_analysis()
    typical_text = (settings.corpus_text() if text is None else text)[: settings.corpus_chars]
    check_criterion(model, settings.criterion, settings.layers)
    if settings.layers is not None:
        check_layers(model, settings.layers)
    choice = choose_first_token(
        model,
        typical_text,
        given=settings.given_first_token,
        max_layer=settings.max_layer,
        min_ratio=settings.min_ratio,
    )
    reference = text_tokens(model, typical_text, first=choice.token.id, max_tokens=model.cfg.n_ctx)
    sink = find_sink_layer(
        model,
        first=choice.token.id,
        max_layer=settings.max_layer,
        n_sigma=settings.n_sigma,
        reference=reference,
    )
    found = (
        find_sink_neurons(
            model,
            reference,
            layers=settings.layers,
            criterion=settings.criterion,
            share=settings.share,
            max_neurons=settings.max_neurons,
            notebook_repeats=settings.n_repeats,
            sink=sink,
        )
        if neurons
        else None
    )
    layer = sink.sink_layer if found is None else found.sink_layer
    source = getattr(model, "sinklens_source", None)
    return CircuitSetup(
        source.name if source else model.cfg.model_name,
        choice,
        reference,
        sink,
        found,
        norm_baseline(model, layer, reference),
        dataclasses.asdict(settings),
    )
