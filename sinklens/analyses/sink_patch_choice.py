"""Which patch keeps repeated tokens out of the sink: the paper's clamp and its variants, measured.

Paper (Listing 1): clamp the sink neuron's *up-projection* output on every position after the first
to the value the first token after the start had. In a gated MLP the neuron's activation is
``act(gate) * up``; clamping ``up`` alone leaves the gate free, so a repeated token that drives the
gate up can still drive the neuron. This module measures, on the model at hand, every combination
of hook point (``up``, ``gate``, ``post``: the activation after the gate) and value (the first token
after the start's, or a calibrated mean over natural text):

* the largest hidden-state norm of a repeated word at the sink layer (over the word list), over the
  typical norm. The target is 3x typical (our choice): the sink regime starts near 0.9 of the way,
  in log space, from typical to the first token's norm (about 100x typical or more on the models
  measured), so a repeated token within a few times typical is far from it;
* the first token's norm at the sink layer, which the patch must leave unchanged (within 1%);
* KL(original || patched) of the next-token distributions on natural text, mean over positions.

The chosen patch is the paper's when it meets the target; else the candidate that meets it with the
smallest KL; else the one that comes closest, and the choice says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.norms import resid_norms
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import run_cache
from sinklens.run.sink_patch import HOOKS, VALUES, SinkPatch, patch_for
from sinklens.run.tokens import Token, repeated_tokens
from sinklens.settings import require_words

TARGET_RATIO = 3.0
FIRST_TOKEN_TOLERANCE = 0.01
PAPER = ("up", "first_after_start")


def kl_divergence(
    original: Float[torch.Tensor, "batch pos d_vocab"],
    patched: Float[torch.Tensor, "batch pos d_vocab"],
) -> Float[torch.Tensor, "batch pos"]:
    """KL(original || patched) of the next-token distributions at every position, in nats."""
    log_p, log_q = original.float().log_softmax(-1), patched.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def calibrated_values(
    model: TransformerBridge, text: Int[torch.Tensor, "1 pos"], neurons, hook: str
) -> list[float]:
    """Each neuron's mean at ``hook`` over the later tokens of natural text."""
    names = {layer: get_act_name(HOOKS[hook], layer) for layer, _ in neurons}
    cache = run_cache(model, text, sorted(set(names.values())))
    return [float(cache[names[layer]][0, 1:, n].mean()) for layer, n in neurons]


@dataclass
class SinkPatchChoice(Result):
    """Each candidate patch's effect on repeats, on the first token and on natural text, and the choice."""

    candidates: list[SinkPatch]
    layer: int  # where the norms are measured: the (last) sink layer
    words: list[Token]
    first_token: int  # the token id at position 0 of every measured sequence
    n_repeats: int
    typical_norm: float
    first_token_norm: float  # intact
    repeat_max_norm: float  # intact, over the words
    repeat_max: Float[torch.Tensor, " candidate"]
    first_norm: Float[torch.Tensor, " candidate"]
    kl: Float[torch.Tensor, " candidate"]
    target_ratio: float
    chosen: int
    reason: str

    @property
    def patch(self) -> SinkPatch:
        """The chosen patch, with the measurements that chose it in its ``selection``."""
        return dataclasses.replace(self.candidates[self.chosen], selection=self.summary())

    def meets_target(self) -> list[bool]:
        first_ok = (
            self.first_norm - self.first_token_norm
        ).abs() <= FIRST_TOKEN_TOLERANCE * self.first_token_norm
        repeats_ok = self.repeat_max <= self.target_ratio * self.typical_norm
        return (first_ok & repeats_ok).tolist()

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "hook": [c.hook for c in self.candidates],
                "value": [c.value for c in self.candidates],
                "repeat_max_norm": self.repeat_max.tolist(),
                "repeat_max_over_typical": (self.repeat_max / self.typical_norm).tolist(),
                "first_token_norm_change": (
                    (self.first_norm - self.first_token_norm) / self.first_token_norm
                ).tolist(),
                "kl_natural_text": self.kl.tolist(),
                "meets_target": self.meets_target(),
                "chosen": [i == self.chosen for i in range(len(self.candidates))],
            }
        )

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        labels = [f"{h} / {v}" for h, v in zip(frame["hook"], frame["value"])]
        fig = go.Figure(
            go.Bar(
                x=labels,
                y=frame["repeat_max_over_typical"],
                marker_color=["firebrick" if c else "steelblue" for c in frame["chosen"]],
            )
        )
        fig.add_hline(
            y=self.target_ratio,
            line_dash="dash",
            annotation_text=f"target {self.target_ratio:g}x typical",
        )
        fig.add_hline(
            y=self.repeat_max_norm / self.typical_norm, line_dash="dot", annotation_text="no patch"
        )
        fig.update_layout(
            title="Largest repeated-token norm at the sink layer with each patch",
            xaxis_title="hook / value",
            yaxis_title="norm / typical",
            yaxis_type="log",
        )
        return fig

    def summary(self) -> dict:
        return {
            "chosen": {
                "hook": self.candidates[self.chosen].hook,
                "value": self.candidates[self.chosen].value,
            },
            "reason": self.reason,
            "layer": self.layer,
            "words": [w.text for w in self.words],
            "word_ids": [w.id for w in self.words],
            "first_token": self.first_token,
            "n_repeats": self.n_repeats,
            "typical_norm": self.typical_norm,
            "first_token_norm": self.first_token_norm,
            "repeat_max_norm_unpatched": self.repeat_max_norm,
            "target_ratio": self.target_ratio,
            "candidates": self.to_frame().to_dict("records"),
        }


@torch.no_grad()
def choose_patch(
    model: TransformerBridge,
    reference: Int[torch.Tensor, "1 pos"],
    neurons: Sequence[tuple[int, int]],
    words: Sequence[Token],
    *,
    n_repeats: int = 1000,
    hooks: Sequence[str] = tuple(HOOKS),
    values: Sequence[str] = VALUES,
    target_ratio: float = TARGET_RATIO,
) -> SinkPatchChoice:
    """Measure each patch of ``neurons`` (hook x value) on ``words`` repeated after ``reference``'s first
    token and on ``reference`` (``[first] + natural text``), and choose one."""
    if not neurons:
        raise SinklensError(
            "there are no sink neurons to patch", "find them first (sinklens table)"
        )
    require_words(words)
    layer = max(l for l, _ in neurons)
    first = int(reference[0, 0])
    runs = [repeated_tokens(model, w.id, n_repeats, first=first) for w in words]
    text = resid_norms(model, reference, layer)[0]
    typical, first_norm = float(text[1:].mean()), float(text[0])
    repeat_max = max(float(resid_norms(model, r, layer)[0, 1:].max()) for r in runs)
    original = model(reference)
    candidates = [
        patch_for(
            model,
            neurons,
            hook=hook,
            value=value,
            values=calibrated_values(model, reference, neurons, hook)
            if value == "calibrated"
            else None,
        )
        for hook in hooks
        for value in values
    ]
    maxima, firsts, kls = [], [], []
    for candidate in candidates:
        with candidate.installed(model):
            maxima.append(max(float(resid_norms(model, r, layer)[0, 1:].max()) for r in runs))
            firsts.append(float(resid_norms(model, reference, layer)[0, 0]))
            kls.append(float(kl_divergence(original, model(reference))[0].mean()))
    result = SinkPatchChoice(
        candidates,
        layer,
        list(words),
        first,
        n_repeats,
        typical,
        first_norm,
        repeat_max,
        torch.tensor(maxima),
        torch.tensor(firsts),
        torch.tensor(kls),
        target_ratio,
        0,
        "",
    )
    result.chosen, result.reason = _choose(result)
    return result


def _choose(result: SinkPatchChoice) -> tuple[int, str]:
    ok = result.meets_target()
    labels = [(c.hook, c.value) for c in result.candidates]
    ratio = (result.repeat_max / result.typical_norm).tolist()
    if len(labels) == 1:
        verdict = "meets" if ok[0] else "misses"
        return 0, (
            f"the only candidate asked for ({labels[0][0]} / {labels[0][1]}); it {verdict} the target, repeats at "
            f"{ratio[0]:.2f}x typical"
        )
    paper = labels.index(PAPER) if PAPER in labels else None
    if paper is not None and ok[paper]:
        return paper, (
            f"the paper's clamp (up-projection, first token after the start) keeps repeats at "
            f"{ratio[paper]:.2f}x typical, within {result.target_ratio:g}x, with the first token unchanged"
        )
    paper_note = (
        ""
        if paper is None
        else (
            f"the paper's clamp leaves repeats at {ratio[paper]:.2f}x typical (the "
            "gate stays free to grow); "
        )
    )
    passing = [i for i, good in enumerate(ok) if good]
    if passing:
        best = min(passing, key=lambda i: float(result.kl[i]))
        return best, (
            f"{paper_note}{labels[best][0]} / {labels[best][1]} keeps them at {ratio[best]:.2f}x, within "
            f"{result.target_ratio:g}x, with the smallest KL on natural text ({float(result.kl[best]):.2e})"
        )
    best = min(range(len(labels)), key=lambda i: ratio[i])
    return best, (
        f"{paper_note}no candidate keeps repeats within {result.target_ratio:g}x typical; "
        f"{labels[best][0]} / {labels[best][1]} comes closest ({ratio[best]:.2f}x): the rest of the repeats' "
        "norm does not come from the sink neurons"
    )
