"""The first-token mark: which components tell the sink neurons that a token is first.

Paper claim (Yona et al. 2025, Sec. 4.3): the first attention layer marks the first token with a
"detect other tokens" mechanism. A token that sees only itself must be first, so its first-layer
output is distinctive; the sink neurons read that mark. A long run of one token has no "others"
that differ from it and gets marked too.

This module tests it causally, on any model and at any depth of the sink layer. The *clean* run
is the first token alone (it sees only itself and becomes a sink); the *corrupted* runs put the
same token after some natural text (it sees others and is not a sink). The metric is the sink
neurons' activation at the sink layer (``blocks.L.mlp.hook_post``, summed with the signs they
have on the first token), as a share of the clean-minus-corrupted gap. For every component
before the sink neurons (each layer's attention output ``hook_attn_out``, each head's output
``attn.hook_z``, each MLP's output ``hook_mlp_out``) three interventions, each with a placebo:

* **necessity**: in the clean run the component takes its corrupted value; the share of the sink
  lost. The "reverse" patch: the first token's component made to look as it does later.
* **sufficiency**: in a corrupted run only the component takes its clean value; the share of the
  sink restored. The lone first token's output patched into a later position.
* **necessity in context**: in a corrupted run every attention head takes its clean value (which
  restores the sink fully) except this component, which keeps its corrupted value; the share lost.
  Where the mark is spread over several components, this isolates what each contributes.

The **placebo** of each intervention moves the component's value by a random vector as long as
the clean-to-corrupted difference, instead of towards the other run. A component *carries the
mark* when its effect exceeds its placebo's (the 95% interval of the paired difference over the
corrupted runs lies above 0) and is at least a tenth of the sink (``min_effect``, our choice: a
smaller share is real but does not explain the sink).

Neurons are too many to patch one by one: their necessity is first estimated by attribution (the
gradient of the metric in the clean run times the clean-to-corrupted difference), and the
top-ranked are then patched for real. At repeated positions (a word that becomes a sink when
repeated) the layers and the mark-carrying heads are patched with the value the word has in
natural text, to show whether the repeats are marked by the same components.

Every patched run goes through the engine the general sweeps use
(:func:`~sinklens.run.activation_patching.patched_rows`, many rows a forward pass, their common beginning
computed once); the experiments here are not :func:`~sinklens.analyses.patching_sweep.patching_sweep` itself
because their clean run (the lone token) and corrupted runs (the token after text) differ in length, and
each comes with a placebo.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._stats import mean_interval
from sinklens.analyses.sink_metric import (
    N_CONTEXTS,
    SinkMetric,
    mark_contexts,
    run_rows,
)
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.activation_patching import (
    Patch,
    Site,
    activation_gradients,
    read_site,
)
from sinklens.run.cache import run_cache
from sinklens.run.interventions import Neuron, check_neurons, neuron_hook_name
from sinklens.run.tokens import Token, encode, repeated_tokens, token

MIN_EFFECT = 0.1
TOP_NEURONS = 10
EXPERIMENTS = ("necessity", "sufficiency", "in_context")


def circuit_sites(model: TransformerBridge, sink_layer: int) -> list[Site]:
    """Every attention layer, head and MLP before the sink neurons (attention of the sink layer included)."""
    sites = []
    for layer in range(sink_layer + 1):
        sites.append(Site(get_act_name("attn_out", layer)))
        sites += [Site(get_act_name("z", layer), h) for h in range(model.cfg.n_heads)]
        if layer < sink_layer:
            sites.append(Site(get_act_name("mlp_out", layer)))
    return sites


@dataclass
class FirstTokenMarkPatching(Result):
    """Effects (share of the sink) of each component per corrupted run, for each experiment."""

    first_token: Token
    sink_neurons: list[Neuron]
    sites: list[Site]
    contexts: list[int]  # tokens of natural text before the token in each corrupted run
    clean_metric: float
    corrupted_metric: Float[torch.Tensor, " context"]
    effects: Float[torch.Tensor, "experiment site context"]
    placebo: Float[torch.Tensor, "experiment site context"]
    min_effect: float
    neurons: list[Neuron]  # the top neurons by attribution
    neuron_attribution: Float[torch.Tensor, " neuron"]  # estimated necessity (share of the sink)
    neuron_necessity: Float[torch.Tensor, "neuron context"]  # patched for real
    repeat_word: Token | None
    repeat_sites: list[Site]
    repeat_effects: Float[torch.Tensor, "site position"] | None  # necessity at repeated positions
    repeat_placebo: Float[torch.Tensor, "site position"] | None

    def __post_init__(self) -> None:
        self.neurons = [(layer, index) for layer, index in self.neurons]
        self.sink_neurons = [(layer, index) for layer, index in self.sink_neurons]

    def carries_mark(self, experiment: str, index: int) -> bool:
        e = EXPERIMENTS.index(experiment)
        mean = float(self.effects[e, index].mean())
        low = mean_interval(self.effects[e, index] - self.placebo[e, index])[1]
        return mean >= self.min_effect and low > 0

    @functools.cached_property
    def mark_sites(self) -> list[Site]:
        """Components whose necessity (alone or in context) passes the test, in layer order (computed once:
        the effects are final when the result is made)."""
        return [
            s
            for i, s in enumerate(self.sites)
            if self.carries_mark("necessity", i) or self.carries_mark("in_context", i)
        ]

    def mark_heads(self, layer: int | None = None) -> list[tuple[int, int]]:
        heads = []
        for s in self.mark_sites:
            if s.name.endswith("hook_z"):
                assert s.index is not None  # circuit_sites patches hook_z one head at a time
                heads.append((int(s.name.split(".")[1]), s.index))
        return [h for h in heads if layer is None or h[0] == layer]

    def to_frame(self) -> pd.DataFrame:
        """One row per component: each experiment's mean effect, placebo and 95% interval of the difference."""
        return self._frame.copy()

    @functools.cached_property
    def _frame(self) -> pd.DataFrame:
        rows, marked = [], set(self.mark_sites)
        for i, site in enumerate(self.sites):
            row: dict[str, Any] = {"component": site.label, "hook": site.name, "index": site.index}
            for e, name in enumerate(EXPERIMENTS):
                mean, _, _ = mean_interval(self.effects[e, i])
                _, low, high = mean_interval(self.effects[e, i] - self.placebo[e, i])
                row.update(
                    {
                        name: mean,
                        f"{name}_placebo": float(self.placebo[e, i].mean()),
                        f"{name}_minus_placebo_ci": (low, high),
                    }
                )
            row["carries_mark"] = site in marked
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """Per layer and head, necessity in context and necessity, with the placebo's."""
        frame = self.to_frame()
        heads = frame[frame["hook"].str.endswith("hook_z")]
        layers = sorted({int(h.split(".")[1]) for h in heads["hook"]})
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                "Necessity in context, per head",
                "Per layer: attention and MLP outputs",
            ],
        )
        grid = np.full((len(layers), int(heads["index"].max()) + 1), np.nan)
        for _, r in heads.iterrows():
            grid[layers.index(int(r["hook"].split(".")[1])), int(r["index"])] = r["in_context"]
        fig.add_heatmap(
            z=grid,
            x=list(range(grid.shape[1])),
            y=layers,
            colorscale="RdBu_r",
            zmid=0,
            row=1,
            col=1,
            colorbar=dict(title="share of the sink lost", x=0.45),
        )
        whole = frame[~frame["hook"].str.endswith("hook_z")]
        for name, color in (
            ("necessity", "firebrick"),
            ("in_context", "steelblue"),
            ("sufficiency", "seagreen"),
        ):
            fig.add_bar(
                x=whole["component"], y=whole[name], name=name, marker_color=color, row=1, col=2
            )
            fig.add_scatter(
                x=whole["component"],
                y=whole[f"{name}_placebo"],
                mode="markers",
                name=f"{name} placebo",
                marker=dict(color=color, symbol="x"),
                row=1,
                col=2,
            )
        fig.update_yaxes(title_text="Layer", autorange="reversed", row=1, col=1)
        fig.update_xaxes(title_text="Head", row=1, col=1)
        fig.update_yaxes(title_text="Share of the sink", row=1, col=2)
        fig.update_layout(
            title=f"What marks {self.first_token.text!r} as first for the sink neurons", height=520
        )
        return fig

    def summary(self) -> dict:
        frame = self.to_frame()
        head_rows = frame[frame["hook"].str.endswith("hook_z")]
        heads = [
            {
                "layer": int(r["hook"].split(".")[1]),
                "head": int(r["index"]),
                **{
                    k: r[k]
                    for k in (
                        "necessity",
                        "necessity_placebo",
                        "sufficiency",
                        "sufficiency_placebo",
                        "in_context",
                        "in_context_placebo",
                    )
                },
                "carries_mark": bool(r["carries_mark"]),
            }
            for _, r in head_rows.iterrows()
        ]
        neuron_real = self.neuron_necessity.mean(dim=-1)
        repeat = None
        if self.repeat_effects is not None:
            # _repeat_positions sets the word, effects and placebo together
            assert self.repeat_word is not None and self.repeat_placebo is not None
            repeat = {
                "word": self.repeat_word.text,
                "components": [
                    {
                        "component": s.label,
                        "necessity": float(self.repeat_effects[i].mean()),
                        "placebo": float(self.repeat_placebo[i].mean()),
                    }
                    for i, s in enumerate(self.repeat_sites)
                ],
            }
        return {
            "first_token": self.first_token.text,
            "sink_neurons": [list(n) for n in self.sink_neurons],
            "contexts": self.contexts,
            "path": [s.label for s in self.mark_sites],
            "heads": heads,
            "layers": frame[~frame["hook"].str.endswith("hook_z")]
            .drop(columns=["hook", "index"])
            .to_dict("records"),
            "neurons": [
                {"neuron": list(n), "attribution": float(a), "necessity": float(r)}
                for n, a, r in zip(self.neurons, self.neuron_attribution, neuron_real)
            ],
            "repeated_positions": repeat,
        }


def _placebo(clean: torch.Tensor, other: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``clean`` moved by a random vector as long as ``other - clean``."""
    direction = torch.randn(clean.shape, generator=generator)
    return clean + direction / direction.norm() * (other - clean).float().cpu().norm()


def first_token_mark_patching(
    model: TransformerBridge,
    first: int,
    text: str,
    sink_neurons: Sequence[Neuron],
    *,
    n_contexts: int = N_CONTEXTS,
    repeat_word: str | int | None = None,
    n_repeats: int = 256,
    top_neurons: int = TOP_NEURONS,
    min_effect: float = MIN_EFFECT,
    seed: int = 0,
    progress: bool = False,
) -> FirstTokenMarkPatching:
    """Patch every component before the sink neurons between the lone first token ``first`` and
    the same token after ``n_contexts`` stretches of ``text`` (1 to 32 tokens)."""
    sink_neurons = check_neurons(model, sink_neurons)
    if not sink_neurons:
        raise SinklensError(
            "no sink neurons to trace the mark to", "find them first (find_sink_neurons)"
        )
    metric = SinkMetric(model, first, sink_neurons)
    layer = metric.layer
    text_ids = encode(model, text)
    contexts = mark_contexts(model, text, n_contexts)
    sites = circuit_sites(model, layer)
    names = sorted({s.name for s in sites})
    generator = torch.Generator().manual_seed(seed)
    lone = torch.tensor([[first]])
    clean = run_cache(model, lone, names + metric.names)
    clean_metric = float(metric(clean, [0], [0])[0])
    runs = [torch.tensor([[first, *text_ids[:k], first]]) for k in contexts]
    corrupted = [run_cache(model, r, names + metric.names) for r in runs]
    corrupted_metric = torch.stack(
        [metric(c, [0], [r.shape[1] - 1])[0] for c, r in zip(corrupted, runs)]
    )
    if clean_metric - float(corrupted_metric.max()) <= min_effect * abs(clean_metric):
        raise SinklensError(
            f"the sink neurons are as active on the first token after text (up to {float(corrupted_metric.max()):.3g}) "
            f"as on the lone first token ({clean_metric:.3g}): the sink does not depend on the token being first, so "
            "there is no mark to trace",
            "check with first_token_dependence(); the model marks the token, not the position",
        )
    gap = clean_metric - corrupted_metric
    clean_at = {s: read_site(clean, s, 0, 0) for s in sites}
    corrupt_at = [
        {s: read_site(c, s, 0, r.shape[1] - 1) for s in sites} for c, r in zip(corrupted, runs)
    ]
    heads = [s for s in sites if s.name.endswith("hook_z")]

    def in_context(position: int, keep: Site, value: torch.Tensor) -> list[Patch]:
        """Every head clean at ``position`` except ``keep`` (or ``keep``'s heads), which is set to ``value``."""
        layer_of = lambda site: site.name.split(".")[1]  # noqa: E731
        skipped = {
            h
            for h in heads
            if h == keep or (keep.name.endswith("hook_attn_out") and layer_of(h) == layer_of(keep))
        }
        return [Patch(h, 0, position, clean_at[h]) for h in heads if h not in skipped] + [
            Patch(keep, 0, position, value)
        ]

    effects = torch.zeros(3, len(sites), len(contexts))
    placebo = torch.zeros_like(effects)
    bar = tqdm(total=2 * len(contexts) + 1, desc="mark patching", disable=not progress)
    # Necessity: the lone first token, one site set to its corrupted (or placebo) value per row.
    rows, index = [], []
    for c, corrupt in enumerate(corrupt_at):
        for i, s in enumerate(sites):
            rows.append([Patch(s, 0, 0, corrupt[s])])
            rows.append([Patch(s, 0, 0, _placebo(clean_at[s], corrupt[s], generator))])
            index.append((i, c))
    values = run_rows(model, lone, rows, 0, metric).view(-1, 2)
    for (i, c), (real, fake) in zip(index, values):
        effects[0, i, c] = (clean_metric - real) / gap[c]
        placebo[0, i, c] = (clean_metric - fake) / gap[c]
    bar.update()
    for c, (run, corrupt) in enumerate(zip(runs, corrupt_at)):
        target = run.shape[1] - 1
        suff, ctx = [], []
        for s in sites:
            suff.append([Patch(s, 0, target, clean_at[s])])
            suff.append([Patch(s, 0, target, _placebo(corrupt[s], clean_at[s], generator))])
            ctx.append(in_context(target, s, corrupt[s]))
            ctx.append(in_context(target, s, _placebo(clean_at[s], corrupt[s], generator)))
        values = run_rows(model, run, suff, target, metric).view(-1, 2)
        effects[1, :, c] = (values[:, 0] - corrupted_metric[c]) / gap[c]
        placebo[1, :, c] = (values[:, 1] - corrupted_metric[c]) / gap[c]
        bar.update()
        values = run_rows(model, run, ctx, target, metric).view(-1, 2)
        effects[2, :, c] = (clean_metric - values[:, 0]) / gap[c]
        placebo[2, :, c] = (clean_metric - values[:, 1]) / gap[c]
        bar.update()
    bar.close()
    result = FirstTokenMarkPatching(
        token(model, first),
        sink_neurons,
        sites,
        contexts,
        clean_metric,
        corrupted_metric,
        effects,
        placebo,
        min_effect,
        [],
        torch.zeros(0),
        torch.zeros(0, len(contexts)),
        None,
        [],
        None,
        None,
    )
    _trace_neurons(model, result, lone, runs, metric, top_neurons)
    if repeat_word is not None:
        _repeat_positions(model, result, first, text_ids, repeat_word, n_repeats, metric, generator)
    return result


def _trace_neurons(
    model, result: FirstTokenMarkPatching, lone, runs, metric: SinkMetric, top: int
) -> None:
    """Attribution for every MLP neuron before the (last) sink layer, then real necessity for the top ones."""
    if metric.layer == 0 or top < 1:
        return
    names = [neuron_hook_name(l) for l in range(metric.layer)]
    grads = activation_gradients(
        model, lone, names, metric.at_lone_token, metric_names=metric.names
    )
    clean = run_cache(model, lone, names)
    later = [run_cache(model, r, names) for r in runs]
    gap = result.clean_metric - result.corrupted_metric
    attribution = torch.zeros(metric.layer, model.cfg.d_mlp)
    for c, cache in enumerate(later):
        for l, name in enumerate(names):
            difference = cache[name][0, -1] - clean[name][0, 0]
            # the metric changes by about grad . difference; necessity counts a loss as positive
            attribution[l] -= (grads[name][0, 0] * difference).float().cpu() / float(gap[c])
    attribution /= len(runs)
    order = attribution.abs().flatten().argsort(descending=True)[:top].tolist()
    chosen = [(i // model.cfg.d_mlp, i % model.cfg.d_mlp) for i in order]
    rows = [
        [Patch(Site(neuron_hook_name(l), n), 0, 0, cache[neuron_hook_name(l)][0, -1, n])]
        for cache in later
        for l, n in chosen
    ]
    values = run_rows(model, lone, rows, 0, metric).view(len(runs), len(chosen)).T
    result.neurons = chosen
    result.neuron_attribution = attribution.flatten()[order]
    result.neuron_necessity = (result.clean_metric - values) / gap[None]


def _repeat_positions(
    model,
    result: FirstTokenMarkPatching,
    first,
    text_ids,
    word,
    n_repeats,
    metric: SinkMetric,
    generator,
) -> None:
    """Necessity of each layer and mark-carrying head at the last repeat of ``word``, against the value
    the word has after natural text; skipped when the word's repeats do not drive the sink neurons."""
    repeat = repeated_tokens(model, word, n_repeats, first=first)
    word_id = int(repeat[0, -1])
    natural = torch.tensor([[first, *text_ids[:64], word_id]])
    sites = [s for s in result.sites if not s.name.endswith("hook_z")] + [
        Site(get_act_name("z", l), h) for l, h in result.mark_heads()
    ]
    names = sorted({s.name for s in sites})
    base = run_cache(model, repeat, names + metric.names)
    donor = run_cache(model, natural, names + metric.names)
    m_natural = float(metric(donor, [0], [natural.shape[1] - 1])[0])
    last = repeat.shape[1] - 1  # the last repeat: its value depends on every earlier position
    m_repeat = float(metric(base, [0], [last])[0])
    if m_repeat - m_natural <= MIN_EFFECT * (result.clean_metric - m_natural):
        return
    rows = []
    for s in sites:
        value = read_site(donor, s, 0, natural.shape[1] - 1)
        rows.append([Patch(s, 0, last, value)])
        rows.append([Patch(s, 0, last, _placebo(read_site(base, s, 0, last), value, generator))])
    values = run_rows(model, repeat, rows, last, metric).view(-1, 2)
    result.repeat_word = token(model, word_id)
    result.repeat_sites = sites
    result.repeat_effects = ((m_repeat - values[:, 0]) / (m_repeat - m_natural))[:, None]
    result.repeat_placebo = ((m_repeat - values[:, 1]) / (m_repeat - m_natural))[:, None]
