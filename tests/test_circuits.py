"""OV and QK circuits, effective matrices and copying scores on hand-built and random models."""

import math

import pandas as pd
import pytest
import torch

from circuits.analysis.circuits import (
    copying_score,
    copying_scores,
    direct_path,
    direct_path_copying_score,
    effective_embedding,
    effective_unembedding,
    ov_circuit,
    ov_circuits,
    ov_eigenvalues,
    positional_qk,
    qk_circuit,
    random_control,
)
from circuits.factored import FactoredMatrix
from circuits.model import AttnOnlyTransformer, ModelConfig


def small_config(**overrides):
    values = dict(n_layers=2, d_model=12, n_heads=3, d_head=4, n_ctx=8, d_vocab=20)
    values.update(overrides)
    return ModelConfig(**values)


def random_model(seed=0, **overrides):
    """A float64 model whose layernorm gains and biases are random too (not 1 and 0)."""
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(small_config(**overrides)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
        for ln in [block.ln1 for block in model.blocks] + [model.ln_final]:
            if ln is not None:
                ln.w.uniform_(0.5, 1.5)
    return model


def identity_model(signs):
    """One layer, no layernorm, W_E = W_U = I, and head h with W_V W_O = signs[h] * I."""
    d = 4
    config = ModelConfig(
        n_layers=1, d_model=d, n_heads=len(signs), d_head=d, n_ctx=4, d_vocab=d,
        normalization_type=None,
    )
    model = AttnOnlyTransformer(config).double()
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(d))
        model.unembed.W_U.copy_(torch.eye(d))
        for head, sign in enumerate(signs):
            model.blocks[0].attn.W_V[head].copy_(sign * torch.eye(d))
            model.blocks[0].attn.W_O[head].copy_(torch.eye(d))
    return model


def test_identity_and_negative_ov_scores():
    model = identity_model([1.0, -1.0])
    torch.testing.assert_close(ov_circuit(model, 0, 0).dense(), torch.eye(4, dtype=torch.float64))
    assert float(copying_score(ov_circuit(model, 0, 0))) == pytest.approx(1.0)
    assert float(copying_score(ov_circuit(model, 0, 1))) == pytest.approx(-1.0)


def test_rotation_scores_zero():
    # A quarter turn in two planes has eigenvalues ±i, ±i: no copying, no anti-copying.
    rotation = torch.tensor(
        [[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]],
        dtype=torch.float64,
    )
    score = copying_score(FactoredMatrix(rotation, torch.eye(4, dtype=torch.float64)))
    assert float(score) == pytest.approx(0.0, abs=1e-12)


def test_copying_score_of_zero_circuit_is_nan():
    zero = FactoredMatrix(torch.zeros(3, 2), torch.zeros(2, 3))
    assert math.isnan(float(copying_score(zero)))


def test_copying_scores_table():
    table = copying_scores(identity_model([1.0, -1.0, 0.5]))
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["layer", "head", "name", "copying_score"]
    assert table["name"].tolist() == ["L0H0", "L0H1", "L0H2"]
    assert table["layer"].tolist() == [0, 0, 0]
    assert table["copying_score"].tolist() == pytest.approx([1.0, -1.0, 1.0])


def test_copying_scores_cover_every_head():
    model = random_model()
    table = copying_scores(model)
    assert len(table) == 6
    assert table["name"].tolist() == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert table["copying_score"].between(-1.0, 1.0).all()


def test_ov_eigenvalues_match_dense_eigvals():
    model = random_model(seed=1)
    for layer in range(2):
        for head in range(3):
            circuit = ov_circuit(model, layer, head)
            small = ov_eigenvalues(model, layer, head)
            assert small.shape == (4,)
            assert small.dtype == torch.complex128
            dense = torch.linalg.eigvals(circuit.dense())
            largest = dense[dense.abs().argsort(descending=True)[:4]]
            # Each of the d_head eigenvalues appears among the dense matrix's largest ones.
            distance = (small[:, None] - largest[None, :]).abs()
            assert distance.min(1).values.max() < 1e-8
            assert distance.min(0).values.max() < 1e-8
            expected_score = dense.real.sum() / dense.abs().sum()
            assert float(copying_score(circuit)) == pytest.approx(float(expected_score), abs=1e-8)


def test_effective_embedding_matches_naive_layer_norm():
    model = random_model(seed=2)
    ln = model.blocks[1].ln1
    W_E = model.embed.W_E.detach()
    expected = torch.empty_like(W_E)
    for t in range(W_E.shape[0]):
        row = W_E[t]
        mean = sum(row.tolist()) / len(row)
        variance = sum((value - mean) ** 2 for value in row.tolist()) / len(row)
        for i in range(len(row)):
            normed = (row[i].item() - mean) / math.sqrt(variance + ln.eps)
            expected[t, i] = normed * ln.w[i].item() + ln.b[i].item()
    torch.testing.assert_close(effective_embedding(model, 1), expected)
    # The model's own layernorm module agrees (it computes in float32).
    torch.testing.assert_close(
        effective_embedding(model, 1).float(), ln(W_E.float()).detach(), rtol=1e-5, atol=1e-5
    )


def test_effective_unembedding_matches_naive_fold_and_centre():
    model = random_model(seed=3)
    w = model.ln_final.w.detach()
    W_U = model.unembed.W_U.detach()
    d_model, d_vocab = W_U.shape
    expected = torch.empty_like(W_U)
    for o in range(d_vocab):
        column = [w[i].item() * W_U[i, o].item() for i in range(d_model)]
        mean = sum(column) / d_model
        for i in range(d_model):
            expected[i, o] = column[i] - mean
    torch.testing.assert_close(effective_unembedding(model), expected)


def test_effective_matrices_without_layernorm_are_plain():
    model = random_model(seed=4, normalization_type=None)
    torch.testing.assert_close(effective_embedding(model, 0), model.embed.W_E.detach())
    torch.testing.assert_close(effective_unembedding(model), model.unembed.W_U.detach())


def test_ov_circuit_matches_forward_pass():
    """On a one-token sequence each head attends only to position 0, so its output is known."""
    model = random_model(seed=5, n_layers=1)
    circuits = ov_circuits(model, 0)
    W_U_eff = effective_unembedding(model)
    for token in (0, 7, 19):
        logits, cache = model.run_with_cache(torch.tensor([[token]]))
        head_outputs = cache.head_outputs[0][0, 0]  # [head, d_model]
        for head in range(3):
            expected = circuits[head].rows([token]).dense()[0]
            torch.testing.assert_close(head_outputs[head] @ W_U_eff, expected)

        # The logits minus the final bias term are the centred residual's logits over its scale.
        resid = cache.resid_pre[1][0, 0]
        scale = model.ln_final.scale(resid[None])[0]
        bias_logits = model.ln_final.b.detach() @ model.unembed.W_U.detach()
        torch.testing.assert_close(logits[0, 0] - bias_logits, resid @ W_U_eff / scale)


def test_qk_circuit_matches_attention_scores():
    model = random_model(seed=6, n_layers=1)
    with torch.no_grad():
        model.pos_embed.W_pos.zero_()
    source, destination = 3, 11
    _, cache = model.run_with_cache(torch.tensor([[source, destination]]))
    pattern = cache.patterns[0][0]  # [head, query, key]
    for head in range(3):
        circuit = qk_circuit(model, 0, head).dense()
        expected = (circuit[destination, source] - circuit[destination, destination]) / 2.0
        observed = torch.log(pattern[head, 1, 0] / pattern[head, 1, 1])
        assert observed.item() == pytest.approx(expected.item(), abs=1e-9)


def test_positional_qk_matches_attention_scores():
    model = random_model(seed=7, n_layers=1, normalization_type=None)
    with torch.no_grad():
        model.embed.W_E.zero_()
    n = 6
    _, cache = model.run_with_cache(torch.zeros(1, n, dtype=torch.long))
    for head in range(3):
        scores = positional_qk(model, 0, head)
        assert scores.shape == (8, 8)
        for query in range(n):
            observed = torch.log(cache.patterns[0][0, head, query, : query + 1])
            expected = scores[query, : query + 1] / 2.0
            torch.testing.assert_close(
                observed - observed[0], expected - expected[0], rtol=1e-9, atol=1e-9
            )


def test_direct_path_matches_zero_layer_forward():
    model = random_model(seed=8, n_layers=0)
    tokens = torch.arange(20)[:, None]
    with torch.no_grad():
        logits = model(tokens)[:, 0]
    torch.testing.assert_close(direct_path(model).dense(), logits)
    expected_eigenvalues = torch.linalg.eigvals(logits)
    expected = expected_eigenvalues.real.sum() / expected_eigenvalues.abs().sum()
    # d_vocab > d_model, so the dense matrix has d_vocab - d_model near-zero eigenvalues that
    # only add rounding noise to the denominator.
    assert direct_path_copying_score(model) == pytest.approx(float(expected), abs=1e-6)


def test_direct_path_of_identity_model_copies():
    assert direct_path_copying_score(identity_model([1.0])) == pytest.approx(1.0)


def test_random_control_is_seeded_and_leaves_rng_alone():
    config = small_config(n_layers=1)
    state = torch.random.get_rng_state()
    first = random_control(config, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    pd.testing.assert_frame_equal(first, random_control(config, seed=5))
    assert not first["copying_score"].equals(random_control(config, seed=6)["copying_score"])

    torch.manual_seed(5)
    pd.testing.assert_frame_equal(first, copying_scores(AttnOnlyTransformer(config)))
    assert first["name"].tolist() == ["L0H0", "L0H1", "L0H2"]


def test_invalid_layer_or_head_raises():
    model = random_model(seed=9)
    with pytest.raises(ValueError, match="layer must be in"):
        ov_circuit(model, 2, 0)
    with pytest.raises(ValueError, match="head must be in"):
        qk_circuit(model, 0, 3)
    with pytest.raises(ValueError, match="layer must be in"):
        positional_qk(model, -1, 0)
