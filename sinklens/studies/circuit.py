"""The explanation half of the paper on one model: how it knows which token is first, and why a long
run of one token fools it.

:func:`first_layer_circuit` chains the pieces, each its own analysis with its own result:

1. the first token the model makes a sink, its sink layer and sink neurons
   (:mod:`~sinklens.analyses.first_token`, :mod:`~sinklens.analyses.sink_neurons`);
2. how the first attention layer's heads treat a token's own key (:mod:`~sinklens.analyses.heads`);
3. which attention layers, heads and MLPs the sink neurons depend on to know a token is first, and
   whether the repeats of a sink-inducing word are marked by the same ones
   (:mod:`~sinklens.analyses.first_token_mark`);
4. the first-detector neurons before the sink layer (:mod:`~sinklens.analyses.first_detector`,
   paper Fig. 4);
5. a linear probe for "first" per layer and its verdict on repeats (:mod:`~sinklens.analyses.probe`);
6. the convergence of the first layer's output on a long run to its output on the lone token
   (:mod:`~sinklens.analyses.convergence`, paper Fig. 5 and Theorem 4.1).

The *detect-others heads* are the heads of the first attention layer that carry the mark (their
necessity, alone or in context, beats its placebo): the heads whose output tells the sink neurons
whether a token sees others. Whether they do it the paper's way, by scoring their own key low, is
in the head-behaviour numbers beside them.

Some models make a sink of a token wherever it stands (Gemma-3 of its ``<bos>``): then the sink
neurons fire as strongly on the token after text as on the lone token, there is no first-token
mark, and the result says so with those numbers instead of patching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.convergence import Convergence, convergence
from sinklens.analyses.first_detector import (
    FirstDetectorNeurons,
    first_detector_neurons,
)
from sinklens.analyses.first_token_mark import (
    MIN_EFFECT,
    FirstTokenMarkPatching,
    first_token_mark_patching,
)
from sinklens.analyses.heads import HeadBehaviour, head_behaviour
from sinklens.analyses.norms import repetition_curves
from sinklens.analyses.probe import FirstTokenProbe, train_first_token_probe
from sinklens.analyses.sink_metric import first_token_dependence
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.tokens import (
    Token,
    check_context,
    default_words,
    repeated_tokens,
    words_to_tokens,
)
from sinklens.settings import Settings
from sinklens.studies.setup import CircuitSetup, OnSetup, circuit_setup
from sinklens.studies.table import SinkTableRow


@dataclass
class FirstLayerCircuit(OnSetup, Result):
    """Every piece of the explanation on one model (see the module docstring)."""

    setup: CircuitSetup
    repeat_word: Token
    heads: HeadBehaviour
    lone_metric: float  # the sink neurons' signed activation on the lone first token ...
    later_metric: Float[torch.Tensor, " context"]  # ... and on it after 1 to 32 tokens of text
    mark: FirstTokenMarkPatching | None  # None: the sink does not depend on the token being first
    detectors: FirstDetectorNeurons
    probe: FirstTokenProbe
    convergence: Convergence

    @property
    def detect_others_heads(self) -> list[tuple[int, int]]:
        return [] if self.mark is None else self.mark.mark_heads(layer=0)

    @property
    def position_dependence(self) -> float:
        """Share of the lone first token's sink-neuron activation that text before it takes away."""
        return 1 - float(self.later_metric.mean()) / self.lone_metric

    def to_frame(self) -> pd.DataFrame:
        """The first attention layer's heads: behaviour beside their effect on the sink neurons."""
        behaviour = self.heads.to_frame()
        behaviour = behaviour[behaviour["input"] == self.heads.labels[0]].drop(columns="input")
        if self.mark is None:
            return behaviour
        effects = self.mark.to_frame()
        effects = effects[effects["hook"] == get_act_name("z", 0)]
        effects = effects.assign(head=effects["index"].astype(int)).drop(
            columns=["hook", "index", "component"]
        )
        frame = behaviour.merge(effects, on="head")
        frame["detect_others"] = [(0, h) in self.detect_others_heads for h in frame["head"]]
        return frame

    def plot(self) -> go.Figure:
        return self.heads.plot() if self.mark is None else self.mark.plot()

    def summary(self) -> dict:
        """The ``sinklens circuit --json`` object."""
        mark = (
            self.mark.summary()
            if self.mark is not None
            else {"path": [], "heads": [], "layers": [], "neurons": [], "repeated_positions": None}
        )
        return {
            "model": self.model,
            "first_token": {
                "id": self.choice.token.id,
                "text": self.choice.token.text,
                "chosen_by": self.choice.reason,
            },
            "sink_layer": self.neurons.sink_layer,
            "sink_neurons": [list(n) for n in self.neurons.sink_neurons],
            "first_token_dependence": {
                "lone": self.lone_metric,
                "after_text": self.later_metric.tolist(),
                "share_removed_by_text": self.position_dependence,
                "mark_traced": self.mark is not None,
            },
            "detect_others_heads": [list(h) for h in self.detect_others_heads],
            "mark_heads": [] if self.mark is None else [list(h) for h in self.mark.mark_heads()],
            "paths": mark["path"],
            "head_effects": mark["heads"],
            "layer_effects": mark["layers"],
            "path_neurons": mark["neurons"],
            "repeated_positions": mark["repeated_positions"],
            "head_behaviour": self.heads.summary(),
            "first_detector_neurons": self.detectors.summary()["neurons"],
            "first_detector_layers": self.detectors.best_per_layer(),
            "probe": self.probe.summary()["per_layer"],
            "probe_by_repeats": self.probe.first_share_on_repeats(),
            "convergence": self.convergence.summary()["words"],
            "repeat_word": self.repeat_word.text,
            "setup": self.setup.summary(),
        }


def first_layer_circuit(
    model: TransformerBridge,
    text: str | None = None,
    settings: Settings | None = None,
    *,
    table: SinkTableRow | None = None,
    n_contexts: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **choices: Any,
) -> FirstLayerCircuit:
    """Run the whole explanation on ``model``. ``text`` is natural text (default: the settings' corpus): its
    first ``corpus_chars`` characters give the circuit setup (:func:`~sinklens.studies.setup.circuit_setup`)
    and the corrupted runs, all of it the probe's and the first-detector's chunks. ``settings`` (or
    ``choices`` in place of its fields) decide the setup and the repeated word: the one of ``words`` (default:
    the tokens of "Another one bites the dust") with the largest norm at the sink layer after ``n_repeats``
    repeats.

    ``table``: the Table-1 row of the same model, text and settings (:func:`sink_table_row`), whose circuit
    setup and norm curves are then reused instead of measured again."""
    settings = Settings.of(settings, **choices)
    settings.check_analysis()
    text = settings.corpus_text() if text is None else text
    tokens = (
        default_words(model) if settings.words is None else words_to_tokens(model, settings.words)
    )
    check_context(model, settings.n_repeats + 1)
    typical_text = text[: settings.corpus_chars]
    n_repeats = settings.n_repeats
    with tqdm(total=7, desc="sinklens circuit", disable=not progress) as bar:
        setup = table.setup if table is not None else circuit_setup(model, text, settings)
        start, reference = setup.first.id, setup.reference
        if not setup.sink_neurons:
            assert setup.neurons is not None  # circuit_setup searched for them (neurons=True)
            raise SinklensError(
                f"no sink neurons found on {setup.model} ({setup.neurons.case}; first token: "
                f"{setup.choice.reason})",
                "there is no sink to explain; see sinklens table for the numbers",
            )
        bar.update()
        layer = setup.sink_layer
        curves = (
            table.curves
            if table is not None
            else repetition_curves(
                model,
                tokens,
                layer=layer,
                baseline=setup.baseline,
                n_repeats=n_repeats,
                first=start,
            )
        )
        word = curves.words[max(range(len(tokens)), key=lambda i: curves.max_norms[i])]
        repeat = repeated_tokens(model, word.id, n_repeats, first=start)
        label = f"{word.text!r} x {n_repeats}"
        bar.update()
        heads = head_behaviour(model, {"natural text": reference, label: repeat})
        bar.update()
        contexts: dict[str, Any] = {} if n_contexts is None else {"n_contexts": n_contexts}
        lone, later = first_token_dependence(
            model, start, typical_text, setup.sink_neurons, **contexts
        )
        mark = None
        if lone - float(later.max()) > MIN_EFFECT * abs(
            lone
        ):  # else the sink does not need the token to be first
            mark = first_token_mark_patching(
                model,
                start,
                typical_text,
                setup.sink_neurons,
                repeat_word=word.id,
                n_repeats=n_repeats,
                seed=seed,
                **contexts,
            )
        bar.update()
        detectors = first_detector_neurons(
            model, text, repeat, sink_layer=layer, repeat_label=label
        )
        bar.update()
        probe = train_first_token_probe(
            model, text, repeat, max_layer=layer, seed=seed, repeat_label=label
        )
        bar.update()
        converged = convergence(model, first=start)
        bar.update()
    return FirstLayerCircuit(setup, word, heads, lone, later, mark, detectors, probe, converged)
