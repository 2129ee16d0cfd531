"""The repetition statistics script on hand-made token streams."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "repetition_stats.py"
spec = importlib.util.spec_from_file_location("repetition_stats", SCRIPT)
repetition_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repetition_stats)


def test_window_counts_by_hand():
    # Positions 0-6 predict a next token. Token 1 at 3 repeats position 0 and both are followed
    # by 2 (reliable); token 2 at 4 repeats position 1, followed by 4 and 3 (not reliable);
    # token 1 at 6 repeats position 3, both followed by 2 (reliable).
    window = np.array([1, 2, 3, 1, 2, 4, 1, 2])
    positions, repeats, reliable, gain = repetition_stats.window_stats(
        window, lambda current, following: math.log(0.5)
    )
    assert positions == 7
    assert repeats == 3
    assert reliable == 2
    assert gain == pytest.approx(2 * math.log(2))


def test_periodic_stream_is_reliable_with_no_gain():
    # In a stream that cycles 5, 6, 7 every bigram is certain, so copying adds nothing.
    tokens = np.tile(np.array([5, 6, 7], dtype=np.uint16), 1000)
    stats = repetition_stats.source_stats(tokens, d_vocab=8, n_ctx=6, n_windows=50)
    assert stats["repeat_frequency"] == pytest.approx(2 / 5)
    assert stats["reliability"] == 1.0
    assert stats["copy_gain_nats_per_token"] == pytest.approx(0.0, abs=1e-12)


def test_short_stream_is_rejected():
    with pytest.raises(ValueError, match="n_ctx"):
        repetition_stats.source_stats(np.arange(4), d_vocab=8, n_ctx=6, n_windows=1)
