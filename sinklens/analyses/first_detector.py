"""First-detector neurons (paper Fig. 4): MLP neurons whose value tells the first token from later ones.

Paper claim (Sec. 4.3, Fig. 4): on Llama-2 the gate of neuron 912 in the first MLP takes values near
0.1 on the first token of short chunks of text and near -1.6 and -2.0 on the second and third, so
one threshold separates them almost perfectly: after the first attention layer, "first" is readable
from a single neuron. The data, as in the authors' notebook: non-overlapping 3-word chunks of Tiny
Shakespeare run *without* a first special token, so position 0 holds an ordinary word; a neuron's
value is its gate pre-activation (``blocks.L.mlp.hook_pre``) at positions 0, 1 and 2. One change,
on by default: each chunk is encoded after a space, so that its first word is the same kind of
token as the others (see :func:`word_chunks`).

The notebook looked only at layer 0 (the layer before Llama-2's sink layer) and ranked by the mean
of (position 0 - position 1). Here every MLP layer *before* the sink layer is searched (a model
whose sink layer is deep may build "first" later; the sink layer itself is left out, since there
the first token's sink neurons give it away), and neurons are ranked by how well one threshold
separates position 0 from positions 1 and 2: the area under the ROC curve, in whichever direction separates (0.5: no separation, 1:
perfect). The result also records the top neurons' values along a repeated sequence, to show
whether the repeats drift towards the first token's values as they grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import check_layer, run_cache
from sinklens.run.interventions import Neuron
from sinklens.run.tokens import encode

PAPER_SAMPLES = 1000  # the notebook's 1000 chunks of 3 words
TOP_NEURONS = 10


def word_chunks(
    model: TransformerBridge,
    text: str,
    *,
    words: int = 3,
    n_chunks: int = PAPER_SAMPLES,
    n_tokens: int = 3,
    leading_space: bool = True,
) -> Int[torch.Tensor, "chunk pos"]:
    """The first ``n_tokens`` tokens of non-overlapping ``words``-word chunks of ``text``, no first special
    token (chunks of fewer tokens are left out).

    With ``leading_space`` (the default) each chunk is encoded after a space, so its first word has the
    same mid-text form as the others: otherwise position 0 holds the only word without its leading
    space, a difference of token that a probe on the embeddings alone picks up, and "first" would be
    read from spelling, not from position. ``leading_space=False`` builds the notebook's chunks."""
    split = text.replace("\n", " ").split()
    space = " " if leading_space else ""
    chunks = (
        space + " ".join(split[i : i + words]) for i in range(0, len(split) - words + 1, words)
    )
    rows = [ids[:n_tokens] for ids in (encode(model, c) for c in chunks) if len(ids) >= n_tokens]
    return torch.tensor(rows[:n_chunks], dtype=torch.long).reshape(-1, n_tokens)


def _separation(first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of first (positive) vs later values, per column (Mann-Whitney U / n1 n2):
    the rank sum of the first values in each column's ascending order (one sort per column)."""
    n1, n2 = first.shape[0], later.shape[0]
    order = (
        torch.cat([first, later]).T.contiguous().argsort(dim=-1)
    )  # [column, rank]: which row sits there
    ranks = torch.arange(1, n1 + n2 + 1, dtype=torch.float64)
    rank_sum = torch.where(order < n1, ranks, 0.0).sum(-1)
    return ((rank_sum - n1 * (n1 + 1) / 2) / (n1 * n2)).float()


@dataclass
class FirstDetectorNeurons(Result):
    """Ranked neurons by how well they separate the first position from the next two."""

    layers: list[int]
    n_chunks: int
    auc: Float[torch.Tensor, "layer d_mlp"]  # P(value at 0 > value at a later position)
    means: Float[torch.Tensor, "position layer d_mlp"]  # mean value at positions 0, 1, 2
    top: list[Neuron]
    top_values: Float[
        torch.Tensor, "neuron chunk position"
    ]  # the top neurons' values on every chunk
    repeat_label: str
    repeat_values: Float[torch.Tensor, "neuron pos"]  # along [first] + [word] * n

    def __post_init__(self) -> None:
        self.top = [(layer, index) for layer, index in self.top]

    @property
    def separation(self) -> Float[torch.Tensor, "layer d_mlp"]:
        """The AUC in the direction that separates: 0.5 none, 1 perfect."""
        return torch.maximum(self.auc, 1 - self.auc)

    def to_frame(self) -> pd.DataFrame:
        """The top neurons: separation, direction and the mean value at positions 0, 1, 2."""
        rows = []
        for layer, neuron in self.top:
            i = self.layers.index(layer)
            rows.append(
                {
                    "layer": layer,
                    "neuron": neuron,
                    "separation": float(self.separation[i, neuron]),
                    "first_is_higher": bool(self.auc[i, neuron] >= 0.5),
                    **{f"mean_position_{p}": float(self.means[p, i, neuron]) for p in range(3)},
                }
            )
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """The paper's Fig. 4 for the best neuron, and the top neurons along the repeated sequence."""
        layer, neuron = self.top[0]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                f"First-detector neuron L{layer}.{neuron}",
                f"Along {self.repeat_label}",
            ],
        )
        for p, name in enumerate(("first token", "second token", "third token")):
            fig.add_histogram(
                x=self.top_values[0, :, p].tolist(), name=name, opacity=0.6, row=1, col=1
            )
        for (l, n), values in zip(self.top[:5], self.repeat_values[:5]):
            fig.add_scatter(y=values.tolist(), mode="lines", name=f"L{l}.{n}", row=1, col=2)
        fig.update_layout(
            barmode="overlay", title="Neurons that tell the first token from later ones"
        )
        fig.update_xaxes(title_text="Value of the neuron (hook_pre)", row=1, col=1)
        fig.update_yaxes(title_text="Number of inputs", row=1, col=1)
        fig.update_xaxes(title_text="Position (0: the first token)", row=1, col=2)
        return fig

    def best_per_layer(self) -> list[dict]:
        """Per layer searched: its best-separating neuron and how many neurons separate almost perfectly (> 0.99)."""
        best = self.separation.max(dim=-1)
        return [
            {
                "layer": layer,
                "neuron": int(best.indices[i]),
                "separation": float(best.values[i]),
                "n_above_0.99": int((self.separation[i] > 0.99).sum()),
            }
            for i, layer in enumerate(self.layers)
        ]

    def summary(self) -> dict:
        return {
            "layers": self.layers,
            "n_chunks": self.n_chunks,
            "repeat_input": self.repeat_label,
            "neurons": self.to_frame().to_dict("records"),
            "per_layer": self.best_per_layer(),
        }


def first_detector_neurons(
    model: TransformerBridge,
    text: str,
    repeat: Int[torch.Tensor, "1 pos"],
    *,
    sink_layer: int,
    n_chunks: int = PAPER_SAMPLES,
    top: int = TOP_NEURONS,
    leading_space: bool = True,
    repeat_label: str = "",
) -> FirstDetectorNeurons:
    """Rank the neurons of the MLP layers before ``sink_layer`` (layer 0 if it is the sink layer) on
    3-word chunks of ``text`` (no first special token); record the top ones along ``repeat``
    (``[first] + [word] * n``)."""
    layers = list(range(max(1, check_layer(model, sink_layer))))
    chunks = word_chunks(model, text, n_chunks=n_chunks, leading_space=leading_space)
    if chunks.shape[0] < 20:
        raise SinklensError(
            f"the text gives {chunks.shape[0]} three-word chunks of 3+ tokens, too few to rank neurons",
            "pass a longer natural text (the paper used 1000 chunks)",
        )
    names = [get_act_name("pre", layer) for layer in layers]
    cache = run_cache(model, chunks, names)
    values = torch.stack([cache[n].cpu() for n in names])  # [layer, chunk, pos, d_mlp]
    n_layers, _, _, d_mlp = values.shape
    flat = values.permute(1, 2, 0, 3).reshape(chunks.shape[0], 3, n_layers * d_mlp)
    auc = _separation(flat[:, 0], flat[:, 1:].reshape(-1, n_layers * d_mlp)).view(n_layers, d_mlp)
    means = values.mean(dim=1).permute(1, 0, 2)  # [pos, layer, d_mlp]
    separation = torch.maximum(auc, 1 - auc).flatten()
    gap = (means[0] - means[1:].mean(0)).abs().flatten() / (values.std(dim=(1, 2)).flatten() + 1e-8)
    order = sorted(
        range(separation.numel()), key=lambda i: (-float(separation[i]), -float(gap[i]))
    )[:top]
    chosen = [(layers[i // d_mlp], i % d_mlp) for i in order]
    top_values = torch.stack([values[layers.index(l), :, :, n] for l, n in chosen])
    along = run_cache(model, repeat, sorted({names[layers.index(l)] for l, _ in chosen}))
    repeat_values = torch.stack([along[get_act_name("pre", l)][0, :, n].cpu() for l, n in chosen])
    return FirstDetectorNeurons(
        layers, chunks.shape[0], auc, means, chosen, top_values, repeat_label, repeat_values
    )
