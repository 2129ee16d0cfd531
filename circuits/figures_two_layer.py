"""Figures of the two-layer chapter and of the attention explorer.

Each function returns a plotly Figure and never shows it (chapters call ``circuits.viz.show``).
Every control is a plotly.js dropdown that switches traces on and off, so the figures work in
the static book without a kernel. Matrices go in as float32 arrays, which plotly stores as base64
typed arrays of about 5.3 characters per value. A [16, 100, 100] stack of patterns therefore adds
about 0.85 MB to a page.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.analysis.attention import RepeatedTokenLoss
from circuits.analysis.circuits import head_name
from circuits.analysis.composition import COMPOSITION_KINDS, CompositionBaseline, CompositionScores
from circuits.analysis.paths import TermImportance
from circuits.analysis.text_attention import TextAttention
from circuits.viz import token_label

LAYER_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def position_labels(strings) -> list[str]:
    """Label each position as ``index 'token'``, unique even when tokens repeat."""
    return [f"{index} {token_label(text)}" for index, text in enumerate(strings)]


def _head_pairs(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def _visibility(n_items: int, chosen: int, per_item: int, fixed: int = 0) -> list[bool]:
    """Visibility list that shows the traces of item ``chosen`` plus ``fixed`` trailing traces."""
    visible = [False] * (n_items * per_item) + [True] * fixed
    for offset in range(per_item):
        visible[chosen * per_item + offset] = True
    return visible


def _dropdown(labels, titles, per_item: int = 1, fixed: int = 0, active: int = 0,
              x: float = 1.0, y: float = 1.14) -> dict:
    """Build a plotly.js dropdown that shows one item's traces (and the fixed ones) at a time."""
    buttons = [
        {"label": str(label), "method": "update",
         "args": [{"visible": _visibility(len(labels), index, per_item, fixed)},
                  {"title.text": titles[index]}]}
        for index, label in enumerate(labels)
    ]
    return {"buttons": buttons, "direction": "down", "showactive": True, "active": active,
            "x": x, "xanchor": "right", "y": y, "yanchor": "top"}


def repeated_loss_figure(loss: RepeatedTokenLoss, period: int) -> go.Figure:
    """Loss per position on repeated random tokens, with each repeat's mean as a flat segment.

    ``loss.per_position[i]`` is the loss of predicting the token at position i + 1; repeat r
    occupies positions 1 + r·P … (r + 1)·P. Dotted lines mark where each repeat starts.
    """
    per_position = loss.per_position.double().numpy()
    targets = np.arange(1, len(per_position) + 1)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=targets, y=per_position.astype(np.float32), mode="lines+markers", name="per position",
        marker={"size": 4},
        hovertemplate="token at position %{x}<br>loss %{y:.2f} nats<extra></extra>",
    ))
    for repeat, mean in enumerate(loss.per_copy.double().tolist()):
        start, end = 2 + repeat * period, (repeat + 1) * period
        fig.add_trace(go.Scatter(
            x=[start, end], y=[mean, mean], mode="lines", line={"width": 4, "color": "#d62728"},
            name="mean of each repeat", showlegend=repeat == 0, legendgroup="means",
            hovertemplate=f"repeat {repeat + 1}: mean {mean:.2f} nats<extra></extra>",
        ))
        if repeat > 0:
            fig.add_vline(x=1 + repeat * period - 0.5, line_dash="dot", line_color="grey")
    fig.update_layout(
        title="Loss on repeated random tokens",
        xaxis_title="position of the predicted token",
        yaxis_title="loss (nats)",
        yaxis_rangemode="tozero",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def head_scores_figure(scores: pd.DataFrame, uniform: dict | None = None) -> go.Figure:
    """Two heatmaps, layer by head: previous-token score and prefix-matching score.

    ``scores`` is a ``head_scores`` table; ``uniform`` optionally contains the evenly-spread levels
    (``uniform_attention_scores``), which the subplot titles quote.
    """
    n_layers = int(scores["layer"].max()) + 1
    n_heads = int(scores["head"].max()) + 1
    columns = [("previous_token_score", "previous-token score"),
               ("prefix_matching_score", "prefix-matching score")]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[title for _, title in columns],
                        horizontal_spacing=0.08)
    for index, (column, title) in enumerate(columns):
        table = scores.pivot(index="layer", columns="head", values=column)
        table = table.reindex(index=range(n_layers), columns=range(n_heads))
        fig.add_trace(go.Heatmap(
            z=table.to_numpy(dtype=np.float32), x=list(range(n_heads)),
            y=[f"layer {layer}" for layer in range(n_layers)],
            zmin=0, zmax=1, colorscale="Blues", showscale=index == 1,
            texttemplate="%{z:.2f}", name=title,
            hovertemplate="%{y}, head %{x}<br>" + title + " %{z:.3f}<extra></extra>",
        ), row=1, col=index + 1)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=index + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=index + 1)
    title = "Attention scores of every head"
    if uniform is not None:
        title += (f" (evenly spread attention: {uniform['previous_token']:.3f} and "
                  f"{uniform['prefix_matching']:.3f})")
    fig.update_layout(title=title, height=120 + 70 * n_layers + 100, margin={"t": 110})
    return fig


def head_heatmaps(
    matrices,
    labels,
    title: str,
    value_name: str,
    active: tuple[int, int] = (0, 0),
    fixed_range: tuple[float, float] | None = (0.0, 1.0),
) -> go.Figure:
    """Draw one [query, key] heatmap per head, with a dropdown over all heads.

    ``matrices`` is [n_layers, n_heads, pos, pos]; ``labels`` name the positions (both axes).
    ``active`` is the (layer, head) shown first. With ``fixed_range`` every head shares that
    colour range. With None each head is scaled to its own maximum over queries 1 and later,
    because query 0 can only attend to itself and would set the scale alone (the hover still gives
    every value).
    """
    matrices = np.asarray(matrices, dtype=np.float32)
    n_layers, n_heads = matrices.shape[:2]
    labels = list(labels)
    pairs = _head_pairs(n_layers, n_heads)
    active_index = pairs.index(tuple(active))
    fig = go.Figure()
    for index, (layer, head) in enumerate(pairs):
        matrix = matrices[layer, head]
        if fixed_range is None:
            later_queries = matrix[1:] if matrix.shape[0] > 1 else matrix
            low, high = 0.0, float(later_queries.max()) or 1.0
        else:
            low, high = fixed_range
        fig.add_trace(go.Heatmap(
            z=matrix, x=labels, y=labels, zmin=low, zmax=high, colorscale="Blues",
            visible=index == active_index, name=head_name(layer, head),
            colorbar={"title": {"text": value_name}},
            hovertemplate="query %{y}<br>key %{x}<br>" + value_name
            + " %{z:.3f}<extra>" + head_name(layer, head) + "</extra>",
        ))
    names = [head_name(layer, head) for layer, head in pairs]
    titles = [f"{title}: {name}" for name in names]
    fig.update_layout(
        title=titles[active_index],
        xaxis={"title": "key position", "showticklabels": False},
        yaxis={"title": "query position", "showticklabels": False, "autorange": "reversed"},
        height=640,
        updatemenus=[_dropdown(names, titles, active=active_index)],
        margin={"t": 90},
    )
    return fig


def composition_figure(
    scores: CompositionScores, baseline: CompositionBaseline, active_kind: str = "k"
) -> go.Figure:
    """Q-, K- and V-composition scores minus the random baseline, source head by target head.

    A dropdown picks the kind, opening on ``active_kind`` (K by default, the kind that induction
    heads rely on). All three share one colour range, so switching compares sizes.
    """
    if active_kind not in COMPOSITION_KINDS:
        raise ValueError(f"active_kind must be one of {COMPOSITION_KINDS}, got {active_kind!r}")
    active = COMPOSITION_KINDS.index(active_kind)
    excess = {kind: (getattr(scores, kind) - getattr(baseline, kind)).double().numpy()
              for kind in COMPOSITION_KINDS}
    raw = {kind: getattr(scores, kind).double().numpy() for kind in COMPOSITION_KINDS}
    limit = max(float(np.nanmax(np.abs(values))) for values in excess.values()) or 1.0
    n_source, n_target = excess["q"].shape
    sources = [head_name(scores.source_layer, h) for h in range(n_source)]
    targets = [head_name(scores.target_layer, h) for h in range(n_target)]
    fig = go.Figure()
    for index, kind in enumerate(COMPOSITION_KINDS):
        fig.add_trace(go.Heatmap(
            z=excess[kind].astype(np.float32), x=targets, y=sources,
            customdata=raw[kind].astype(np.float32), zmid=0, zmin=-limit, zmax=limit,
            colorscale="RdBu_r", visible=index == active, texttemplate="%{z:.3f}",
            name=f"{kind.upper()}-composition",
            colorbar={"title": {"text": "score − baseline"}},
            hovertemplate="%{y} → %{x}<br>score %{customdata:.3f}<br>minus baseline "
            f"{getattr(baseline, kind):.3f}: " + "%{z:.3f}<extra></extra>",
        ))
    labels = [f"{kind.upper()}-composition" for kind in COMPOSITION_KINDS]
    titles = [f"{label} − random baseline ({getattr(baseline, kind):.3f})"
              for label, kind in zip(labels, COMPOSITION_KINDS)]
    fig.update_layout(
        title=titles[active],
        xaxis_title=f"layer-{scores.target_layer} head (reads)",
        yaxis={"title": f"layer-{scores.source_layer} head (writes)", "autorange": "reversed"},
        height=520,
        updatemenus=[_dropdown(labels, titles, active=active)],
        margin={"t": 90},
    )
    return fig


def induction_plane_figure(plane: pd.DataFrame) -> go.Figure:
    """Scatter of layer-1 heads: K-composition positivity (x) against OV copying score (y).

    ``plane`` is an ``induction_plane`` table; colour gives the prefix-matching score.
    """
    fig = go.Figure(go.Scatter(
        x=plane["k_composition_positivity"].to_numpy(dtype=np.float32),
        y=plane["copying_score"].to_numpy(dtype=np.float32),
        mode="markers+text", text=plane["name"].tolist(), textposition="top center",
        customdata=plane["prefix_matching_score"].to_numpy(dtype=np.float32),
        marker={"size": 14, "color": plane["prefix_matching_score"].to_numpy(dtype=np.float32),
                "colorscale": "Viridis", "cmin": 0, "cmax": 1, "showscale": True,
                "colorbar": {"title": {"text": "prefix matching"}},
                "line": {"width": 1, "color": "black"}},
        hovertemplate="%{text}<br>K-composition positivity %{x:.3f}<br>OV copying score "
        "%{y:.3f}<br>prefix-matching score %{customdata:.3f}<extra></extra>",
    ))
    fig.add_hline(y=0, line_color="grey")
    fig.add_vline(x=0, line_color="grey")
    fig.update_layout(
        title="Layer-1 heads: QK side against OV side",
        xaxis={"title": "K-composition positivity with previous-token heads (Σ Re λ / Σ |λ|)",
               "range": [-1.05, 1.05]},
        yaxis={"title": "OV copying score (Σ Re λ / Σ |λ|)", "range": [-1.05, 1.15]},
        height=520,
    )
    return fig


def term_importance_figure(importance: TermImportance) -> go.Figure:
    """Bars of the loss reduction (nats) that each group of path-expansion terms adds.

    Order 0 is measured from the uniform loss log(d_vocab), each later order from the terms up to
    the previous order, and each layer's share of order 1 from order 0 alone.
    """
    table = importance.marginal_reductions()
    names = {"order 0": "order 0: direct path", "order 1": "order 1: all single heads",
             "order 2": "order 2: virtual heads"}
    labels = [names.get(term, term.replace("order 1, layer", "order 1: layer") + " heads only")
              for term in table["terms"]]
    colours = ["#7f7f7f" if "layer" in label else "#1f77b4" for label in labels]
    fig = go.Figure(go.Bar(
        x=labels, y=table["reduction"].to_numpy(dtype=np.float32),
        customdata=table["loss"].to_numpy(dtype=np.float32), marker_color=colours,
        texttemplate="%{y:.3f}", textposition="outside",
        hovertemplate="%{x}<br>loss reduction %{y:.3f} nats<br>loss with these terms "
        "%{customdata:.3f} nats<extra></extra>",
    ))
    fig.update_layout(
        title="Marginal loss reduction of each group of path terms",
        yaxis_title="loss reduction (nats)",
        height=460,
    )
    return fig


def head_ablation_figure(frame: pd.DataFrame) -> go.Figure:
    """Bars of the change in the in-context learning score when each head is ablated alone.

    ``frame`` is a ``head_ablation_icl`` table. Positive bars: ablating the head makes the late
    tokens relatively worse, so the head helps the model use its context.
    """
    fig = go.Figure()
    for layer, rows in frame.groupby("layer", sort=True):
        fig.add_trace(go.Bar(
            x=rows["name"].tolist(), y=rows["change"].to_numpy(dtype=np.float32),
            name=f"layer {layer}", marker_color=LAYER_COLOURS[int(layer) % len(LAYER_COLOURS)],
            customdata=np.stack([rows["ablated_icl_score"].to_numpy(dtype=np.float32),
                                 rows["ablated_loss"].to_numpy(dtype=np.float32)], axis=1),
            hovertemplate="%{x} ablated<br>ICL score change %{y:+.3f} nats<br>ablated ICL score "
            "%{customdata[0]:.3f}<br>ablated mean loss %{customdata[1]:.3f}<extra></extra>",
        ))
    clean = float(frame["icl_score"].iloc[0])
    fig.update_layout(
        title=f"ICL score change when one head is ablated (unablated {clean:.3f})",
        yaxis_title="ablated − unablated ICL score (nats)",
        xaxis_title="ablated head",
        height=440,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def loss_by_position_figure(
    losses: pd.Series, late_index: int, early_index: int, smoothing: int = 9
) -> go.Figure:
    """Mean loss by token index, its centred running mean, and the two ICL indices marked."""
    if smoothing < 1:
        raise ValueError(f"smoothing must be a positive window length, got {smoothing}")
    index = losses.index.to_numpy()
    values = losses.to_numpy(dtype=np.float64)
    smoothed = losses.rolling(smoothing, center=True, min_periods=1).mean().to_numpy()
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=index, y=values.astype(np.float32), mode="lines", name="mean loss",
        line={"color": "#aec7e8", "width": 1},
        hovertemplate="token index %{x}<br>mean loss %{y:.3f} nats<extra></extra>",
    ))
    fig.add_trace(go.Scatter(
        x=index, y=smoothed.astype(np.float32), mode="lines",
        name=f"running mean over {smoothing} indices", line={"color": "#1f77b4", "width": 2.5},
        hovertemplate="token index %{x}<br>running mean %{y:.3f} nats<extra></extra>",
    ))
    for position, name, text_side in ((early_index, "early", "top center"),
                                      (late_index, "late", "top left")):
        value = float(losses.loc[position])
        fig.add_trace(go.Scatter(
            x=[position], y=[value], mode="markers+text", text=[f"{name} index {position}"],
            textposition=text_side, marker={"size": 11, "color": "#d62728"},
            showlegend=False,
            hovertemplate=f"{name} index {position}<br>mean loss {value:.3f} nats<extra></extra>",
        ))
    fig.update_layout(
        title="Mean loss by position in the context",
        xaxis={"title": "token index in the window", "type": "log"},
        yaxis_title="loss (nats)",
        legend={"orientation": "h", "y": -0.2},
        height=460,
    )
    return fig


def text_attention_figure(
    analysis: TextAttention,
    head: tuple[int, int] | None = None,
    active: tuple[int, int] = (0, 0),
    show_text_below: int = 48,
) -> go.Figure:
    """Attention of one head (or of every head, with a dropdown) above the top predictions.

    Top panel: the pattern [query, key] of ``head``, or, when ``head`` is None, of every head
    with a dropdown that opens on ``active``. Bottom panel: one column per position, one row per
    rank, coloured by the probability of the model's k-th most likely next token. The predicted
    tokens are written in the cells when the text has at most ``show_text_below`` positions and
    are always in the hover.
    """
    labels = position_labels(analysis.token_strings)
    n_pos = len(labels)
    n_layers, n_heads = analysis.n_layers, analysis.n_heads
    pairs = _head_pairs(n_layers, n_heads) if head is None else [tuple(head)]
    shown = tuple(head) if head is not None else tuple(active)
    if not (0 <= shown[0] < n_layers and 0 <= shown[1] < n_heads):
        raise ValueError(f"head {shown} is out of range for {n_layers} layers of {n_heads} heads")
    active_index = pairs.index(shown)

    fig = make_subplots(rows=2, cols=1, row_heights=[0.78, 0.22], vertical_spacing=0.04,
                        shared_xaxes=True)
    for position, (layer, index) in enumerate(pairs):
        fig.add_trace(go.Heatmap(
            z=analysis.patterns[layer, index], x=labels, y=labels, zmin=0, zmax=1,
            colorscale="Blues", visible=position == active_index, name=head_name(layer, index),
            colorbar={"title": {"text": "attention"}, "len": 0.75, "y": 0.62},
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra>"
            + head_name(layer, index) + "</extra>",
        ), row=1, col=1)

    k = analysis.top_probabilities.shape[1]
    predicted = [[token_label(analysis.top_strings[p][rank]) for p in range(n_pos)]
                 for rank in range(k)]
    fig.add_trace(go.Heatmap(
        z=analysis.top_probabilities.T.astype(np.float32), x=labels,
        y=[f"top {rank + 1}" for rank in range(k)], text=predicted, zmin=0, zmax=1,
        colorscale="Oranges", showscale=False, name="predictions",
        texttemplate="%{text}" if n_pos <= show_text_below else None,
        hovertemplate="after %{x}<br>%{y}: %{text}<br>probability %{z:.3f}<extra></extra>",
    ), row=2, col=1)

    names = [head_name(*pair) for pair in pairs]
    titles = [f"{name} attention, and the top {k} next tokens" for name in names]
    fig.update_yaxes(autorange="reversed", showticklabels=n_pos <= 40, title_text="query",
                     row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_xaxes(showticklabels=n_pos <= 40, row=2, col=1)
    fig.update_layout(title=titles[active_index], height=760, margin={"t": 90})
    if len(pairs) > 1:
        fig.update_layout(updatemenus=[_dropdown(names, titles, fixed=1, active=active_index,
                                                 y=1.1)])
    return fig
