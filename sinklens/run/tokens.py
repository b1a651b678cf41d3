"""Token-level inputs: the first token, words as single tokens, repeated-token sequences.

Sequences are built from token ids, never by joining strings: ``" ".join([word] * n)`` can merge
or split tokens with some BPE tokenizers (Llama-3's among them), and then the sequence is not a
run of one token at all. Here a repeated word is exactly one token id per repeat. A word is taken
as it appears mid-text (after a space), which is the form the paper's notebook repeats; pass
``leading_space=False`` for the bare form.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from sinklens.errors import SinklensError
from sinklens.results import value_type
from sinklens.settings import require_words

FirstToken = str | int
"""``"bos"`` (default), ``"eos"``, a token id, or a word placed at the start of the text."""


@value_type
@dataclass(frozen=True)
class Token:
    """A token id with its text, as results record it."""

    id: int
    text: str


def token(model: TransformerBridge, token_id: int) -> Token:
    """The :class:`Token` for an id, checked against the vocabulary."""
    vocab = model.cfg.d_vocab
    if not 0 <= token_id < vocab:
        raise SinklensError(
            f"token id {token_id} is outside the vocabulary (0..{vocab - 1})",
            "pass a valid token id",
        )
    pieces = _memo(model.tokenizer).pieces
    if token_id not in pieces:
        pieces[token_id] = model.tokenizer.decode([token_id])
    return Token(token_id, pieces[token_id])


def first_token(model: TransformerBridge, first: FirstToken = "bos") -> Token:
    """Resolve the token placed at position 0: the model's BOS by default."""
    tokenizer = model.tokenizer
    if isinstance(first, int):
        return token(model, first)
    if first in ("bos", "eos"):
        token_id = bos_token_id(model) if first == "bos" else tokenizer.eos_token_id
        if token_id is None:
            raise SinklensError(
                f"the tokenizer of {model.cfg.model_name} defines no {first.upper()} token",
                "choose the first token explicitly: first_token='eos' or a word such as 'The' "
                "(CLI: --first-token)",
            )
        return token(model, token_id)
    return word_token(model, first, leading_space=False)


def bos_token_id(model: TransformerBridge) -> int | None:
    """The tokenizer's own BOS: TransformerLens fills a missing BOS with EOS, :func:`load_model` records the truth."""
    source = getattr(model, "sinklens_source", None)
    return source.bos_token_id if source is not None else model.tokenizer.bos_token_id


def word_token_ids(model: TransformerBridge, word: str, *, leading_space: bool = True) -> list[int]:
    """Token ids of ``word`` as it appears after a space in running text (or bare)."""
    if not word or word != word.strip():
        raise SinklensError(
            f"word {word!r} is empty or has surrounding whitespace",
            "pass the bare word, e.g. 'the'",
        )
    if not leading_space:
        return encode(model, word)
    anchor = encode(model, "a")
    ids = encode(model, f"a {word}")
    if (
        ids[: len(anchor)] != anchor
    ):  # the tokenizer merged across the space: fall back to the bare form
        return encode(model, word)
    return ids[len(anchor) :]


@dataclass
class _Memo:
    """What is remembered of one tokenizer while it keeps its size (adding tokens forgets it)."""

    size: int
    texts: OrderedDict = field(default_factory=OrderedDict)  # text -> ids, the last used last
    vocabulary: dict | None = None
    pieces: dict[int, str] = field(default_factory=dict)  # token id -> its text alone


_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Memo
_REMEMBERED_TEXTS = 64


def _memo(tokenizer) -> _Memo:
    memo = _MEMOS.get(tokenizer)
    if memo is None or memo.size != len(tokenizer):
        memo = _MEMOS[tokenizer] = _Memo(len(tokenizer))
    return memo


def encode(model: TransformerBridge, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the bridge's tokenizer adds BOS by default). A
    study encodes the same few texts many times (the natural text, each word, the anchor of a
    mid-text word), so the last texts' ids are remembered per tokenizer."""
    texts = _memo(model.tokenizer).texts
    ids = texts.get(text)
    if ids is None:
        ids = texts[text] = tuple(model.tokenizer.encode(text, add_special_tokens=False))
        if len(texts) > _REMEMBERED_TEXTS:
            texts.popitem(last=False)
    else:
        texts.move_to_end(text)
    return list(ids)


def vocabulary_id(model: TransformerBridge, text: str) -> int | None:
    """The id of the vocabulary entry spelled ``text`` (a special token such as ``<|im_end|>``), or
    None when the vocabulary has no such entry; the vocabulary is read once per tokenizer."""
    memo = _memo(model.tokenizer)
    if memo.vocabulary is None:
        memo.vocabulary = model.tokenizer.get_vocab()
    return memo.vocabulary.get(text)


def word_token(model: TransformerBridge, word: str, *, leading_space: bool = True) -> Token:
    """The single token for ``word``; a word that is several tokens or unknown is an error."""
    ids = word_token_ids(model, word, leading_space=leading_space)
    pieces = [model.tokenizer.decode([i]) for i in ids]
    if len(ids) != 1:
        raise SinklensError(
            f"word {word!r} is {len(ids)} tokens for this tokenizer ({pieces})",
            "pick a word that is one token, or repeat its whole token cycle (repeated_tokens(..., cycle=True))",
        )
    unk = model.tokenizer.unk_token_id
    if unk is not None and ids[0] == unk:
        raise SinklensError(
            f"word {word!r} is not in the vocabulary (it maps to the unknown token)",
            "pick another word",
        )
    return Token(ids[0], pieces[0])


def check_context(model: TransformerBridge, n_tokens: int) -> None:
    """Raise if a sequence of ``n_tokens`` does not fit the model's context window."""
    n_ctx = model.cfg.n_ctx
    if n_tokens > n_ctx:
        raise SinklensError(
            f"a sequence of {n_tokens} tokens is longer than the context of {model.cfg.model_name} "
            f"({n_ctx} tokens)",
            f"shorten the input to at most {n_ctx} tokens in all (fewer repeats, less text), or load the model "
            "with a larger n_ctx",
        )


def repeated_tokens(
    model: TransformerBridge,
    word: str | int,
    n_repeats: int,
    *,
    first: FirstToken = "bos",
    prefix: str | None = None,
    cycle: bool = False,
    leading_space: bool = True,
) -> Int[torch.Tensor, "1 pos"]:
    """``[first] + prefix + [word] * n_repeats`` as token ids.

    ``word`` is a word or a token id. A word of several tokens is an error unless ``cycle``
    is set, in which case its token cycle is repeated ``n_repeats`` times.
    """
    if n_repeats < 1:
        raise SinklensError(
            f"n_repeats must be at least 1, got {n_repeats}", "pass a positive number of repeats"
        )
    if isinstance(word, int):
        unit = [token(model, word).id]
    elif cycle:
        unit = word_token_ids(model, word, leading_space=leading_space)
    else:
        unit = [word_token(model, word, leading_space=leading_space).id]
    head = [first_token(model, first).id, *(encode(model, prefix) if prefix else [])]
    check_context(model, len(head) + len(unit) * n_repeats)
    body = torch.tensor(unit, dtype=torch.long).expand(n_repeats, -1).reshape(-1)
    return torch.cat([torch.tensor(head, dtype=torch.long), body])[None]


def text_tokens(
    model: TransformerBridge, text: str, *, first: FirstToken = "bos", max_tokens: int | None = None
) -> Int[torch.Tensor, "1 pos"]:
    """``[first] + tokens(text)``, cut to ``max_tokens`` in all and checked against the context."""
    ids = [first_token(model, first).id, *encode(model, text)]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    check_context(model, len(ids))
    return torch.tensor([ids], dtype=torch.long)


def chat_tokens(
    model: TransformerBridge, messages: Sequence[dict[str, str]]
) -> Int[torch.Tensor, "1 pos"]:
    """A conversation as the model's own chat template writes it (the template decides the first token), checked
    against the context."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise SinklensError(
            f"{model.cfg.model_name} has no chat template to format a conversation with",
            "pass the conversation as plain text (--text FILE), or use an instruct model",
        )
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    check_context(model, len(ids))
    return torch.tensor([ids], dtype=torch.long)


def default_words(
    model: TransformerBridge, phrase: str = "Another one bites the dust"
) -> list[Token]:
    """The paper's Fig. 2/6 words: the tokens of ``phrase`` as they appear mid-text."""
    ids = word_token_ids(model, phrase)
    return [Token(i, model.tokenizer.decode([i])) for i in ids]


def words_to_tokens(
    model: TransformerBridge, words: Sequence[str | int], *, leading_space: bool = True
) -> list[Token]:
    """One token per word (a word or a token id); an empty list is an error."""
    require_words(words)
    return [
        token(model, w) if isinstance(w, int) else word_token(model, w, leading_space=leading_space)
        for w in words
    ]
