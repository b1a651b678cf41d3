"""Every sink in a text, not only the first: a census of the positions the model turns into attention sinks.

The paper studies one sink, the first token, and asks when a run of repeats becomes like it. Tokens other than
the first can become sinks too: an MLP in a middle layer blows up their norm, later layers attend to them, and
they last some layers before fading ("secondary" sinks, arXiv 2512.22213; turn markers of chat templates and
delimiters are the usual suspects). :func:`find_sinks` measures, in one forward pass of a text,

* every position's hidden-state norm at every layer (``blocks.L.hook_resid_post``) against the model's own
  typical norm there and its sink regime: 0.9 of the way, in log space, from the typical norm of natural text
  to the first token's norm at that layer (the threshold the rest of sinklens uses), defined at the layers
  where the first token is a sink at all (``min_ratio`` times typical);
* how close each position's hidden state is to the first token's (cosine), as the secondary-sink literature
  detects them;
* the attention later queries pay each position while it is in the sink regime, read from the fused kernel
  (:func:`~sinklens.load.fused_attention.key_weights`: one indicator column per sink, no pattern is formed).

A position is a sink where it enters the sink regime. Per sink the census gives its token, the layer where it
appears and how many layers it lasts (its longest stay in the regime: a position can touch the regime for a
layer before its sink forms, as SmolLM2's first token does at layer 2, 10.6 times typical, nine layers before
its sink neurons write it; every stay is listed), the share of attention it takes there (the mean over
heads and later queries of the weight they pay it), and the MLP neurons that write it at its first layer,
ranked and filtered by ablation as the first token's sink neurons are
(:func:`~sinklens.analyses.neuron_writes.neurons_writing`, each ablation one token after the cached text), and
whether those are the first token's sink neurons. The first token itself is counted, so its row checks the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.neuron_writes import neurons_writing
from sinklens.analyses.norms import sink_threshold
from sinklens.errors import SinklensError
from sinklens.load.corpus import read_messages, read_text
from sinklens.load.fused_attention import KeyWeights, key_weights
from sinklens.results import Result, value_type
from sinklens.run.cache import SharedPrefix, forward, run_cache
from sinklens.run.interventions import Neuron
from sinklens.run.tokens import chat_tokens, check_context, text_tokens
from sinklens.run.traced_forward import is_traced
from sinklens.settings import Settings
from sinklens.studies.setup import CircuitSetup, OnSetup, circuit_setup


@value_type
@dataclass(frozen=True)
class Sink:
    """One position the model makes a sink (see the module docstring)."""

    position: int
    token_id: int
    token: str
    first_layer: int  # where its longest stay in the sink regime begins (a layer's output)
    n_layers: int  # how many layers that stay lasts
    runs: tuple[tuple[int, int], ...]  # every stay: (first layer, number of layers)
    peak_ratio: float  # its largest norm over the typical norm of that layer, over those layers
    attention_share: (
        float | None
    )  # mean weight later queries pay it in the layers that read it (None: last position)
    cosine_to_first: float  # its hidden state against the first token's, at ``first_layer``
    neurons: tuple[Neuron, ...]  # the MLP neurons of ``first_layer`` that write it
    first_token_neurons: bool  # whether those are among the first token's sink neurons

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "token": self.token,
            "token_id": self.token_id,
            "first_layer": self.first_layer,
            "n_layers": self.n_layers,
            "runs": [list(r) for r in self.runs],
            "peak_ratio": self.peak_ratio,
            "attention_share": self.attention_share,
            "cosine_to_first": self.cosine_to_first,
            "neurons": [list(n) for n in self.neurons],
            "first_token_neurons": self.first_token_neurons,
        }


@dataclass
class SinkCensus(OnSetup, Result):
    """Every position's norm and likeness to the first token per layer, the sink regime per layer, and the sinks."""

    setup: CircuitSetup
    label: str
    tokens: Int[torch.Tensor, "1 pos"]
    token_texts: list[str]
    norms: Float[torch.Tensor, "layer pos"]  # ||blocks.L.hook_resid_post||
    cosine: Float[torch.Tensor, "layer pos"]  # with position 0's hidden state
    typical: Float[torch.Tensor, " layer"]  # mean norm of natural text's later tokens
    first_norms: Float[torch.Tensor, " layer"]  # the lone first token's norm
    thresholds: Float[
        torch.Tensor, " layer"
    ]  # the sink regime's lower edge (inf where the first token is no sink)
    sinks: list[Sink]

    @property
    def in_regime(self) -> torch.Tensor:
        """``[layer, pos]``: True where a position's norm is in the sink regime."""
        return self.norms >= self.thresholds[:, None]

    def to_frame(self) -> pd.DataFrame:
        """One row per sink, by position."""
        columns = list(Sink.__dataclass_fields__)
        return pd.DataFrame(
            [
                {**s.to_json(), "neurons": ", ".join(f"L{l}.{n}" for l, n in s.neurons)}
                for s in self.sinks
            ],
            columns=columns,
        )

    def plot(self) -> go.Figure:
        """log10 of each position's norm over the typical norm, per layer, with the sinks' first layers marked."""
        ratio = (self.norms / self.typical[:, None]).clamp_min(1e-6).log10()
        labels = [f"{i}: {text!r}" for i, text in enumerate(self.token_texts)]
        fig = go.Figure(
            go.Heatmap(
                z=ratio.tolist(),
                x=list(range(ratio.shape[1])),
                colorscale="Viridis",
                customdata=[labels] * ratio.shape[0],
                colorbar={"title": "log10 norm / typical"},
                hovertemplate="layer %{y}, position %{customdata}<br>log10 ratio %{z:.2f}"
                "<extra></extra>",
            )
        )
        if self.sinks:
            fig.add_scatter(
                x=[s.position for s in self.sinks],
                y=[s.first_layer for s in self.sinks],
                mode="markers",
                marker={"symbol": "x", "color": "red", "size": 9},
                name="sink appears",
                text=[repr(s.token) for s in self.sinks],
                hovertemplate="%{text} at %{x}: a sink from layer %{y}<extra></extra>",
            )
        fig.update_layout(
            title=f"Sinks in {self.label}: norm over typical per position and layer ({len(self.sinks)} "
            f"sink{'s' * (len(self.sinks) != 1)})",
            xaxis_title="Position",
            yaxis_title="Layer",
            height=420,
            legend={"orientation": "h", "y": -0.2},
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n_tokens": int(self.tokens.shape[1]),
            "sinks": [s.to_json() for s in self.sinks],
            "first_token_sink_neurons": [list(n) for n in self.setup.sink_neurons],
            "sink_regime": {
                "fraction": self.setup.settings["sink_fraction"],
                "min_ratio": self.setup.settings["min_ratio"],
                "layers": [i for i, t in enumerate(self.thresholds.tolist()) if t != float("inf")],
            },
            "setup": self.setup.summary(),
        }


def _regime_thresholds(
    first: torch.Tensor, typical: torch.Tensor, settings: Settings
) -> torch.Tensor:
    """Per layer the sink regime's lower edge, where the first token is a sink (``min_ratio``); inf elsewhere."""
    edges = torch.tensor(
        [sink_threshold(float(f), float(t), settings.sink_fraction) for f, t in zip(first, typical)]
    )
    return torch.where(
        first >= settings.min_ratio * typical, edges, torch.full_like(edges, float("inf"))
    )


def find_sinks(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "1 pos"],
    settings: Settings | None = None,
    *,
    setup: CircuitSetup | None = None,
    label: str = "the text",
    progress: bool = False,
    **choices: Any,
) -> SinkCensus:
    """The sink census of ``tokens`` (one row, as the model reads it: ``[first] + text``, or a chat template's
    output). The model's typical and first-token norms per layer come from its circuit setup (``setup``, else
    :func:`~sinklens.studies.setup.circuit_setup` with ``settings`` or ``choices``); its ``share`` and
    ``max_neurons`` filter every sink's neurons as they filter the first token's."""
    settings = Settings.of(settings, **choices)
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] < 2:
        raise SinklensError(
            f"the census reads one row of at least two tokens, not shape {tuple(tokens.shape)}",
            "pass [first] + text as text_tokens() makes it",
        )
    check_context(model, tokens.shape[1])
    setup = setup or circuit_setup(model, None, settings)
    n_layers = model.cfg.n_layers
    names = [get_act_name("resid_post", layer) for layer in range(n_layers)]
    reference = run_cache(
        model, setup.reference, names, reduce=lambda name, x: x[0].float().norm(dim=-1)
    )
    typical = torch.stack([reference[n][1:].mean() for n in names]).cpu()
    first = torch.stack([reference[n][0] for n in names]).cpu()
    thresholds = _regime_thresholds(first, typical, settings)
    from transformers import DynamicCache

    # The text's keys and values, kept so that each sink's neuron search runs one token after them. A model with
    # sliding-window layers keeps only the last window's, and a server none, so there each search runs its prefix.
    past = None
    if not is_traced(model) and not _sliding(model):
        # TransformerLens types original_model as nn.Module, so its .config reads as Tensor | Module
        past = DynamicCache(config=model.original_model.config)  # type: ignore[arg-type]
    with tqdm(total=2, desc="sinklens sinks", disable=not progress) as bar:
        measure = _measure_traced if is_traced(model) else _measure
        norms, cosine, weights = measure(model, tokens, names, thresholds, past)
        bar.update()
        norms_t = torch.stack([norms[layer] for layer in range(n_layers)]).cpu()
        cosine_t = torch.stack([cosine[layer] for layer in range(n_layers)]).cpu()
        regime = norms_t >= thresholds[:, None]
        sinks = [
            _sink(
                model,
                tokens,
                position,
                regime,
                norms_t,
                cosine_t,
                typical,
                weights,
                past,
                setup,
                settings,
            )
            for position in regime.any(dim=0).nonzero().flatten().tolist()
        ]
        bar.update()
    texts = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return SinkCensus(
        setup, label, tokens.cpu(), texts, norms_t, cosine_t, typical, first, thresholds, sinks
    )


def _sliding(model) -> bool:
    """Whether some layers attend to a sliding window (their cache keeps only the last window's keys)."""
    config = model.original_model.config
    return bool(
        getattr(config, "sliding_window", None)
        or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    )


def _measure(model, tokens, names: list[str], thresholds, past) -> tuple[dict, dict, KeyWeights]:
    """Each layer's norms and cosines to the first token, and the attention paid to the positions in the sink
    regime, in one forward pass: the weights from the fused kernel (:func:`key_weights`), for the positions
    found at the layer before as the pass goes. ``past`` keeps the text's keys and values (None: not kept)."""
    norms, cosine, candidates = {}, {}, {}

    def measure(layer: int):
        def hook(resid: torch.Tensor, hook) -> None:
            row = resid[0].float()
            norms[layer] = row.norm(dim=-1)
            cosine[layer] = torch.nn.functional.cosine_similarity(row, row[:1], dim=-1)
            candidates[layer + 1] = (norms[layer] >= float(thresholds[layer])).nonzero().flatten()

        return hook

    cache_kwargs: dict[str, Any] = {} if past is None else {"past_key_values": past}
    with torch.inference_mode(), key_weights(model, lambda layer: candidates.get(layer)) as weights:
        forward(
            model,
            tokens,
            names,
            hooks=[(n, measure(layer)) for layer, n in enumerate(names)],
            return_type=None,
            **cache_kwargs,
        )
    return norms, cosine, weights


def _norms_and_cosines(name: str, resid: torch.Tensor) -> torch.Tensor:
    row = resid[0].float()
    return torch.stack(
        [row.norm(dim=-1), torch.nn.functional.cosine_similarity(row, row[:1], dim=-1)]
    )


def _measure_traced(
    model, tokens, names: list[str], thresholds, past
) -> tuple[dict, dict, KeyWeights]:
    """:func:`_measure` on the nnsight backend, where what a run measures comes back only as its saved values:
    one pass for the norms and cosines, one for the attention weights the positions found are paid (read
    from the attention pattern of the layers after them)."""
    measured = run_cache(model, tokens, names, reduce=_norms_and_cosines)
    norms = {layer: measured[name][0] for layer, name in enumerate(names)}
    cosine = {layer: measured[name][1] for layer, name in enumerate(names)}
    keys = {
        layer + 1: (norms[layer] >= float(thresholds[layer])).nonzero().flatten()
        for layer in range(len(names) - 1)
    }
    asked = {get_act_name("pattern", layer): found for layer, found in keys.items() if len(found)}
    weights = KeyWeights(keys.get)
    if asked:
        patterns = run_cache(
            model, tokens, list(asked), reduce=lambda name, pattern: pattern[..., asked[name]]
        )
        for layer in keys:
            if get_act_name("pattern", layer) in asked:
                weights.found[layer] = patterns[get_act_name("pattern", layer)]
                weights.asked[layer] = keys[layer]
    return norms, cosine, weights


def _sink(
    model,
    tokens,
    position: int,
    regime,
    norms,
    cosine,
    typical,
    weights,
    past,
    setup: CircuitSetup,
    settings: Settings,
) -> Sink:
    """One sink's row: where it appears and lasts, the attention later queries pay it, the neurons that write it."""
    runs: list[list[int]] = []  # [first layer, length] of each run of layers
    for layer in regime[:, position].nonzero().flatten().tolist():
        if runs and runs[-1][0] + runs[-1][1] == layer:
            runs[-1][1] += 1
        else:
            runs.append([layer, 1])
    first_layer, n_layers = max(
        runs, key=lambda run: run[1]
    )  # the longest stay; the earliest of equal ones
    span = range(first_layer, first_layer + n_layers)
    n = tokens.shape[1]
    shares = []
    for layer in (l + 1 for l in span):  # the attention layers that read it in the regime
        asked = weights.asked.get(layer)
        if asked is None or position == n - 1:
            continue
        column = int((asked == position).nonzero()[0])
        paid = weights.found[layer][0, :, position + 1 :, column]  # [head, later query]
        shares.append(float(paid.mean()))
    prefix = None
    if (
        position > 0 and past is not None
    ):  # the text's own keys and values up to the sink, without a new run
        cropped = copy.deepcopy(past)
        cropped.crop(position - cropped.get_seq_length())  # negative: the tokens to drop
        prefix = SharedPrefix(cropped, None)
    neurons = neurons_writing(
        model,
        tokens,
        position,
        first_layer,
        typical=float(typical[first_layer]),
        share=settings.share,
        max_neurons=settings.max_neurons,
        prefix=prefix,
    )
    token_id = int(tokens[0, position])
    return Sink(
        position,
        token_id,
        model.tokenizer.decode([token_id]),
        first_layer,
        n_layers,
        tuple((start, length) for start, length in runs),
        float((norms[list(span), position] / typical[list(span)]).max()),
        sum(shares) / len(shares) if shares else None,
        float(cosine[first_layer, position]),
        tuple(neurons),
        bool(set(neurons) & set(setup.sink_neurons)),
    )


def census_of(
    settings: Settings | None = None,
    *,
    text: str | Path | None = None,
    chat: str | Path | None = None,
    model: TransformerBridge | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> SinkCensus:
    """What ``sinklens sinks`` runs: the census of the text file ``text`` (read after the first token), of the
    conversation in the JSON file ``chat`` (a list of ``{"role", "content"}`` messages, in the model's own chat
    template), or of the settings' natural text. A file that cannot be read or is no message list fails
    before the model loads. ``model``: an already loaded model (default: load the whole model, since a sink
    may appear in any layer; ``verbose`` shows the loading libraries' own progress and notices)."""
    if text is not None and chat is not None:
        raise SinklensError("both a text and a chat were given", "pass one of them")
    settings = settings or Settings()
    settings.check()
    messages = read_messages(chat) if chat is not None else None
    given_text = read_text(text) if text is not None else None
    model = model or settings.load_model(verbose)
    setup = circuit_setup(model, settings.corpus_text(), settings)
    if messages is not None:
        assert chat is not None  # messages were read from it
        tokens, label = chat_tokens(model, messages), f"the chat {Path(chat).name}"
    elif given_text is not None:
        assert text is not None  # given_text was read from it
        tokens, label = text_tokens(model, given_text, first=setup.first.id), Path(text).name
    else:
        tokens, label = (
            text_tokens(model, settings.natural_text(), first=setup.first.id),
            "the natural text",
        )
    return find_sinks(model, tokens, settings, setup=setup, label=label, progress=progress)
