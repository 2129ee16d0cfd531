"""Skip-trigram sweeps on hand-built heads and against an unbatched dense computation."""

import math

import numpy as np
import pytest
import torch

from circuits.analysis.circuits import ov_circuit, qk_circuit
from circuits.analysis.skip_trigrams import (
    TRIGRAM_COLUMNS,
    skip_trigrams,
    source_top_tokens,
    top_skip_trigrams,
)
from circuits.model import AttnOnlyTransformer, ModelConfig
from circuits.tokenizer import Tokenizer

VOCAB = 6
OUTPUT_OF = [3, 0, 5, 1, 2, 4]  # the OV circuit sends source s to output OUTPUT_OF[s]
DESTINATION_OF = [2, 4, 0, 5, 3, 1]  # query DESTINATION_OF[s] attends most to key s
STRINGS = ["a", "b", "c", "d", "e", "f"]


def hand_built_model():
    """W_E = I, no layernorm, W_V = W_O = W_Q = I; W_U and W_K are permutations plus small ramps."""
    config = ModelConfig(
        n_layers=1, d_model=VOCAB, n_heads=1, d_head=VOCAB, n_ctx=4, d_vocab=VOCAB,
        normalization_type=None,
    )
    model = AttnOnlyTransformer(config).double()
    eye = torch.eye(VOCAB, dtype=torch.float64)
    ramp = torch.arange(VOCAB * VOCAB, dtype=torch.float64).view(VOCAB, VOCAB) / 1000.0
    W_U = ramp.clone()
    W_K = ramp.clone()
    for source in range(VOCAB):
        W_U[source, OUTPUT_OF[source]] += 2.0
        # qk[d, s] = (W_Q W_Kᵀ)[d, s] = W_K[s, d].
        W_K[source, DESTINATION_OF[source]] += 3.0
    with torch.no_grad():
        model.embed.W_E.copy_(eye)
        model.unembed.W_U.copy_(W_U)
        attn = model.blocks[0].attn
        attn.W_Q[0].copy_(eye)
        attn.W_K[0].copy_(W_K)
        attn.W_V[0].copy_(eye)
        attn.W_O[0].copy_(eye)
    return model, W_U, W_K


def random_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(n_layers=2, d_model=10, n_heads=3, d_head=4, n_ctx=8, d_vocab=30)
    model = AttnOnlyTransformer(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def test_hand_built_top_output_and_destination():
    model, W_U, W_K = hand_built_model()
    tops = source_top_tokens(model, 0, k=2)
    assert tops.outputs.shape == (1, VOCAB, 2)
    assert tops.outputs[0, :, 0].tolist() == OUTPUT_OF
    assert tops.destinations[0, :, 0].tolist() == DESTINATION_OF
    for source in range(VOCAB):
        output = OUTPUT_OF[source]
        destination = DESTINATION_OF[source]
        assert tops.ov_scores[0, source, 0].item() == pytest.approx(W_U[source, output].item())
        expected_qk = W_K[source, destination].item() / math.sqrt(VOCAB)
        assert tops.qk_scores[0, source, 0].item() == pytest.approx(expected_qk, rel=1e-6)


def test_hand_built_top_skip_trigrams():
    model, W_U, _ = hand_built_model()
    table = top_skip_trigrams(model, STRINGS, layer=0, head=0, k=3)
    assert list(table.columns) == TRIGRAM_COLUMNS
    assert len(table) == 3
    assert table["source"].is_unique
    assert table["ov_score"].is_monotonic_decreasing
    # The ramp makes the source with the largest permutation entry the one with the largest index.
    best_values = [W_U[s, OUTPUT_OF[s]].item() for s in range(VOCAB)]
    expected_sources = sorted(range(VOCAB), key=lambda s: -best_values[s])[:3]
    assert table["source"].tolist() == expected_sources
    for row in table.itertuples():
        assert row.output == OUTPUT_OF[row.source]
        assert row.destination == DESTINATION_OF[row.source]
        assert row.source_str == STRINGS[row.source]
        assert row.output_str == STRINGS[row.output]
        assert row.destination_str == STRINGS[row.destination]
        assert row.name == "L0H0"


def test_top_skip_trigrams_restricted_sources():
    model, W_U, _ = hand_built_model()
    table = top_skip_trigrams(model, STRINGS, layer=0, head=0, k=5, source_tokens=[0, 2])
    assert sorted(table["source"].tolist()) == [0, 2]
    assert table["output"].tolist() == [OUTPUT_OF[s] for s in table["source"]]
    with pytest.raises(ValueError, match="source_tokens"):
        top_skip_trigrams(model, STRINGS, layer=0, head=0, source_tokens=[VOCAB])


@pytest.mark.parametrize("batch_size", [1, 7, 30, 64])
def test_batched_sweep_matches_dense_topk(batch_size):
    model = random_model(seed=1)
    k = 4
    for layer in range(2):
        tops = source_top_tokens(model, layer, k=k, batch_size=batch_size)
        for head in range(3):
            ov_dense = ov_circuit(model, layer, head).dense()
            qk_dense = qk_circuit(model, layer, head).dense() / math.sqrt(4)
            expected_ov = ov_dense.topk(k, dim=1)
            # Destinations of source s are the rows d of column s with the largest qk_dense[d, s].
            expected_qk = qk_dense.T.topk(k, dim=1)
            assert torch.equal(tops.outputs[head], expected_ov.indices)
            assert torch.equal(tops.destinations[head], expected_qk.indices)
            torch.testing.assert_close(
                tops.ov_scores[head].double(), expected_ov.values, rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                tops.qk_scores[head].double(), expected_qk.values, rtol=1e-5, atol=1e-5
            )


def test_skip_trigram_table_layout():
    model = random_model(seed=2)
    strings = [f"t{i}" for i in range(30)]
    k = 2
    table = skip_trigrams(model, strings, k=k, batch_size=8)
    assert list(table.columns) == TRIGRAM_COLUMNS
    assert len(table) == 2 * 3 * 30 * k * k
    assert sorted(table["name"].unique()) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]

    one_head = table[table["name"] == "L1H2"]
    assert one_head["ov_score"].is_monotonic_decreasing
    assert (one_head.groupby("source").size() == k * k).all()
    assert (one_head["source_str"] == [strings[i] for i in one_head["source"]]).all()
    assert (one_head["output_str"] == [strings[i] for i in one_head["output"]]).all()

    # Every row pairs one of the source's top destinations with one of its top outputs.
    tops = source_top_tokens(model, 1, k=k)
    source = 17
    rows = one_head[one_head["source"] == source]
    destinations = tops.destinations[2, source].tolist()
    outputs = tops.outputs[2, source].tolist()
    expected_pairs = {(d, o) for d in destinations for o in outputs}
    assert set(zip(rows["destination"], rows["output"])) == expected_pairs


def test_skip_trigrams_with_real_tokenizer():
    tokenizer = Tokenizer(n_ranks=256)
    torch.manual_seed(3)
    config = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=4, d_vocab=257)
    model = AttnOnlyTransformer(config)
    table = top_skip_trigrams(model, tokenizer, layer=0, head=1, k=5)
    vocabulary = np.array(tokenizer.vocabulary_strings, dtype=object)
    assert (table["source_str"].to_numpy() == vocabulary[table["source"].to_numpy()]).all()
    assert (table["output_str"].to_numpy() == vocabulary[table["output"].to_numpy()]).all()


def test_invalid_arguments_raise():
    model = random_model()
    with pytest.raises(ValueError, match="d_vocab=30"):
        skip_trigrams(model, ["x"] * 29)
    with pytest.raises(ValueError, match="k must be"):
        source_top_tokens(model, 0, k=0)
    with pytest.raises(ValueError, match="batch_size"):
        source_top_tokens(model, 0, batch_size=0)
    with pytest.raises(ValueError, match="head must be in"):
        top_skip_trigrams(model, [str(i) for i in range(30)], layer=0, head=3)
