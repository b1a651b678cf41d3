"""Convergence of a long run to the lone token (paper Theorem 4.1, Fig. 5).

Paper claim (Theorem 4.1): with a bounded positional encoding (RoPE is one), the first attention
layer's output at the end of ``prefix + [x] * n`` converges, as n grows, to its output on ``x``
alone. The reason is softmax leakage: every repeat has the same value vector, and the attention
mass left for the prefix shrinks as the repeats multiply. So the first layer cannot tell a long
run of ``x`` from a lone, first ``x``.

Measured, per token, at every repeated position n: the L2 distance and the cosine distance
(1 - cosine similarity) between the output on ``[first] + prefix + [x] * n`` and on ``[x]`` alone
(no first special token, as the authors' notebook), at ``blocks.0.hook_attn_out`` (the attention
output, what the theorem is about) and ``blocks.1.hook_resid_pre`` (the whole first block's
output, what the notebook plotted). The decay rate is the slope of log distance against log n
(scipy's linear regression, with its 95% interval), fitted from ``fit_from`` repeats on.

Beside it, the rate softmax leakage predicts. At the first layer the repeats share one value
vector, so the attention output at repeat n differs from the lone token's only through the mass
``m(n)`` the heads still put on the first token and the prefix: the distance is about proportional
to ``m(n)``. With scores that do not grow with n, ``m(n)`` falls as ``1/n`` (slope -1); the
measured slope of ``m(n)`` itself is reported, so the two can be compared on the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from scipy import stats
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import run_cache
from sinklens.run.tokens import (
    FirstToken,
    Token,
    encode,
    first_token,
    word_token,
    word_token_ids,
)
from sinklens.settings import require_words

PAPER_WORDS = ("cat", "dog", "the", "bla")
PAPER_PREFIX = "some prefix: "
PAPER_REPEATS = 500
FIT_FROM = 10
HOOKS = (get_act_name("attn_out", 0), get_act_name("resid_pre", 1))
LEAKAGE_SLOPE = -1.0


def _slope(distances: torch.Tensor, fit_from: int) -> tuple[float, float, float]:
    """Slope of log distance on log repeat count from ``fit_from`` repeats on, with its 95% interval."""
    n = np.arange(1, len(distances) + 1)
    keep = (n >= fit_from) & (distances.numpy() > 0)
    if keep.sum() < 3:
        return float("nan"), float("nan"), float("nan")
    fit = stats.linregress(np.log(n[keep]), np.log(distances.numpy()[keep]))
    half = stats.t.ppf(0.975, keep.sum() - 2) * fit.stderr
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half)


@dataclass
class Convergence(Result):
    """Per token and hook: distances to the lone token along the repeats, and the leaked attention mass."""

    words: list[Token]
    prefix: str
    hooks: list[str]
    l2: Float[torch.Tensor, "word hook repeat"]  # repeat index 0 is the first repeat
    cosine: Float[torch.Tensor, "word hook repeat"]  # 1 - cosine similarity
    leaked: Float[
        torch.Tensor, "word repeat"
    ]  # attention mass on the first token and the prefix, mean over heads
    fit_from: int

    def slopes(self) -> dict[str, dict]:
        """Per word: the log-log slope of the L2 distance at each hook and of the leaked mass, with intervals."""
        out = {}
        for w, word in enumerate(self.words):
            entry = {
                hook: dict(
                    zip(("slope", "ci_low", "ci_high"), _slope(self.l2[w, h], self.fit_from))
                )
                for h, hook in enumerate(self.hooks)
            }
            entry["leaked_attention"] = dict(
                zip(("slope", "ci_low", "ci_high"), _slope(self.leaked[w], self.fit_from))
            )
            out[word.text] = entry
        return out

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for word, entry in self.slopes().items():
            for what, fit in entry.items():
                rows.append({"word": word, "measure": what, **fit})
        frame = pd.DataFrame(rows)
        frame["predicted_by_leakage"] = LEAKAGE_SLOPE
        return frame

    def plot(self) -> go.Figure:
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                f"L2 distance to the lone token ({self.hooks[0]})",
                "Attention mass on the first token and prefix",
            ],
        )
        n = list(range(1, self.l2.shape[-1] + 1))
        for w, word in enumerate(self.words):
            fig.add_scatter(
                x=n,
                y=self.l2[w, 0].tolist(),
                mode="lines",
                name=repr(word.text),
                legendgroup=str(w),
                row=1,
                col=1,
            )
            fig.add_scatter(
                x=n,
                y=self.leaked[w].tolist(),
                mode="lines",
                name=repr(word.text),
                legendgroup=str(w),
                showlegend=False,
                row=1,
                col=2,
            )
        fig.update_xaxes(type="log", title_text="Repeats")
        fig.update_yaxes(type="log")
        fig.update_layout(title=f"Attn0({self.prefix!r} + x * n) -> Attn0(x) (Fig. 5)")
        return fig

    def summary(self) -> dict:
        return {
            "prefix": self.prefix,
            "hooks": self.hooks,
            "fit_from": self.fit_from,
            "predicted_slope": LEAKAGE_SLOPE,
            "words": [
                {
                    "word": word,
                    "slope": entry[self.hooks[0]]["slope"],
                    **{k: v for k, v in entry.items()},
                }
                for word, entry in self.slopes().items()
            ],
        }


def convergence(
    model: TransformerBridge,
    words: Sequence[str | int] | None = None,
    *,
    first: FirstToken = "bos",
    prefix: str = PAPER_PREFIX,
    n_repeats: int = PAPER_REPEATS,
    fit_from: int = FIT_FROM,
) -> Convergence:
    """Distances between the first layer's output on ``[first] + prefix + [word] * n`` and on ``[word]``.

    ``words`` default to the notebook's cat, dog, the, bla, those of them that are one token for this
    tokenizer; a word you pass that is several tokens is an error (pass token ids to use any token).
    """
    if words is None:
        words = [w for w in PAPER_WORDS if len(word_token_ids(model, w)) == 1]
    require_words(words)
    if n_repeats <= fit_from + 2:
        raise SinklensError(
            f"{n_repeats} repeats leave nothing to fit from repeat {fit_from}",
            f"pass n_repeats above {fit_from + 2}",
        )
    tokens = [
        Token(w, model.tokenizer.decode([w])) if isinstance(w, int) else word_token(model, w)
        for w in words
    ]
    start = first_token(model, first).id
    prefix_ids = encode(model, prefix) if prefix else []
    n_prefix = 1 + len(prefix_ids)
    names = [*HOOKS, get_act_name("pattern", 0)]
    l2, cosine, leaked = [], [], []
    for word in tokens:
        run = torch.tensor([[start, *prefix_ids, *[word.id] * n_repeats]])
        lone = run_cache(model, torch.tensor([[word.id]]), list(HOOKS))
        cache = run_cache(model, run, names)
        distances, cosines = [], []
        for hook in HOOKS:
            reps = cache[hook][0, n_prefix:].cpu()
            alone = lone[hook][0, 0].cpu()
            distances.append((reps - alone).norm(dim=-1))
            cosines.append(1 - torch.nn.functional.cosine_similarity(reps, alone[None], dim=-1))
        l2.append(torch.stack(distances))
        cosine.append(torch.stack(cosines))
        pattern = cache[get_act_name("pattern", 0)][0].cpu()  # [head, query, key]
        leaked.append(pattern[:, n_prefix:, :n_prefix].sum(-1).mean(0))
    return Convergence(
        tokens,
        prefix,
        list(HOOKS),
        torch.stack(l2),
        torch.stack(cosine),
        torch.stack(leaked),
        fit_from,
    )
