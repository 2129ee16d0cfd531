"""Figures for the book and for live notebooks.

In a kernel that nbmake or nbclient runs, plotly's default renderer outputs only
application/vnd.plotly.v1+json, which myst-nb (the notebook reader of Jupyter
Book 1) skips. Chapters therefore show figures with `show(fig)`, whose output
carries two representations:

* text/html: a div and a script that calls Plotly.newPlot on the embedded
  figure JSON. It loads no plotly.js, because the book serves one local copy
  of plotly.min.js on every page. myst-nb renders this one.
* application/vnd.plotly.v1+json: the figure itself, which JupyterLab and
  Notebook 7 draw with the jupyterlab-plotly extension that ships with plotly.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import Counter

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

PLOTLY_MIME = "application/vnd.plotly.v1+json"

# Height used when neither the figure's layout nor its template sets one. It is
# plotly.js's own default, written on the div so that the page reserves the space.
DEFAULT_HEIGHT = "450px"

# plotly.js redraws a responsive figure when the window resizes, but not when only
# its container does: when the page's scroll bar appears while it loads, or when
# the reader hides the book's sidebar. This script, run after Plotly.newPlot,
# redraws the figure whenever its div changes size. plotly.io.to_html puts the
# div id in place of {plot_id}.
_RESIZE_SCRIPT = """
var plot = document.getElementById('{plot_id}');
if (window.ResizeObserver) {
    new ResizeObserver(function () {
        if (plot.offsetParent !== null) {
            Plotly.Plots.resize(plot).catch(function () {});
        }
    }).observe(plot);
}
"""

_DIV_ID_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

# Div ids issued in this process, so that a page never contains one id twice.
_issued_div_ids: Counter[str] = Counter()


def content_div_id(figure_json: str, config: dict) -> str:
    """Return a div id derived from a figure's JSON and its plotly.js config.

    The id depends only on what is drawn, so executing a chapter again yields
    the same HTML as long as its figures are the same.
    """
    content = figure_json + json.dumps(config, sort_keys=True)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return f"circuits-fig-{digest[:12]}"


def _issue_div_id(base: str) -> str:
    _issued_div_ids[base] += 1
    count = _issued_div_ids[base]
    return base if count == 1 else f"{base}-{count}"


class PlotlyFigure:
    """A plotly figure that displays without plotly's renderers.

    `div_id` names the figure's div. It defaults to an id derived from the
    figure's content. Issuing the same id again in one process appends "-2",
    "-3", ... so that ids on a page stay unique.
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
        self.div_id = _issue_div_id(div_id or content_div_id(figure_json, self.config))

    def to_html(self) -> str:
        """Return the figure as a div and an inline script, without plotly.js."""
        return pio.to_html(
            self.figure,
            config=self.config,
            include_plotlyjs=False,
            include_mathjax=False,
            post_script=_RESIZE_SCRIPT,
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


# ---------------------------------------------------------------------------
# Figures of the zero-layer and one-layer chapters.
#
# Each function returns a plotly Figure and never shows it. Dropdowns and
# sliders run plotly "update" methods, which either switch traces on and off
# or replace trace data, and plotly.js runs both in the browser without a
# kernel. Matrices go in as float32 numpy arrays, which plotly stores as
# base64 typed arrays, about 5.3 characters per value.
# ---------------------------------------------------------------------------


def token_label(text: str) -> str:
    """Return a token's display string quoted, with whitespace escaped and HTML made inert.

    ``repr`` shows a leading space and escapes newlines; plotly renders a few HTML tags in labels,
    so ``<``, ``>`` and ``&`` become entities.
    """
    return html.escape(repr(text), quote=False)


def token_labels(strings, ids=None) -> list[str]:
    """Label each token with ``token_label``, appending ``#id`` where two labels would coincide.

    Categorical axes merge equal labels, and distinct ids can share a display string (bytes that
    are not valid UTF-8 alone all show as the replacement character).
    """
    labels = [token_label(text) for text in strings]
    ids = list(range(len(labels))) if ids is None else [int(i) for i in ids]
    seen = Counter(labels)
    return [f"{label} #{i}" if seen[label] > 1 else label for label, i in zip(labels, ids)]


def quoted_tokens(frame):
    """Return a copy of a DataFrame with every ``*_str`` column quoted by ``repr``.

    For tables that pandas renders, which escape HTML themselves: a leading space or a newline
    stays visible. Spaces become no-break spaces, so a narrow column never wraps a token.
    """
    frame = frame.copy()
    for column in frame.columns:
        if str(column).endswith("_str"):
            frame[column] = [repr(text).replace(" ", "\u00a0") for text in frame[column]]
    return frame


def _visibility_buttons(
    names, traces_per_item: int, fixed_traces: int = 0, titles=None
) -> list[dict]:
    """Dropdown buttons that show one item's traces at a time.

    Traces are laid out item by item, ``traces_per_item`` each, followed by ``fixed_traces``
    traces that stay visible whatever is chosen. ``titles`` optionally sets the layout title per
    item.
    """
    n_items = len(names)
    buttons = []
    for index, name in enumerate(names):
        visible = [False] * (n_items * traces_per_item) + [True] * fixed_traces
        for offset in range(traces_per_item):
            visible[index * traces_per_item + offset] = True
        args = [{"visible": visible}]
        if titles is not None:
            args.append({"title.text": titles[index]})
        buttons.append({"label": str(name), "method": "update", "args": args})
    return buttons


def _dropdown(buttons: list[dict], x: float = 1.0, xanchor: str = "right") -> dict:
    """Return a dropdown menu just above the plot area, right-aligned by default.

    Figures that use it leave a top margin of about 110 pixels, so the title sits above the menu.
    """
    return {
        "buttons": buttons,
        "direction": "down",
        "showactive": True,
        "x": x,
        "xanchor": xanchor,
        "y": 1.02,
        "yanchor": "bottom",
    }


# Top margin in pixels of figures with a dropdown: room for the title above the menu.
MENU_MARGIN = {"t": 110}


def kl_histogram(kl, source_counts, n_bins: int = 50, title: str | None = None) -> go.Figure:
    """Histogram of per-source KL divergences on a log scale, by token or by occurrence.

    ``kl`` and ``source_counts`` are [d_vocab] arrays; sources with a NaN or non-positive KL, or a
    zero count, are left out. The bins are evenly spaced in log10(KL) and drawn as bars at their
    log10 centres, with tick labels in nats. A dropdown switches between counting source tokens
    and weighting each by its count (the share of corpus pairs), and a dashed line marks the
    count-weighted mean.
    """
    kl = np.asarray(kl, dtype=np.float64)
    weights = np.asarray(source_counts, dtype=np.float64)
    keep = np.isfinite(kl) & (kl > 0) & (weights > 0)
    kl, weights = kl[keep], weights[keep]
    weighted_mean = float(np.average(kl, weights=weights))

    log_kl = np.log10(kl)
    edges = np.linspace(log_kl.min(), log_kl.max(), n_bins + 1)
    tokens_per_bin, _ = np.histogram(log_kl, bins=edges)
    share_per_bin, _ = np.histogram(log_kl, bins=edges, weights=weights / weights.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    ranges = [f"{10 ** low:.3g} to {10 ** high:.3g}" for low, high in zip(edges[:-1], edges[1:])]
    width = float(edges[1] - edges[0])

    fig = go.Figure()
    fig.add_trace(go.Bar(
        x=centres.astype(np.float32), y=tokens_per_bin, width=width, customdata=ranges,
        name="source tokens",
        hovertemplate="KL %{customdata} nats<br>%{y} source tokens<extra></extra>",
    ))
    fig.add_trace(go.Bar(
        x=centres.astype(np.float32), y=share_per_bin.astype(np.float32), width=width,
        customdata=ranges, name="share of corpus pairs", visible=False,
        hovertemplate="KL %{customdata} nats<br>%{y:.2%} of corpus pairs<extra></extra>",
    ))
    fig.add_vline(
        x=float(np.log10(weighted_mean)), line_dash="dash", line_color="black",
        annotation_text=f"weighted mean {weighted_mean:.3f}", annotation_position="top right",
    )
    decades = np.arange(np.floor(edges[0]), np.ceil(edges[-1]) + 1)
    buttons = [
        {"label": "count source tokens", "method": "update",
         "args": [{"visible": [True, False]}, {"yaxis.title.text": "source tokens"}]},
        {"label": "weight by occurrences", "method": "update",
         "args": [{"visible": [False, True]}, {"yaxis.title.text": "share of corpus pairs"}]},
    ]
    fig.update_layout(
        title=title or "KL(corpus ‖ model) per source token",
        xaxis={"title": "KL divergence (nats, log scale)", "tickvals": decades.tolist(),
               "ticktext": [f"{10 ** d:g}" for d in decades]},
        yaxis_title="source tokens",
        bargap=0.0,
        showlegend=False,
        updatemenus=[_dropdown(buttons)],
        margin=MENU_MARGIN,
    )
    return fig


def next_token_bars(
    frame, distributions, title: str | None = None, max_tokens: int = 16
) -> go.Figure:
    """Grouped bars of next-token probabilities per source token, with a slider over sources.

    ``frame`` has the columns of ``circuits.analysis.bigram_tables.next_token_comparison``:
    ``source``, ``source_str``, ``token``, ``token_str`` and one probability column per name in
    ``distributions`` (for example ``["corpus", "model"]``). Sources keep the frame's order along
    the slider, whose current value names the source. Each step replaces the bars' data (an
    "update"), so the page contains one set of traces, and each source shows at most ``max_tokens``
    next tokens, in the frame's order. A slider rather than a dropdown, because a dropdown of
    hundreds of entries only scrolls with the mouse wheel.
    """
    distributions = list(distributions)
    sources = list(dict.fromkeys(frame["source"].tolist()))
    per_source = {
        source: group.head(max_tokens) for source, group in frame.groupby("source", sort=False)
    }

    def source_data(source):
        group = per_source[source]
        labels = token_labels(group["token_str"], group["token"])
        xs = [labels] * len(distributions)
        ys = [
            [round(float(v), 5) for v in np.nan_to_num(group[name].to_numpy())]
            for name in distributions
        ]
        return xs, ys

    def source_label(source):
        return token_label(per_source[source]["source_str"].iloc[0])

    first = sources[0]
    xs, ys = source_data(first)
    fig = go.Figure()
    for name, x, y in zip(distributions, xs, ys):
        fig.add_trace(go.Bar(
            x=x, y=y, name=name,
            hovertemplate="%{x}<br>" + name + ": %{y:.2%}<extra></extra>",
        ))

    steps = []
    for source in sources:
        xs, ys = source_data(source)
        steps.append({
            "label": source_label(source),
            "method": "update",
            "args": [
                {"x": xs, "y": ys},
                {"title.text": f"Next token after {source_label(source)}"},
            ],
        })
    fig.update_layout(
        title=title or f"Next token after {source_label(first)}",
        barmode="group",
        xaxis_title="next token",
        yaxis_title="probability",
        yaxis_tickformat=".0%",
        legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
        sliders=[{
            "active": 0,
            "steps": steps,
            "currentvalue": {
                "prefix": f"source token (1 to {len(sources)}, most frequent first): ",
                "font": {"color": "#2a3f5f", "size": 14},
            },
            # One label per step would overlap, so the step labels and ticks are transparent; the
            # current value above the slider names the chosen source.
            "font": {"color": "rgba(0, 0, 0, 0)"},
            "tickcolor": "rgba(0, 0, 0, 0)",
            "ticklen": 0,
            "minorticklen": 0,
            "len": 1.0,
            "y": -0.2,
            "yanchor": "top",
            "pad": {"t": 10},
        }],
        height=560,
        margin={"b": 150, "t": 90},
    )
    return fig


def kl_scatter(frame, x: str, y: str, title: str | None = None) -> go.Figure:
    """Scatter of two per-source KL columns of ``frame`` against each other, one point per token.

    ``frame`` has the columns of ``circuits.analysis.bigram_tables.per_source_kl``: ``source``,
    ``source_str``, ``count`` and the KL columns named ``x`` and ``y``. Marker size grows with the
    log of the count. Both axes are logarithmic, so a KL of 0 is not drawn; a dashed diagonal
    marks equal KL.
    """
    labels = [token_label(text) for text in frame["source_str"]]
    counts = frame["count"].to_numpy(dtype=np.float64)
    sizes = 4 + 8 * np.log10(np.maximum(counts, 1)) / np.log10(max(counts.max(), 10))
    xs = frame[x].to_numpy(dtype=np.float32)
    ys = frame[y].to_numpy(dtype=np.float32)
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers", text=labels,
        customdata=counts.astype(np.int64),
        marker={"size": sizes.astype(np.float32), "opacity": 0.6},
        hovertemplate="%{text}<br>" + x + ": %{x:.3f}<br>" + y
        + ": %{y:.3f}<br>%{customdata} occurrences<extra></extra>",
        name="source tokens",
    ))
    positive = np.concatenate([xs[xs > 0], ys[ys > 0]])
    low, high = float(positive.min()) / 1.2, float(positive.max()) * 1.2
    fig.add_trace(go.Scatter(
        x=[low, high], y=[low, high], mode="lines", line={"dash": "dash", "color": "grey"},
        name="equal KL", hoverinfo="skip",
    ))
    fig.update_layout(
        title=title or f"KL per source token: {x} vs {y}",
        xaxis={"title": f"KL(corpus ‖ {x}) (nats)", "type": "log"},
        yaxis={"title": f"KL(corpus ‖ {y}) (nats)", "type": "log"},
        showlegend=False,
    )
    return fig


def logit_term_heatmap(frame, title: str | None = None) -> go.Figure:
    """Heatmap of path-expansion terms (rows) by position (columns) for the actual next token.

    ``frame`` has the columns of ``circuits.analysis.logit_terms.target_logit_terms``:
    ``position``, ``token_str``, ``next_str``, ``term`` and ``value``. Rows keep the order in
    which terms first appear, and the x axis labels each position with its current token. The
    colour scale is centred on 0.
    """
    terms = list(dict.fromkeys(frame["term"].tolist()))
    table = frame.pivot(index="term", columns="position", values="value").loc[terms]
    positions = table.columns.tolist()
    by_position = frame.drop_duplicates("position").set_index("position")
    current = [token_label(by_position.loc[p, "token_str"]) for p in positions]
    following = [token_label(by_position.loc[p, "next_str"]) for p in positions]
    hover = [[f"{current[i]} → {following[i]}" for i in range(len(positions))] for _ in terms]
    values = table.to_numpy(dtype=np.float32)
    limit = float(np.abs(values).max())

    fig = go.Figure(go.Heatmap(
        z=values, x=positions, y=terms, text=hover, zmid=0, zmin=-limit, zmax=limit,
        colorscale="RdBu", colorbar={"title": {"text": "logit"}},
        hovertemplate="%{y} at position %{x}<br>%{text}<br>%{z:.2f}<extra></extra>",
    ))
    fig.update_layout(
        title=title or "Logit of the actual next token, split into path terms",
        xaxis={"title": "current token (position)", "tickvals": positions, "ticktext": current,
               "tickangle": -90, "tickfont": {"size": 9}},
        yaxis={"autorange": "reversed"},
        height=220 + 28 * len(terms),
    )
    return fig


def circuit_heatmaps(
    matrices,
    labels,
    head_names,
    x_title: str,
    y_title: str,
    title: str,
    value_name: str = "value",
    saturation_quantile: float = 0.995,
) -> go.Figure:
    """Draw one heatmap per head [n_heads, rows, columns], with a head dropdown.

    ``labels`` name the tokens of both axes (the same token set in the same order, as in a QK or
    OV circuit restricted to chosen tokens). Each head gets its own colour range, symmetric
    around 0 and set by the ``saturation_quantile`` of its absolute values, so that a few extreme
    entries do not wash out the rest. Entries beyond it show the end colour, and hover shows
    every value.
    """
    matrices = np.asarray(matrices, dtype=np.float32)
    labels = list(labels)
    fig = go.Figure()
    for index, name in enumerate(head_names):
        limit = float(np.quantile(np.abs(matrices[index]), saturation_quantile)) or 1.0
        fig.add_trace(go.Heatmap(
            z=matrices[index], x=labels, y=labels, zmid=0, zmin=-limit, zmax=limit,
            colorscale="RdBu", visible=index == 0, name=str(name),
            colorbar={"title": {"text": value_name}},
            hovertemplate=y_title + " %{y}<br>" + x_title + " %{x}<br>" + value_name
            + " %{z:.2f}<extra>" + str(name) + "</extra>",
        ))
    titles = [f"{title}: {name}" for name in head_names]
    fig.update_layout(
        title=titles[0],
        xaxis={"title": x_title, "showticklabels": False},
        yaxis={"title": y_title, "showticklabels": False, "autorange": "reversed",
               "scaleanchor": "x"},
        height=680,
        updatemenus=[_dropdown(_visibility_buttons(head_names, 1, titles=titles))],
        margin=MENU_MARGIN,
    )
    return fig


def ov_eigenvalue_figure(eigenvalues, scores) -> go.Figure:
    """OV eigenvalues of one head in the complex plane (head dropdown) beside copying scores.

    ``eigenvalues`` maps a head name to its complex eigenvalues [d_head]; ``scores`` is a
    DataFrame with a ``name`` column and one column per model compared (for example ``trained``
    and ``random init``). The bars stay visible whatever head is chosen.
    """
    names = list(eigenvalues)
    score_columns = [column for column in scores.columns if column != "name"]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
        subplot_titles=("OV eigenvalues (complex plane)", "copying score Σ Re λ / Σ |λ|"),
    )
    for index, name in enumerate(names):
        values = np.asarray(eigenvalues[name])
        fig.add_trace(go.Scatter(
            x=values.real.astype(np.float32), y=values.imag.astype(np.float32), mode="markers",
            name=name, visible=index == 0, showlegend=False,
            hovertemplate="Re %{x:.3g}<br>Im %{y:.3g}<extra>" + name + "</extra>",
        ), row=1, col=1)
    for column in score_columns:
        fig.add_trace(go.Bar(
            x=scores["name"].tolist(), y=scores[column].to_numpy(dtype=np.float32), name=column,
            hovertemplate="%{x}: %{y:.3f}<extra>" + column + "</extra>",
        ), row=1, col=2)
    buttons = _visibility_buttons(names, 1, fixed_traces=len(score_columns))
    fig.update_xaxes(title_text="Re λ", zeroline=True, zerolinecolor="grey", row=1, col=1)
    fig.update_yaxes(title_text="Im λ", zeroline=True, zerolinecolor="grey", scaleanchor="x",
                     row=1, col=1)
    fig.update_yaxes(title_text="copying score", range=[-1, 1], row=1, col=2)
    fig.update_layout(
        barmode="group",
        height=480,
        legend={"orientation": "h", "x": 0.56, "y": -0.15},
        updatemenus=[_dropdown(buttons, x=0.0, xanchor="left") | {"y": 1.12}],
        margin={"t": 120},
    )
    return fig


def head_tables(frames, columns, headers=None, title: str | None = None) -> go.Figure:
    """Build a plotly Table per head, with a head dropdown.

    ``frames`` maps a head name to a DataFrame; ``columns`` are the columns shown, with
    ``headers`` as their titles (default: the column names). Float columns are shown with three
    decimals, and string columns ending in ``_str`` as quoted token labels.
    """
    headers = list(headers or columns)
    names = list(frames)
    fig = go.Figure()
    for index, name in enumerate(names):
        frame = frames[name]
        cells = []
        for column in columns:
            values = frame[column]
            if column.endswith("_str"):
                cells.append([token_label(text) for text in values])
            elif np.issubdtype(values.dtype, np.floating):
                cells.append([f"{v:.3f}" for v in values])
            else:
                cells.append([str(v) for v in values])
        fig.add_trace(go.Table(
            header={"values": headers, "align": "left"},
            cells={"values": cells, "align": "left"},
            visible=index == 0, name=name,
        ))
    titles = [f"{title}: {name}" if title else name for name in names]
    fig.update_layout(
        title=titles[0],
        # Room for the title and menu, the header, then about 22 pixels per row.
        height=170 + 22 * max((len(frame) for frame in frames.values()), default=1),
        updatemenus=[_dropdown(_visibility_buttons(names, 1, titles=titles))],
        margin=MENU_MARGIN | {"b": 10},
    )
    return fig


def offset_profile_figure(attention, uniform, head_names, positional=None) -> go.Figure:
    """Mean attention by relative offset, one line per head, beside the evenly-spread baseline.

    ``attention`` is [n_heads, n_offsets]; ``uniform`` [n_offsets]. Heads flagged in
    ``positional`` (booleans, one per head) get solid lines; the others are dotted. Click a legend
    entry to hide a head.
    """
    attention = np.asarray(attention, dtype=np.float32)
    offsets = list(range(attention.shape[1]))
    flags = list(positional) if positional is not None else [True] * len(head_names)
    fig = go.Figure()
    for index, name in enumerate(head_names):
        fig.add_trace(go.Scatter(
            x=offsets, y=attention[index], mode="lines+markers", name=str(name),
            line={"dash": "solid" if flags[index] else "dot"},
            hovertemplate="offset %{x}<br>mean attention %{y:.3f}<extra>" + str(name) + "</extra>",
        ))
    fig.add_trace(go.Scatter(
        x=offsets, y=np.asarray(uniform, dtype=np.float32), mode="lines", name="evenly spread",
        line={"color": "black", "dash": "dash"},
        hovertemplate="offset %{x}<br>evenly spread %{y:.3f}<extra></extra>",
    ))
    fig.update_layout(
        title="Mean attention by relative offset (query − key)",
        xaxis_title="offset (tokens back)",
        yaxis_title="mean attention",
    )
    return fig


def skip_trigram_bug_figure(effects) -> go.Figure:
    """Grouped bars of a head's logit effect on two outputs after two destinations, per example.

    ``effects`` has the columns of ``circuits.analysis.skip_trigram_bugs.skip_trigram_bug_effects``.
    For each example the x axis shows the contexts "source … destination", and each output gets
    one bar colour; a dropdown chooses the example. Every example needs the same number of
    outputs, because the dropdown shows a fixed number of traces per example.
    """
    examples = list(dict.fromkeys(effects["example"].tolist()))
    labels, titles = [], []
    traces_per_example = None
    fig = go.Figure()
    for index, example in enumerate(examples):
        rows = effects[effects["example"] == example]
        source = token_label(rows["source_str"].iloc[0])
        name = rows["name"].iloc[0]
        outputs = list(dict.fromkeys(rows["output"].tolist()))
        destinations = list(dict.fromkeys(rows["destination"].tolist()))
        if traces_per_example is None:
            traces_per_example = len(outputs)
        elif len(outputs) != traces_per_example:
            raise ValueError(
                f"example {example} has {len(outputs)} outputs but the first has "
                f"{traces_per_example}; every example needs the same number"
            )
        strings = dict(zip(rows["destination"], rows["destination_str"]))
        strings.update(zip(rows["output"], rows["output_str"]))
        contexts = [f"{source} … {token_label(strings[d])}" for d in destinations]
        for output in outputs:
            part = rows[rows["output"] == output].set_index("destination").loc[destinations]
            kinds = ["paired" if flag else "crossed" for flag in part["paired"]]
            output_label = token_label(strings[output])
            fig.add_trace(go.Bar(
                x=contexts, y=part["head_effect"].to_numpy(dtype=np.float32),
                name=f"raises {output_label}", visible=index == 0,
                customdata=np.stack([
                    part["attention_to_source"].to_numpy(dtype=np.float32),
                    part["corpus_prob"].to_numpy(dtype=np.float32),
                ], axis=1),
                text=kinds, textposition="inside",
                hovertemplate="%{x} → " + output_label + " (%{text})<br>head effect "
                "%{y:.2f} logits<br>attention on source %{customdata[0]:.2f}<br>corpus P(output "
                "| destination) %{customdata[1]:.3%}<extra>" + name + "</extra>",
            ))
        output_labels = " / ".join(token_label(strings[o]) for o in outputs)
        labels.append(f"{name}: {source} → {output_labels}")
        titles.append(f"{name} after source {source}: logit effect at the destination")
    fig.update_layout(
        title=titles[0],
        barmode="group",
        yaxis_title="head's logit effect (centred over the vocabulary)",
        xaxis_title="context (source … destination)",
        updatemenus=[
            _dropdown(_visibility_buttons(labels, traces_per_example or 1, titles=titles))
        ],
        margin=MENU_MARGIN,
    )
    return fig
