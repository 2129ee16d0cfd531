"""Figures for the book and for live notebooks.

Jupyter Book 1 drops the output of plotly's default renderer, so chapters show
figures with `show(fig)`. Its output carries two representations:

* text/html: a div and a script that calls Plotly.newPlot on the embedded
  figure JSON. It loads no plotly.js, because the book serves one local copy
  of plotly.min.js on every page. myst-nb renders this one.
* application/vnd.plotly.v1+json: the figure itself, which JupyterLab and
  Notebook 7 draw with the jupyterlab-plotly extension that ships with plotly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import plotly.graph_objects as go
import plotly.io as pio

PLOTLY_MIME = "application/vnd.plotly.v1+json"

# Height used when neither the figure's layout nor its template sets one. It is
# plotly.js's own default, written on the div so that the page reserves the space.
DEFAULT_HEIGHT = "450px"

_DIV_ID_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

# Div ids issued in this process, so that a page never holds one id twice.
_issued_div_ids: Counter[str] = Counter()


def content_div_id(figure_json: str) -> str:
    """Return a div id derived from the figure's JSON.

    The id depends only on the figure, so executing a chapter again yields the
    same HTML as long as its figures are the same.
    """
    digest = hashlib.sha256(figure_json.encode("utf-8")).hexdigest()
    return f"circuits-fig-{digest[:12]}"


def _issue_div_id(base: str) -> str:
    _issued_div_ids[base] += 1
    count = _issued_div_ids[base]
    return base if count == 1 else f"{base}-{count}"


class PlotlyFigure:
    """A plotly figure that displays without plotly's renderers.

    `div_id` names the figure's div. It defaults to an id derived from the
    figure's content. Showing the same figure again in one process appends
    "-2", "-3", ... so that ids on a page stay unique.
    """

    def __init__(self, fig, div_id: str | None = None, config: dict | None = None):
        if isinstance(fig, dict):
            fig = go.Figure(fig)
        if not isinstance(fig, go.Figure):
            raise TypeError(
                f"expected a plotly.graph_objects.Figure or a figure dict, got {type(fig).__name__}"
            )
        if div_id is not None and not _DIV_ID_PATTERN.fullmatch(div_id):
            raise ValueError(
                f"invalid div_id {div_id!r}: use a letter followed by letters, digits, '-' or '_'"
            )

        self.figure = fig
        self.config = {"responsive": True, **(config or {})}
        figure_json = pio.to_json(fig, validate=False, pretty=False)
        self.div_id = _issue_div_id(div_id or content_div_id(figure_json + json.dumps(self.config)))

    def to_html(self) -> str:
        """Return the figure as a div and an inline script, without plotly.js."""
        return pio.to_html(
            self.figure,
            config=self.config,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            div_id=self.div_id,
            default_height=DEFAULT_HEIGHT,
            default_width="100%",
            validate=False,
        )

    def to_plotly_json(self) -> dict:
        """Return the application/vnd.plotly.v1+json payload."""
        figure = json.loads(pio.to_json(self.figure, validate=False))
        return {
            "data": figure.get("data", []),
            "layout": figure.get("layout", {}),
            "config": self.config,
        }

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {
            "text/html": self.to_html(),
            PLOTLY_MIME: self.to_plotly_json(),
            "text/plain": f"<PlotlyFigure {self.div_id}>",
        }

    def __repr__(self) -> str:
        return f"<PlotlyFigure {self.div_id}>"


def show(fig, div_id: str | None = None, config: dict | None = None) -> None:
    """Display a plotly figure in a notebook so that the book renders it too.

    `config` updates plotly.js's config, which starts as {"responsive": True}.
    """
    from IPython.display import display

    display(PlotlyFigure(fig, div_id=div_id, config=config))
