import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.tokenizer import FULL_GPT2_RANKS, Tokenizer, TruncationWarning

FULL = Tokenizer()
SMALL = Tokenizer(2048)


def test_known_gpt2_encodings():
    assert FULL.encode("Hello world") == [15496, 995]
    assert FULL.encode(" the") == [262]
    assert FULL.encode("<|endoftext|>")[0] != FULL.bos_token_id
    assert FULL.bos_token_id == 50256
    assert FULL.d_vocab == 50257


def test_truncated_ids_are_gpt2_ids():
    text = "The old mill stood by the river, and Mara walked towards it."
    full_ids = FULL.encode(text)
    small_ids = SMALL.encode(text)
    assert max(small_ids) < 2048
    # Every truncated token decodes to the same bytes as the GPT-2 token with that id.
    for token in small_ids:
        assert SMALL.decode([token]) == FULL.decode([token])
    # Tokens that GPT-2 itself uses below the cut-off are kept unchanged.
    assert set(t for t in full_ids if t < 2048) <= set(small_ids)


def test_truncated_bos_and_vocabulary():
    assert SMALL.bos_token_id == 2048
    assert SMALL.d_vocab == 2049
    assert SMALL.encode_with_bos("hi")[0] == 2048
    assert len(SMALL.vocabulary_strings) == 2049
    assert SMALL.vocabulary_strings[-1] == "<|endoftext|>"


def test_rare_characters_split_into_bytes():
    text = "Ωmega 𝔘 文字"
    ids = Tokenizer(256).encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert Tokenizer(256).decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    for tokenizer in (FULL, SMALL):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < tokenizer.n_ranks for i in ids)


def test_empty_text():
    assert SMALL.encode("") == []
    assert SMALL.encode_with_bos("") == [SMALL.bos_token_id]


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_non_string_input_rejected(bad):
    with pytest.raises(TypeError, match="must be a str"):
        SMALL.encode(bad)


@pytest.mark.parametrize("n_ranks", [0, 255, FULL_GPT2_RANKS + 1])
def test_invalid_rank_count(n_ranks):
    with pytest.raises(ValueError, match="n_ranks must be between"):
        Tokenizer(n_ranks)


def test_description_round_trip():
    assert Tokenizer.from_description(SMALL.describe()) == SMALL
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Tokenizer.from_description({"name": "llama"})
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Tokenizer.from_description("gpt2")


def test_model_input_short_text():
    assert SMALL.encode_for_model("", n_ctx=8) == [2048]
    assert SMALL.encode_for_model("the river", n_ctx=8) == [2048, *SMALL.encode("the river")]


def test_model_input_long_text_truncated_with_warning():
    text = " the" * 20
    assert len(SMALL.encode(text)) == 20
    with pytest.warns(TruncationWarning, match="20 tokens long .* dropping 13"):
        ids = SMALL.encode_for_model(text, n_ctx=8)
    assert ids == [2048] + SMALL.encode(text)[:7]


def test_model_input_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a str"):
        SMALL.encode_for_model(12, n_ctx=8)


@pytest.mark.parametrize("n_ctx", [0, -1, 2.5, None, True])
def test_model_input_rejects_invalid_context(n_ctx):
    with pytest.raises(ValueError, match="n_ctx must be a positive int"):
        SMALL.encode_for_model("the river", n_ctx=n_ctx)
