"""The in-context learning score with its standard error, against naive per-window losses."""

import math

import numpy as np
import pytest
import torch

from circuits.analysis.icl import in_context_learning_score, loss_by_position
from circuits.analysis.icl_spread import icl_score_spread
from conftest import tiny_model


def windows(n_windows, n_pos=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 299, (n_windows, n_pos), generator=generator)
    batch[:, 0] = 299
    return batch


def test_matches_icl_module():
    model = tiny_model()
    batch = windows(5)
    spread = icl_score_spread(model, batch, batch_size=2)
    reference = in_context_learning_score(model, batch)

    assert spread.score == pytest.approx(reference.score)
    assert (spread.late_index, spread.early_index) == (reference.late_index,
                                                        reference.early_index)
    assert spread.n_windows == 5
    expected = loss_by_position(model, batch)
    assert spread.loss_by_position.index.equals(expected.index)
    np.testing.assert_allclose(spread.loss_by_position.to_numpy(), expected.to_numpy(),
                               rtol=1e-6)


def test_standard_error_naive():
    model = tiny_model()
    batch = windows(6)
    spread = icl_score_spread(model, batch, late_index=15, early_index=3)

    with torch.no_grad():
        losses = model.loss(batch, per_token=True).double().numpy()
    # Column i - 1 is the loss of the token at index i.
    differences = losses[:, 14] - losses[:, 2]
    # Both sides come from float32 losses of several nats, computed by different kernels, so
    # they agree to about 1e-6 nats, which is not a relative 1e-6 of a small difference.
    assert spread.score == pytest.approx(differences.mean(), abs=1e-5)
    assert spread.standard_error == pytest.approx(differences.std(ddof=1) / math.sqrt(6),
                                                  abs=1e-5)


def test_single_window_has_no_error():
    spread = icl_score_spread(tiny_model(), windows(1))
    assert math.isnan(spread.standard_error)
    assert math.isfinite(spread.score)


def test_constant_logits_give_zero():
    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 300)

    spread = icl_score_spread(Uniform(), windows(4))
    assert spread.score == pytest.approx(0.0)
    assert spread.standard_error == pytest.approx(0.0)
    assert spread.loss_by_position.to_numpy() == pytest.approx(math.log(300))


def test_rejects_empty_windows():
    with pytest.raises(ValueError, match="n_windows"):
        icl_score_spread(tiny_model(), torch.zeros(0, 20, dtype=torch.int64))
