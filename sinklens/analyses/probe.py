"""A linear probe for "this token is first", per layer, and what it says about repeated tokens.

Paper claim (Sec. 4.3): after the first attention layer the first token is separable from the
others (their Fig. 4 shows one neuron doing it), and a long run of one token is taken for a first
token. The paper trained no probe; this module does, as a direct test of both halves:

* **Training**: natural text cut into non-overlapping 3-word chunks, run without a first special
  token so that position 0 holds an ordinary word (the data of Fig. 4), each encoded after a space
  so that the first word's token has the same form as the others'. At each layer, from the
  embedding (``blocks.0.hook_resid_pre``) to the sink layer (``blocks.L.hook_resid_post``), a
  logistic regression (scikit-learn, standardised features, classes balanced, seeded) tells
  position 0 (label 1) from positions 1 and 2 (label 0). Chunks are split into training and
  held-out sets, so no chunk is seen in both. The embedding layer is the control: it carries no
  position, so its accuracy is what token identity alone gives.
* **Repeated sequences**: the probe is applied to every position of ``[first] + [word] * n``; the
  result is the share of repeated positions called "first", per range of repeat counts.

The fitted probe (weights, bias, standardisation per layer) is stored as tensors, so it saves and
loads with the result and predicts without scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._stats import proportion_interval
from sinklens.analyses.first_detector import PAPER_SAMPLES, word_chunks
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import check_layer, run_cache

MIN_CHUNKS = 40
HELD_OUT = 0.25
REPEAT_BINS = (1, 10, 100, 1000, 10_000)


def probe_hook(layer: int | None) -> str:
    """The residual stream a probe reads: the embedding for ``None``, else the output of ``layer``."""
    return get_act_name("resid_pre", 0) if layer is None else get_act_name("resid_post", layer)


@dataclass
class FirstTokenProbe(Result):
    """A "first token" probe per layer, its held-out accuracy, and its verdicts on repeated tokens."""

    layers: list[int | None]  # None: the embedding
    weights: Float[torch.Tensor, "layer d_model"]  # on standardised features
    bias: Float[torch.Tensor, " layer"]
    mean: Float[torch.Tensor, "layer d_model"]
    scale: Float[torch.Tensor, "layer d_model"]
    accuracy: Float[torch.Tensor, " layer"]  # held out
    balanced_accuracy: Float[torch.Tensor, " layer"]
    n_train: int
    n_test: int
    seed: int
    repeat_label: str
    repeat_first: Float[torch.Tensor, "layer pos"]  # 1 where the probe calls the position first

    def predict(
        self, features: Float[torch.Tensor, "... d_model"], layer_index: int
    ) -> torch.Tensor:
        """1 where the probe of ``layers[layer_index]`` calls the token first."""
        z = (features.float().cpu() - self.mean[layer_index]) / self.scale[layer_index]
        return ((z @ self.weights[layer_index] + self.bias[layer_index]) > 0).float()

    def first_share_on_repeats(self) -> list[dict]:
        """Per layer and range of repeat counts, the share of repeated positions called first (Wilson 95%)."""
        rows = []
        n = self.repeat_first.shape[1] - 1
        for i, layer in enumerate(self.layers):
            for low, high in zip(REPEAT_BINS, REPEAT_BINS[1:]):
                if low > n:
                    break
                calls = self.repeat_first[i, low : min(high, n + 1)]
                share, ci_low, ci_high = proportion_interval(int(calls.sum()), calls.numel())
                rows.append(
                    {
                        "layer": _name(layer),
                        "repeats": f"{low}-{min(high, n + 1) - 1}",
                        "n": calls.numel(),
                        "first_share": share,
                        "ci_low": ci_low,
                        "ci_high": ci_high,
                    }
                )
        return rows

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "layer": [_name(l) for l in self.layers],
                "accuracy": self.accuracy.tolist(),
                "balanced_accuracy": self.balanced_accuracy.tolist(),
                "first_share_on_repeats": self.repeat_first[:, 1:].mean(-1).tolist(),
            }
        )
        frame["n_train"], frame["n_test"] = self.n_train, self.n_test
        return frame

    def plot(self) -> go.Figure:
        names = [_name(l) for l in self.layers]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=["Held-out accuracy", f"Called first, along {self.repeat_label}"],
        )
        fig.add_scatter(
            x=names,
            y=self.balanced_accuracy.tolist(),
            mode="lines+markers",
            name="balanced accuracy",
            row=1,
            col=1,
        )
        window = max(1, self.repeat_first.shape[1] // 50)
        for name, calls in zip(names, self.repeat_first):
            smoothed = torch.nn.functional.avg_pool1d(calls[1:][None, None], window, window)[0, 0]
            fig.add_scatter(
                x=(torch.arange(len(smoothed)) * window + 1).tolist(),
                y=smoothed.tolist(),
                mode="lines",
                name=f"layer {name}",
                row=1,
                col=2,
            )
        fig.update_yaxes(range=[0, 1.02])
        fig.update_xaxes(title_text="Layer", row=1, col=1)
        fig.update_xaxes(title_text="Repeats", row=1, col=2)
        fig.update_layout(title="A linear probe for 'first token'")
        return fig

    def summary(self) -> dict:
        return {
            "layers": [_name(l) for l in self.layers],
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
            "repeat_input": self.repeat_label,
            "per_layer": [
                {
                    "layer": _name(l),
                    "accuracy": float(a),
                    "balanced_accuracy": float(b),
                    "first_share_on_repeats": float(s),
                }
                for l, a, b, s in zip(
                    self.layers,
                    self.accuracy,
                    self.balanced_accuracy,
                    self.repeat_first[:, 1:].mean(-1),
                )
            ],
            "first_share_by_repeats": self.first_share_on_repeats(),
        }


def _name(layer: int | None) -> str:
    return "embed" if layer is None else str(layer)


def train_first_token_probe(
    model: TransformerBridge,
    text: str,
    repeat: Int[torch.Tensor, "1 pos"],
    *,
    max_layer: int,
    layers: Sequence[int | None] | None = None,
    n_chunks: int = PAPER_SAMPLES,
    seed: int = 0,
    leading_space: bool = True,
    repeat_label: str = "",
) -> FirstTokenProbe:
    """Fit a probe per layer (default: the embedding and every layer up to ``max_layer``, the sink
    layer) on 3-word chunks of ``text``, and apply it to ``repeat``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    max_layer = check_layer(model, max_layer)
    layers = [None, *range(max_layer + 1)] if layers is None else list(layers)
    for layer in layers:
        if layer is not None and check_layer(model, layer) > max_layer:
            raise SinklensError(
                f"layer {layer} is past the sink layer {max_layer}",
                f"probe layers up to {max_layer}; past the sink layer the first token's norm alone "
                "gives it away",
            )
    chunks = word_chunks(model, text, n_chunks=n_chunks, leading_space=leading_space)
    if chunks.shape[0] < MIN_CHUNKS:
        raise SinklensError(
            f"the text gives {chunks.shape[0]} three-word chunks, too few to train a probe "
            f"(at least {MIN_CHUNKS})",
            "pass a longer natural text",
        )
    train, test = train_test_split(
        torch.arange(chunks.shape[0]).numpy(), test_size=HELD_OUT, random_state=seed
    )
    labels = torch.tensor([1, 0, 0])
    names = sorted({probe_hook(layer) for layer in layers})
    cache = run_cache(model, chunks, names)
    along = run_cache(model, repeat, names)
    weights, biases, means, scales, accuracy, balanced, calls = [], [], [], [], [], [], []
    for layer in layers:
        features = cache[probe_hook(layer)].cpu()  # [chunk, pos, d_model]
        x_train, x_test = (
            features[train].flatten(0, 1).numpy(),
            features[test].flatten(0, 1).numpy(),
        )
        y_train, y_test = labels.repeat(len(train)).numpy(), labels.repeat(len(test)).numpy()
        scaler = StandardScaler().fit(x_train)
        fit = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
        fit.fit(scaler.transform(x_train), y_train)
        predicted = fit.predict(scaler.transform(x_test))
        accuracy.append(float((predicted == y_test).mean()))
        balanced.append(float(balanced_accuracy_score(y_test, predicted)))
        weights.append(torch.tensor(fit.coef_[0], dtype=torch.float32))
        biases.append(float(fit.intercept_[0]))
        means.append(torch.tensor(scaler.mean_, dtype=torch.float32))
        scales.append(torch.tensor(scaler.scale_, dtype=torch.float32))
        z = (along[probe_hook(layer)][0].cpu() - means[-1]) / scales[-1]
        calls.append(((z @ weights[-1] + biases[-1]) > 0).float())
    return FirstTokenProbe(
        layers,
        torch.stack(weights),
        torch.tensor(biases),
        torch.stack(means),
        torch.stack(scales),
        torch.tensor(accuracy),
        torch.tensor(balanced),
        len(train),
        len(test),
        seed,
        repeat_label,
        torch.stack(calls),
    )
