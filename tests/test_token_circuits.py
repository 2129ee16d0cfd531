"""Circuit blocks over chosen tokens against the dense circuits."""

import math

import pytest
import torch

from circuits.analysis.circuits import ov_circuit, qk_circuit
from circuits.analysis.token_circuits import CircuitBlocks, circuit_blocks
from conftest import tiny_model

TOKENS = [5, 0, 299, 42, 17]


def test_blocks_match_dense_circuits():
    model = tiny_model(seed=3, n_layers=1)
    blocks = circuit_blocks(model, 0, TOKENS)
    index = torch.tensor(TOKENS)
    assert blocks.qk.shape == (model.cfg.n_heads, 5, 5)
    assert blocks.qk.dtype == torch.float32
    for head in range(model.cfg.n_heads):
        qk = qk_circuit(model, 0, head).dense()[index][:, index] / math.sqrt(model.cfg.d_head)
        ov = ov_circuit(model, 0, head).dense()[index][:, index]
        torch.testing.assert_close(blocks.qk[head], qk.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(blocks.ov[head], ov.float(), rtol=1e-5, atol=1e-6)
    assert blocks.tokens.tolist() == TOKENS


def test_blocks_of_second_layer():
    model = tiny_model(seed=4, n_layers=2)
    blocks = circuit_blocks(model, 1, TOKENS[:2])
    expected = ov_circuit(model, 1, 2).dense()[TOKENS[:2]][:, TOKENS[:2]]
    torch.testing.assert_close(blocks.ov[2], expected.float(), rtol=1e-5, atol=1e-6)


def test_copy_rate_by_hand():
    ov = torch.tensor([
        [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]],  # copies all three
        [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]],  # copies only the second
    ])
    blocks = CircuitBlocks(layer=0, tokens=torch.arange(3).numpy(), qk=torch.zeros_like(ov), ov=ov)
    assert blocks.copy_rate().tolist() == pytest.approx([1.0, 1 / 3])


def test_blocks_reject_bad_tokens():
    model = tiny_model(n_layers=1)
    with pytest.raises(ValueError, match="tokens must be ids"):
        circuit_blocks(model, 0, [300])
    with pytest.raises(ValueError, match="non-empty"):
        circuit_blocks(model, 0, [])
    with pytest.raises(ValueError, match="layer must be in"):
        circuit_blocks(model, 1, [1])
