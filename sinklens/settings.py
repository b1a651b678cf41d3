"""The settings every study and command shares, in one object, and their defaults.

A sinklens study is decided by a handful of choices: the model and its precision, which token stands at
position 0, the natural text the typical norm comes from and how much of it, the sink-layer rule, the
sink-neuron filter, the repeated words. :class:`Settings` holds them all, checks them without a model
(:meth:`Settings.check`, so a bad value fails before anything is loaded), gives the natural text once
(:meth:`Settings.natural_text`), and keys resumable results (:meth:`Settings.fingerprint`). The report,
every command and the explorer take their choices from it, so a flag means the same everywhere.

This module is plain Python: the command line reads its defaults and checks its arguments before torch,
TransformerLens or any model is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from sinklens.errors import SinklensError
from sinklens.load.registry import DEFAULT_MODEL
from sinklens.load.sources import (
    REMOTE_TIMEOUT,
    check_device,
    check_dtype_name,
    check_max_memory,
    check_remote,
    resolve_model,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# The paper's choices, as its notebook makes them.
PAPER_MAX_LAYER = 15  # the sink layer is searched among layers 0..14
PAPER_N_SIGMA = 2.0  # the first layer whose first-token MLP norm exceeds mean + 2 sigma
PAPER_CORPUS_CHARS = 1000  # the typical norm: the first 1000 characters of Tiny Shakespeare

# sinklens' own choices where the paper is silent (docs/methods.md says why).
AUTO = "auto"  # the first token: the tokenizer's BOS if the model makes it a sink, else the candidate it does
MIN_SINK_RATIO = 10.0  # a first token is a sink at 10x the typical norm
SINK_FRACTION = (
    0.9  # the sink regime starts 0.9 of the way from typical to the first token, in log space
)
REMOVED_SHARE = 0.9  # the sink neurons: the shortest ranked prefix whose ablation removes 90% of the excess norm
MAX_NEURONS = 32  # candidates the ablation filter tries
CRITERIA = (
    "paper",
    "notebook",
)  # sink-neuron rankings: the paper's (output at the first token), the notebook's
DEFAULT_REPEATS = 1000


def require_words(words) -> None:
    """A word list (None: the paper's words) must hold at least one word."""
    if words is not None and not words:
        raise SinklensError(
            "the word list is empty", "pass at least one word, or None for the paper's words"
        )


def check_criterion_name(criterion: str, layers: int | list[int] | None = None) -> None:
    """The part of a sink-neuron criterion's check that needs no model."""
    if criterion not in CRITERIA:
        raise SinklensError(
            f"unknown criterion {criterion!r}", f"pass one of {', '.join(CRITERIA)}"
        )
    if (
        criterion == "notebook"
        and layers is not None
        and not isinstance(layers, int)
        and len(set(layers)) > 1
    ):
        raise SinklensError(
            "the notebook criterion ranks the neurons of one layer, but several layers were given",
            "pass one layer, or use criterion='paper' (CLI: --criterion paper) for a layer range",
        )


@dataclass
class Settings:
    """Every choice a study depends on; its JSON form (``dataclasses.asdict``) is recorded with results and keys
    their resume checkpoints."""

    model: str = DEFAULT_MODEL
    words: list[str] | None = None  # None: the tokens of "Another one bites the dust"
    n_repeats: int = DEFAULT_REPEATS
    first_token: str | int = (
        AUTO  # "auto": the token the model makes a sink (its BOS where that is one)
    )
    corpus: str | None = None  # a text file; None: the opening of Coriolanus (Tiny Shakespeare)
    corpus_chars: int = PAPER_CORPUS_CHARS
    max_layer: int = PAPER_MAX_LAYER
    n_sigma: float = PAPER_N_SIGMA
    sink_fraction: float = SINK_FRACTION
    sink_layer: int | None = None  # None: from the analysis; else measure the curves at this layer
    layers: list[int] | None = (
        None  # layers to search for sink neurons; None: decided from the data
    )
    criterion: str = "paper"
    share: float = REMOVED_SHARE
    max_neurons: int = MAX_NEURONS
    min_ratio: float = MIN_SINK_RATIO
    dtype: str | None = None  # None: float32 on the CPU, the checkpoint's own dtype on a GPU
    device: str | None = None  # None: the first GPU, else the CPU
    # with device "auto": the most accelerate's device map puts on each device, "0=20GiB,cpu=64GiB"
    max_memory: str | None = None
    # "nnsight": run as nnsight traces (the analyses that only run the model, read hooks and ablate neurons)
    backend: str = "transformer_lens"
    remote: bool = False  # with backend nnsight: run on an NDIF server, not here
    host: str | None = (
        None  # the NDIF server; None: NDIF_HOST, else nnsight's configured host (NDIF)
    )
    remote_timeout: float = REMOTE_TIMEOUT  # seconds one remote job may take, queueing included

    @property
    def given_first_token(self) -> str | int | None:
        """The first token asked for, or None where the analysis is to choose it (``auto``)."""
        return None if self.first_token == AUTO else self.first_token

    def fingerprint(self, model_name: str = "", **extra: Any) -> str:
        """Keys resumable results: these settings, the model, the sinklens version that computed them and any
        ``extra`` choices of the caller."""
        key = {
            **dataclasses.asdict(self),
            "model_name": model_name,
            "sinklens": version("sinklens"),
            **extra,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]

    @classmethod
    def of(cls, settings: Settings | None = None, **choices: Any) -> Settings:
        """``settings`` (default: the defaults) with ``choices`` in place of its fields, as the studies take them
        (``sink_table_row(model, text, n_repeats=300)``); a name that is no field is an error, not ignored."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(choices) - set(names))
        if unknown:
            raise SinklensError(
                f"unknown setting {unknown[0]!r}",
                f"pass fields of sinklens.Settings: {', '.join(names)}",
            )
        return dataclasses.replace(settings or cls(), **choices)

    def check(self) -> None:
        """Every check that needs no model, so a bad setting fails before anything is loaded."""
        resolve_model(self.model)
        if self.dtype is not None:
            check_dtype_name(self.dtype)
        check_device(self.device)
        placed = any(x is not None for x in (self.dtype, self.device, self.max_memory))
        check_remote(self.backend, self.remote, self.host, self.remote_timeout, placed)
        if check_max_memory(self.max_memory) is not None and self.device != "auto":
            raise SinklensError(
                "--max-memory caps accelerate's device map, which only --device auto uses",
                "add --device auto, or drop --max-memory",
            )
        self.check_analysis()
        if self.corpus:
            self.corpus_text()

    def check_analysis(self) -> None:
        """The checks of the choices an analysis makes (not of what to load)."""
        require_words(self.words)
        if self.n_repeats < 1:
            raise SinklensError(
                f"n_repeats must be at least 1, got {self.n_repeats}", "pass a positive number"
            )
        if self.corpus_chars < 2:
            raise SinklensError(
                f"corpus_chars must be at least 2, got {self.corpus_chars}",
                "pass enough characters for a first token and a later one",
            )
        if self.max_layer < 2:
            raise SinklensError(
                f"max_layer={self.max_layer} leaves fewer than 2 layers to compare",
                "pass max_layer >= 2",
            )
        if self.n_sigma < 0:
            raise SinklensError(
                f"n_sigma={self.n_sigma} puts the sink-layer threshold below the mean",
                "pass a non-negative multiple of the standard deviation, such as the paper's 2",
            )
        if not 0 < self.sink_fraction < 1:
            raise SinklensError(
                f"sink_fraction must be in (0, 1), got {self.sink_fraction}",
                "pass a fraction of the way from typical to the first token's norm, such as 0.9",
            )
        if self.layers is not None and not self.layers:
            raise SinklensError("the layer range is empty", "pass at least one layer, e.g. 3-8")
        for layer in [
            *(self.layers or []),
            *([] if self.sink_layer is None else [self.sink_layer]),
        ]:
            if layer < 0:
                raise SinklensError(f"layer {layer} is negative", "pass 0-based layer indices")
        check_criterion_name(self.criterion, self.layers)
        if not 0 < self.share <= 1:
            raise SinklensError(
                f"share must be in (0, 1], got {self.share}", "pass a share such as 0.9"
            )
        if self.max_neurons < 1:
            raise SinklensError(
                f"max_neurons must be at least 1, got {self.max_neurons}", "pass a positive number"
            )
        if self.min_ratio <= 1:
            raise SinklensError(
                f"min_ratio={self.min_ratio} calls a first token no larger than typical a sink",
                "pass a multiple of the typical norm above 1, such as 10",
            )

    def corpus_text(self) -> str:
        """The whole natural text of these settings: the corpus file, or the opening of Coriolanus (Tiny
        Shakespeare). Analyses that need more than the typical norm's text (the probe's chunks) read it."""
        from sinklens.load.corpus import read_text, shakespeare

        return read_text(self.corpus) if self.corpus else shakespeare()

    def natural_text(self) -> str:
        """:meth:`corpus_text` cut to ``corpus_chars``: where the typical norm comes from."""
        return self.corpus_text()[: self.corpus_chars]

    def layers_reached(self) -> int:
        """How many layers the early-layer analyses read: the sink-layer search's, or the layers named."""
        named = [*(self.layers or []), *([] if self.sink_layer is None else [self.sink_layer])]
        return max([self.max_layer, *(layer + 1 for layer in named)])

    def load_model(
        self, verbose: bool = False, *, early_layers_only: bool = False
    ) -> TransformerBridge:
        """The model these settings name, in their dtype and on their device; with ``early_layers_only``, built
        only up to the deepest layer these settings can reach (:meth:`layers_reached`), for the analyses that
        stop at the sink layer."""
        from sinklens.load.models import load_model

        n_layers = self.layers_reached() if early_layers_only else None
        return load_model(
            self.model,
            dtype=self.dtype,
            device=self.device,
            n_layers=n_layers,
            max_memory=self.max_memory,
            verbose=verbose,
            backend=self.backend,
            remote=self.remote,
            host=self.host,
            remote_timeout=self.remote_timeout,
        )


ReportConfig = (
    Settings  # the name earlier releases gave these settings, when only the report took them
)
