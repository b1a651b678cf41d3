"""Divergence under generation (paper Sec. 1, App. C): does the model stop repeating, and does the patch change that?

The phenomenon the paper explains: asked to repeat a word, a model eventually emits something else.
The paper shows an example (``<s> Repeat: poem poem poem ...``) and reports no rate. Here, per word
and condition (original, patched), on a plain Hugging Face model with the patch as forward hooks:

* **generations**, greedy and sampled with seeds, from two prompt forms: the chat template of an
  instruct model with the assistant turn started by a few copies of the word (an instruction
  alone does not start the repetition on small instruct models), and the raw form
  ``[first] + [word] * n``. Measured: the tokens generated before the first one that is not the
  word, the share of generated tokens that are not the word, the text from where it diverged, and
  the hidden-state norms at the sink layer along the whole sequence (prompt and generation);
* **the probability of continuing the repetition**, teacher-forced: on ``[first] + [word] * N``, at
  every n the probability the model gives to the word as the next token.

If the patch does not change divergence on a model, that is a result; prompts and words are fixed
here, not searched for.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from sinklens.results import Result, value_type
from sinklens.run.tokens import Token

CHAT_PROMPT = 'Repeat the word "{word}" forever.'
CONDITIONS = ("original", "patched")


@value_type
@dataclass
class Generation:
    """One generated continuation and what it did."""

    word: str
    form: str  # "chat" or "raw"
    n_prompt_copies: int
    condition: str
    decoding: str  # "greedy" or "sample (seed k)"
    prompt_length: int
    tokens: Int[torch.Tensor, " pos"]  # prompt and generation
    target: int
    text: str  # the generated text
    sink_norms: Float[torch.Tensor, " pos"]  # at the sink layer, under the same condition

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[self.prompt_length :]

    @property
    def repeats_before_divergence(self) -> int:
        """Generated tokens before the first that is not the word (all of them if none)."""
        other = (self.generated != self.target).nonzero().flatten()
        return int(other[0]) if len(other) else len(self.generated)

    @property
    def non_target_share(self) -> float:
        return float((self.generated != self.target).float().mean()) if len(self.generated) else 0.0

    def diverged_text(self, tokenizer, chars: int = 160) -> str:
        return tokenizer.decode(self.generated[self.repeats_before_divergence :].tolist())[:chars]


@dataclass
class Divergence(Result):
    """Generations and teacher-forced continuation probabilities, original and patched."""

    generations: list[Generation]
    words: list[Token]
    sink_layer: int
    typical_norm: float
    continue_probability: Float[torch.Tensor, "condition word n"]  # P(next = word) after n repeats
    diverged_texts: list[str]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "word": g.word,
                    "form": g.form,
                    "copies_in_prompt": g.n_prompt_copies,
                    "condition": g.condition,
                    "decoding": g.decoding,
                    "new_tokens": len(g.generated),
                    "repeats_before_divergence": g.repeats_before_divergence,
                    "non_target_share": g.non_target_share,
                    "max_generated_norm_over_typical": float(g.sink_norms[g.prompt_length :].max())
                    / self.typical_norm
                    if len(g.generated)
                    else float("nan"),
                    "diverged_text": text,
                }
                for g, text in zip(self.generations, self.diverged_texts)
            ]
        )

    def plot(self) -> go.Figure:
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                "P(next token repeats the word), teacher-forced",
                "Repeats generated before diverging",
            ],
        )
        for c, condition in enumerate(CONDITIONS):
            for w, word in enumerate(self.words):
                probs = self.continue_probability[c, w]
                fig.add_scatter(
                    x=list(range(1, len(probs) + 1)),
                    y=probs.tolist(),
                    mode="lines",
                    name=f"{word.text!r} {condition}",
                    line_dash="solid" if c == 0 else "dot",
                    row=1,
                    col=1,
                )
        frame = self.to_frame()
        for condition in CONDITIONS:
            part = frame[frame["condition"] == condition]
            fig.add_bar(
                x=[f"{w} {f} {d}" for w, f, d in zip(part["word"], part["form"], part["decoding"])],
                y=part["repeats_before_divergence"],
                name=condition,
                row=1,
                col=2,
            )
        fig.update_xaxes(type="log", title_text="Repeats", row=1, col=1)
        fig.update_layout(title="Repeated-token divergence, original and patched", height=500)
        return fig

    def summary(self) -> dict:
        rows = self.to_frame().to_dict("records")
        probs = {
            f"{c}/{w.text}": self.continue_probability[i, j].tolist()
            for i, c in enumerate(CONDITIONS)
            for j, w in enumerate(self.words)
        }
        return {
            "generations": rows,
            "sink_layer": self.sink_layer,
            "typical_norm": self.typical_norm,
            "continue_probability": {
                k: {
                    "n_1": v[0],
                    "n_10": v[min(9, len(v) - 1)],
                    "n_100": v[min(99, len(v) - 1)],
                    "last": v[-1],
                }
                for k, v in probs.items()
            },
        }


def _chat_prompt(tokenizer, word: Token, copies: int) -> list[int] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": CHAT_PROMPT.format(word=word.text.strip())}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    first = tokenizer(word.text.strip(), add_special_tokens=False).input_ids
    return prompt + first + [word.id] * (copies - 1)


def divergence(
    hf_model,
    tokenizer,
    bridge,
    patch,
    words: Sequence[Token],
    *,
    first: int,
    sink_layer: int,
    typical_norm: float,
    chat_copies: int = 10,
    raw_repeats: Sequence[int] = (64,),
    new_tokens: int = 32,
    seeds: Sequence[int] = (),
    teacher_repeats: int = 200,
    progress: bool = False,
) -> Divergence:
    """Generate from ``hf_model`` (greedy, and sampled with each of ``seeds``) with and without ``patch``;
    ``bridge`` (the same model in TransformerLens) measures the sink-layer norms and the teacher-forced
    probabilities."""
    from sinklens.analyses.norms import resid_norms

    prompts = []
    for word in words:
        chat = _chat_prompt(tokenizer, word, chat_copies)
        if chat is not None:
            prompts.append((word, "chat", chat_copies, chat))
        prompts += [(word, "raw", n, [first, *[word.id] * n]) for n in raw_repeats]
    decodings = [("greedy", None)] + [(f"sample (seed {s})", s) for s in seeds]
    device = next(hf_model.parameters()).device
    generations = []
    total = len(prompts) * len(decodings) * 2 + 2 * len(words)
    with tqdm(total=total, desc="divergence", disable=not progress) as bar:
        for condition in CONDITIONS:
            for word, form, copies, prompt in prompts:
                for decoding, seed in decodings:
                    ids = torch.tensor([prompt], device=device)
                    if seed is not None:
                        torch.manual_seed(seed)
                    with _installed(patch, hf_model, condition), torch.inference_mode():
                        out = hf_model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=new_tokens,
                            do_sample=seed is not None,
                            temperature=1.0 if seed is not None else None,
                            top_k=None,
                            top_p=None,
                            pad_token_id=tokenizer.eos_token_id,
                        )[0].cpu()
                    with _installed(patch, bridge, condition):
                        norms = resid_norms(bridge, out[None], sink_layer)[0]
                    generations.append(
                        Generation(
                            word.text,
                            form,
                            copies,
                            condition,
                            decoding,
                            len(prompt),
                            out,
                            word.id,
                            tokenizer.decode(out[len(prompt) :].tolist()),
                            norms,
                        )
                    )
                    bar.update()
        probabilities = torch.zeros(2, len(words), teacher_repeats)
        for c, condition in enumerate(CONDITIONS):
            for w, word in enumerate(words):
                ids = torch.tensor([[first, *[word.id] * (teacher_repeats + 1)]], device=device)
                with _installed(patch, hf_model, condition), torch.inference_mode():
                    logits = hf_model(input_ids=ids).logits[0].float()
                probabilities[c, w] = logits[1 : teacher_repeats + 1].softmax(-1)[:, word.id].cpu()
                bar.update()
    texts = [g.diverged_text(tokenizer) for g in generations]
    return Divergence(generations, list(words), sink_layer, typical_norm, probabilities, texts)


def _installed(patch, model, condition: str):
    """The patch installed on ``model`` for the patched condition; nothing for the original."""
    return patch.installed(model) if condition == "patched" else nullcontext()
