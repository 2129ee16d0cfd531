"""Figures of the zero- and one-layer chapters: traces, dropdowns and the values they carry."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from circuits import viz


def test_token_label_escapes_and_quotes():
    assert viz.token_label(" the") == "' the'"
    assert viz.token_label("\n") == "'\\n'"
    assert viz.token_label("<b>&") == "'&lt;b&gt;&amp;'"


def test_token_labels_disambiguate_duplicates():
    labels = viz.token_labels(["a", "\ufffd", "\ufffd"], [7, 8, 9])
    assert labels == ["'a'", "'\ufffd' #8", "'\ufffd' #9"]
    assert len(set(labels)) == 3


def test_quoted_tokens_only_touch_string_columns():
    frame = pd.DataFrame({"source_str": [" a", "\n"], "source": [1, 2]})
    quoted = viz.quoted_tokens(frame)
    assert quoted["source_str"].tolist() == ["'\u00a0a'", "'\\n'"]
    assert quoted["source"].tolist() == [1, 2]
    assert frame["source_str"].tolist() == [" a", "\n"]


def test_kl_histogram_bins_and_mean():
    kl = np.array([0.01, 0.1, np.nan, 1.0, 0.0])
    counts = np.array([10, 30, 0, 60, 5])
    fig = viz.kl_histogram(kl, counts, n_bins=2)

    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2
    # Bins of log10(KL) over [-2, 0]: [-2, -1) and [-1, 0]; NaN and 0 are left out.
    assert list(fig.data[0].x) == pytest.approx([-1.5, -0.5])
    assert list(fig.data[0].y) == [1, 2]
    assert list(fig.data[1].y) == pytest.approx([0.1, 0.9])
    assert fig.data[1].visible is False
    assert list(fig.layout.xaxis.ticktext) == ["0.01", "0.1", "1"]
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.args[0]["visible"] for b in buttons] == [[True, False], [False, True]]
    mean = (0.01 * 10 + 0.1 * 30 + 1.0 * 60) / 100
    assert fig.layout.shapes[0].x0 == pytest.approx(np.log10(mean))


def comparison_frame():
    return pd.DataFrame({
        "source": [1, 1, 2, 2, 2],
        "source_str": [" a", " a", "\n", "\n", "\n"],
        "token": [3, 4, 3, 5, 6],
        "token_str": ["x", "y", "x", "\ufffd", "\ufffd"],
        "corpus": [0.6, 0.4, 0.5, 0.3, np.nan],
        "model": [0.5, 0.3, 0.4, 0.2, 0.1],
    })


def test_next_token_bars_slider_per_source():
    fig = viz.next_token_bars(comparison_frame(), ["corpus", "model"])

    assert len(fig.data) == 2
    assert [trace.name for trace in fig.data] == ["corpus", "model"]
    assert list(fig.data[0].x) == ["'x'", "'y'"]
    assert list(fig.data[1].y) == pytest.approx([0.5, 0.3])
    assert not fig.layout.updatemenus
    steps = fig.layout.sliders[0].steps
    assert [step.label for step in steps] == ["' a'", "'\\n'"]
    second = steps[1].args[0]
    assert second["x"][0] == ["'x'", "'\ufffd' #5", "'\ufffd' #6"]
    assert second["y"][0] == pytest.approx([0.5, 0.3, 0.0])  # NaN shown as 0
    assert second["y"][1] == pytest.approx([0.4, 0.2, 0.1])
    assert steps[1].args[1]["title.text"] == "Next token after '\\n'"


def test_next_token_bars_cap_tokens():
    fig = viz.next_token_bars(comparison_frame(), ["corpus"], max_tokens=2)
    assert len(fig.layout.sliders[0].steps[1].args[0]["x"][0]) == 2


def test_kl_scatter_points_and_diagonal():
    frame = pd.DataFrame({
        "source": [1, 2], "source_str": [" a", "b"], "count": [10, 1000],
        "zero": [0.1, 0.2], "one": [0.5, 0.05],
    })
    fig = viz.kl_scatter(frame, "zero", "one")
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == pytest.approx([0.1, 0.2])
    assert list(fig.data[0].y) == pytest.approx([0.5, 0.05])
    assert list(fig.data[0].text) == ["' a'", "'b'"]
    assert fig.data[0].marker.size[1] > fig.data[0].marker.size[0]
    assert fig.layout.xaxis.type == "log"
    assert fig.data[1].x[0] == pytest.approx(0.05 / 1.2)


def test_logit_term_heatmap_layout():
    frame = pd.DataFrame({
        "position": [0, 1, 0, 1],
        "token": [1, 2, 1, 2], "next_token": [2, 3, 2, 3],
        "token_str": ["a", "b", "a", "b"], "next_str": ["b", "c", "b", "c"],
        "term": ["direct path", "direct path", "L0H0", "L0H0"],
        "value": [1.0, -2.0, 0.5, 4.0],
    })
    fig = viz.logit_term_heatmap(frame)
    assert len(fig.data) == 1
    heatmap = fig.data[0]
    assert list(heatmap.y) == ["direct path", "L0H0"]
    np.testing.assert_allclose(np.asarray(heatmap.z), [[1.0, -2.0], [0.5, 4.0]])
    assert heatmap.zmin == -4.0
    assert heatmap.zmax == 4.0
    assert heatmap.text[0][1] == "'b' → 'c'"
    assert list(fig.layout.xaxis.ticktext) == ["'a'", "'b'"]


def test_circuit_heatmaps_head_dropdown():
    matrices = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) - 4
    fig = viz.circuit_heatmaps(matrices, ["a", "b", "c"], ["L0H0", "L0H1"], "key", "query", "QK")

    assert len(fig.data) == 2
    assert [trace.visible for trace in fig.data] == [True, False]
    np.testing.assert_array_equal(np.asarray(fig.data[1].z), matrices[1])
    # With the default quantile, the colour range ends just below the largest |value|.
    assert 3.9 < fig.data[0].zmax <= 4.0
    assert fig.data[0].zmin == -fig.data[0].zmax
    clipped = viz.circuit_heatmaps(matrices, ["a", "b", "c"], ["L0H0", "L0H1"], "key", "query",
                                   "QK", saturation_quantile=0.5)
    assert clipped.data[1].zmax == pytest.approx(9.0)  # the median of 5 … 13
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["L0H0", "L0H1"]
    assert buttons[1].args[0]["visible"] == [False, True]
    assert buttons[1].args[1]["title.text"] == "QK: L0H1"


def test_ov_eigenvalue_figure_keeps_bars():
    eigenvalues = {"L0H0": np.array([1 + 1j, 2 - 0.5j]), "L0H1": np.array([-1 + 0j, 0.5j])}
    scores = pd.DataFrame({"name": ["L0H0", "L0H1"], "trained": [0.9, -0.2],
                           "random init": [0.01, 0.02]})
    fig = viz.ov_eigenvalue_figure(eigenvalues, scores)

    assert [trace.type for trace in fig.data] == ["scatter", "scatter", "bar", "bar"]
    assert list(fig.data[0].x) == pytest.approx([1, 2])
    assert list(fig.data[0].y) == pytest.approx([1, -0.5])
    assert list(fig.data[2].y) == pytest.approx([0.9, -0.2])
    assert fig.data[3].name == "random init"
    buttons = fig.layout.updatemenus[0].buttons
    assert buttons[1].args[0]["visible"] == [False, True, True, True]


def test_head_tables_format_and_dropdown():
    frames = {
        "L0H0": pd.DataFrame({"source_str": [" keep"], "ov_score": [1.23456], "head": [0]}),
        "L0H1": pd.DataFrame({"source_str": ["<a>", "b"], "ov_score": [0.5, 0.25], "head": [1, 1]}),
    }
    fig = viz.head_tables(frames, ["source_str", "ov_score", "head"], ["source", "OV", "head"])

    assert [trace.type for trace in fig.data] == ["table", "table"]
    assert list(fig.data[0].header.values) == ["source", "OV", "head"]
    assert [list(column) for column in fig.data[1].cells.values] == [
        ["'&lt;a&gt;'", "'b'"], ["0.500", "0.250"], ["1", "1"]
    ]
    assert fig.layout.updatemenus[0].buttons[1].args[0]["visible"] == [False, True]


def test_offset_profile_lines():
    attention = np.array([[0.1, 0.6, 0.1], [0.3, 0.2, 0.1]])
    fig = viz.offset_profile_figure(attention, [0.4, 0.3, 0.2], ["L0H0", "L0H1"], [True, False])
    assert len(fig.data) == 3
    assert list(fig.data[0].y) == pytest.approx([0.1, 0.6, 0.1])
    assert fig.data[0].line.dash == "solid"
    assert fig.data[1].line.dash == "dot"
    assert fig.data[2].name == "evenly spread"


def effects_frame():
    rows = []
    for example, (name, source) in enumerate([("L0H1", " keep"), ("L0H2", " per")]):
        for destination, d_str in [(10, " in"), (11, " at")]:
            for output, o_str in [(20, " mind"), (21, " bay")]:
                rows.append({
                    "example": example, "name": name, "source": 1, "destination": destination,
                    "output": output, "source_str": source, "destination_str": d_str,
                    "output_str": o_str, "paired": (destination - 10) == (output - 20),
                    "attention_to_source": 0.8, "head_effect": float(destination + output),
                    "corpus_prob": 0.1,
                })
    return pd.DataFrame(rows)


def test_bug_figure_bars_per_example():
    fig = viz.skip_trigram_bug_figure(effects_frame())
    assert len(fig.data) == 4
    assert [trace.visible for trace in fig.data] == [True, True, False, False]
    first = fig.data[0]
    assert list(first.x) == ["' keep' … ' in'", "' keep' … ' at'"]
    assert list(first.y) == pytest.approx([30.0, 31.0])
    assert list(first.text) == ["paired", "crossed"]
    assert first.name == "raises ' mind'"
    buttons = fig.layout.updatemenus[0].buttons
    assert buttons[1].args[0]["visible"] == [False, False, True, True]
    assert buttons[0].label == "L0H1: ' keep' → ' mind' / ' bay'"


def test_bug_figure_rejects_uneven_examples():
    frame = effects_frame()
    frame = frame[~((frame["example"] == 1) & (frame["output"] == 21))]
    with pytest.raises(ValueError, match="same number"):
        viz.skip_trigram_bug_figure(frame)
