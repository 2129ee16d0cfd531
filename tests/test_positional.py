"""Offset profiles against an evenly spread head, and validation windows with their fallback."""

import json
from pathlib import Path

import pytest
import torch

from circuits.analysis.attention import preferred_offsets
from circuits.analysis.positional import (
    SAMPLE_PASSAGE,
    OffsetProfile,
    offset_profile,
    passage_windows,
    uniform_offset_profile,
    validation_windows,
)
from circuits.checkpoints import Checkpoint
from circuits.tokenizer import Tokenizer
from conftest import SAMPLE_TEXT, tiny_model

TOKENIZER = Tokenizer(n_ranks=299)  # d_vocab 300, as the tiny models


def checkpoint_with_validation(spec):
    model = tiny_model(n_layers=1, n_ctx=24)
    data = {"validation": spec} if spec is not None else {}
    config = {"training": {"config": {"data": data}}}
    return Checkpoint(model, TOKENIZER, config, Path("unused"))


def test_uniform_profile_by_hand():
    profile = uniform_offset_profile(n_pos=4, max_offset=2)
    expected = [
        (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4,
        (1 / 2 + 1 / 3 + 1 / 4) / 3,
        (1 / 3 + 1 / 4) / 2,
    ]
    assert profile.tolist() == pytest.approx(expected)


def test_uniform_profile_matches_blind_head():
    model = tiny_model(n_layers=1).double()
    with torch.no_grad():
        model.blocks[0].attn.W_Q.zero_()  # every score 0: each query spreads evenly over its keys
    windows = torch.randint(0, 299, (3, 10), generator=torch.Generator().manual_seed(0))
    measured = preferred_offsets(model, windows, max_offset=6)
    expected = uniform_offset_profile(10, 6)
    for head in range(model.cfg.n_heads):
        torch.testing.assert_close(measured[0, head], expected)


def test_uniform_profile_rejects_bad_offset():
    with pytest.raises(ValueError, match="max_offset must be in"):
        uniform_offset_profile(4, 4)


def test_head_table_peak_and_verdict():
    uniform = torch.tensor([0.5, 0.25, 0.2])
    attention = torch.tensor([[[0.5, 0.25, 0.2], [0.1, 0.9, 0.0], [0.0, 0.1, 0.6]]])
    table = OffsetProfile(attention, uniform, n_pos=3).head_table(min_lift=2.5)

    assert table["name"].tolist() == ["L0H0", "L0H1", "L0H2"]
    assert table["peak_offset"].tolist() == [0, 1, 2]
    assert table["attention"].tolist() == pytest.approx([0.5, 0.9, 0.6])
    assert table["lift"].tolist() == pytest.approx([1.0, 3.6, 3.0])
    assert table["positional"].tolist() == [False, True, True]


def test_offset_profile_wraps_preferred_offsets():
    model = tiny_model(n_layers=1)
    windows = torch.randint(0, 299, (2, 12), generator=torch.Generator().manual_seed(1))
    profile = offset_profile(model, windows, max_offset=5)
    torch.testing.assert_close(profile.attention, preferred_offsets(model, windows, max_offset=5))
    assert profile.uniform.shape == (6,)
    assert profile.n_pos == 12


def test_windows_from_validation_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"text": SAMPLE_TEXT * 5}) + "\n")
    windows = validation_windows(checkpoint_with_validation(str(path)), n_windows=3, n_pos=16)

    assert windows.from_corpus
    assert windows.tokens.shape == (3, 16)
    assert (windows.tokens[:, 0] == TOKENIZER.bos_token_id).all()
    assert windows.source.endswith("validation.jsonl")
    assert "not available" not in windows.describe()


def test_relative_path_read_from_root(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.jsonl").write_text(json.dumps({"text": SAMPLE_TEXT * 3}) + "\n")
    checkpoint = checkpoint_with_validation("data/valid.jsonl")
    windows = validation_windows(checkpoint, n_windows=2, n_pos=8, root=tmp_path)
    assert windows.from_corpus
    assert windows.source == "data/valid.jsonl"


def test_windows_fall_back_to_passage(tmp_path):
    missing = str(tmp_path / "absent" / "validation-*.jsonl.gz")
    windows = validation_windows(checkpoint_with_validation(missing), n_windows=4, n_pos=64)

    assert not windows.from_corpus
    assert "no files match" in windows.reason
    assert "not available" in windows.describe()
    # The context of the tiny model (24) caps the window length.
    assert windows.tokens.shape[1] == 24
    expected = passage_windows(TOKENIZER, 4, 24)
    torch.testing.assert_close(windows.tokens, expected)


def test_windows_fall_back_without_config():
    windows = validation_windows(checkpoint_with_validation(None), n_windows=1, n_pos=8)
    assert not windows.from_corpus
    assert "names no validation data" in windows.reason


def test_passage_windows_follow_the_text():
    ids = TOKENIZER.encode(SAMPLE_PASSAGE)
    windows = passage_windows(TOKENIZER, n_windows=2, n_pos=10)
    assert windows[0].tolist() == [TOKENIZER.bos_token_id] + ids[:9]
    assert windows[1].tolist() == [TOKENIZER.bos_token_id] + ids[9:18]


def test_short_passage_gives_one_window():
    windows = passage_windows(TOKENIZER, n_windows=5, n_pos=100, text="A short line.")
    assert windows.shape == (1, 1 + len(TOKENIZER.encode("A short line.")))


def test_windows_reject_bad_sizes():
    with pytest.raises(ValueError, match="n_windows >= 1"):
        validation_windows(checkpoint_with_validation(None), n_windows=0)
