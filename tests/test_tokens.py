import pytest

from conftest import save_tiny
from sinklens import (
    SinklensError,
    first_token,
    repeated_tokens,
    text_tokens,
    word_token,
)
from sinklens.load.models import load_model
from sinklens.run.tokens import default_words, word_token_ids


def test_first_token_defaults_to_bos(tiny):
    assert first_token(tiny).id == tiny.tokenizer.bos_token_id
    assert first_token(tiny, "eos").id == tiny.tokenizer.eos_token_id
    assert first_token(tiny, 7).id == 7


def test_word_is_taken_mid_text(tiny):
    token = word_token(tiny, "the")
    assert token.text == " the"
    assert word_token_ids(tiny, "the", leading_space=False) != [token.id]


def test_several_token_word_is_an_error_that_names_the_fix(tiny):
    with pytest.raises(SinklensError, match=r"'dust' is \d+ tokens.*cycle=True"):
        word_token(tiny, "dust")


def test_repeated_tokens_layout(tiny):
    the = word_token(tiny, "the").id
    ids = repeated_tokens(tiny, "the", 5)
    assert ids.tolist() == [[tiny.tokenizer.bos_token_id] + [the] * 5]
    ids = repeated_tokens(tiny, the, 3, first="eos", prefix="First Citizen:")
    prefix = tiny.tokenizer.encode("First Citizen:", add_special_tokens=False)
    assert ids.tolist() == [[tiny.tokenizer.eos_token_id, *prefix, the, the, the]]


def test_cycle_repeats_the_whole_token_cycle(tiny):
    unit = word_token_ids(tiny, "dust")
    ids = repeated_tokens(tiny, "dust", 4, cycle=True)
    assert ids[0, 1:].tolist() == unit * 4


def test_sequence_longer_than_context_is_an_error(tiny):
    n_ctx = tiny.cfg.n_ctx
    assert repeated_tokens(tiny, "the", n_ctx - 1).shape == (1, n_ctx)
    with pytest.raises(SinklensError, match=f"longer than the context.*{n_ctx} tokens"):
        repeated_tokens(tiny, "the", n_ctx)


def test_bad_words_and_ids(tiny):
    with pytest.raises(SinklensError, match="outside the vocabulary"):
        repeated_tokens(tiny, 10**6, 3)
    with pytest.raises(SinklensError, match="whitespace"):
        word_token(tiny, " the")
    with pytest.raises(SinklensError, match="at least 1"):
        repeated_tokens(tiny, "the", 0)


def test_model_without_bos_needs_an_explicit_first_token(tmp_path):
    model = load_model(str(save_tiny(tmp_path, bos=False)), device="cpu")
    with pytest.raises(SinklensError, match="defines no BOS token.*first_token='eos'"):
        repeated_tokens(model, "the", 3)
    assert repeated_tokens(model, "the", 3, first="eos")[0, 0] == model.tokenizer.eos_token_id


def test_text_tokens_and_default_words(tiny):
    ids = text_tokens(tiny, "Speak, speak.", max_tokens=3)
    assert ids.shape == (1, 3) and ids[0, 0] == tiny.tokenizer.bos_token_id
    words = default_words(tiny)
    assert "".join(w.text for w in words) == " Another one bites the dust"
    assert all(isinstance(w.id, int) for w in words)
