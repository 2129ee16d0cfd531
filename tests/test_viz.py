"""Tests for circuits.viz: figure HTML for the static book and live notebooks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import plotly.graph_objects as go
import pytest

from circuits import viz

EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\ssrc\s*=\s*[\"']?(https?:)?//", re.IGNORECASE)


def scatter(name: str, y) -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=y, name=name))


def test_html_has_div_with_figure_id():
    figure = viz.PlotlyFigure(scatter("div-check", [1, 2, 3]))
    html = figure.to_html()

    assert re.fullmatch(r"circuits-fig-[0-9a-f]{12}", figure.div_id)
    assert f'<div id="{figure.div_id}" class="plotly-graph-div"' in html
    assert re.search(rf'Plotly\.newPlot\(\s*"{figure.div_id}"', html)


def test_html_loads_no_script_file():
    html = viz.PlotlyFigure(scatter("script-check", [1, 2, 3])).to_html()

    assert EXTERNAL_SCRIPT.search(html) is None
    assert re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE) is None
    assert "cdn.plot.ly" not in html
    assert "require(" not in html


def test_html_embeds_figure_json():
    html = viz.PlotlyFigure(scatter("embedded-trace", [7, 11, 13])).to_html()

    assert '"name":"embedded-trace"' in html
    assert '"y":[7,11,13]' in html
    assert '"responsive": true' in html


def test_html_escapes_script_end_tag_in_data():
    html = viz.PlotlyFigure(scatter("</script><b>bold</b>", [1, 2, 3])).to_html()

    assert html.count("</script>") == 1


def test_html_height_defaults_and_follows_layout():
    default = viz.PlotlyFigure(scatter("height-default", [1, 2, 3])).to_html()
    tall_figure = scatter("height-layout", [1, 2, 3])
    tall_figure.update_layout(height=720)
    tall = viz.PlotlyFigure(tall_figure).to_html()

    assert "height:450px" in default
    assert "height:720px" in tall


def test_html_redraws_on_container_resize():
    figure = viz.PlotlyFigure(scatter("resize-check", [1, 2, 3]))
    html = figure.to_html()

    assert f"document.getElementById('{figure.div_id}')" in html
    assert "ResizeObserver" in html
    assert "{plot_id}" not in html


def test_div_id_repeats_get_suffix():
    first = viz.PlotlyFigure(scatter("repeat-check", [3, 2, 1]))
    second = viz.PlotlyFigure(scatter("repeat-check", [3, 2, 1]))
    third = viz.PlotlyFigure(scatter("repeat-check", [3, 2, 1]))

    assert second.div_id == f"{first.div_id}-2"
    assert third.div_id == f"{first.div_id}-3"


def test_div_id_differs_between_figures():
    figure = viz.PlotlyFigure(scatter("differs", [1, 2, 3]))
    changed = viz.PlotlyFigure(scatter("differs", [1, 2, 4]))

    assert figure.div_id != changed.div_id


def test_div_id_differs_with_config():
    plain = viz.PlotlyFigure(scatter("config-id", [1, 2, 3]))
    static = viz.PlotlyFigure(scatter("config-id", [1, 2, 3]), config={"staticPlot": True})

    assert not static.div_id.startswith(plain.div_id)


def test_div_id_stable_across_processes():
    # A fresh interpreter stands for a fresh kernel executing the chapter again.
    code = (
        "import plotly.graph_objects as go\n"
        "from circuits.viz import PlotlyFigure\n"
        "fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[5, 6, 7], name='across-processes'))\n"
        "print(PlotlyFigure(fig).div_id)\n"
    )
    ids = [
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.strip()
        for _ in range(2)
    ]

    assert ids[0] == ids[1]
    assert re.fullmatch(r"circuits-fig-[0-9a-f]{12}", ids[0])


def test_explicit_div_id_is_used():
    figure = viz.PlotlyFigure(scatter("explicit", [1, 2, 3]), div_id="bigram-heatmap")

    assert figure.div_id == "bigram-heatmap"
    assert '<div id="bigram-heatmap"' in figure.to_html()


@pytest.mark.parametrize("bad_id", ["", "1starts-with-digit", "has space", 'quote"', "a<b"])
def test_invalid_div_id_raises(bad_id):
    with pytest.raises(ValueError, match="invalid div_id"):
        viz.PlotlyFigure(scatter("bad-id", [1, 2, 3]), div_id=bad_id)


@pytest.mark.parametrize("not_a_figure", ["figure", [1, 2, 3], None, np.zeros(3)])
def test_non_figure_raises_type_error(not_a_figure):
    with pytest.raises(TypeError, match="expected a plotly.graph_objects.Figure"):
        viz.PlotlyFigure(not_a_figure)


def test_figure_dict_is_accepted():
    figure = viz.PlotlyFigure({"data": [{"type": "bar", "y": [4, 5]}], "layout": {}})

    assert '"type":"bar"' in figure.to_html()


def test_mimebundle_has_html_json_and_text():
    figure = viz.PlotlyFigure(scatter("bundle", [2, 4, 8]))
    bundle = figure._repr_mimebundle_()

    assert set(bundle) == {"text/html", viz.PLOTLY_MIME, "text/plain"}
    assert bundle["text/html"] == figure.to_html()
    assert bundle["text/plain"] == f"<PlotlyFigure {figure.div_id}>"
    assert figure._repr_html_() == bundle["text/html"]


def test_plotly_json_is_serialisable_figure():
    figure = viz.PlotlyFigure(scatter("json-payload", [2, 4, 8]), config={"displaylogo": False})
    payload = figure.to_plotly_json()

    assert payload["data"][0]["name"] == "json-payload"
    assert payload["data"][0]["y"] == [2, 4, 8]
    assert "template" in payload["layout"]
    assert payload["config"] == {"responsive": True, "displaylogo": False}
    json.dumps(payload)


def test_numpy_data_is_embedded():
    heatmap = go.Figure(go.Heatmap(z=np.arange(6, dtype=np.float32).reshape(2, 3)))
    figure = viz.PlotlyFigure(heatmap)

    assert '"type":"heatmap"' in figure.to_html()
    json.dumps(figure.to_plotly_json())


def test_show_displays_plotly_figure(monkeypatch):
    displayed = []
    monkeypatch.setattr("IPython.display.display", lambda obj: displayed.append(obj))

    result = viz.show(scatter("shown", [1, 2, 3]), div_id="shown-figure")

    assert result is None
    assert len(displayed) == 1
    assert isinstance(displayed[0], viz.PlotlyFigure)
    assert displayed[0].div_id == "shown-figure"
