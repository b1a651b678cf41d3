"""``sl.explore(model)``: one live notebook widget for the questions a researcher asks of the sink circuit.

Pick a prompt (free text, a word and a repeat count, or a sequence drawn from a token cluster), a
layer and a head, and four views update in place:

* the hidden-state norm per position at the sink layer, against the first token's, the typical and
  the sink-regime norms of natural text (:mod:`sinklens.analyses.norms`), the positions the prompt holds in
  the sink regime marked as its sinks (the census of :mod:`sinklens.studies.census`, at the sink layer);
* the attention later queries pay to the first token per layer, and the share of heads that pay it more
  than 0.3 (the report's attention-received figure without its later-token line), the chosen layer marked;
* the sink neurons' activations (``blocks.L.mlp.hook_post``) along the positions;
* the chosen head's attention pattern (circuitsvis), on the first and last positions of long prompts.
  circuitsvis' own browser bundle, shipped in the circuitsvis package, is inlined in the view, so it
  draws offline (its default HTML loads the bundle from a CDN). The views stack in one column, so they
  fit a 1,280 px window, and the pattern's frame grows to hold every row.

A toggle runs the prompt again with a :class:`~sinklens.run.patch.SinkPatch` installed (by default
the paper's Listing 1 on the sink neurons found), so every view shows original against patched. The
patch is installed for that forward pass only: the model is never left patched between updates.

What does not depend on the controls (the first token, the sink layer and neurons, the typical
norm) is measured once, when the explorer is built, by the circuit setup every study uses, or taken from a
:class:`SinkTableRow`. Each prompt then costs one forward pass per state (original, patched) in which only
the layer shown reads its pattern (runs attention step by step); every other layer runs fused and reports
the weight its queries pay the first token from one more fused kernel on an indicator value
(:func:`~sinklens.load.attention.key_weights`: the numbers the patterns give, to float rounding). The last few
runs are kept, so moving the head, toggling the patch back or returning to an earlier prompt redraws from
memory; moving the layer reads that layer's pattern in one forward pass.

Time per update (``python bench/bench_explore.py``, SmolLM2-135M-Instruct, 2 idle CPU cores): a new
1,001-token prompt with the patch off takes 2.26 s, 1.12x a plain Hugging Face SDPA forward pass of the same
tokens (2.02 s; the last release, reading every layer's pattern, took about twice it); moving the layer takes
the same, moving the head 0.03 s.

Bad input (an empty prompt, a word that is not one token, a prompt longer than the context, a
layer or head out of range) shows one line in the widget and leaves the figures as they were.

An explorer opens on a given prompt mode, layer, head and patch state, and
:meth:`SinkExplorer.opened_at` opens another view of the same circuit (no measurement, shared runs):
``analyses/explore.ipynb`` tours the circuit that way, one explorer per stop. Displayed in a
notebook, the explorer carries a PNG of its views beside the live widget, drawn by kaleido when it
is displayed (4.9 s for SmolLM2 at 300 repeats on the 2 shared cores, most of it starting
Chromium), so that a saved notebook shows its views in viewers without a kernel (GitHub, nbviewer,
``jupyter nbconvert``). With circuitsvis' bundle inlined, moving the head still takes 0.05-0.06 s there.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from itertools import cycle

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._figures import pattern_heatmap
from sinklens.analyses.attention import (
    EPSILON,
)
from sinklens.analyses.norms import NormBaseline, sink_threshold
from sinklens.analyses.sink_neurons import NOTEBOOK_WORD
from sinklens.errors import SinklensError
from sinklens.load.attention import key_weights
from sinklens.run.cache import as_index, check_layer, run_cache
from sinklens.run.interventions import Neuron, neuron_hook_name
from sinklens.run.patch import SinkPatch, installed_patch, patch_for
from sinklens.run.tokens import (
    Token,
    check_context,
    default_words,
    repeated_tokens,
    text_tokens,
    token,
    word_token,
    words_to_tokens,
)
from sinklens.settings import Settings
from sinklens.studies.attack import ClusterAttack, sample_sequences
from sinklens.studies.setup import circuit_setup
from sinklens.studies.table import SinkTableRow

PROMPT_MODES = {"free text": "text", "word x repeats": "repeat", "cluster sequence": "cluster"}
MAX_REPEATS = 2000  # the sliders stop here (or at the context) so that one update stays within seconds
DEFAULT_REPEATS = 300
PATTERN_EDGE = 20  # the pattern view shows the first and the last PATTERN_EDGE positions of a longer prompt
RUNS_KEPT = 8  # forward passes remembered (prompt x patch state x layer), by the explorers of one circuit together
PATTERN_FRAME, PATTERN_ROW = 260, 16  # pixels of the pattern view: its title and key axis, and per query row
ORIGINAL, PATCHED = "original", "patched"
COLORS = ("steelblue", "seagreen", "purple", "darkorange", "crimson", "teal")


@dataclass
class PromptRun:
    """What one forward pass of a prompt leaves for the views (original or patched)."""

    label: str
    token_texts: list[str]
    norms: Float[torch.Tensor, "pos"]  # ||blocks.L.hook_resid_post|| at the sink layer
    first_attention: Float[torch.Tensor, "layer head"]  # mean weight later queries pay the first token
    neurons: list[Neuron]
    activations: Float[torch.Tensor, "neuron pos"]  # blocks.L.mlp.hook_post of each neuron
    window: list[int]  # the positions the pattern view shows
    layer: int  # the layer whose pattern the run read
    pattern: Float[torch.Tensor, "head window window"]  # each of its heads' pattern on those positions
    sinks: list[int]  # positions in the sink regime at the sink layer


def pattern_window(n_tokens: int, edge: int = PATTERN_EDGE) -> list[int]:
    """All positions of a short prompt; the first and last ``edge`` of a longer one (a 1000 x 1000
    pattern is too large to draw, and the sink and the end of a run are where the circuit shows)."""
    if n_tokens <= 2 * edge:
        return list(range(n_tokens))
    return [*range(edge), *range(n_tokens - edge, n_tokens)]


def run_prompt(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "1 pos"],
    *,
    sink_layer: int,
    neurons: Sequence[Neuron],
    layer: int,
    threshold: float,
    patch: SinkPatch | None = None,
) -> PromptRun:
    """Run ``tokens`` once (with ``patch`` installed for this run, if given) and keep what the explorer's views
    show: the sink-layer norms (and the positions at or above the sink regime's ``threshold``), the attention
    later queries pay the first token in every layer, the neurons' activations, and every head's pattern of
    ``layer`` on :func:`pattern_window`'s positions.

    Only ``layer`` runs attention step by step (its pattern is read); every other layer runs fused, and reports
    the weights paid to the first token from one more fused kernel on an indicator value
    (:func:`~sinklens.load.attention.key_weights`), the numbers its pattern would give."""
    if installed_patch(model) is not None:  # the "original" run would be patched too
        raise SinklensError("a sink patch is already installed on this model",
                            "remove it (installed.remove()); the explorer installs its patch for its patched run")
    norm_name = get_act_name("resid_post", check_layer(model, sink_layer))
    pattern_name = get_act_name("pattern", check_layer(model, layer))
    last = get_act_name("attn_out", model.cfg.n_layers - 1)  # every layer's attention is shown: run them all
    neuron_layers = sorted({neuron_layer for neuron_layer, _ in neurons})
    window = pattern_window(tokens.shape[1])
    shown = torch.tensor(window)
    first_key = torch.tensor([0])

    def reduce(name: str, activation: torch.Tensor):
        if name == norm_name:
            return activation[0].float().norm(dim=-1).cpu()
        if name == pattern_name:  # the [head, query, key] pattern is never stored whole
            return activation[0, :, 1:, 0].float().mean(dim=-1).cpu(), activation[0][:, shown][:, :, shown].float().cpu()
        if name == last:
            return activation[0, :1, :1]
        return activation[0].float().cpu()  # a layer's hook_post, [pos, d_mlp]

    names = [norm_name, pattern_name, last, *(neuron_hook_name(n) for n in neuron_layers)]
    with patch.installed(model) if patch is not None else nullcontext(), \
            key_weights(model, lambda other: None if other == layer else first_key) as weights:
        cache = run_cache(model, tokens, names, reduce=reduce)
    paid, pattern = cache[pattern_name]
    first_attention = torch.stack([paid if other == layer else weights.found[other][0, :, 1:, 0].mean(dim=-1).cpu()
                                   for other in range(model.cfg.n_layers)])
    activations = [cache[neuron_hook_name(neuron_layer)][:, index] for neuron_layer, index in neurons]
    norms = cache[norm_name]
    return PromptRun(
        ORIGINAL if patch is None else PATCHED, [model.tokenizer.decode([int(t)]) for t in tokens[0]], norms,
        first_attention, list(neurons), torch.stack(activations) if activations else torch.zeros(0, tokens.shape[1]),
        window, layer, pattern, (norms >= threshold).nonzero().flatten().tolist())


def plot_norms(runs: Sequence[PromptRun], baseline: NormBaseline) -> go.Figure:
    """Norm per position at the sink layer for each run, with the natural text's first-token,
    typical and sink-regime norms (the regime as :mod:`sinklens.analyses.norms` defines it)."""
    fig = go.Figure()
    for run, color in zip(runs, COLORS):
        fig.add_scatter(y=run.norms.tolist(), text=_hover_texts(run), mode="lines", name=run.label, line_color=color,
                        hovertemplate="position %{x}: %{text}<br>norm %{y:.4g}")
        if run.sinks:  # the positions this run holds in the sink regime at the sink layer
            texts = _hover_texts(run)
            fig.add_scatter(x=run.sinks, y=run.norms[run.sinks].tolist(), text=[texts[p] for p in run.sinks],
                            mode="markers", name=f"{run.label}: sinks ({len(run.sinks)})",
                            marker=dict(color=color, symbol="x", size=9),
                            hovertemplate="sink at position %{x}: %{text}<br>norm %{y:.4g}")
    last = len(runs[0].norms) - 1
    threshold = sink_threshold(baseline.first_token_norm, baseline.typical_norm)
    first = html.escape(repr(baseline.first_token.text), quote=False)  # plotly reads tags such as <s> in labels
    for value, name, color in ((baseline.first_token_norm, f"first token {first}", "firebrick"),
                               (threshold, "sink regime", "orange"), (baseline.typical_norm, "typical", "gray")):
        fig.add_scatter(x=[0, last], y=[value, value], mode="lines", name=f"{name} ({value:.4g})",
                        line=dict(color=color, dash="dash"), hoverinfo="skip")
    fig.update_layout(title=f"Hidden-state norm per position at the sink layer ({baseline.layer})",
                      xaxis_title="Position", yaxis_title="||hook_resid_post||", yaxis_type="log", height=360,
                      xaxis_range=[0, last])
    return fig


def plot_first_token_attention(runs: Sequence[PromptRun], layer: int) -> go.Figure:
    """Per layer, the attention later queries pay the first token (mean over heads) and the share of heads paying
    it more than ``EPSILON`` (the report's figure, without its later-token line), each run, ``layer`` marked."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Attention to the first token", "Share of sink heads"])
    layers = list(range(len(runs[0].first_attention)))
    for run, color in zip(runs, COLORS):
        fig.add_scatter(x=layers, y=run.first_attention.mean(dim=-1).tolist(), mode="lines+markers",
                        name=f"{run.label}: first token", line_color=color, row=1, col=1)
        fig.add_scatter(x=layers, y=(run.first_attention > EPSILON).float().mean(dim=-1).tolist(), mode="lines+markers",
                        name=f"{run.label}: heads > {EPSILON:g}", line=dict(color=color, dash="dot"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="Mean attention weight", row=1, col=1)
    fig.update_yaxes(range=[0, 1], title_text="Share of heads", row=1, col=2)
    fig.update_xaxes(title_text="Layer")
    fig.add_vline(x=layer, line_dash="dot", line_color="gray")
    fig.update_layout(title=f"Attention received by the first token per layer (layer {layer} marked)", height=360)
    return fig


def plot_neuron_activations(runs: Sequence[PromptRun]) -> go.Figure:
    """Each sink neuron's activation along the prompt, one line style per run."""
    fig = go.Figure()
    for run, dash in zip(runs, ("solid", "dot")):
        for (layer, index), values, color in zip(run.neurons, run.activations, cycle(COLORS)):
            fig.add_scatter(y=values.tolist(), text=_hover_texts(run), mode="lines",
                            name=f"L{layer}.{index} {run.label}", line=dict(color=color, dash=dash),
                            hovertemplate="position %{x}: %{text}<br>%{y:.4g}")
    title = "Sink neurons' activation (mlp.hook_post) along the prompt"
    fig.update_layout(title=title if runs[0].neurons else "No sink neurons were found", xaxis_title="Position",
                      yaxis_title="Activation", height=360)
    return fig


def _hover_texts(run: PromptRun) -> list[str]:
    return [html.escape(repr(text), quote=False) for text in run.token_texts]


@functools.cache
def circuitsvis_bundle() -> str:
    """circuitsvis' prebuilt browser bundle, read from the installed circuitsvis package (the same
    code its CDN serves), so that the pattern view draws without a network. ``</script`` is escaped
    so that the bundle can sit inside a ``<script>`` element."""
    bundle = resources.files("circuitsvis").joinpath("dist", "cdn", "iife.js").read_text(encoding="utf-8")
    return bundle.replace("</script", "<\\/script")


def _shown_positions(run: PromptRun) -> str:
    window, n = run.window, len(run.token_texts)
    if len(window) < n:
        return f"positions {window[0]}-{window[PATTERN_EDGE - 1]} and {window[PATTERN_EDGE]}-{window[-1]} of {n}"
    return f"all {n} positions"


def _pattern_labels(run: PromptRun) -> list[str]:
    return [f"{run.token_texts[p]} ({p})" for p in run.window]


# The pattern's frame takes the height of what circuitsvis draws (the page is the frame's own, so it may set it),
# whatever the number of positions shown: no row is cut off at the bottom.
_FIT_FRAME = ("const fit = () => { if (window.frameElement) window.frameElement.style.height = "
              "document.documentElement.scrollHeight + 'px'; }; new ResizeObserver(fit).observe(document.body); fit();")


def pattern_page(runs: Sequence[PromptRun], layer: int, head: int) -> str:
    """A self-contained HTML page with head ``head`` of ``layer`` drawn by circuitsvis for each run,
    side by side. circuitsvis' script is inlined (:func:`circuitsvis_bundle`): the page loads nothing."""
    columns, draws = [], []
    for i, run in enumerate(runs):
        props = {"tokens": _pattern_labels(run), "attention": run.pattern[head].tolist()}
        script_safe = json.dumps(props).replace("<", "\\u003c")  # a token such as "</script>" stays data
        columns.append(f"<div style='flex:1'><b>{html.escape(run.label)}</b><div id='pattern-{i}'></div></div>")
        draws.append(f"CircuitsVis.render('pattern-{i}', CircuitsVis.AttentionPattern, {script_safe});")
    return (f"<!DOCTYPE html><meta charset='utf-8'>"
            f"<p style='font-family:sans-serif'>Layer {layer}, head {head}: {_shown_positions(runs[0])}.</p>"
            f"<div style='display:flex;gap:16px'>{''.join(columns)}</div>"
            f"<script>{circuitsvis_bundle()}</script><script>{''.join(draws)}{_FIT_FRAME}</script>")


def plot_pattern(runs: Sequence[PromptRun], layer: int, head: int) -> go.Figure:
    """Head ``head`` of ``layer`` as a heatmap per run: the pattern view as a plotly figure, for the
    explorer's static image."""
    fig = make_subplots(rows=1, cols=len(runs), subplot_titles=[run.label for run in runs], horizontal_spacing=0.15)
    for column, run in enumerate(runs, start=1):
        fig.add_trace(pattern_heatmap(run.pattern[head], _pattern_labels(run), show_scale=False),
                      row=1, col=column)
    fig.update_yaxes(autorange="reversed", tickfont_size=8, title_text="Query")
    fig.update_xaxes(tickfont_size=8, title_text="Key")
    fig.update_layout(title=f"Attention pattern of layer {layer}, head {head} ({_shown_positions(runs[0])})",
                      height=520)
    return fig


LEGEND_COLUMN = 0.78  # share of a stacked figure's width left of the legends
BAND_TITLE, BAND_AXIS, STACK_MARGIN = 70, 70, 30  # pixels above a band's plots, below them, around the figure


def stack_figures(figures: Sequence[go.Figure], width: int = 1000) -> go.Figure:
    """Plotly figures one above the other in one figure, each in a band as tall as its own
    ``height``, keeping its axes, shapes, annotations, title and legend (on its right): several
    figures as one static image. Each figure's x and y axes are expected in make_subplots' pairs
    (xN with yN)."""
    heights = [figure.layout.height or 400 for figure in figures]
    plot_height = sum(heights)
    stacked = go.Figure()
    stacked.update_layout(width=width, height=plot_height + 2 * STACK_MARGIN, template=figures[0].layout.template,
                          margin=dict(l=70, r=10, t=STACK_MARGIN, b=STACK_MARGIN))
    band_top, next_number = plot_height, 1
    for index, figure in enumerate(figures):
        layout = figure.layout.to_plotly_json()
        inner_top = (band_top - BAND_TITLE) / plot_height
        inner_bottom = (band_top - heights[index] + BAND_AXIS) / plot_height
        title_y = band_top / plot_height
        band_top -= heights[index]
        suffixes = sorted({key[5:] for key in layout if re.fullmatch(r"[xy]axis\d*", key)} | {""},
                          key=lambda suffix: int(suffix or 1))
        numbers = {suffix: next_number + i for i, suffix in enumerate(suffixes)}  # the pair xN, yN -> a fresh pair
        next_number += len(suffixes)

        def to_paper(axis: str, value: float, low=inner_bottom, high=inner_top) -> float:
            return value * LEGEND_COLUMN if axis == "x" else low + value * (high - low)

        def ref(name: str) -> str:
            axis, _, domain = name.partition(" ")
            if axis == "paper":
                return axis
            number = numbers[axis[1:]]
            return f"{axis[0]}{'' if number == 1 else number}{' domain' if domain else ''}"

        for suffix in suffixes:
            for letter in "xy":
                axis = dict(layout.get(f"{letter}axis{suffix}", {}))
                axis.setdefault("anchor", f"{'y' if letter == 'x' else 'x'}{suffix}")  # its own pair, not the first
                axis["domain"] = [to_paper(letter, end) for end in axis.get("domain", (0, 1))]
                if axis["anchor"] != "free":
                    axis["anchor"] = ref(axis["anchor"])
                number = numbers[suffix]
                stacked.layout[f"{letter}axis{'' if number == 1 else number}"] = axis
        legend = "legend" if index == 0 else f"legend{index + 1}"
        for trace in figure.data:
            trace = trace.to_plotly_json()
            trace.update(xaxis=ref(trace.get("xaxis", "x")), yaxis=ref(trace.get("yaxis", "y")), legend=legend)
            stacked.add_trace(trace)
        stacked.layout[legend] = dict(x=LEGEND_COLUMN + 0.02, y=inner_top, xanchor="left", yanchor="top",
                                      font_size=11)
        for shape in layout.get("shapes", ()):
            shape = dict(shape)
            for letter in "xy":
                name = shape.get(f"{letter}ref", letter)
                shape[f"{letter}ref"] = ref(name)
                if name == "paper":
                    for end in (f"{letter}0", f"{letter}1"):
                        shape[end] = to_paper(letter, shape[end])
            stacked.add_shape(shape)
        for note in layout.get("annotations", ()):  # make_subplots' subplot titles among them
            note = dict(note)
            for letter in "xy":
                name = note.get(f"{letter}ref", letter)
                note[f"{letter}ref"] = ref(name)
                if name == "paper":
                    note[letter] = to_paper(letter, note[letter])
            stacked.add_annotation(note)
        if figure.layout.title.text:
            stacked.add_annotation(text=f"<b>{figure.layout.title.text}</b>", x=0, y=title_y, xref="paper",
                                   yref="paper", xanchor="left", yanchor="top", showarrow=False, font_size=15)
    return stacked


def check_head(model: TransformerBridge, head: int) -> int:
    """Raise if ``head`` is not a 0-based head index of ``model``."""
    head = as_index(head, "head")
    if not 0 <= head < model.cfg.n_heads:
        raise SinklensError(f"head {head} is out of range: {model.cfg.model_name} has heads 0..{model.cfg.n_heads - 1}",
                            "pass a 0-based head index below n_heads")
    return head


def check_opening(model: TransformerBridge, prompt_mode: str, layer: int | None, head: int) -> tuple[int | None, int]:
    """Raise if the explorer cannot open on ``prompt_mode``, ``layer`` (None: the default) and ``head``."""
    if prompt_mode not in PROMPT_MODES.values():
        raise SinklensError(f"unknown prompt mode {prompt_mode!r}",
                            f"pass one of {', '.join(repr(mode) for mode in PROMPT_MODES.values())}")
    return (None if layer is None else check_layer(model, layer)), check_head(model, head)


def parse_tokens(model: TransformerBridge, entries: str) -> list[int]:
    """Token ids from comma-separated entries: a token id, or a word that is one token mid-text."""
    ids = [token(model, int(e)).id if e.lstrip("-").isdigit() else word_token(model, e).id
           for e in (part.strip() for part in entries.split(",")) if e]
    if len(set(ids)) < 2:
        raise SinklensError(f"the cluster has {len(set(ids))} distinct token(s); a sequence without repeats needs 2",
                            "list at least two tokens, separated by commas (words or token ids)")
    return ids


def _entry(model: TransformerBridge, tok: Token) -> str:
    """How a token is typed in the word or cluster box: its word where that reads back as the same
    token, else its id."""
    try:
        return tok.text.strip() if word_token(model, tok.text.strip()).id == tok.id else str(tok.id)
    except SinklensError:
        return str(tok.id)


class SinkExplorer:
    """The widget :func:`explore` returns; display it as a notebook cell's last line.

    Its controls (``prompt_mode``, ``text``, ``word``, ``repeats``, ``cluster_tokens``,
    ``cluster_length``, ``cluster_seed``, ``layer``, ``head``, ``patch_toggle``) and views
    (``norm_figure``, ``attention_figure``, ``neuron_figure``: plotly ``FigureWidget``;
    ``pattern_html``; ``message``, ``status``) are ipywidgets, so code can drive it as a user does.
    ``runs`` holds the forward passes of the prompt shown, ``last_update_seconds`` the time the last
    change took, ``error`` the exception behind the message (None after a good update).

    It opens on ``prompt_mode`` ("text", "repeat" or "cluster"), ``layer`` (default: the one after
    the sink layer), ``head`` and the patch on or off (``patched``); :meth:`opened_at` makes another
    explorer of the same circuit that opens elsewhere, without measuring it again. Displayed, it
    also carries a PNG of its views as they stand (:meth:`static_figure`), which notebook viewers
    without a kernel show in place of the live widget.
    """

    def __init__(self, model: TransformerBridge, *, first: Token, neurons: list[Neuron], baseline: NormBaseline,
                 patch: SinkPatch | None, text: str, cluster: list[Token], word: str | int | Token, n_repeats: int,
                 prompt_mode: str = "repeat", layer: int | None = None, head: int = 0, patched: bool = False,
                 memory: OrderedDict[tuple[tuple[int, ...], bool], PromptRun] | None = None):
        """``memory``: the forward passes of another explorer of the same circuit, shared with it."""
        import ipywidgets as widgets

        layer, head = check_opening(model, prompt_mode, layer, head)
        if patched and patch is None:
            raise SinklensError("there is no patch to open on: no sink neurons were found",
                                "open with patched=False, or pass a patch")
        self.model, self.first, self.neurons, self.baseline, self.patch = model, first, neurons, baseline, patch
        self.sink_layer = baseline.layer
        if layer is None:
            layer = min(self.sink_layer + 1, model.cfg.n_layers - 1)
        self._cluster = cluster
        self.runs: list[PromptRun] = []
        self._drawn_head: tuple[int, int] | None = None  # the layer and head the views show
        self.error: Exception | None = None
        self.last_update_seconds = 0.0
        self._remembered = OrderedDict() if memory is None else memory
        longest = min(model.cfg.n_ctx - 1, MAX_REPEATS)
        later = dict(continuous_update=False)

        self.prompt_mode = widgets.ToggleButtons(options=list(PROMPT_MODES.items()), value=prompt_mode)
        self.text = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="95%"), **later)
        if not isinstance(word, str):
            word = _entry(model, word if isinstance(word, Token) else token(model, word))
        self.word = widgets.Text(value=word, description="word", placeholder="a word or a token id", **later)
        self.repeats = widgets.IntSlider(value=min(n_repeats, longest), min=1, max=longest,
                                         description="repeats", **later)
        self.cluster_tokens = widgets.Text(value=", ".join(_entry(model, t) for t in cluster), description="cluster",
                                           placeholder="words or token ids, comma-separated",
                                           layout=widgets.Layout(width="50%"), **later)
        self.cluster_length = widgets.IntSlider(value=min(n_repeats, longest), min=2, max=longest,
                                                description="length", **later)
        self.cluster_seed = widgets.IntText(value=0, description="seed", layout=widgets.Layout(width="140px"))
        self.layer = widgets.IntText(value=layer, description="layer", layout=widgets.Layout(width="140px"))
        self.head = widgets.IntText(value=head, description="head", layout=widgets.Layout(width="140px"))
        self.patch_toggle = widgets.ToggleButton(
            value=patched, description="patched" if patch else "no patch", disabled=patch is None, icon="wrench",
            tooltip=patch.describe() if patch else "no sink neurons were found, so there is nothing to patch")
        self.message = widgets.HTML()
        self.status = widgets.HTML()
        self.norm_figure = go.FigureWidget()
        self.attention_figure = go.FigureWidget()
        self.neuron_figure = go.FigureWidget()
        self.pattern_html = widgets.HTML()

        self._mode_controls = {"text": widgets.HBox([self.text], layout=widgets.Layout(width="100%")),
                               "repeat": widgets.HBox([self.word, self.repeats]),
                               "cluster": widgets.HBox([self.cluster_tokens, self.cluster_length, self.cluster_seed])}
        self.widget = widgets.VBox([
            self.prompt_mode, *self._mode_controls.values(),
            widgets.HBox([self.layer, self.head, self.patch_toggle, self.status]), self.message,
            self.norm_figure, self.attention_figure, self.neuron_figure, self.pattern_html,
        ])
        self.widget.add_class("sinklens-explorer")  # a handle for styling the explorer and for browser tests
        for control in (self.prompt_mode, self.text, self.word, self.repeats, self.cluster_tokens, self.cluster_length,
                        self.cluster_seed, self.patch_toggle):
            control.observe(lambda _: self._guarded(self._show_prompt), names="value")
        for control in (self.layer, self.head):
            control.observe(lambda _: self._guarded(self._show_head), names="value")
        self._guarded(self._show_prompt)

    def opened_at(self, *, prompt_mode: str | None = None, text: str | None = None,
                  word: str | int | Token | None = None, n_repeats: int | None = None, layer: int | None = None,
                  head: int = 0, patched: bool = False) -> SinkExplorer:
        """Another explorer of the same circuit (first token, sink layer and neurons, norms, patch,
        cluster), opening on another prompt, layer, head or patch state; what is not given is taken
        from this explorer's controls, except the layer (default: the one after the sink layer),
        the head (0) and the patch (off). Nothing is measured again, and the two explorers share
        their forward passes: a prompt either has run opens from memory."""
        return SinkExplorer(
            self.model, first=self.first, neurons=self.neurons, baseline=self.baseline, patch=self.patch,
            text=self.text.value if text is None else text, cluster=self._cluster,
            word=self.word.value if word is None else word,
            n_repeats=self.repeats.value if n_repeats is None else n_repeats,
            prompt_mode=self.prompt_mode.value if prompt_mode is None else prompt_mode,
            layer=layer, head=head, patched=patched, memory=self._remembered)

    def static_figure(self) -> go.Figure:
        """The four views as they stand, one above the other in one plotly figure (the head's
        pattern as heatmaps): what the explorer's PNG shows."""
        if not self.runs:
            raise SinklensError("the explorer has drawn nothing yet", f"fix its input: {self.error}")
        return stack_figures([self.norm_figure, self.attention_figure, self.neuron_figure,
                              plot_pattern(self.runs, *self._drawn_head)])

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, with a PNG of :meth:`static_figure` for notebook viewers without a kernel
        (rendered by kaleido, which needs a Chrome or Chromium; without one the plain-text form says why)."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        try:
            png = self.static_figure().to_image(format="png")
        except Exception as exc:  # noqa: BLE001 (the live widget works without the image; a viewer shows why)
            bundle["text/plain"] = f"sinklens explorer (no static image of its views: {type(exc).__name__}: {exc})"
        else:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

    def prompt_tokens(self) -> Int[torch.Tensor, "1 pos"]:
        """``[first] + prompt`` from the controls of the chosen prompt mode (a bad prompt raises)."""
        mode, first = self.prompt_mode.value, self.first.id
        if mode == "text":
            if not self.text.value.strip():
                raise SinklensError("the prompt is empty", "type some text, or pick a word and a repeat count")
            return text_tokens(self.model, self.text.value, first=first)
        if mode == "repeat":
            entry = self.word.value
            word = int(entry) if entry.strip().lstrip("-").isdigit() else entry  # a word's own checks name its problem
            return repeated_tokens(self.model, word, self.repeats.value, first=first)
        pool = parse_tokens(self.model, self.cluster_tokens.value)
        length = self.cluster_length.value
        check_context(self.model, length + 1)
        sequence = sample_sequences(pool, 1, length, seed=self.cluster_seed.value)
        return torch.cat([torch.tensor([[first]]), sequence], dim=1)

    def _guarded(self, update: Callable[[], None]) -> None:
        """Run ``update``; a problem becomes one line in the widget, never a traceback in the output area."""
        start = time.perf_counter()
        self.message.value = "<i>running...</i>"
        try:
            update()
        except Exception as exc:  # noqa: BLE001 (a widget callback has nowhere to raise to but the output area)
            self.error = exc
            problem = str(exc) if isinstance(exc, SinklensError) else f"unexpected {type(exc).__name__}: {exc}"
            self.message.value = f"<span style='color:firebrick'>{html.escape(problem)}</span>"
        else:
            self.error = None
            self.message.value = ""
        self.last_update_seconds = time.perf_counter() - start
        if self.error is None:
            self.status.value = (f"<span style='color:gray'>{len(self.runs[0].token_texts)} tokens, "
                                 f"updated in {self.last_update_seconds:.2f} s</span>")

    def _run(self, tokens: Int[torch.Tensor, "1 pos"], patched: bool, layer: int) -> PromptRun:
        """A prompt's run in one patch state, reading ``layer``'s pattern, from memory when it was run lately."""
        key = (tuple(tokens[0].tolist()), patched, layer)
        if key in self._remembered:
            self._remembered.move_to_end(key)
            return self._remembered[key]
        run = run_prompt(self.model, tokens, sink_layer=self.sink_layer, neurons=self._shown_neurons(), layer=layer,
                         threshold=sink_threshold(self.baseline.first_token_norm, self.baseline.typical_norm),
                         patch=self.patch if patched else None)
        self._remembered[key] = run
        if len(self._remembered) > RUNS_KEPT:
            self._remembered.popitem(last=False)
        return run

    def _shown_neurons(self) -> list[Neuron]:
        """The sink neurons, and any other neuron the patch clamps."""
        extra = [n for n in (self.patch.neurons if self.patch else ()) if n not in self.neurons]
        return [*self.neurons, *extra]

    def _layer_head(self) -> tuple[int, int]:
        return check_layer(self.model, self.layer.value), check_head(self.model, self.head.value)

    def _show_prompt(self) -> None:
        """A prompt or the patch changed: run what is not in memory, then redraw every view."""
        for mode, box in self._mode_controls.items():
            box.layout.display = None if mode == self.prompt_mode.value else "none"
        layer, head = self._layer_head()  # every check before any figure changes
        tokens = self.prompt_tokens()
        self.runs = [self._run(tokens, False, layer)] + ([self._run(tokens, True, layer)] if self.patch_toggle.value
                                                         else [])
        _redraw(self.norm_figure, plot_norms(self.runs, self.baseline))
        _redraw(self.neuron_figure, plot_neuron_activations(self.runs))
        self._draw_head(layer, head)

    def _show_head(self) -> None:
        """The head changed: redraw from the runs in memory, no forward pass; the layer changed: run the prompt
        reading that layer's pattern (from memory if it was)."""
        layer, head = self._layer_head()
        if self.runs and self.runs[0].layer == layer:
            self._draw_head(layer, head)
        elif self.runs:
            self._show_prompt()

    def _draw_head(self, layer: int, head: int) -> None:
        self._drawn_head = layer, head
        _redraw(self.attention_figure, plot_first_token_attention(self.runs, layer))
        page = pattern_page(self.runs, layer, head)
        height = PATTERN_FRAME + PATTERN_ROW * len(self.runs[0].window)  # the whole pattern, its last row too
        self.pattern_html.value = (f"<iframe srcdoc=\"{html.escape(page)}\" style=\"width:100%;height:{height}px;"
                                   f"border:0\"></iframe>")  # an iframe runs circuitsvis' script


def _redraw(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Replace a FigureWidget's traces and layout in one message to the browser."""
    with widget.batch_update():
        widget.data = ()
        widget.add_traces(figure.data)
        widget.layout = figure.layout


def explore(
    model: TransformerBridge,
    row: SinkTableRow | None = None,
    *,
    settings: Settings | None = None,
    text: str | None = None,
    patch: SinkPatch | None = None,
    cluster: ClusterAttack | Sequence[int | str] | None = None,
    word: str | int | Token = NOTEBOOK_WORD,
    n_repeats: int = DEFAULT_REPEATS,
    prompt_mode: str = "repeat",
    layer: int | None = None,
    head: int = 0,
    patched: bool = False,
) -> SinkExplorer:
    """A live widget that shows the sink circuit on any prompt, layer and head, with and without a patch.

    The first token, the sink layer and neurons and the typical norm come from ``row`` (a
    :func:`~sinklens.studies.table.sink_table_row` result) or are measured now on ``text`` (default: the
    settings' corpus, the first 1000 characters of Tiny Shakespeare as the paper's) by
    :func:`~sinklens.studies.setup.circuit_setup` with ``settings`` (default: the defaults; ``n_repeats``
    is the explorer's), as every study measures them. ``patch`` is what
    the toggle installs (default: the paper's Listing 1 on the sink neurons). ``cluster`` fills the
    cluster-sequence prompt: a :class:`ClusterAttack`'s cluster, or token ids or one-token words
    (default: the tokens of "Another one bites the dust"). ``text`` fills the free-text prompt.

    The widget opens on ``prompt_mode``: "repeat" (``word`` x ``n_repeats``; ``word`` is a word, a
    token id or a :class:`Token`, and the word box takes a word or a token id), "text" or "cluster";
    on ``layer`` (default: the one after the sink layer) and ``head``; with the patch on if
    ``patched``. :meth:`SinkExplorer.opened_at` opens another view of the same circuit.

    Needs the ``notebook`` extra (ipywidgets, and anywidget for plotly's FigureWidget).
    """
    try:
        import anywidget  # noqa: F401 (plotly's FigureWidget is an anywidget)
        import ipywidgets  # noqa: F401
    except ImportError:
        raise SinklensError("the explorer needs the notebook extra", "pip install 'sinklens[notebook]'") from None
    check_opening(model, prompt_mode, layer, head)  # before the circuit is measured
    settings = Settings.of(settings, n_repeats=n_repeats)
    natural = settings.natural_text() if text is None else text
    setup = row.setup if row is not None else circuit_setup(model, natural, settings)
    start, baseline, neurons = setup.first, setup.baseline, setup.sink_neurons
    if patch is None and neurons:
        patch = patch_for(model, neurons)
    elif patch is not None:
        patch.check(model.cfg.n_layers, model.cfg.d_mlp, model.cfg.model_name)
    if isinstance(cluster, ClusterAttack):
        cluster = cluster.cluster
    pool = default_words(model) if cluster is None else words_to_tokens(model, cluster)
    return SinkExplorer(model, first=start, neurons=neurons, baseline=baseline, patch=patch, text=natural,
                        cluster=pool, word=word, n_repeats=n_repeats, prompt_mode=prompt_mode, layer=layer,
                        head=head, patched=patched)
