"""Composition scores against dense matrices, on hand-built heads, and the random baseline."""

import math

import pandas as pd
import pytest
import torch

from circuits.analysis.attention import previous_token_scores
from circuits.analysis.composition import (
    composition_baseline,
    composition_scores,
    composition_table,
    k_composition_positivity,
    model_composition_baseline,
    normalized_embedding,
)
from circuits.folding import fold_layernorm
from circuits.model import AttnOnlyTransformer, ModelConfig
from conftest import tiny_model

D_MODEL = 16
N_CTX = 16


def frobenius(matrix):
    return torch.linalg.matrix_norm(matrix).item()


def dense_circuits(model, layer):
    """W_OV and W_QK per head, built directly from the parameters: gains folded, W_O centred."""
    block = model.blocks[layer]
    gain = block.ln1.w.detach().double()
    W_Q = gain[None, :, None] * block.attn.W_Q.detach().double()
    W_K = gain[None, :, None] * block.attn.W_K.detach().double()
    W_V = gain[None, :, None] * block.attn.W_V.detach().double()
    W_O = block.attn.W_O.detach().double()
    W_O = W_O - W_O.mean(-1, keepdim=True)
    return W_V @ W_O, W_Q @ W_K.transpose(-1, -2)


def test_scores_match_dense_products():
    model = tiny_model(n_layers=3)
    scores = composition_scores(model, 0, 2)
    ov_source, _ = dense_circuits(model, 0)
    ov_target, qk_target = dense_circuits(model, 2)

    for h1 in range(model.cfg.n_heads):
        for h2 in range(model.cfg.n_heads):
            ov, qk, ov2 = ov_source[h1], qk_target[h2], ov_target[h2]
            expected_q = frobenius(ov @ qk) / (frobenius(ov) * frobenius(qk))
            expected_k = frobenius(ov @ qk.T) / (frobenius(ov) * frobenius(qk))
            expected_v = frobenius(ov @ ov2) / (frobenius(ov) * frobenius(ov2))
            assert scores.q[h1, h2].item() == pytest.approx(expected_q, abs=1e-10)
            assert scores.k[h1, h2].item() == pytest.approx(expected_k, abs=1e-10)
            assert scores.v[h1, h2].item() == pytest.approx(expected_v, abs=1e-10)


def test_cyclic_permutation_changes_scores():
    """The permuted product W_QK W_OV has the same trace but not the same norm as W_OV W_QK."""
    model = tiny_model(n_layers=2)
    scores = composition_scores(model, 0, 1)
    ov, _ = dense_circuits(model, 0)
    _, qk = dense_circuits(model, 1)
    permuted = frobenius(qk[0] @ ov[0]) / (frobenius(ov[0]) * frobenius(qk[0]))
    assert torch.trace(qk[0] @ ov[0]).item() == pytest.approx(torch.trace(ov[0] @ qk[0]).item())
    assert abs(permuted - scores.q[0, 0].item()) > 1e-3


def induction_model(sign=1.0):
    """A 2-layer model without layernorm where L0H0 is a previous-token head and L1H1 reads it.

    Token embeddings live in dims 0-3 and positions in dims 12-13. L0H0 attends one token back
    (its query is the position rotated back by one step) and copies dims 0-3 into dims 8-11.
    L1H1's query reads dims 0-3 and its key reads dims 8-11 (times ``sign``), so
    W_QK^{L1H1} = sign · Σ_i e_i e_{8+i}ᵀ. L0H1 and L1H0 are random.
    """
    cfg = ModelConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=4, n_ctx=N_CTX, d_vocab=12,
                      normalization_type=None, pos_init="normal")
    model = AttnOnlyTransformer(cfg).double().eval()
    generator = torch.Generator().manual_seed(0)
    eye = torch.eye(4, dtype=torch.float64)
    theta, radius = 2 * math.pi / 40, 40.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embed.W_E[:, :4] = torch.randn(12, 4, generator=generator, dtype=torch.float64)
        angles = torch.arange(N_CTX, dtype=torch.float64) * theta
        model.pos_embed.W_pos[:, 12] = radius * torch.cos(angles)
        model.pos_embed.W_pos[:, 13] = radius * torch.sin(angles)
        model.unembed.W_U.normal_(generator=generator)

        layer0, layer1 = model.blocks[0].attn, model.blocks[1].attn
        rotate_back = torch.tensor([[math.cos(theta), -math.sin(theta)],
                                    [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        layer0.W_Q[0, 12:14, :2] = rotate_back
        layer0.W_K[0, 12:14, :2] = torch.eye(2, dtype=torch.float64)
        layer0.W_V[0, :4] = eye
        layer0.W_O[0, :, 8:12] = eye
        layer1.W_Q[1, :4] = eye
        layer1.W_K[1, 8:12] = sign * eye
        for weight in (layer0.W_Q[1], layer0.W_K[1], layer0.W_V[1], layer1.W_Q[0],
                       layer1.W_K[0], layer1.W_V[0], layer1.W_V[1]):
            weight.normal_(generator=generator)
        for weight in (layer0.W_O[1], layer1.W_O[0], layer1.W_O[1]):
            weight.normal_(generator=generator)
    return model


def test_reader_of_previous_token_head_tops_k_composition():
    model = induction_model()
    windows = torch.randint(0, 12, (4, N_CTX), generator=torch.Generator().manual_seed(1))
    previous = previous_token_scores(model, windows)
    assert previous[0, 0] > 0.99  # L0H0 really is a previous-token head
    positivity = k_composition_positivity(model, previous)
    assert positivity.pair_ratio[0, 1].item() == pytest.approx(1.0, abs=1e-10)
    assert torch.equal(positivity.previous_token_scores, previous[0])

    scores = composition_scores(model, 0, 1)

    # W_OV^{L0H0} (W_QK^{L1H1})ᵀ is the projector on dims 0-3: norm 2, and both factors have norm 2.
    assert scores.k[0, 1].item() == pytest.approx(0.5, abs=1e-12)
    assert scores.q[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    top = torch.argmax(scores.k).item()
    assert divmod(top, 2) == (0, 1)


def test_v_composition_order_matters():
    cfg = ModelConfig(n_layers=2, d_model=4, n_heads=1, d_head=1, n_ctx=4, d_vocab=5,
                      normalization_type=None)
    model = AttnOnlyTransformer(cfg).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.blocks[0].attn.W_V[0, 0, 0] = 1.0  # L0H0: W_OV = e0 e1ᵀ (reads e0, writes e1)
        model.blocks[0].attn.W_O[0, 0, 1] = 1.0
        model.blocks[1].attn.W_V[0, 1, 0] = 1.0  # L1H0: W_OV = e1 e2ᵀ (reads e1, writes e2)
        model.blocks[1].attn.W_O[0, 0, 2] = 1.0
        for block in model.blocks:
            block.attn.W_Q[0, 3, 0] = block.attn.W_K[0, 3, 0] = 1.0

    scores = composition_scores(model, 0, 1)
    ov_first = model.blocks[0].attn.W_V[0] @ model.blocks[0].attn.W_O[0]
    ov_second = model.blocks[1].attn.W_V[0] @ model.blocks[1].attn.W_O[0]

    assert scores.v[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert frobenius(ov_first @ ov_second) == pytest.approx(1.0)
    assert frobenius(ov_second @ ov_first) == 0.0  # the reversed product
    # Swapping the two layers' weights puts the heads in the other order: V-composition 0.
    with torch.no_grad():
        first = {k: v.clone() for k, v in model.blocks[0].attn.state_dict().items()}
        model.blocks[0].attn.load_state_dict(model.blocks[1].attn.state_dict())
        model.blocks[1].attn.load_state_dict(first)
    assert composition_scores(model, 0, 1).v[0, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_k_composition_positivity_of_induction_reader():
    model = induction_model()
    prev = torch.tensor([0.9, 0.1], dtype=torch.float64)
    result = k_composition_positivity(model, prev)

    # M_{L0H0, L1H1} = W_E P W_Eᵀ with P the projector on dims 0-3: all eigenvalues >= 0.
    assert result.pair_ratio[0, 1].item() == pytest.approx(1.0, abs=1e-10)
    anti = k_composition_positivity(induction_model(sign=-1.0), prev)
    assert anti.pair_ratio[0, 1].item() == pytest.approx(-1.0, abs=1e-10)

    W_E = model.embed.W_E.detach()
    qk = model.blocks[1].attn.W_Q[1] @ model.blocks[1].attn.W_K[1].T
    expected_trace = 0.0
    for head, weight in enumerate(prev.tolist()):
        ov = model.blocks[0].attn.W_V[head] @ model.blocks[0].attn.W_O[head]
        expected_trace += weight * torch.trace(W_E @ qk @ ov.T @ W_E.T).item()
    assert result.weighted_trace[1].item() == pytest.approx(expected_trace, rel=1e-10)
    # With all weight on L0H0 the trace is tr(W_E P W_Eᵀ), the squared norm of W_E's dims 0-3.
    only_previous = k_composition_positivity(model, torch.tensor([1.0, 0.0]))
    expected = (W_E[:, :4] ** 2).sum().item()
    assert only_previous.weighted_trace[1].item() == pytest.approx(expected, rel=1e-12)
    assert only_previous.weighted_ratio[1].item() == pytest.approx(1.0, abs=1e-10)


def test_k_composition_positivity_matches_dense_eigenvalues():
    model = tiny_model(n_layers=2, d_vocab=30)
    folded = fold_layernorm(model, dtype=torch.float64)
    prev = torch.tensor([0.7, 0.1, 0.05, 0.3], dtype=torch.float64)
    result = k_composition_positivity(model, prev)

    # The effective embedding: each W_E row centred and divided by sqrt(var + eps).
    W_E = model.embed.W_E.detach().double()
    centred = W_E - W_E.mean(-1, keepdim=True)
    embedding = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
    assert torch.allclose(normalized_embedding(folded), embedding, atol=1e-12)

    ov_source, _ = dense_circuits(model, 0)
    _, qk_target = dense_circuits(model, 1)
    for h2 in range(4):
        weighted = torch.zeros(30, 30, dtype=torch.float64)
        for h1 in range(4):
            M = embedding @ qk_target[h2] @ ov_source[h1].T @ embedding.T
            eigenvalues = torch.linalg.eigvals(M)
            ratio = (eigenvalues.real.sum() / eigenvalues.abs().sum()).item()
            assert result.pair_ratio[h1, h2].item() == pytest.approx(ratio, abs=1e-8)
            weighted += prev[h1] * M
        assert result.weighted_trace[h2].item() == pytest.approx(torch.trace(weighted).item(),
                                                                 rel=1e-9)
        eigenvalues = torch.linalg.eigvals(weighted)
        ratio = (eigenvalues.real.sum() / eigenvalues.abs().sum()).item()
        assert result.weighted_ratio[h2].item() == pytest.approx(ratio, abs=1e-8)


def test_baseline_matches_closed_form_for_rank_one():
    # With d_head = 1 every score is |cos| of the angle between two independent Gaussian vectors
    # in R^d, whose mean is Γ(d/2) / (sqrt(π) Γ((d+1)/2)).
    d = 16
    expected = math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    baseline = composition_baseline(d, 1, n_samples=4000, seed=0)
    for kind in ("q", "k", "v"):
        assert getattr(baseline, kind) == pytest.approx(expected, abs=0.01)


def test_baseline_near_inverse_sqrt_d_model():
    baseline = composition_baseline(64, 8, n_samples=200, seed=0)
    for kind in ("q", "k", "v"):
        assert getattr(baseline, kind) == pytest.approx(1 / 8, abs=0.004)


def test_baseline_is_deterministic():
    first = composition_baseline(32, 4, n_samples=100, seed=3)
    again = composition_baseline(32, 4, n_samples=100, seed=3)
    other = composition_baseline(32, 4, n_samples=100, seed=4)
    assert first == again
    assert first.q != other.q
    assert model_composition_baseline(tiny_model(), n_samples=100, seed=3) == composition_baseline(
        32, 8, n_samples=100, seed=3)


def test_composition_table_rows():
    model = tiny_model(n_layers=3)
    baseline = composition_baseline(32, 8, n_samples=100)
    table = composition_table(model, baseline=baseline)

    assert isinstance(table, pd.DataFrame)
    assert len(table) == 3 * 16 * 3  # layer pairs x head pairs x kinds
    assert (table["source_layer"] < table["target_layer"]).all()
    row = table[(table.source == "L0H2") & (table.target == "L2H1") & (table.composition == "k")]
    assert row["score"].item() == pytest.approx(composition_scores(model, 0, 2).k[2, 1].item())
    assert row["baseline"].item() == baseline.k


def test_invalid_layers_raise():
    model = tiny_model(n_layers=2)
    with pytest.raises(ValueError, match="before the target"):
        composition_scores(model, 1, 0)
    with pytest.raises(ValueError, match="target_layer must be in"):
        composition_scores(model, 0, 2)
    with pytest.raises(ValueError, match="previous_token_scores must have shape"):
        k_composition_positivity(model, torch.ones(3))
    with pytest.raises(ValueError, match="n_samples"):
        composition_baseline(32, 8, n_samples=0)
