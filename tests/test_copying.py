"""Copying summary: scores, control and eigenvalues agree with the circuit functions."""

import numpy as np
import pytest
import torch

from circuits.analysis.circuits import (
    copying_scores,
    direct_path_copying_score,
    ov_eigenvalues,
    random_control,
)
from circuits.analysis.copying import copying_summary
from conftest import tiny_model


def test_summary_matches_circuit_functions():
    model = tiny_model(seed=5, n_layers=2)
    summary = copying_summary(model, seed=3)

    scores = copying_scores(model)
    control = random_control(model.cfg, seed=3)
    assert summary.scores["name"].tolist() == scores["name"].tolist()
    assert summary.scores["trained"].tolist() == pytest.approx(scores["copying_score"].tolist())
    expected_control = control["copying_score"].tolist()
    assert summary.scores["random init"].tolist() == pytest.approx(expected_control)
    assert summary.direct_path == pytest.approx(direct_path_copying_score(model))
    np.testing.assert_allclose(summary.eigenvalues["L1H2"], ov_eigenvalues(model, 1, 2).numpy())
    assert len(summary.eigenvalues) == 8


def test_count_of_copying_heads():
    model = tiny_model(seed=6, n_layers=1)
    with torch.no_grad():
        attn = model.blocks[0].attn
        # W_O = W_Vᵀ makes W_V W_O positive semi-definite; W_U = W_Eᵀ nearly so.
        attn.W_O.copy_(attn.W_V.transpose(-1, -2))
        model.unembed.W_U.copy_(model.embed.W_E.T)
        attn.W_O[1].neg_()
    summary = copying_summary(model)
    assert summary.scores["copying"].tolist() == (summary.scores["trained"] > 0).tolist()
    assert summary.scores.loc[0, "copying"]
    assert not summary.scores.loc[1, "copying"]
    assert summary.n_copying == int((summary.scores["trained"] > 0).sum())
