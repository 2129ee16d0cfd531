"""Attention-pattern scores on hand-built heads, closed forms and naive loops."""

import math

import numpy as np
import pytest
import torch

from circuits.analysis.attention import (
    induction_targets,
    preferred_offsets,
    prefix_matching_score_from_patterns,
    prefix_matching_scores,
    previous_token_score_from_patterns,
    previous_token_scores,
    repeated_random_tokens,
    repeated_token_loss,
)
from circuits.model import AttnOnlyTransformer, ModelConfig
from circuits.tokenizer import Tokenizer

N_CTX = 12
D_VOCAB = 40


def positional_model():
    """Layer 0: head 0 attends to the previous token, head 1 to itself. Layer 1: uniform.

    W_pos = I and W_E = 0, with no layernorm, so the scores are purely positional. Head 0 has
    W_Q = c·I and W_K = c·S with S[j, j + 1] = 1, so query i matches only key i - 1 with score
    c² / sqrt(d_head). Layer 1 has W_Q = 0, so every score is 0 and the softmax is uniform.
    """
    config = ModelConfig(
        n_layers=2, d_model=N_CTX, n_heads=2, d_head=N_CTX, n_ctx=N_CTX, d_vocab=D_VOCAB,
        normalization_type=None,
    )
    model = AttnOnlyTransformer(config).double().eval()
    c = 10.0
    eye = torch.eye(N_CTX, dtype=torch.float64)
    shift = torch.diag(torch.ones(N_CTX - 1, dtype=torch.float64), diagonal=1)
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.pos_embed.W_pos.copy_(eye)
        first = model.blocks[0].attn
        first.W_Q[0].copy_(c * eye)
        first.W_K[0].copy_(c * shift)
        first.W_Q[1].copy_(c * eye)
        first.W_K[1].copy_(c * eye)
        model.blocks[1].attn.W_Q.zero_()
    return model


def random_windows(n, n_pos=N_CTX, seed=0):
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, D_VOCAB - 1, (n, n_pos), generator=generator)
    windows[:, 0] = D_VOCAB - 1
    return windows


def random_patterns(batch, heads, n_pos, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n_pos, n_pos, generator=generator, dtype=torch.float64)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def naive_prefix_matching(pattern, period):
    """Loop over queries and earlier copies of each query's token, position by position."""
    batch, heads, n_pos, _ = pattern.shape
    scores = torch.zeros(batch, heads, dtype=torch.float64)
    n_queries = 0
    for p in range(1 + period, n_pos):
        n_queries += 1
        earlier_copies = [c for c in range(1, p) if (p - c) % period == 0]
        for c in earlier_copies:
            scores += pattern[:, :, p, c + 1]
    return scores / n_queries


def test_previous_token_head_scores_one():
    model = positional_model()
    scores = previous_token_scores(model, random_windows(5), batch_size=2)
    assert scores.shape == (2, 2)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_uniform_head_previous_token_closed_form():
    # Uniform attention over keys 0 … i puts 1 / (i + 1) on key i - 1.
    model = positional_model()
    scores = previous_token_scores(model, random_windows(3))
    expected = sum(1.0 / (i + 1) for i in range(1, N_CTX)) / (N_CTX - 1)
    assert scores[1, 0].item() == pytest.approx(expected, rel=1e-9)
    assert scores[1, 1].item() == pytest.approx(expected, rel=1e-9)


def test_preferred_offsets_peak_where_expected():
    model = positional_model()
    offsets = preferred_offsets(model, random_windows(4), max_offset=5)
    assert offsets.shape == (2, 2, 6)
    assert offsets[0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert offsets[0, 1, 0].item() == pytest.approx(1.0, abs=1e-6)
    # Offset 0 of the previous-token head: only query 0 (with one key) attends to itself.
    assert offsets[0, 0, 0].item() == pytest.approx(1.0 / N_CTX, abs=1e-6)
    for offset in range(6):
        expected = sum(1.0 / (i + 1) for i in range(offset, N_CTX)) / (N_CTX - offset)
        assert offsets[1, 0, offset].item() == pytest.approx(expected, rel=1e-9)


def test_preferred_offsets_default_covers_every_offset():
    offsets = preferred_offsets(positional_model(), random_windows(2))
    assert offsets.shape == (2, 2, N_CTX)
    assert offsets[1, 1, N_CTX - 1].item() == pytest.approx(1.0 / N_CTX, rel=1e-9)


def test_offsets_after_bos_closed_form():
    model = positional_model()
    offsets = preferred_offsets(model, random_windows(3), skip_bos=True)
    assert offsets.shape == (2, 2, N_CTX - 1)
    assert offsets[0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert offsets[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert offsets[0, 1, 0].item() == pytest.approx(1.0, abs=1e-6)
    for offset in range(N_CTX - 1):
        # Uniform attention, queries o + 1 … n - 1 (the key i - o is never position 0).
        queries = range(offset + 1, N_CTX)
        expected = sum(1.0 / (i + 1) for i in queries) / len(queries)
        assert offsets[1, 0, offset].item() == pytest.approx(expected, rel=1e-9)


def test_offsets_ignore_bos_parking():
    # Head 1 of layer 0 puts nearly all of every query's attention on position 0: W_Q maps each
    # position to the same query and W_K gives only position 0 a matching key.
    model = positional_model()
    with torch.no_grad():
        attn = model.blocks[0].attn
        attn.W_Q[1].zero_()
        attn.W_Q[1][:, 0] = 10.0
        attn.W_K[1].zero_()
        attn.W_K[1][0, 0] = 10.0
    windows = random_windows(2)
    with_bos = preferred_offsets(model, windows)
    after_bos = preferred_offsets(model, windows, skip_bos=True)
    # Counting the BOS key, the single query at offset n - 1 makes that offset look preferred.
    assert with_bos[0, 1].argmax().item() == N_CTX - 1
    assert with_bos[0, 1, N_CTX - 1].item() == pytest.approx(1.0, abs=1e-6)
    assert after_bos[0, 1].max().item() < 1e-6


def test_offsets_after_bos_reject_last():
    with pytest.raises(ValueError, match="max_offset"):
        preferred_offsets(positional_model(), random_windows(1), max_offset=N_CTX - 1,
                          skip_bos=True)


def test_previous_token_from_patterns_matches_loop():
    pattern = random_patterns(3, 2, 9, seed=1)
    expected = sum(pattern[:, :, i, i - 1] for i in range(1, 9)) / 8
    torch.testing.assert_close(previous_token_score_from_patterns(pattern), expected)


@pytest.mark.parametrize("period,n_repeats", [(1, 5), (2, 3), (3, 4), (5, 2)])
def test_prefix_matching_matches_naive_loop(period, n_repeats):
    n_pos = 1 + period * n_repeats
    pattern = random_patterns(4, 3, n_pos, seed=period)
    expected = naive_prefix_matching(pattern, period)
    torch.testing.assert_close(prefix_matching_score_from_patterns(pattern, period), expected)


def test_exact_induction_pattern_scores_one():
    period, n_repeats = 4, 3
    n_pos = 1 + period * n_repeats
    pattern = torch.zeros(1, 1, n_pos, n_pos, dtype=torch.float64)
    for p in range(n_pos):
        if p >= 1 + period:
            pattern[0, 0, p, p - period + 1] = 1.0  # the token after the latest earlier copy
        else:
            pattern[0, 0, p, 0] = 1.0
    score = prefix_matching_score_from_patterns(pattern, period)
    assert score.item() == pytest.approx(1.0)

    # Attending to the earlier copy itself (a duplicate-token head) is not prefix matching.
    shifted = torch.zeros_like(pattern)
    for p in range(n_pos):
        shifted[0, 0, p, p - period if p >= 1 + period else 0] = 1.0
    assert prefix_matching_score_from_patterns(shifted, period).item() == pytest.approx(0.0)


def test_induction_targets_hand_listed():
    # Period 2: positions 1 2 | 3 4 | 5 6 hold tokens a b | a b | a b.
    queries, targets = induction_targets(7, 2)
    assert queries.tolist() == [False, False, False, True, True, True, True]
    listed = {p: torch.nonzero(targets[p]).flatten().tolist() for p in range(7)}
    # Query 3 (a): the earlier a is at 1, so the target is 2 (b).
    assert listed == {0: [], 1: [], 2: [], 3: [2], 4: [3], 5: [2, 4], 6: [3, 5]}


def test_prefix_matching_scores_on_uniform_model():
    model = positional_model()
    period = 3
    sequences = repeated_random_tokens(D_VOCAB, n_tokens=period, n_repeats=3, n_sequences=4)
    scores = prefix_matching_scores(model, sequences, period)
    assert scores.shape == (2, 2)
    _, targets = induction_targets(sequences.shape[1], period)
    queries = range(1 + period, sequences.shape[1])
    expected = sum(targets[p].sum().item() / (p + 1) for p in queries) / len(queries)
    assert scores[1, 0].item() == pytest.approx(expected, rel=1e-9)
    # The previous-token head attends to p - 1, a target only for period 1.
    assert scores[0, 0].item() == pytest.approx(0.0, abs=1e-6)


def test_repeated_random_tokens_layout():
    sequences = repeated_random_tokens(D_VOCAB, n_tokens=6, n_repeats=3, n_sequences=5, seed=3)
    assert sequences.shape == (5, 19)
    assert sequences.dtype == torch.int64
    assert (sequences[:, 0] == D_VOCAB - 1).all()
    first = sequences[:, 1:7]
    assert torch.equal(sequences[:, 7:13], first)
    assert torch.equal(sequences[:, 13:19], first)
    for row in first:
        assert len(set(row.tolist())) == 6
    assert ((sequences[:, 1:] >= 0) & (sequences[:, 1:] < D_VOCAB - 1)).all()
    assert torch.equal(sequences, repeated_random_tokens(D_VOCAB, 6, 3, 5, seed=3))
    assert not torch.equal(sequences, repeated_random_tokens(D_VOCAB, 6, 3, 5, seed=4))


def test_repeated_random_tokens_default_range_skips_bytes():
    tokenizer = Tokenizer(n_ranks=300)
    sequences = repeated_random_tokens(tokenizer, n_tokens=20, n_sequences=3)
    assert (sequences[:, 0] == 300).all()
    assert sequences[:, 1:].min() >= 256
    assert sequences[:, 1:].max() < 300


def test_repeated_random_tokens_explicit_range_and_counts():
    ranged = repeated_random_tokens(D_VOCAB, n_tokens=4, low=10, high=14, n_sequences=3)
    assert sorted(ranged[0, 1:5].tolist()) == [10, 11, 12, 13]

    # Ten tokens occur; the most and least frequent are dropped with exclude_fraction 0.1.
    counts = np.zeros(D_VOCAB, dtype=np.int64)
    counts[[3, 5, 7, 9, 11, 13, 15, 17, 19, 21]] = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    counts[D_VOCAB - 1] = 1000  # BOS is never drawn
    sequences = repeated_random_tokens(D_VOCAB, n_tokens=8, counts=counts, n_sequences=3)
    for row in sequences:
        assert sorted(row[1:9].tolist()) == [5, 7, 9, 11, 13, 15, 17, 19]


def test_repeated_random_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="candidate tokens"):
        repeated_random_tokens(D_VOCAB, n_tokens=5, low=0, high=4)
    with pytest.raises(ValueError, match="token range"):
        repeated_random_tokens(D_VOCAB, low=5, high=D_VOCAB)
    with pytest.raises(ValueError, match="not both"):
        repeated_random_tokens(D_VOCAB, counts=np.ones(D_VOCAB), low=0)
    with pytest.raises(ValueError, match="must be positive"):
        repeated_random_tokens(D_VOCAB, n_repeats=0)


def test_repeated_token_loss_matches_naive():
    torch.manual_seed(0)
    config = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=16, d_vocab=D_VOCAB)
    model = AttnOnlyTransformer(config).double().eval()
    period, n_repeats = 5, 3
    sequences = repeated_random_tokens(D_VOCAB, n_tokens=period, n_repeats=n_repeats,
                                       n_sequences=3, seed=1)
    result = repeated_token_loss(model, sequences, period, batch_size=2)

    with torch.no_grad():
        log_probs = model(sequences).log_softmax(-1)
    n_pos = sequences.shape[1]
    naive = torch.zeros(n_pos - 1, dtype=torch.float64)
    for position in range(1, n_pos):
        for row in range(3):
            naive[position - 1] -= log_probs[row, position - 1, sequences[row, position]] / 3
    torch.testing.assert_close(result.per_position, naive)

    for r in range(n_repeats):
        targets = range(2 + r * period, (r + 1) * period + 1)
        expected = sum(naive[t - 1].item() for t in targets) / len(targets)
        assert result.per_copy[r].item() == pytest.approx(expected, rel=1e-12)


def test_repeated_input_validation():
    model = positional_model()
    sequences = repeated_random_tokens(D_VOCAB, n_tokens=3, n_repeats=2, n_sequences=2)
    with pytest.raises(ValueError, match="two repeats of period 4"):
        prefix_matching_scores(model, sequences, 4)
    with pytest.raises(ValueError, match="period must be a positive int"):
        prefix_matching_scores(model, sequences, 0)
    with pytest.raises(ValueError, match="shape"):
        previous_token_scores(model, sequences[0])
    with pytest.raises(ValueError, match="max_offset"):
        preferred_offsets(model, sequences, max_offset=sequences.shape[1])
    no_layers = AttnOnlyTransformer(ModelConfig(0, 4, 1, 4, 8, D_VOCAB))
    with pytest.raises(ValueError, match="no attention layers"):
        previous_token_scores(no_layers, sequences)


def test_model_mode_is_restored():
    model = positional_model().train()
    previous_token_scores(model, random_windows(2))
    assert model.training
    assert math.isfinite(repeated_token_loss(
        model, repeated_random_tokens(D_VOCAB, 3, 3, 2), 3).per_copy.sum().item())
    assert model.training
