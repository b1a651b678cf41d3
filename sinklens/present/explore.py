"""``sl.explore(model)``: one live notebook widget for the questions a researcher asks of the sink
circuit.

Pick a prompt (free text, a word and a repeat count, or a sequence drawn from a token cluster), a
layer and a head, and four views update in place, one above the other so that they fit a 1,280 px
window: the hidden-state norm per position at the sink layer with the prompt's sinks marked, the
attention the first token receives per layer, the sink neurons' activations, and the head's
attention pattern, drawn by circuitsvis offline (:mod:`sinklens.present.explore_views` says what
each view shows). A toggle runs the prompt again with a :class:`~sinklens.run.sink_patch.SinkPatch`
installed (by default the paper's Listing 1 on the sink neurons found), so every view shows
original against patched.

What it measures is :mod:`sinklens.studies.explorer_circuit`'s, where the same runs come without a widget:
the circuit (first token, sink layer and neurons, typical norm) is measured once, when the
explorer is built, then each prompt costs one forward pass per patch state, in which only the
layer shown reads its pattern. The last few runs are kept, so moving the head, toggling the patch
back or returning to an earlier prompt redraws from memory; moving the layer reads that layer's
pattern in one forward pass.

Time per update (``python bench/bench_explore.py``, SmolLM2-135M-Instruct, 2 idle CPU cores): a
new 1,001-token prompt with the patch off takes 2.26 s, 1.12x a plain Hugging Face SDPA forward
pass of the same tokens (2.02 s; the last release, reading every layer's pattern, took about twice
it); moving the layer takes the same, moving the head 0.03 s.

Bad input (an empty prompt, a word that is not one token, a prompt longer than the context, a
layer or head out of range) shows one line in the widget and leaves the figures as they were.

An explorer opens on a given prompt mode, layer, head and patch state, and
:meth:`SinkExplorer.opened_at` opens another view of the same circuit (no measurement, shared
runs): ``analyses/explore.ipynb`` tours the circuit that way, one explorer per stop. Displayed in
a notebook, the explorer carries a PNG of its views beside the live widget, drawn by kaleido when
it is displayed (4.9 s for SmolLM2 at 300 repeats on the 2 shared cores, most of it starting
Chromium), so that a saved notebook shows its views in viewers without a kernel (GitHub,
nbviewer, ``jupyter nbconvert``). With circuitsvis' bundle inlined, moving the head still takes
0.05-0.06 s there.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses.sink_neurons import NOTEBOOK_WORD
from sinklens.errors import SinklensError
from sinklens.present.explore_views import (
    PATTERN_FRAME,
    PATTERN_ROW,
    pattern_page,
    plot_first_token_attention,
    plot_neuron_activations,
    plot_norms,
    plot_pattern,
    stack_figures,
)
from sinklens.run.cache import check_layer
from sinklens.run.sink_patch import SinkPatch
from sinklens.run.tokens import Token, token
from sinklens.settings import Settings
from sinklens.studies.attack import ClusterAttack
from sinklens.studies.explorer_circuit import (
    DEFAULT_REPEATS,
    MAX_REPEATS,
    PROMPT_MODES,
    ExplorerCircuit,
    PromptRun,
    check_head,
    check_opening,
    explorer_circuit,
    token_entry,
)
from sinklens.studies.table import SinkTableRow


class SinkExplorer:
    """The widget :func:`explore` returns; display it as a notebook cell's last line.

    Its controls (``prompt_mode``, ``text``, ``word``, ``repeats``, ``cluster_tokens``,
    ``cluster_length``, ``cluster_seed``, ``layer``, ``head``, ``patch_toggle``) and views
    (``norm_figure``, ``attention_figure``, ``neuron_figure``: plotly ``FigureWidget``;
    ``pattern_html``; ``message``, ``status``) are ipywidgets, so code can drive it as a user does.
    ``runs`` holds the forward passes of the prompt shown, ``last_update_seconds`` the time the last
    change took, ``error`` the exception behind the message (None after a good update).
    ``circuit`` is the :class:`~sinklens.studies.explorer_circuit.ExplorerCircuit` it shows (``first``,
    ``neurons``, ``baseline``, ``patch`` and ``sink_layer`` are its), with the runs kept.

    It opens on ``prompt_mode`` ("text", "repeat" or "cluster"), ``layer`` (default: the one after
    the sink layer), ``head`` and the patch on or off (``patched``); :meth:`opened_at` makes another
    explorer of the same circuit that opens elsewhere, without measuring it again. Displayed, it
    also carries a PNG of its views as they stand (:meth:`static_figure`), which notebook viewers
    without a kernel show in place of the live widget.
    """

    def __init__(
        self,
        circuit: ExplorerCircuit,
        *,
        text: str | None = None,
        word: str | int | Token = NOTEBOOK_WORD,
        n_repeats: int = DEFAULT_REPEATS,
        prompt_mode: str = "repeat",
        layer: int | None = None,
        head: int = 0,
        patched: bool = False,
    ):
        """``text`` fills the free-text prompt (default: the circuit's natural text), ``word`` (a
        word, a token id or a :class:`Token`) and ``n_repeats`` the repeat prompt."""
        import ipywidgets as widgets

        model, patch = circuit.model, circuit.patch
        layer, head = check_opening(model, prompt_mode, layer, head)
        if patched and patch is None:
            raise SinklensError(
                "there is no patch to open on: no sink neurons were found",
                "open with patched=False, or pass a patch",
            )
        self.circuit, self.model, self.patch = circuit, model, patch
        self.first, self.neurons, self.baseline = circuit.first, circuit.neurons, circuit.baseline
        self.sink_layer = circuit.sink_layer
        if layer is None:
            layer = min(self.sink_layer + 1, model.cfg.n_layers - 1)
        self.runs: list[PromptRun] = []
        self._drawn_head: tuple[int, int] | None = None  # the layer and head the views show
        self.error: Exception | None = None
        self.last_update_seconds = 0.0
        longest = min(model.cfg.n_ctx - 1, MAX_REPEATS)
        later = dict(continuous_update=False)

        self.prompt_mode = widgets.ToggleButtons(
            options=list(PROMPT_MODES.items()), value=prompt_mode
        )
        text = circuit.text if text is None else text
        self.text = widgets.Textarea(
            value=text, description="text", layout=widgets.Layout(width="95%"), **later
        )
        if not isinstance(word, str):
            word = token_entry(model, word if isinstance(word, Token) else token(model, word))
        self.word = widgets.Text(
            value=word, description="word", placeholder="a word or a token id", **later
        )
        self.repeats = widgets.IntSlider(
            value=min(n_repeats, longest), min=1, max=longest, description="repeats", **later
        )
        self.cluster_tokens = widgets.Text(
            value=circuit.cluster_entries,
            description="cluster",
            placeholder="words or token ids, comma-separated",
            layout=widgets.Layout(width="50%"),
            **later,
        )
        self.cluster_length = widgets.IntSlider(
            value=min(n_repeats, longest), min=2, max=longest, description="length", **later
        )
        self.cluster_seed = widgets.IntText(
            value=0, description="seed", layout=widgets.Layout(width="140px")
        )
        self.layer = widgets.IntText(
            value=layer, description="layer", layout=widgets.Layout(width="140px")
        )
        self.head = widgets.IntText(
            value=head, description="head", layout=widgets.Layout(width="140px")
        )
        no_patch = "no sink neurons were found, so there is nothing to patch"
        self.patch_toggle = widgets.ToggleButton(
            value=patched,
            description="patched" if patch else "no patch",
            disabled=patch is None,
            icon="wrench",
            tooltip=patch.describe() if patch else no_patch,
        )
        self.message = widgets.HTML()
        self.status = widgets.HTML()
        self.norm_figure = go.FigureWidget()
        self.attention_figure = go.FigureWidget()
        self.neuron_figure = go.FigureWidget()
        self.pattern_html = widgets.HTML()

        self._mode_controls = {
            "text": widgets.HBox([self.text], layout=widgets.Layout(width="100%")),
            "repeat": widgets.HBox([self.word, self.repeats]),
            "cluster": widgets.HBox([self.cluster_tokens, self.cluster_length, self.cluster_seed]),
        }
        self.widget = widgets.VBox(
            [
                self.prompt_mode,
                *self._mode_controls.values(),
                widgets.HBox([self.layer, self.head, self.patch_toggle, self.status]),
                self.message,
                self.norm_figure,
                self.attention_figure,
                self.neuron_figure,
                self.pattern_html,
            ]
        )
        # a handle for styling the explorer and for browser tests
        self.widget.add_class("sinklens-explorer")
        for control in (
            self.prompt_mode,
            self.text,
            self.word,
            self.repeats,
            self.cluster_tokens,
            self.cluster_length,
            self.cluster_seed,
            self.patch_toggle,
        ):
            control.observe(lambda _: self._guarded(self._show_prompt), names="value")
        for control in (self.layer, self.head):
            control.observe(lambda _: self._guarded(self._show_head), names="value")
        self._guarded(self._show_prompt)

    def opened_at(
        self,
        *,
        prompt_mode: str | None = None,
        text: str | None = None,
        word: str | int | Token | None = None,
        n_repeats: int | None = None,
        layer: int | None = None,
        head: int = 0,
        patched: bool = False,
    ) -> SinkExplorer:
        """Another explorer of the same circuit (first token, sink layer and neurons, norms, patch,
        cluster), opening on another prompt, layer, head or patch state; what is not given is taken
        from this explorer's controls, except the layer (default: the one after the sink layer),
        the head (0) and the patch (off). Nothing is measured again, and the two explorers share
        their forward passes: a prompt either has run opens from memory."""
        return SinkExplorer(
            self.circuit,
            text=self.text.value if text is None else text,
            word=self.word.value if word is None else word,
            n_repeats=self.repeats.value if n_repeats is None else n_repeats,
            prompt_mode=self.prompt_mode.value if prompt_mode is None else prompt_mode,
            layer=layer,
            head=head,
            patched=patched,
        )

    def static_figure(self) -> go.Figure:
        """The four views as they stand, one above the other in one plotly figure (the head's
        pattern as heatmaps): what the explorer's PNG shows."""
        if not self.runs:
            raise SinklensError(
                "the explorer has drawn nothing yet", f"fix its input: {self.error}"
            )
        assert self._drawn_head is not None  # _show_prompt draws a head whenever it sets runs
        pattern = plot_pattern(self.runs, *self._drawn_head)
        return stack_figures([self.norm_figure, self.attention_figure, self.neuron_figure, pattern])

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, with a PNG of :meth:`static_figure` for notebook viewers without a
        kernel (rendered by kaleido, which needs a Chrome or Chromium; without one the plain-text
        form says why)."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        try:
            png = self.static_figure().to_image(format="png")
        # the live widget works without the image; a viewer shows why
        except Exception as exc:  # noqa: BLE001
            bundle["text/plain"] = (
                f"sinklens explorer (no static image of its views: {type(exc).__name__}: {exc})"
            )
        else:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

    def prompt_tokens(self) -> Int[torch.Tensor, "1 pos"]:
        """``[first] + prompt`` from the controls of the chosen prompt mode (a bad prompt
        raises)."""
        return self.circuit.prompt_tokens(
            self.prompt_mode.value,
            text=self.text.value,
            word=self.word.value,
            n_repeats=self.repeats.value,
            cluster=self.cluster_tokens.value,
            length=self.cluster_length.value,
            seed=self.cluster_seed.value,
        )

    def _guarded(self, update: Callable[[], None]) -> None:
        """Run ``update``; a problem becomes one line in the widget, never a traceback in the
        output area."""
        start = time.perf_counter()
        self.message.value = "<i>running...</i>"
        try:
            update()
        # a widget callback has nowhere to raise to but the output area
        except Exception as exc:  # noqa: BLE001
            self.error = exc
            problem = (
                str(exc)
                if isinstance(exc, SinklensError)
                else f"unexpected {type(exc).__name__}: {exc}"
            )
            self.message.value = f"<span style='color:firebrick'>{html.escape(problem)}</span>"
        else:
            self.error = None
            self.message.value = ""
        self.last_update_seconds = time.perf_counter() - start
        if self.error is None:
            self.status.value = (
                f"<span style='color:gray'>{len(self.runs[0].token_texts)} tokens, "
                f"updated in {self.last_update_seconds:.2f} s</span>"
            )

    def _layer_head(self) -> tuple[int, int]:
        return check_layer(self.model, self.layer.value), check_head(self.model, self.head.value)

    def _show_prompt(self) -> None:
        """A prompt or the patch changed: run what is not in memory, then redraw every view."""
        for mode, box in self._mode_controls.items():
            box.layout.display = None if mode == self.prompt_mode.value else "none"
        layer, head = self._layer_head()  # every check before any figure changes
        self.runs = self.circuit.prompt_runs(self.prompt_tokens(), layer, self.patch_toggle.value)
        _redraw(self.norm_figure, plot_norms(self.runs, self.baseline))
        _redraw(self.neuron_figure, plot_neuron_activations(self.runs))
        self._draw_head(layer, head)

    def _show_head(self) -> None:
        """The head changed: redraw from the runs in memory, no forward pass; the layer changed:
        run the prompt reading that layer's pattern (from memory if it was)."""
        layer, head = self._layer_head()
        if self.runs and self.runs[0].layer == layer:
            self._draw_head(layer, head)
        elif self.runs:
            self._show_prompt()

    def _draw_head(self, layer: int, head: int) -> None:
        self._drawn_head = layer, head
        _redraw(self.attention_figure, plot_first_token_attention(self.runs, layer))
        page = pattern_page(self.runs, layer, head)
        # the whole pattern, its last row too; an iframe runs circuitsvis' script
        height = PATTERN_FRAME + PATTERN_ROW * len(self.runs[0].window)
        self.pattern_html.value = (
            f'<iframe srcdoc="{html.escape(page)}" style="width:100%;height:{height}px;'
            f'border:0"></iframe>'
        )


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
    """A live widget that shows the sink circuit on any prompt, layer and head, with and without a
    patch.

    The first token, the sink layer and neurons and the typical norm come from ``row`` (a
    :func:`~sinklens.studies.table.sink_table_row` result) or are measured now on ``text``
    (default: the settings' corpus, the first 1000 characters of Tiny Shakespeare as the paper's)
    by :func:`~sinklens.studies.setup.circuit_setup` with ``settings`` (default: the defaults;
    ``n_repeats`` is the explorer's), as every study measures them. ``patch`` is what the toggle
    installs (default: the paper's Listing 1 on the sink neurons). ``cluster`` fills the
    cluster-sequence prompt: a :class:`ClusterAttack`'s cluster, or token ids or one-token words
    (default: the tokens of "Another one bites the dust"). ``text`` fills the free-text prompt.
    :func:`~sinklens.studies.explorer_circuit.explorer_circuit` measures the same without a widget.

    The widget opens on ``prompt_mode``: "repeat" (``word`` x ``n_repeats``; ``word`` is a word, a
    token id or a :class:`Token`, and the word box takes a word or a token id), "text" or
    "cluster"; on ``layer`` (default: the one after the sink layer) and ``head``; with the patch on
    if ``patched``. :meth:`SinkExplorer.opened_at` opens another view of the same circuit.

    Needs the ``notebook`` extra (ipywidgets, and anywidget for plotly's FigureWidget).
    """
    try:
        import anywidget  # noqa: F401 (plotly's FigureWidget is an anywidget)
        import ipywidgets  # noqa: F401
    except ImportError:
        raise SinklensError(
            "the explorer needs the notebook extra", "pip install 'sinklens[notebook]'"
        ) from None
    check_opening(model, prompt_mode, layer, head)  # before the circuit is measured
    circuit = explorer_circuit(
        model, row, settings=settings, text=text, patch=patch, cluster=cluster, n_repeats=n_repeats
    )
    return SinkExplorer(
        circuit,
        word=word,
        n_repeats=n_repeats,
        prompt_mode=prompt_mode,
        layer=layer,
        head=head,
        patched=patched,
    )
