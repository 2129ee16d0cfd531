"""Figures of the two-layer chapter: traces hold the input values and dropdowns switch them."""

import numpy as np
import pandas as pd
import pytest
import torch

from circuits import figures_two_layer as figures
from circuits.analysis.attention import RepeatedTokenLoss
from circuits.analysis.composition import CompositionBaseline, CompositionScores
from circuits.analysis.paths import TermImportance
from circuits.analysis.text_attention import TextAttention


def decode(values):
    """Plotly stores numpy arrays as base64 typed arrays; return them as numpy again."""
    if isinstance(values, dict) and "bdata" in values:
        import base64

        array = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        return array.reshape(values["shape"]) if "shape" in values else array
    return np.asarray(values)


def visible_names(trace_data, visibility):
    return [trace.name for trace, shown in zip(trace_data, visibility) if shown]


def test_position_labels_unique_for_repeats():
    labels = figures.position_labels(["<|endoftext|>", " a", " a", "\n"])
    # token_label escapes HTML, because plotly renders a few tags in labels.
    assert labels == ["0 '&lt;|endoftext|&gt;'", "1 ' a'", "2 ' a'", "3 '\\n'"]
    assert len(set(labels)) == 4


def test_repeated_loss_segments():
    per_position = torch.arange(8, dtype=torch.float64)  # 1 + 2 * 4 tokens, period 4
    loss = RepeatedTokenLoss(per_position=per_position,
                             per_copy=torch.tensor([2.0, 5.0], dtype=torch.float64))
    fig = figures.repeated_loss_figure(loss, period=4)

    assert decode(fig.data[0].y).tolist() == list(range(8))
    assert list(fig.data[0].x) == list(range(1, 9))
    # Repeat r covers predicted positions 2 + r·P … (r + 1)·P.
    assert list(fig.data[1].x) == [2, 4]
    assert list(fig.data[1].y) == [2.0, 2.0]
    assert list(fig.data[2].x) == [6, 8]
    assert list(fig.data[2].y) == [5.0, 5.0]


def test_head_scores_heatmaps():
    scores = pd.DataFrame({
        "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "name": ["L0H0", "L0H1", "L1H0", "L1H1"],
        "previous_token_score": [0.9, 0.1, 0.2, 0.3],
        "prefix_matching_score": [0.0, 0.05, 0.8, 0.1],
    })
    fig = figures.head_scores_figure(scores, {"previous_token": 0.01, "prefix_matching": 0.04})

    np.testing.assert_allclose(decode(fig.data[0].z), [[0.9, 0.1], [0.2, 0.3]])
    np.testing.assert_allclose(decode(fig.data[1].z), [[0.0, 0.05], [0.8, 0.1]])
    assert "0.010 and 0.040" in fig.layout.title.text


def test_head_heatmaps_dropdown_and_values():
    matrices = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    fig = figures.head_heatmaps(matrices, list("abcd"), "Attention", "attention",
                                active=(1, 2))

    assert len(fig.data) == 6
    assert [trace.visible for trace in fig.data] == [False] * 5 + [True]
    np.testing.assert_array_equal(decode(fig.data[4].z), matrices[1, 1])
    assert fig.layout.title.text == "Attention: L1H2"
    menu = fig.layout.updatemenus[0]
    assert menu.active == 5
    assert [button.label for button in menu.buttons] == [
        "L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    for index, button in enumerate(menu.buttons):
        visibility = button.args[0]["visible"]
        assert visible_names(fig.data, visibility) == [button.label]
        assert button.args[1]["title.text"] == f"Attention: {button.label}"


def test_head_heatmaps_own_scale():
    matrices = np.zeros((1, 2, 3, 3), dtype=np.float32)
    matrices[0, 0, 2, 1] = 4.0
    matrices[0, :, 0, 0] = 9.0  # query 0 is left out of the colour range
    fig = figures.head_heatmaps(matrices, list("abc"), "Weighted", "w", fixed_range=None)
    assert fig.data[0].zmax == 4.0
    assert fig.data[1].zmax == 1.0  # an all-zero head falls back to 1


def test_composition_subtracts_baseline():
    q = torch.tensor([[0.2, 0.1], [0.3, 0.4]], dtype=torch.float64)
    scores = CompositionScores(q=q, k=q * 2, v=q * 3, source_layer=0, target_layer=1)
    baseline = CompositionBaseline(q=0.1, k=0.2, v=0.05, n_samples=10, seed=0)
    fig = figures.composition_figure(scores, baseline)

    np.testing.assert_allclose(decode(fig.data[0].z), q.numpy() - 0.1, rtol=1e-6)
    np.testing.assert_allclose(decode(fig.data[1].z), 2 * q.numpy() - 0.2, rtol=1e-6)
    np.testing.assert_allclose(decode(fig.data[2].customdata), 3 * q.numpy(), rtol=1e-6)
    assert list(fig.data[0].x) == ["L1H0", "L1H1"]
    assert list(fig.data[0].y) == ["L0H0", "L0H1"]
    # One colour range for all kinds: the largest excess, V's 1.2 − 0.05.
    assert fig.data[0].zmax == pytest.approx(1.15)
    assert [button.label for button in fig.layout.updatemenus[0].buttons] == [
        "Q-composition", "K-composition", "V-composition"]
    # K-composition is shown first.
    assert [trace.visible for trace in fig.data] == [False, True, False]
    assert fig.layout.updatemenus[0].active == 1
    assert fig.layout.title.text.startswith("K-composition")
    with pytest.raises(ValueError, match="active_kind"):
        figures.composition_figure(scores, baseline, active_kind="x")


def test_induction_plane_points():
    plane = pd.DataFrame({"name": ["L1H0", "L1H1"], "head": [0, 1],
                          "k_composition_positivity": [0.9, -0.2], "copying_score": [0.8, 0.1],
                          "prefix_matching_score": [0.7, 0.0]})
    fig = figures.induction_plane_figure(plane)

    np.testing.assert_allclose(decode(fig.data[0].x), [0.9, -0.2], rtol=1e-6)
    np.testing.assert_allclose(decode(fig.data[0].y), [0.8, 0.1], rtol=1e-6)
    assert list(fig.data[0].text) == ["L1H0", "L1H1"]


def test_term_importance_bars():
    importance = TermImportance(
        loss_order0=6.0, loss_order0_plus_layer=[5.5, 5.0], loss_upto_order1=4.5,
        loss_upto_order2=4.4, loss_full=4.4, uniform_loss=7.6, n_tokens=100,
    )
    fig = figures.term_importance_figure(importance)

    np.testing.assert_allclose(decode(fig.data[0].y), [1.6, 1.5, 0.5, 1.0, 0.1], rtol=1e-6)
    assert list(fig.data[0].x) == [
        "order 0: direct path", "order 1: all single heads", "order 1: layer 0 heads only",
        "order 1: layer 1 heads only", "order 2: virtual heads"]


def test_head_ablation_bars_by_layer():
    frame = pd.DataFrame({
        "name": ["L0H0", "L0H1", "L1H0"], "layer": [0, 0, 1], "head": [0, 1, 0],
        "icl_score": [-0.5] * 3, "ablated_icl_score": [-0.4, -0.5, -0.1],
        "change": [0.1, 0.0, 0.4], "ablated_loss": [4.0, 4.1, 4.2],
    })
    fig = figures.head_ablation_figure(frame)

    assert [trace.name for trace in fig.data] == ["layer 0", "layer 1"]
    np.testing.assert_allclose(decode(fig.data[0].y), [0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(decode(fig.data[1].y), [0.4], rtol=1e-6)
    assert "-0.500" in fig.layout.title.text


def test_loss_by_position_marks_indices():
    losses = pd.Series(np.linspace(5.0, 3.0, 20),
                       index=pd.RangeIndex(1, 21, name="token_index"))
    fig = figures.loss_by_position_figure(losses, late_index=18, early_index=2, smoothing=3)

    assert list(fig.data[2].x) == [2]
    assert fig.data[2].y[0] == pytest.approx(losses.loc[2])
    assert list(fig.data[3].x) == [18]
    assert fig.data[3].y[0] == pytest.approx(losses.loc[18])
    smoothed = decode(fig.data[1].y)
    # A centred running mean of a straight line is the line itself, away from the ends.
    np.testing.assert_allclose(smoothed[1:-1], losses.to_numpy()[1:-1], rtol=1e-6)
    with pytest.raises(ValueError, match="smoothing"):
        figures.loss_by_position_figure(losses, 18, 2, smoothing=0)


def make_analysis(n_pos=3, n_layers=2, n_heads=2, k=2):
    rng = np.random.default_rng(0)
    patterns = rng.random((n_layers, n_heads, n_pos, n_pos)).astype(np.float32)
    return TextAttention(
        token_ids=list(range(n_pos)), token_strings=[f"t{i}" for i in range(n_pos)],
        patterns=patterns, top_ids=np.zeros((n_pos, k), dtype=np.int64),
        top_strings=[[f"p{i}{r}" for r in range(k)] for i in range(n_pos)],
        top_probabilities=np.full((n_pos, k), 0.25, dtype=np.float32),
    )


def test_text_attention_all_heads_keeps_predictions():
    analysis = make_analysis()
    fig = figures.text_attention_figure(analysis, active=(1, 0))

    assert len(fig.data) == 5  # four heads, then the predictions
    assert [trace.visible for trace in fig.data[:4]] == [False, False, True, False]
    np.testing.assert_array_equal(decode(fig.data[2].z), analysis.patterns[1, 0])
    predictions = fig.data[4]
    assert predictions.name == "predictions"
    assert [list(row) for row in predictions.text] == [["'p00'", "'p10'", "'p20'"],
                                                       ["'p01'", "'p11'", "'p21'"]]
    for button in fig.layout.updatemenus[0].buttons:
        assert button.args[0]["visible"][-1] is True
        assert sum(button.args[0]["visible"]) == 2


def test_text_attention_single_head():
    analysis = make_analysis()
    fig = figures.text_attention_figure(analysis, head=(0, 1))

    assert len(fig.data) == 2
    np.testing.assert_array_equal(decode(fig.data[0].z), analysis.patterns[0, 1])
    assert not fig.layout.updatemenus
    with pytest.raises(ValueError, match="out of range"):
        figures.text_attention_figure(analysis, head=(2, 0))
