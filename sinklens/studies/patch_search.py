"""Finding the sink patch for a model: what ``sinklens patch`` runs, callable from Python.

:func:`find_sink_patch` measures the model's circuit setup (first token, sink layer, sink neurons) on the
whole model, then every candidate clamp of the sink neurons (each hook point x each value: the paper's
Listing 1 clamps the up-projection to the first token's value after the start) on the settings' words
repeated, on the first token and on natural text, and chooses one
(:func:`~sinklens.analyses.sink_patch_choice.choose_patch`). ``choice.patch.save(path)`` writes it for
``sinklens evaluate`` and for installing on a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.sink_patch_choice import SinkPatchChoice, choose_patch
from sinklens.defaults import PATCH_HOOKS, PATCH_VALUES
from sinklens.run.tokens import check_context, default_words, words_to_tokens
from sinklens.settings import Settings
from sinklens.studies.setup import CircuitSetup, circuit_setup


class PatchStudy(NamedTuple):
    """The candidates measured and the choice, with the circuit setup they were measured on."""

    choice: SinkPatchChoice
    setup: CircuitSetup


def find_sink_patch(
    settings: Settings | None = None,
    *,
    hooks: Sequence[str] = tuple(PATCH_HOOKS),
    values: Sequence[str] = PATCH_VALUES,
    model: TransformerBridge | None = None,
    verbose: bool = False,
) -> PatchStudy:
    """Measure each clamp of the sink neurons at ``hooks`` x ``values`` on ``settings.model`` and choose one.
    ``model``: an already loaded whole model (default: load it; ``verbose`` shows the loading libraries' own
    progress and notices)."""
    settings = settings or Settings()
    settings.check()
    model = model or settings.load_model(verbose)  # the patch is measured on the whole model
    setup = circuit_setup(model, settings.corpus_text(), settings)
    words = (
        default_words(model) if settings.words is None else words_to_tokens(model, settings.words)
    )
    check_context(model, settings.n_repeats + 1)
    choice = choose_patch(
        model,
        setup.reference,
        setup.sink_neurons,
        words,
        n_repeats=settings.n_repeats,
        hooks=hooks,
        values=values,
    )
    return PatchStudy(choice, setup)
