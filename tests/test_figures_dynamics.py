"""Figures of the training-dynamics chapter: traces contain the inputs, sliders replace them."""

import base64

import numpy as np
import pandas as pd
import pytest

from circuits import figures_dynamics as figures
from circuits.analysis.training_log import ProbeHistory, SnapshotMeasurements, Transition


def decode(values):
    """Plotly stores numpy arrays as base64 typed arrays; return them as numpy again."""
    if isinstance(values, dict) and "bdata" in values:
        array = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        return array.reshape(values["shape"]) if "shape" in values else array
    return np.asarray(values)


def make_history(n_steps=3, n_layers=2, n_heads=3, seed=0, k_composition=True):
    """A ProbeHistory with random scores in [0, 1) and losses that fall with each copy."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n_steps + 1) * 500
    return ProbeHistory(
        steps=steps,
        tokens=steps * 4096.0,
        icl_score=-np.linspace(0.0, 0.5, n_steps),
        repeated_loss_per_copy=np.stack([np.array([10.0, 8.0, 7.0, 6.5]) - i
                                         for i in range(n_steps)]),
        previous_token=rng.random((n_steps, n_layers, n_heads)),
        prefix_matching=rng.random((n_steps, n_layers, n_heads)),
        k_composition=rng.random((n_steps, n_heads, n_heads)) if k_composition else None,
    )


def slider_update(fig, index):
    return fig.layout.sliders[0].steps[index].args


# Loss curves


LOSSES = pd.DataFrame({
    "step": [50, 100, 150, 200],
    "tokens": [200.0, 400.0, 600.0, 800.0],
    "lr": [1.0, 1.0, 1.0, 1.0],
    "train_loss": [6.0, 5.0, 4.5, 4.2],
    "val_loss": [np.nan, 5.5, np.nan, 4.9],
    "icl_score": [np.nan, -0.1, np.nan, -0.6],
    "elapsed_s": [1.0, 2.0, 3.0, 4.0],
})


def test_loss_curves_traces():
    fig = figures.loss_curves_figure(LOSSES)
    train, validation, icl = fig.data

    assert decode(train.x).tolist() == [50, 100, 150, 200]
    assert decode(train.y).tolist() == [6.0, 5.0, 4.5, 4.2]
    assert decode(validation.x).tolist() == [100, 200]
    assert decode(validation.y).tolist() == [5.5, 4.9]
    assert decode(icl.y).tolist() == [-0.1, -0.6]
    assert icl.yaxis == "y2"
    assert train.yaxis == "y"
    assert fig.layout.shapes == ()


def test_loss_curves_tokens_button():
    fig = figures.loss_curves_figure(LOSSES, Transition(100, 200, 0.1, 0.8))
    steps_button, tokens_button = fig.layout.updatemenus[0].buttons

    trace_update, layout_update = tokens_button.args
    assert [decode(x).tolist() for x in trace_update["x"]] == [
        [200, 400, 600, 800], [400, 800], [400, 800]]
    assert layout_update["xaxis.title.text"] == "tokens seen"
    shade = layout_update["shapes"][0]
    assert (shade["x0"], shade["x1"]) == (400.0, 800.0)

    assert (fig.layout.shapes[0].x0, fig.layout.shapes[0].x1) == (100, 200)
    assert steps_button.args[1]["shapes"][0]["x0"] == 100


def test_validation_loss_figure_skips_unevaluated_steps():
    fig = figures.validation_loss_figure({"run a": LOSSES, "run b": LOSSES.assign(
        val_loss=LOSSES["val_loss"] + 1)})

    assert [trace.name for trace in fig.data] == ["run a", "run b"]
    assert decode(fig.data[0].x).tolist() == [400, 800]
    assert decode(fig.data[1].y).tolist() == [6.5, 5.9]


# Per-head scores


def test_head_score_slider_steps():
    history = make_history()
    fig = figures.head_score_slider_figure(history)

    np.testing.assert_allclose(decode(fig.data[0].z), history.previous_token[0], rtol=1e-6)
    np.testing.assert_allclose(decode(fig.data[1].z), history.prefix_matching[0], rtol=1e-6)
    assert len(fig.layout.sliders[0].steps) == 3
    assert fig.layout.sliders[0].active == 0
    trace_update, layout_update, indices = slider_update(fig, 2)
    np.testing.assert_allclose(trace_update["z"][0], history.previous_token[2], rtol=1e-6)
    np.testing.assert_allclose(trace_update["z"][1], history.prefix_matching[2], rtol=1e-6)
    assert list(indices) == [0, 1]
    assert "step 1,500" in layout_update["title.text"]
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 1)


def test_head_score_slider_absent_for_one_step():
    fig = figures.head_score_slider_figure(make_history(n_steps=1))

    assert fig.layout.sliders == ()
    assert "step 500" in fig.layout.title.text


def test_slider_hides_labels_when_crowded():
    fig = figures.head_score_slider_figure(make_history(n_steps=figures.MAX_SLIDER_LABELS + 1))
    assert fig.layout.sliders[0].font.color == "rgba(0, 0, 0, 0)"

    fig = figures.head_score_slider_figure(make_history(n_steps=figures.MAX_SLIDER_LABELS))
    assert fig.layout.sliders[0].font.color is None


def test_head_score_lines_colour_top_heads():
    history = make_history(n_steps=4, n_layers=2, n_heads=3)
    prefix = history.prefix_matching.copy()
    prefix[-1] = [[0.1, 0.9, 0.2], [0.8, 0.3, 0.05]]
    history.prefix_matching = prefix
    fig = figures.head_score_lines_figure(history, n_top=2)

    prefix_traces = [trace for trace in fig.data if trace.xaxis == "x"]
    coloured = [trace for trace in prefix_traces if trace.showlegend is not False]
    grey = [trace for trace in prefix_traces if trace.showlegend is False]
    assert [trace.name for trace in coloured] == [
        "L0H1 (prefix-matching)", "L1H0 (prefix-matching)"]
    assert len(grey) == 6 - 2
    np.testing.assert_allclose(decode(coloured[0].y), prefix[:, 0, 1])
    assert len([trace for trace in fig.data if trace.xaxis == "x2"]) == 6


# Repeated random tokens


def test_repeated_loss_threshold_line():
    history = make_history(n_steps=2)
    fig = figures.repeated_loss_figure(history)

    assert [trace.name for trace in fig.data] == ["copy 1", "copy 2", "copy 3", "copy 4",
                                                  "35% of copy 1"]
    assert decode(fig.data[1].y).tolist() == [8.0, 7.0]
    np.testing.assert_allclose(decode(fig.data[1].customdata), [0.8, 7.0 / 9.0])
    np.testing.assert_allclose(decode(fig.data[4].y), [3.5, 3.15])


# K-composition


def test_k_composition_minus_baseline():
    history = make_history()
    fig = figures.k_composition_slider_figure(history, baseline=0.25)

    excess = history.k_composition - 0.25
    limit = np.abs(excess).max()
    np.testing.assert_allclose(decode(fig.data[0].z), excess[0], rtol=1e-6)
    np.testing.assert_allclose(decode(fig.data[0].customdata), history.k_composition[0],
                               rtol=1e-6)
    assert fig.data[0].zmin == pytest.approx(-limit)
    assert fig.data[0].zmax == pytest.approx(limit)
    trace_update = slider_update(fig, 1)[0]
    np.testing.assert_allclose(trace_update["z"][0], excess[1], rtol=1e-6)
    np.testing.assert_allclose(trace_update["customdata"][0], history.k_composition[1],
                               rtol=1e-6)
    assert list(fig.data[0].x) == ["L1H0", "L1H1", "L1H2"]
    assert list(fig.data[0].y) == ["L0H0", "L0H1", "L0H2"]


def test_k_composition_requires_scores():
    with pytest.raises(ValueError, match="did not measure K-composition"):
        figures.k_composition_slider_figure(make_history(k_composition=False), baseline=0.1)


# Attention at each snapshot


def make_snapshots(n_steps=2):
    rng = np.random.default_rng(1)
    patterns = np.round(rng.random((n_steps, 2, 4, 4)), 3).astype(np.float32)
    prefix = rng.random((n_steps, 2, 3))
    return SnapshotMeasurements(
        steps=np.arange(n_steps) * 1000, heads=[(1, 2), (0, 0)], tokens=np.array([9, 1, 2, 1]),
        patterns=patterns, prefix_matching=prefix,
        repeated_loss_per_copy=np.ones((n_steps, 2)), decimals=3,
    )


def test_snapshot_attention_slider():
    snapshots = make_snapshots()
    fig = figures.snapshot_attention_figure(snapshots, ["<|endoftext|>", " a", " b", " a"])

    np.testing.assert_array_equal(decode(fig.data[0].z), snapshots.patterns[0, 0])
    np.testing.assert_array_equal(decode(fig.data[1].z), snapshots.patterns[0, 1])
    assert list(fig.data[0].x) == ["0 '&lt;|endoftext|&gt;'", "1 ' a'", "2 ' b'", "3 ' a'"]
    assert fig.layout.annotations[0].text == (
        f"L1H2: prefix-matching {snapshots.prefix_matching[0, 1, 2]:.3f}")

    trace_update, layout_update, indices = slider_update(fig, 1)
    np.testing.assert_array_equal(trace_update["z"][0], snapshots.patterns[1, 0])
    np.testing.assert_array_equal(trace_update["z"][1], snapshots.patterns[1, 1])
    assert list(indices) == [0, 1]
    assert layout_update["annotations[1].text"] == (
        f"L0H0: prefix-matching {snapshots.prefix_matching[1, 0, 0]:.3f}")
    assert layout_update["title.text"].endswith("step 1,000")


def test_snapshot_attention_one_snapshot_has_no_slider():
    fig = figures.snapshot_attention_figure(make_snapshots(n_steps=1), ["a", "b", "c", "d"])
    assert fig.layout.sliders == ()


# Runs side by side


def test_run_comparison_values():
    first, second = make_history(n_steps=2, seed=3), make_history(n_steps=3, seed=4)
    fig = figures.run_comparison_figure({"two layers": first, "one layer": second})

    best, ratio = fig.data[0], fig.data[1]
    np.testing.assert_allclose(decode(best.y), first.prefix_matching.reshape(2, -1).max(1))
    np.testing.assert_allclose(decode(ratio.y), [0.8, 7.0 / 9.0])
    assert decode(best.x).tolist() == first.tokens.tolist()
    assert fig.data[2].name == "one layer"
    assert [shape.y0 for shape in fig.layout.shapes] == [0.5, 0.35]
