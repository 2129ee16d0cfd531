"""Value-weighted attention against a naive recomputation and hand-built cases."""

import pytest
import torch

from circuits.analysis.value_weighted import ValueWeightedAttention, value_weighted_attention
from conftest import tiny_model


def tokens(batch=2, n_pos=10, d_vocab=300, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, n_pos), generator=generator)


def layer_norm(x, ln):
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt() * ln.w + ln.b


def test_matches_naive_loop():
    model = tiny_model(dtype=torch.float64)
    batch = tokens()
    result = value_weighted_attention(model, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)

    for layer, block in enumerate(model.blocks):
        normed = layer_norm(cache.resid_pre[layer], block.ln1)
        for b in range(batch.shape[0]):
            for head in range(model.cfg.n_heads):
                for j in range(batch.shape[1]):
                    written = normed[b, j] @ block.attn.W_V[head] @ block.attn.W_O[head]
                    expected_norm = written.norm().item()
                    assert result.value_norms[layer][b, head, j].item() == pytest.approx(
                        expected_norm, rel=1e-10)
                    for i in range(batch.shape[1]):
                        expected = cache.patterns[layer][b, head, i, j].item() * expected_norm
                        assert result.weighted[layer][b, head, i, j].item() == pytest.approx(
                            expected, rel=1e-10, abs=1e-14)


def test_output_norm_bounded_by_row_sum():
    model = tiny_model(dtype=torch.float64)
    batch = tokens()
    result = value_weighted_attention(model, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)

    for layer in range(model.cfg.n_layers):
        # head_outputs[l] is [batch, pos, head, d_model]; its norm is at most Σ_j W[i, j].
        output_norms = cache.head_outputs[layer].norm(dim=-1).transpose(1, 2)
        row_sums = result.weighted[layer].sum(-1)
        assert bool((output_norms <= row_sums + 1e-12).all())
        assert float((row_sums - output_norms).max()) > 0  # strict somewhere: values differ


def test_zero_output_matrix_gives_zero():
    model = tiny_model(dtype=torch.float64)
    with torch.no_grad():
        model.blocks[1].attn.W_O[2].zero_()
    result = value_weighted_attention(model, tokens())

    assert torch.count_nonzero(result.weighted[1][:, 2]) == 0
    assert torch.count_nonzero(result.weighted[1][:, 1]) > 0


def test_scaling_output_matrix_scales_weights():
    model = tiny_model(dtype=torch.float64)
    batch = tokens()
    before = value_weighted_attention(model, batch)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0].mul_(3.0)
    after = value_weighted_attention(model, batch)

    # Layer 1 is the last layer, so its patterns do not change.
    torch.testing.assert_close(after.patterns[1], before.patterns[1])
    torch.testing.assert_close(after.weighted[1][:, 0], 3.0 * before.weighted[1][:, 0])
    torch.testing.assert_close(after.weighted[1][:, 1], before.weighted[1][:, 1])


def test_keeps_training_mode():
    model = tiny_model().train()
    value_weighted_attention(model, tokens())
    assert model.training


def test_stacks_have_layer_head_axes():
    model = tiny_model()
    batch = tokens(batch=2, n_pos=7)
    result = value_weighted_attention(model, batch)

    stack = result.weighted_stack(sequence=1)
    assert stack.shape == (2, 4, 7, 7)
    assert stack.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(stack[1, 3]), result.weighted[1][1, 3])
    torch.testing.assert_close(torch.from_numpy(result.pattern_stack()[0, 2]),
                               result.patterns[0][0, 2])


def test_first_key_share_hand_built():
    pattern = torch.tensor([[[[1.0, 0.0, 0.0],
                              [0.5, 0.5, 0.0],
                              [0.2, 0.3, 0.5]]]])
    norms = torch.tensor([[[2.0, 1.0, 4.0]]])
    weighted = pattern * norms[:, :, None, :]
    view = ValueWeightedAttention([pattern], [norms], [weighted])

    row = view.first_key_share().iloc[0]
    # Queries 1 and 2: A[i, 0] = 0.5 and 0.2.
    assert row["attention_share"] == pytest.approx(0.35)
    # Weighted rows: [1.0, 0.5, 0] and [0.4, 0.3, 2.0]; key 0 receives 1.4 of 4.2.
    assert row["weighted_share"] == pytest.approx(1.4 / 4.2)
    assert row["name"] == "L0H0"
