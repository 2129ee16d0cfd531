"""Naming previous-token and induction heads from measured scores."""

import pandas as pd
import pytest
import torch

from circuits.analysis.attention import prefix_matching_scores, repeated_random_tokens
from circuits.analysis.circuits import copying_scores
from circuits.analysis.composition import k_composition_positivity
from circuits.analysis.induction_heads import (
    head_scores,
    identify_heads,
    induction_plane,
    uniform_attention_scores,
    uniform_causal_pattern,
)
from conftest import tiny_model


def test_uniform_pattern_rows():
    pattern = uniform_causal_pattern(3)
    expected = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]],
                            dtype=torch.float64)
    torch.testing.assert_close(pattern, expected)


def test_uniform_scores_by_hand():
    scores = uniform_attention_scores(window_length=4, sequence_length=5, period=2)
    # Previous token: queries 1, 2, 3 give 1/2, 1/3, 1/4.
    assert scores["previous_token"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    # BOS a b a b: query 3 (a) targets key 2 of 4 keys; query 4 (b) targets key 3 of 5.
    assert scores["prefix_matching"] == pytest.approx((1 / 4 + 1 / 5) / 2)


def score_table(previous, prefix):
    rows = []
    for index, (p, q) in enumerate(zip(previous, prefix)):
        layer, head = divmod(index, 3)
        rows.append({"layer": layer, "head": head, "name": f"L{layer}H{head}",
                     "previous_token_score": p, "prefix_matching_score": q})
    return pd.DataFrame(rows)


def test_identify_heads_picks_by_score():
    table = score_table(previous=[0.1, 0.7, 0.2, 0.9, 0.0, 0.1],
                        prefix=[0.0, 0.05, 0.35, 0.2, 0.8, 0.31])
    roles = identify_heads(table, threshold=0.3)

    # L1H0 has the highest previous-token score, but only layer 0 counts.
    assert roles.previous_token_head == (0, 1)
    assert roles.previous_token_score == pytest.approx(0.7)
    assert roles.top_induction_head == (1, 1)
    assert roles.top_induction_name == "L1H1"
    assert roles.induction_heads == [(1, 1), (0, 2), (1, 2)]
    assert roles.induction_names == ["L1H1", "L0H2", "L1H2"]


def test_identify_heads_none_pass():
    table = score_table(previous=[0.1] * 6, prefix=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    roles = identify_heads(table, threshold=0.3)

    assert roles.induction_heads == []
    assert roles.top_induction_head == (1, 2)


def test_identify_heads_empty_table():
    with pytest.raises(ValueError, match="empty"):
        identify_heads(score_table([], []))


def test_head_scores_match_naive_previous_token():
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 299, (3, 12), generator=generator)
    windows[:, 0] = 299
    sequences = repeated_random_tokens(300, n_tokens=5, n_repeats=3, n_sequences=4, seed=0)
    table = head_scores(model, windows, sequences, period=5)

    _, cache = model.run_with_cache(windows)
    prefix = prefix_matching_scores(model, sequences, 5)
    assert len(table) == 8
    for row in table.itertuples():
        pattern = cache.patterns[row.layer][:, row.head]
        naive = sum(pattern[b, i, i - 1].item() for b in range(3) for i in range(1, 12)) / 33
        assert row.previous_token_score == pytest.approx(naive, rel=1e-5)
        assert row.prefix_matching_score == pytest.approx(prefix[row.layer, row.head].item())
        assert row.name == f"L{row.layer}H{row.head}"


def test_induction_plane_columns_match_sources():
    model = tiny_model()
    table = score_table(previous=[0.5, 0.1, 0.2, 0.0, 0.0, 0.0],
                        prefix=[0.0, 0.0, 0.0, 0.4, 0.1, 0.2])
    table = pd.concat([table, pd.DataFrame([
        {"layer": 0, "head": 3, "name": "L0H3", "previous_token_score": 0.3,
         "prefix_matching_score": 0.0},
        {"layer": 1, "head": 3, "name": "L1H3", "previous_token_score": 0.0,
         "prefix_matching_score": 0.9},
    ])], ignore_index=True)
    plane = induction_plane(model, table)

    positivity = k_composition_positivity(model, torch.tensor([0.5, 0.1, 0.2, 0.3]))
    copying = copying_scores(model)
    assert plane["name"].tolist() == ["L1H0", "L1H1", "L1H2", "L1H3"]
    for row in plane.itertuples():
        assert row.k_composition_positivity == pytest.approx(
            positivity.weighted_ratio[row.head].item())
        expected = copying[(copying["layer"] == 1) & (copying["head"] == row.head)]
        assert row.copying_score == pytest.approx(expected["copying_score"].item())
    assert plane["prefix_matching_score"].tolist() == pytest.approx([0.4, 0.1, 0.2, 0.9])


def test_induction_plane_needs_two_layers():
    model = tiny_model(n_layers=1)
    with pytest.raises(ValueError, match="two layers"):
        induction_plane(model, score_table([0.1, 0.2, 0.3], [0.0, 0.0, 0.0]))
