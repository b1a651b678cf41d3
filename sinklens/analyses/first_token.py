"""Which token the model turns into a sink at position 0.

Whether position 0 becomes an attention sink is a fact about the model, not about its tokenizer.
Some tokenizers prepend a special token that the model never turns into a sink, while an
ordinary text token (or the end-of-turn token) at position 0 does; Gemma-3 makes a sink only of
its ``<bos>``. So before looking for the sink's layer and neurons, sinklens measures the
candidates for position 0 on the same natural text: the tokenizer's BOS, its EOS and
end-of-turn tokens, and the text's own first token.

A candidate *becomes a sink* when its hidden-state norm (``blocks.L.hook_resid_post``) at some
layer ``0..max_layer-1`` is at least ``min_ratio`` times the typical norm (the mean over the
later tokens of the text at that layer). The default, 10x, asks for an order of magnitude: the
paper's models put their first token 90-1000x above typical, while a first token that is merely
unusual sits within a few times of it. The choice: the tokenizer's BOS when it becomes a sink,
else the candidate with the largest ratio among those that do. When none does, the result says
"no sink found" and names the token that later measurements use anyway (the BOS if there is
one, else the candidate with the largest ratio), so the numbers can still be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from sinklens.analyses._figures import with_reference_line
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.run.cache import act_name, l2_norms, run_cache
from sinklens.run.tokens import (
    FirstToken,
    Token,
    bos_token_id,
    encode,
    first_token,
    token,
    vocabulary_id,
)
from sinklens.settings import AUTO, MIN_SINK_RATIO, PAPER_MAX_LAYER

END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass
class FirstTokenChoice(Result):
    """Per candidate for position 0: its norm and the typical norm per layer, and the choice made."""

    candidates: list[Token]
    roles: list[str]  # why each is a candidate: "bos", "eos", "end of turn", "text", "given"
    first_norms: Float[torch.Tensor, "candidate layer"]
    typical_norms: Float[torch.Tensor, "candidate layer"]
    min_ratio: float
    chosen: int  # index into candidates
    reason: str

    @property
    def ratios(self) -> Float[torch.Tensor, "candidate layer"]:
        return self.first_norms / self.typical_norms

    @property
    def peak_ratios(self) -> list[float]:
        return self.ratios.max(dim=-1).values.tolist()

    @property
    def peak_layers(self) -> list[int]:
        return self.ratios.argmax(dim=-1).tolist()

    @property
    def is_sink(self) -> list[bool]:
        return [ratio >= self.min_ratio for ratio in self.peak_ratios]

    @property
    def token(self) -> Token:
        """The chosen first token."""
        return self.candidates[self.chosen]

    @property
    def sink_found(self) -> bool:
        """Whether the chosen token becomes a sink."""
        return self.is_sink[self.chosen]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "token": [c.text for c in self.candidates],
                "token_id": [c.id for c in self.candidates],
                "role": self.roles,
                "peak_ratio": self.peak_ratios,
                "peak_layer": self.peak_layers,
                "becomes_sink": self.is_sink,
                "chosen": [i == self.chosen for i in range(len(self.candidates))],
            }
        )

    def plot(self) -> go.Figure:
        fig = go.Figure()
        for candidate, role, ratios in zip(self.candidates, self.roles, self.ratios):
            fig.add_scatter(
                y=ratios.tolist(), mode="lines+markers", name=f"{candidate.text!r} ({role})"
            )
        return with_reference_line(
            fig,
            self.min_ratio,
            f"sink: {self.min_ratio:g}x typical",
            "First-token norm / typical norm per layer",
            "Layer",
            "||blocks.L.hook_resid_post|| / typical",
        )

    def summary(self) -> dict:
        return {
            "chosen": {"id": self.token.id, "text": self.token.text},
            "sink_found": self.sink_found,
            "reason": self.reason,
            "min_ratio": self.min_ratio,
            "candidates": self.to_frame().to_dict("records"),
        }


def _candidates(
    model: TransformerBridge, text_ids: list[int], given: FirstToken | None
) -> list[tuple[Token, str]]:
    tokenizer = model.tokenizer
    found: dict[int, list[str]] = {}
    if given is not None and given != AUTO:
        found[first_token(model, given).id] = ["given"]
    ids = [(bos_token_id(model), "bos"), (tokenizer.eos_token_id, "eos")]
    turns = [vocabulary_id(model, t) for t in END_OF_TURN_TOKENS]
    ids += [(turn, "end of turn") for turn in turns if turn is not None]
    ids.append((text_ids[0], "text"))
    for (
        token_id,
        role,
    ) in ids:  # special tokens past the model's embedding matrix cannot be candidates
        if (
            token_id is not None
            and token_id < model.cfg.d_vocab
            and role not in found.setdefault(token_id, [])
        ):
            found[token_id].append(role)
    return [(token(model, token_id), "/".join(roles)) for token_id, roles in found.items()]


def choose_first_token(
    model: TransformerBridge,
    text: str,
    *,
    given: FirstToken | None = None,
    max_layer: int | None = PAPER_MAX_LAYER,
    min_ratio: float = MIN_SINK_RATIO,
    max_tokens: int = 512,
) -> FirstTokenChoice:
    """Measure the candidates for position 0 on ``text`` and choose the first token.

    ``given`` (a first-token spec other than ``"auto"``) is measured too and always chosen, so
    results can say whether the user's choice is a sink. ``text`` is cut to ``max_tokens`` (and to
    the model's context).
    """
    text_ids = encode(model, text)[: min(max_tokens, model.cfg.n_ctx)]
    if len(text_ids) < 2:
        raise SinklensError(
            "the natural text has fewer than 2 tokens",
            "pass a longer text to compare the first token with",
        )
    candidates = _candidates(model, text_ids, given)
    n_layers = min(max_layer or model.cfg.n_layers, model.cfg.n_layers)
    later = torch.tensor(text_ids[1:], dtype=torch.long)
    firsts = torch.tensor([[c.id] for c, _ in candidates])
    tokens = torch.cat([firsts, later.expand(len(candidates), -1)], dim=1)
    names = [act_name("resid_post", layer) for layer in range(n_layers)]
    cache = run_cache(model, tokens, names, reduce=l2_norms)
    norms = torch.stack([cache[name] for name in names], dim=1).cpu()  # [cand, layer, pos]
    result = FirstTokenChoice(
        [c for c, _ in candidates],
        [role for _, role in candidates],
        norms[:, :, 0],
        norms[:, :, 1:].mean(dim=-1),
        min_ratio,
        0,
        "",
    )
    result.chosen, result.reason = _choose(result)
    return result


def _choose(result: FirstTokenChoice) -> tuple[int, str]:
    def describe(i: int) -> str:
        return (
            f"{result.candidates[i].text!r} ({result.roles[i]}, {result.peak_ratios[i]:.3g}x typical at layer "
            f"{result.peak_layers[i]})"
        )

    roles = [role.split("/") for role in result.roles]
    given = next((i for i, r in enumerate(roles) if "given" in r), None)
    if given is not None:
        verdict = "a sink" if result.is_sink[given] else f"not a sink (below {result.min_ratio:g}x)"
        return given, f"given by the user: {describe(given)}, {verdict}"
    bos = next((i for i, r in enumerate(roles) if "bos" in r), None)
    if bos is not None and result.is_sink[bos]:
        return bos, f"the tokenizer's BOS, which the model makes a sink: {describe(bos)}"
    sinks = [i for i, s in enumerate(result.is_sink) if s]
    bos_note = (
        "the tokenizer has no BOS"
        if bos is None
        else f"the tokenizer's BOS is not a sink: {describe(bos)}"
    )
    if not sinks:
        fallback = (
            bos if bos is not None else max(range(len(roles)), key=lambda i: result.peak_ratios[i])
        )
        return fallback, (
            f"no sink found: no candidate reaches {result.min_ratio:g}x the typical norm ("
            + "; ".join(describe(i) for i in range(len(result.candidates)))
            + f"); measuring with {result.candidates[fallback].text!r}"
        )
    best = max(sinks, key=lambda i: result.peak_ratios[i])
    return best, f"{bos_note}; chose the strongest sink among the candidates, {describe(best)}"
