"""Attention and top predictions on free text: values, empty text, truncation, split bytes."""

import warnings
from pathlib import Path

import pytest
import torch

from circuits.analysis.text_attention import analyse_text, split_characters
from circuits.checkpoints import Checkpoint
from circuits.tokenizer import Tokenizer
from conftest import tiny_model

N_CTX = 24


@pytest.fixture
def checkpoint():
    # tiny_model has d_vocab 300: GPT-2's first 299 ranks plus BOS.
    return Checkpoint(tiny_model(n_ctx=N_CTX), Tokenizer(299), {}, Path("tiny"))


def test_patterns_and_predictions_match_model(checkpoint):
    analysis = analyse_text(checkpoint, "the cat sat", top_k=3)
    ids = torch.tensor([analysis.token_ids])
    with torch.no_grad():
        logits, cache = checkpoint.model.run_with_cache(ids)

    assert analysis.token_ids == checkpoint.tokenizer.encode_for_model("the cat sat", N_CTX)
    assert analysis.token_strings[0] == "<|endoftext|>"
    assert analysis.patterns.shape == (2, 4, len(analysis.token_ids), len(analysis.token_ids))
    torch.testing.assert_close(torch.from_numpy(analysis.patterns[1, 2]), cache.patterns[1][0, 2])

    probabilities = logits[0].softmax(-1)
    expected = probabilities.topk(3, dim=-1)
    assert analysis.top_ids.tolist() == expected.indices.tolist()
    torch.testing.assert_close(torch.from_numpy(analysis.top_probabilities), expected.values)
    strings = checkpoint.tokenizer.token_strings(expected.indices[-1])
    assert analysis.top_strings[-1] == strings
    assert analysis.warnings == []


def test_empty_text_is_bos_only(checkpoint):
    analysis = analyse_text(checkpoint, "")

    assert analysis.token_ids == [299]
    assert analysis.patterns.shape == (2, 4, 1, 1)
    assert analysis.patterns[:, :, 0, 0].tolist() == [[1.0] * 4] * 2
    assert analysis.top_probabilities.shape == (1, 5)


def test_long_text_truncated_with_message(checkpoint):
    text = "one two three four five six seven eight nine ten " * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning must be captured, not emitted
        analysis = analyse_text(checkpoint, text)

    assert len(analysis.token_ids) == N_CTX
    assert len(analysis.warnings) == 1
    assert "dropping" in analysis.warnings[0]
    assert analysis.patterns.shape[-1] == N_CTX


def test_characters_outside_vocabulary_listed(checkpoint):
    analysis = analyse_text(checkpoint, "naïve 日本 tea")

    assert analysis.split_characters == ["ï", "日", "本"]
    assert any("3 distinct characters" in message for message in analysis.warnings)
    assert "\N{REPLACEMENT CHARACTER}" in analysis.token_strings


def test_split_characters_ascii_and_repeats():
    tokenizer = Tokenizer(299)
    assert split_characters(tokenizer, tokenizer.encode_with_bos("plain text")) == []
    ids = tokenizer.encode_with_bos("日 and 日 again é")
    assert split_characters(tokenizer, ids) == ["日", "é"]


def test_rejects_bad_arguments(checkpoint):
    with pytest.raises(TypeError, match="str"):
        analyse_text(checkpoint, None)
    with pytest.raises(ValueError, match="top_k"):
        analyse_text(checkpoint, "text", top_k=0)
