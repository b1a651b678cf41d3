"""Activation-patching studies of the sink: what ``sinklens patching`` runs, callable from Python.

:func:`patching_study` measures the model's circuit setup (the first token it makes a sink, the sink layer
and neurons), builds a clean and a corrupted input of equal length, and sweeps one kind of site with
:func:`~sinklens.analyses.patching_sweep.patching_sweep`. The default pair (:func:`sink_pair`) is the natural
text after the sink-making first token (clean) and the same text after the candidate first token the model
makes least of a sink (corrupted): patching then shows where the difference between a sink and no sink is
carried on its way to the sink layer. Any other pair of equal-length texts can be given instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.patching_sweep import (
    LOGITS,
    PatchingMetric,
    PatchingSweep,
    attention_to,
    first_token_norm,
    logit_difference,
    patching_sweep,
    sink_neuron_activation,
)
from sinklens.defaults import PATCHING_METRICS, PATCHING_TOKENS
from sinklens.errors import SinklensError
from sinklens.run.cache import run_cache
from sinklens.run.tokens import encode, text_tokens
from sinklens.settings import Settings
from sinklens.studies.setup import CircuitSetup, circuit_setup


def sink_pair(
    setup: CircuitSetup, n_tokens: int = PATCHING_TOKENS
) -> tuple[Int[torch.Tensor, "1 pos"], Int[torch.Tensor, "1 pos"]]:
    """The natural text's first ``n_tokens`` tokens after the sink-making first token (clean), and after the
    candidate first token whose peak norm is the smallest multiple of typical (corrupted)."""
    ratios = setup.choice.peak_ratios
    least = setup.choice.candidates[min(range(len(ratios)), key=ratios.__getitem__)]
    if least.id == setup.first.id:
        raise SinklensError(
            "no candidate first token is less of a sink than the chosen one",
            "pass a clean and a corrupted text of your own",
        )
    clean = setup.reference[:, : n_tokens + 1]
    corrupted = clean.clone()
    corrupted[0, 0] = least.id
    return clean, corrupted


def choose_metric(
    name: str, model: TransformerBridge, setup: CircuitSetup, clean, corrupted, position: int
) -> PatchingMetric:
    """A metric of the menu (:data:`~sinklens.defaults.PATCHING_METRICS`) on this model's circuit."""
    if name == "first_token_norm":
        return first_token_norm(setup.sink_layer)
    if name == "sink_neurons":
        if not setup.sink_neurons:
            raise SinklensError(
                "no sink neurons were found to measure", "use --metric first_token_norm"
            )
        return sink_neuron_activation(setup.sink_neurons, position)
    if name == "attention":
        later = list(range(setup.sink_layer + 1, model.cfg.n_layers))
        if not later:
            raise SinklensError(
                "no layer follows the sink layer to pay attention", "use another metric"
            )
        return attention_to(position, later)
    if name == "logit_diff":  # the clean run's next token against the corrupted run's
        logits = LOGITS
        answer = int(run_cache(model, clean, [logits])[logits][0, -1].argmax())
        wrong = int(run_cache(model, corrupted, [logits])[logits][0, -1].argmax())
        if answer == wrong:
            raise SinklensError(
                "both inputs predict the same next token, so their logit difference is 0",
                "use another metric or another pair",
            )
        return logit_difference(answer, wrong)
    raise SinklensError(f"unknown metric {name!r}", f"pass one of {', '.join(PATCHING_METRICS)}")


class PatchingStudy(NamedTuple):
    """The sweep with the circuit setup its default metric and pair came from."""

    sweep: PatchingSweep
    setup: CircuitSetup


def patching_study(
    settings: Settings | None = None,
    *,
    site: str = "resid_pre",
    metric: str | PatchingMetric = "first_token_norm",
    position: int = 0,
    clean: str | None = None,
    corrupted: str | None = None,
    n_tokens: int = PATCHING_TOKENS,
    model: TransformerBridge | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> PatchingStudy:
    """Sweep ``site`` on ``settings.model`` for ``metric`` (a name of the menu or a :class:`PatchingMetric`;
    ``position`` is where the sink-neuron and attention metrics look).

    ``clean`` and ``corrupted``: two texts of equal token length, each read after the model's sink-making
    first token (default: :func:`sink_pair`, ``n_tokens`` tokens of the natural text). ``model``: an already
    loaded model (default: load the layers the metric reads; ``verbose`` shows the loading libraries' own
    progress and notices)."""
    settings = settings or Settings()
    settings.check()
    if (clean is None) != (corrupted is None):
        raise SinklensError(
            "a clean text was given without a corrupted one, or the reverse",
            "pass both, or neither",
        )
    whole = metric in ("attention", "logit_diff") or isinstance(metric, PatchingMetric)
    model = model or settings.load_model(verbose, early_layers_only=not whole)
    setup = circuit_setup(model, settings.corpus_text(), settings)
    if clean is None or corrupted is None:
        clean_ids, corrupted_ids = sink_pair(setup, n_tokens)
    else:
        clean_ids = text_tokens(model, clean, first=setup.first.id)
        corrupted_ids = text_tokens(model, corrupted, first=setup.first.id)
        if clean_ids.shape != corrupted_ids.shape:
            raise SinklensError(
                f"the clean text has {len(encode(model, clean))} tokens and the corrupted "
                f"{len(encode(model, corrupted))}",
                "pass two texts of the same token length",
            )
    chosen = (
        metric
        if isinstance(metric, PatchingMetric)
        else choose_metric(metric, model, setup, clean_ids, corrupted_ids, position)
    )
    sweep = patching_sweep(model, clean_ids, corrupted_ids, chosen, site=site, progress=progress)
    return PatchingStudy(sweep, setup)
