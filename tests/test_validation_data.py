"""Validation windows for a checkpoint, and the fallback when its corpus is missing."""

import json
import warnings

import pytest
import torch

from circuits.analysis.validation_data import validation_windows_for
from circuits.checkpoints import load_checkpoint, save_checkpoint
from circuits.data import WindowSampler, load_tokens
from circuits.report import ReportError
from circuits.tokenizer import Tokenizer
from conftest import SAMPLE_TEXT, tiny_model

N_CTX = 64
FALLBACK = "Ada Lark mended nets. Ada Lark sang."


def checkpoint_with(folder, validation):
    model = tiny_model(d_vocab=257, n_ctx=N_CTX)
    training = {"config": {"data": {"validation": validation}}}
    return load_checkpoint(save_checkpoint(model, Tokenizer(256), folder, training=training))


def test_reads_recorded_corpus(tmp_path):
    data = tmp_path / "validation.jsonl"
    data.write_text(json.dumps({"text": SAMPLE_TEXT * 3}) + "\n")
    checkpoint = checkpoint_with(tmp_path / "model", str(data))

    result = validation_windows_for(checkpoint, 4, fallback_text=FALLBACK)

    tokens = load_tokens(str(data), checkpoint.tokenizer, progress=False)
    expected = WindowSampler(tokens, N_CTX, 256).sequential_windows(4)
    assert result.from_corpus
    assert result.problem is None
    assert torch.equal(result.windows, expected)
    assert result.describe().startswith(f"4 validation windows of {N_CTX} tokens from ")


def test_missing_corpus_falls_back(tmp_path):
    checkpoint = checkpoint_with(tmp_path / "model", str(tmp_path / "absent-*.jsonl"))

    result = validation_windows_for(checkpoint, 4, fallback_text=FALLBACK)

    expected = checkpoint.tokenizer.encode_for_model(FALLBACK, N_CTX)
    assert not result.from_corpus
    assert result.windows.tolist() == [expected]
    assert result.problem.startswith("no files match")
    assert "absent-*.jsonl" in result.problem
    assert "not available" in result.describe()
    assert "1 window of" in result.describe()


def test_missing_corpus_without_fallback_raises(tmp_path):
    checkpoint = checkpoint_with(tmp_path / "model", str(tmp_path / "absent-*.jsonl"))
    with pytest.raises(ReportError, match="absent"):
        validation_windows_for(checkpoint, 4)


def test_long_fallback_is_truncated_with_warning(tmp_path):
    checkpoint = checkpoint_with(tmp_path / "model", str(tmp_path / "absent-*.jsonl"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = validation_windows_for(checkpoint, 2, fallback_text=SAMPLE_TEXT)
    assert result.windows.shape == (1, N_CTX)
    assert any("context" in str(item.message) for item in caught)


@pytest.mark.parametrize("n_windows", [0, -1, 2.5, True])
def test_rejects_invalid_count(tmp_path, n_windows):
    checkpoint = checkpoint_with(tmp_path / "model", str(tmp_path / "absent-*.jsonl"))
    with pytest.raises(ValueError, match="n_windows"):
        validation_windows_for(checkpoint, n_windows, fallback_text=FALLBACK)


def test_fallback_without_recorded_data(tmp_path):
    model = tiny_model(d_vocab=257, n_ctx=N_CTX)
    checkpoint = load_checkpoint(save_checkpoint(model, Tokenizer(256), tmp_path / "model"))

    result = validation_windows_for(checkpoint, 4, fallback_text=FALLBACK)

    assert not result.from_corpus
    assert result.problem == "the checkpoint records no validation data"
