"""Benchmarks before and after the patch (paper Table 2): multiple-choice log-likelihood scoring.

Paper (Table 2): on MMLU, HellaSwag, TruthfulQA, WinoGrande and ARC the patch moves accuracy by at
most 1.83 points on Llama-1/2 and Mistral. The harness, shots and metric variant are not given.
Here: 0-shot, lm-evaluation-harness's prompts (:mod:`sinklens.load.benchmark_items`), each choice
scored by the summed log-probability of its continuation tokens (tokenised as the harness does:
the context alone, then context + continuation, the continuation being the extra tokens). ``acc``
takes the choice with the largest log-likelihood, ``acc_norm`` divides it by the continuation's
length in characters, as the harness does. LAMBADA's ``acc`` is whether greedy decoding yields
every token of the last word.

The comparison is paired (the same items, original and patched): per task the difference in
accuracy with a 95% t-interval of the per-item differences, the mean change of every choice's
log-likelihood with its interval, and how many items changed answer. Scoring runs a shared context
once: its choices are packed after it in one row, each seeing the context and its own tokens at the
positions it would have alone (a block-causal mask), so the log-likelihoods are those of one row per
choice (the harness's way) with the context's work done once. An item whose choices are all single
tokens after a shared context (MMLU's letters) is one row, the choices read from its last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from sinklens.analyses._stats import mean_interval
from sinklens.analyses.sink_patch_choice import kl_divergence
from sinklens.load.benchmark_items import Item
from sinklens.results import Result, value_type

TOKENS_PER_BATCH = 512  # measured on SmolLM2 on a 2-core CPU: 256-4096 tokens per batch took 21.1, 19.4, 20.2, 22.3, 26.1 s
PAPER_TABLE_2 = {  # Yona et al. (2025), Table 2: accuracy (%), original -> patched
    "LLaMa-1-7B-HF": {
        "MMLU": (29.81, 29.93),
        "HellaSwag": (56.97, 56.95),
        "TruthfulQA": (31.21, 29.38),
        "WinoGrande": (69.93, 69.93),
        "AI2-ARC": (41.89, 42.15),
    },
    "LLaMa-2-7B-HF": {
        "MMLU": (41.20, 42.17),
        "HellaSwag": (57.12, 57.13),
        "TruthfulQA": (34.15, 34.39),
        "WinoGrande": (68.98, 69.06),
        "AI2-ARC": (43.52, 43.34),
    },
    "Mistral-7B-Instruct-v0.1": {
        "MMLU": (53.41, 52.58),
        "HellaSwag": (56.23, 55.75),
        "TruthfulQA": (53.37, 52.26),
        "WinoGrande": (69.30, 68.82),
        "AI2-ARC": (50.17, 49.66),
    },
}


@value_type
@dataclass
class ItemScores:
    """Per choice: summed log-probability of the continuation, its token count, and whether greedy decoding
    yields it."""

    logprob: list[float]
    n_tokens: list[int]
    greedy: list[bool]


def _encode(
    tokenizer, context: str, continuation: str, bos: list[int]
) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, whose tokens are
    what encoding context + continuation adds to encoding the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    prefix = tokenizer(context, add_special_tokens=False).input_ids
    return bos + prefix, whole[len(prefix) :]


def _first_token_ids(tokenizer) -> list[int]:
    """The tokenizer's own start: its BOS if it adds one by default (Gemma), else nothing (SmolLM2)."""
    ids = tokenizer("a").input_ids
    return (
        ids[:1]
        if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id
        else []
    )


@dataclass
class _Row:
    """One row of a scoring batch: a context once, then each continuation packed after it.

    Every continuation sees the context and its own earlier tokens, at the positions it would have
    scored alone (``len(context) + t``), so the row computes what one row per choice would, with the
    shared context run once. A continuation's last token is only ever a target, so it is not input.
    ``letters``: single-token choices, all read at the context's last position.
    """

    context: list[int]
    continuations: list[list[int]]
    owners: list[tuple[int, int]]  # (item, choice) of each continuation (of each letter)
    letters: list[int] | None = None

    @property
    def inputs(self) -> list[int]:
        return self.context + [t for c in self.continuations for t in c[:-1]]

    @property
    def positions(self) -> list[int]:
        return list(range(len(self.context))) + [
            len(self.context) + t for c in self.continuations for t in range(len(c) - 1)
        ]

    @property
    def segments(self) -> list[int]:
        """0 for the context, j + 1 for continuation j's inputs."""
        return [0] * len(self.context) + [
            j + 1 for j, c in enumerate(self.continuations) for _ in c[:-1]
        ]

    def reads(self, j: int) -> list[int]:
        """The input indices whose logits predict continuation j's tokens: the context's last, then its own."""
        start = len(self.context) + sum(len(c) - 1 for c in self.continuations[:j])
        return [len(self.context) - 1, *range(start, start + len(self.continuations[j]) - 1)]


def _rows(tokenizer, items: Sequence[Item], bos: list[int], max_packed: int) -> list[_Row]:
    """Items as rows: single-token choices after a shared context read at one position; other choices
    that share a context are packed after one copy of it (while the row fits ``max_packed`` tokens);
    choices with contexts of their own (WinoGrande) take a row each."""
    rows = []
    for i, item in enumerate(items):
        encoded = [_encode(tokenizer, c, k, bos) for c, k in zip(item.contexts, item.continuations)]
        context = encoded[0][0]
        if item.shared_context and all(len(k) == 1 for _, k in encoded):
            rows.append(
                _Row(context, [], [(i, j) for j in range(len(encoded))], [k[0] for _, k in encoded])
            )
            continue
        packed = _Row(context, [k for _, k in encoded], [(i, j) for j in range(len(encoded))])
        # a one-token context would put every choice's first token at position 1, where a patch reads
        # "the first token after the start": such items are scored a row per choice
        if item.shared_context and len(context) > 1 and len(packed.inputs) <= max_packed:
            rows.append(packed)
            continue
        rows += [_Row(c, [k], [(i, j)]) for j, (c, k) in enumerate(encoded)]
    return rows


def _packing_limit(model) -> int:
    """The longest packed row that is exact: a custom mask stands for every layer's mask, so rows must fit
    a sliding window as well as the context."""
    config = model.config
    windows = [w for w in (getattr(config, "sliding_window", None),) if w]
    return min([getattr(config, "max_position_embeddings", None) or 2**31, *windows])


def _batch_inputs(batch: Sequence[_Row], pad: int, dtype: torch.dtype):
    """Right-padded ids and positions, and the attention mask: none when every row is one causal
    sequence (right padding is never attended to), else each row's additive [query, key] mask."""
    width = max(len(r.inputs) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for b, row in enumerate(batch):
        ids[b, : len(row.inputs)] = torch.tensor(row.inputs)
        positions[b, : len(row.inputs)] = torch.tensor(row.positions)
    if all(len(r.continuations) <= 1 for r in batch):
        return ids, positions, None
    segments = torch.full(
        (len(batch), width), -1, dtype=torch.long
    )  # -1: padding, which sees only itself
    for b, row in enumerate(batch):
        segments[b, : len(row.inputs)] = torch.tensor(row.segments)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees_context = (key == 0) & (query >= 0)
    allowed = (causal & (sees_context | (key == query))) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[:, None]


def score_items(
    model, tokenizer, items: Sequence[Item], *, progress: bool = False, desc: str = "scoring"
) -> list[ItemScores]:
    """Score every choice of every item with ``model`` (a Hugging Face causal LM or a TransformerBridge's
    ``original_model``; install a patch first to score the patched model).

    Each shared context runs once, its choices packed after it in one row (see :class:`_Row`), rows
    sorted by length and batched by :data:`TOKENS_PER_BATCH`; logits are computed only where read."""
    bos = _first_token_ids(tokenizer)
    rows = _rows(tokenizer, items, bos, _packing_limit(model))
    results = [
        ItemScores(
            [0.0] * len(it.continuations),
            [0] * len(it.continuations),
            [False] * len(it.continuations),
        )
        for it in items
    ]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].inputs))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.inference_mode(), tqdm(total=len(rows), desc=desc, disable=not progress) as bar:
        start = 0
        while start < len(order):
            batch = [
                rows[r]
                for r in order[
                    start : start + max(1, TOKENS_PER_BATCH // len(rows[order[start]].inputs))
                ]
            ]
            start += len(batch)
            ids, positions, mask = _batch_inputs(batch, tokenizer.pad_token_id or 0, dtype)
            keep = sorted(
                {p for row in batch for j in range(len(row.continuations)) for p in row.reads(j)}
                | {len(row.context) - 1 for row in batch}
            )
            index = torch.full((ids.shape[1],), -1, dtype=torch.long)
            index[keep] = torch.arange(len(keep))
            logits = model(
                input_ids=ids.to(device),
                position_ids=positions.to(device),
                attention_mask=None if mask is None else mask.to(device),
                logits_to_keep=torch.tensor(keep, device=device),
            ).logits
            logprobs = logits.float().log_softmax(-1)
            for b, row in enumerate(batch):
                if (
                    row.letters is not None
                ):  # single-token choices read at the context's last position
                    last = logprobs[b, index[len(row.context) - 1]]
                    (i, _), letters = row.owners[0], torch.tensor(row.letters, device=last.device)
                    results[i].logprob = last[letters].tolist()
                    results[i].n_tokens = [1] * len(row.letters)
                    results[i].greedy = (last.argmax() == letters).tolist()
                for j, (continuation, (i, choice)) in enumerate(zip(row.continuations, row.owners)):
                    target = torch.tensor(continuation, device=logprobs.device)
                    token_logprobs = logprobs[b, index[row.reads(j)]]
                    results[i].logprob[choice] = float(
                        token_logprobs.gather(-1, target[:, None]).sum()
                    )
                    results[i].n_tokens[choice] = len(continuation)
                    results[i].greedy[choice] = bool((token_logprobs.argmax(-1) == target).all())
            bar.update(len(batch))
    return results


def accuracy(
    items: Sequence[Item], scores: Sequence[ItemScores], normalised: bool = False
) -> torch.Tensor:
    """Per item 1.0 where the best choice is the gold one (LAMBADA: greedy decoding yields the word)."""
    correct = []
    for item, score in zip(items, scores):
        if item.task == "lambada":
            correct.append(float(score.greedy[0]))
            continue
        values = torch.tensor(score.logprob)
        if normalised:
            values = values / torch.tensor(
                [max(len(c), 1) for c in item.continuations], dtype=values.dtype
            )
        correct.append(float(int(values.argmax()) == item.gold))
    return torch.tensor(correct)


def _answer(item: Item, score: ItemScores) -> int:
    """The chosen answer (LAMBADA: whether greedy decoding yields the word)."""
    if item.task == "lambada":
        return int(score.greedy[0])
    return max(range(len(score.logprob)), key=score.logprob.__getitem__)


@dataclass
class BenchmarkComparison(Result):
    """The same items scored by the original and the patched model."""

    tasks: list[str]
    items: dict[str, list[Item]]
    original: dict[str, list[ItemScores]]
    patched: dict[str, list[ItemScores]]

    @classmethod
    def merge(cls, parts: Sequence[BenchmarkComparison]) -> BenchmarkComparison:
        """One comparison from comparisons of separate tasks."""
        return cls(
            [t for p in parts for t in p.tasks],
            *(
                {t: getattr(p, field)[t] for p in parts for t in p.tasks}
                for field in ("items", "original", "patched")
            ),
        )

    def task_summary(self, task: str) -> dict:
        items, before, after = self.items[task], self.original[task], self.patched[task]
        row = {"task": task, "n": len(items)}
        for name, normalised in (("acc", False), ("acc_norm", True)):
            a, b = accuracy(items, before, normalised), accuracy(items, after, normalised)
            delta, low, high = mean_interval(b - a)
            row.update(
                {
                    f"{name}_original": float(a.mean()),
                    f"{name}_patched": float(b.mean()),
                    f"{name}_delta": delta,
                    f"{name}_ci_low": low,
                    f"{name}_ci_high": high,
                }
            )
        changes = torch.tensor(
            [y - x for s, t in zip(before, after) for x, y in zip(s.logprob, t.logprob)]
        )
        mean, low, high = mean_interval(changes)
        row.update(
            {
                "logprob_change": mean,
                "logprob_change_ci_low": low,
                "logprob_change_ci_high": high,
                "logprob_change_abs": float(changes.abs().mean()),
                "answers_changed": sum(
                    _answer(i, a) != _answer(i, b) for i, a, b in zip(items, before, after)
                ),
            }
        )
        return row

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.task_summary(t) for t in self.tasks])

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = go.Figure(
            go.Bar(
                x=frame["task"],
                y=100 * frame["acc_delta"],
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=100 * (frame["acc_ci_high"] - frame["acc_delta"]),
                    arrayminus=100 * (frame["acc_delta"] - frame["acc_ci_low"]),
                ),
            )
        )
        fig.add_hline(y=0, line_dash="dot")
        fig.update_layout(
            title="Accuracy change with the patch (points, 95% paired interval)",
            yaxis_title="patched - original (points)",
        )
        return fig

    def summary(self) -> dict:
        frame = self.to_frame()
        return {
            row["task"]: {
                "n": int(row["n"]),
                "acc_original": row["acc_original"],
                "acc_patched": row["acc_patched"],
                "delta": row["acc_delta"],
                "ci_low": row["acc_ci_low"],
                "ci_high": row["acc_ci_high"],
                **{k: row[k] for k in row if k.startswith(("acc_norm", "logprob", "answers"))},
            }
            for row in frame.to_dict("records")
        }


def compare_benchmarks(
    model, tokenizer, patch, items: dict[str, list[Item]], *, progress: bool = False
) -> BenchmarkComparison:
    """Score ``items`` (task -> items) with ``model`` as it is and with ``patch`` installed."""
    original = {
        t: score_items(model, tokenizer, it, progress=progress, desc=f"{t} (original)")
        for t, it in items.items()
    }
    with patch.installed(model):
        patched = {
            t: score_items(model, tokenizer, it, progress=progress, desc=f"{t} (patched)")
            for t, it in items.items()
        }
    return BenchmarkComparison(list(items), items, original, patched)


@dataclass
class TextEffect(Result):
    """Natural text with and without the patch: per-position loss under each model and KL(original || patched)."""

    nll_original: Float[torch.Tensor, " pos"]
    nll_patched: Float[torch.Tensor, " pos"]
    kl: Float[torch.Tensor, " pos"]  # nats, next-token distributions

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "position": range(len(self.kl)),
                "nll_original": self.nll_original.tolist(),
                "nll_patched": self.nll_patched.tolist(),
                "kl": self.kl.tolist(),
            }
        )

    def plot(self) -> go.Figure:
        fig = go.Figure(go.Histogram(x=self.kl.clamp_min(1e-12).log10().tolist(), nbinsx=60))
        fig.update_layout(
            title="KL(original || patched) per position of natural text",
            xaxis_title="log10 KL (nats)",
            yaxis_title="positions",
        )
        return fig

    def summary(self) -> dict:
        return {
            "perplexity_original": float(self.nll_original.mean().exp()),
            "perplexity_patched": float(self.nll_patched.mean().exp()),
            "kl_natural_text": float(self.kl.mean()),
            "kl_max": float(self.kl.max()),
            "n_tokens": len(self.kl),
        }


def text_effect(model, tokens: Int[torch.Tensor, "1 pos"], patch, window: int = 512) -> TextEffect:
    """Natural text (``[first] + text``) scored by ``model`` with and without ``patch``, in windows of
    ``window`` tokens, each a fresh context that starts with the same first token (so every window has
    its sink, as the patch assumes)."""
    device = next(model.parameters()).device
    nll: dict[str, list[torch.Tensor]] = {"original": [], "patched": []}
    kls = []
    with torch.inference_mode():
        first, text = tokens[:, :1], tokens[:, 1:]
        for start in range(0, text.shape[1], window - 1):
            chunk = torch.cat([first, text[:, start : start + window - 1]], dim=1).to(device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits
            with patch.installed(model):
                patched = model(input_ids=chunk).logits
            for name, values in (("original", logits), ("patched", patched)):
                logprobs = values[0, :-1].float().log_softmax(-1)
                nll[name].append(-logprobs.gather(-1, chunk[0, 1:, None]).squeeze(-1).cpu())
            kls.append(kl_divergence(logits, patched)[0, :-1].cpu())
    return TextEffect(torch.cat(nll["original"]), torch.cat(nll["patched"]), torch.cat(kls))
