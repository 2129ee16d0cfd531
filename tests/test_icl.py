"""In-context learning score and loss by position, against naive loops and closed-form values."""

import math

import numpy as np
import pytest
import torch

from circuits.analysis.icl import (
    icl_indices,
    icl_score_from_losses,
    in_context_learning_score,
    loss_by_position,
    mean_token_losses,
    validation_windows,
)
from conftest import tiny_model

BOS = 299


def windows_with_bos(n_windows, n_pos, seed=0):
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, BOS, (n_windows, n_pos), generator=generator)
    windows[:, 0] = BOS
    return windows


def naive_mean_losses(model, windows):
    """Loss of token i = −log softmax(logits at i − 1)[token i], averaged over windows, by loop."""
    logits = model(windows).double()
    n_windows, n_pos = windows.shape
    means = []
    for i in range(1, n_pos):
        total = 0.0
        for w in range(n_windows):
            log_probs = logits[w, i - 1] - torch.logsumexp(logits[w, i - 1], -1)
            total += -log_probs[windows[w, i]].item()
        means.append(total / n_windows)
    return means


def test_loss_by_position_matches_naive_loop():
    model = tiny_model()
    with torch.no_grad():
        model.unembed.W_U.mul_(40)  # losses that vary by position
    windows = windows_with_bos(5, 24)

    series = loss_by_position(model, windows, batch_size=2, bos_token_id=BOS)

    expected = naive_mean_losses(model, windows)
    assert list(series.index) == list(range(1, 24))
    assert series.index.name == "token_index"
    assert np.allclose(series.to_numpy(), expected, rtol=0, atol=1e-5)
    assert np.ptp(series.to_numpy()) > 0.1


def test_icl_score_matches_naive_loop():
    model = tiny_model()
    with torch.no_grad():
        model.unembed.W_U.mul_(40)
    windows = windows_with_bos(6, 24, seed=1)

    result = in_context_learning_score(model, windows, batch_size=4, bos_token_id=BOS)

    expected = naive_mean_losses(model, windows)
    assert (result.late_index, result.early_index) == (22, 2)  # round(21.6), round(2.4)
    assert result.late_loss == pytest.approx(expected[21], abs=1e-5)
    assert result.early_loss == pytest.approx(expected[1], abs=1e-5)
    assert result.score == pytest.approx(expected[21] - expected[1], abs=1e-5)
    assert result.n_windows == 6


def test_uniform_model_scores_zero():
    model = tiny_model()
    with torch.no_grad():
        model.unembed.W_U.zero_()
    windows = windows_with_bos(3, 24)

    series = loss_by_position(model, windows)
    result = in_context_learning_score(model, windows)

    assert np.allclose(series.to_numpy(), math.log(300), atol=1e-6)
    assert result.score == pytest.approx(0.0, abs=1e-6)


def test_context_use_gives_negative_score():
    """Logits that favour the true next token more with every position: a known, falling loss."""
    vocab, n_pos, slope = 10, 20, 0.25
    windows = windows_with_bos(4, n_pos, seed=2) % vocab

    def oracle(tokens):
        logits = torch.zeros(*tokens.shape, vocab, dtype=torch.float64)
        for i in range(tokens.shape[1] - 1):
            logits[torch.arange(tokens.shape[0]), i, tokens[:, i + 1]] = slope * i
        return logits

    result = in_context_learning_score(oracle, windows)

    def loss(index):  # the target at `index` gets logit slope * (index − 1)
        boost = slope * (index - 1)
        return -(boost - math.log(math.exp(boost) + vocab - 1))

    assert (result.late_index, result.early_index) == (18, 2)
    assert result.score == pytest.approx(loss(18) - loss(2), abs=1e-12)
    assert result.score < 0


@pytest.mark.parametrize(
    "n_pos, expected",
    [(512, (500, 50)), (2048, (500, 50)), (100, (90, 10)), (25, (23, 3)), (24, (22, 2)),
     (15, (14, 2)), (10, (9, 1)), (3, (2, 1))],
)
def test_icl_indices(n_pos, expected):
    assert icl_indices(n_pos) == expected


def test_icl_indices_reject_short_windows():
    with pytest.raises(ValueError, match="at least 3 tokens"):
        icl_indices(2)


def test_explicit_indices():
    means = torch.arange(1, 24, dtype=torch.float64)  # mean loss of index i is i
    result = icl_score_from_losses(means, n_windows=7, late_index=20, early_index=5)
    assert result.score == 15.0
    assert (result.late_loss, result.early_loss) == (20.0, 5.0)
    with pytest.raises(ValueError, match="late_index must be in"):
        icl_score_from_losses(means, n_windows=7, late_index=24)
    with pytest.raises(ValueError, match="early_index must be in"):
        icl_score_from_losses(means, n_windows=7, early_index=0)


def test_training_mode_restored():
    model = tiny_model(attn_dropout=0.5).train()
    windows = windows_with_bos(3, 16)
    first = mean_token_losses(model, windows)
    again = mean_token_losses(model, windows)
    assert torch.equal(first, again)  # dropout was off while scoring
    assert model.training


def test_batch_size_does_not_change_result():
    model = tiny_model()
    windows = windows_with_bos(5, 16, seed=3)
    single = mean_token_losses(model, windows, batch_size=1)
    batched = mean_token_losses(model, windows, batch_size=7)
    assert torch.allclose(single, batched, atol=1e-6)


def test_windows_without_bos_rejected():
    model = tiny_model()
    windows = windows_with_bos(2, 8)
    windows[1, 0] = 5
    with pytest.raises(ValueError, match="BOS token 299"):
        in_context_learning_score(model, windows, bos_token_id=BOS)
    with pytest.raises(TypeError, match="integer"):
        loss_by_position(model, windows.float())
    with pytest.raises(ValueError, match="n_windows >= 1"):
        loss_by_position(model, windows[:0])


def test_validation_windows():
    stream = np.arange(1, 200, dtype=np.uint16) % 50
    windows = validation_windows(stream, n_ctx=10, bos_token_id=BOS, n_windows=5)
    assert windows.shape == (5, 10)
    assert (windows[:, 0] == BOS).all()
    assert windows[1, 1:].tolist() == stream[9:18].tolist()
    with pytest.raises(ValueError, match="enough for 22 windows"):
        validation_windows(stream, n_ctx=10, bos_token_id=BOS, n_windows=1000)
