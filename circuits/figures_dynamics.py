"""Figures of the training-dynamics chapter.

Each function returns a plotly Figure and never shows it (chapters call ``circuits.viz.show``).
Sliders and dropdowns run plotly.js "update" methods that replace trace data, so they work in the
static book without a kernel. A figure with a single step gets no slider. Sliders start at the
earliest step, so moving one to the right plays training forward.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.analysis.circuits import head_name
from circuits.analysis.training_log import (
    PREFIX_THRESHOLD,
    RATIO_THRESHOLD,
    ProbeHistory,
    SnapshotMeasurements,
    Transition,
)
from circuits.viz import token_label

HEAD_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
COPY_COLOURS = ("#7f7f7f", "#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c")
OTHER_HEAD_COLOUR = "rgba(120, 120, 120, 0.35)"
SHADE_COLOUR = "rgba(255, 165, 0, 0.2)"

# Blues stretched towards 0: diffuse attention (a few hundredths per key) stays visible next to
# sharp attention near 1. The colour bar still reads in attention weights.
ATTENTION_COLOURSCALE = [
    [0.0, "#ffffff"], [0.05, "#deebf7"], [0.15, "#9ecae1"], [0.4, "#4292c6"], [1.0, "#08306b"],
]

# Sliders with more steps than this hide their step labels, which would overlap. The current
# value above the slider still names the step.
MAX_SLIDER_LABELS = 12


def _slider(labels: list[str], args: list[list], prefix: str) -> dict:
    """Build a plotly.js slider whose step i runs the "update" method with ``args[i]``."""
    hide_labels = len(labels) > MAX_SLIDER_LABELS
    slider = {
        "active": 0,
        "steps": [{"label": label, "method": "update", "args": step_args}
                  for label, step_args in zip(labels, args)],
        "currentvalue": {"prefix": prefix, "font": {"size": 14}},
        "len": 1.0,
        "y": 0,
        "yanchor": "top",
        "pad": {"t": 60},
    }
    if hide_labels:
        slider.update({"font": {"color": "rgba(0, 0, 0, 0)"}, "tickcolor": "rgba(0, 0, 0, 0)",
                       "ticklen": 0, "minorticklen": 0})
    return slider


def _tokens_label(tokens: float) -> str:
    if not np.isfinite(tokens):
        return "tokens unknown"
    return f"{tokens / 1e6:,.1f}M tokens"


def _step_title(base: str, step: int, tokens: float) -> str:
    return f"{base}, step {step:,} ({_tokens_label(tokens)})"


# Loss curves


def _shade(transition: Transition | None, x_of_step) -> list[dict]:
    if transition is None:
        return []
    return [{
        "type": "rect", "xref": "x", "yref": "paper", "y0": 0, "y1": 1,
        "x0": x_of_step(transition.start_step), "x1": x_of_step(transition.end_step),
        "fillcolor": SHADE_COLOUR, "line": {"width": 0}, "layer": "below",
    }]


def loss_curves_figure(losses: pd.DataFrame, transition: Transition | None = None) -> go.Figure:
    """Plot training and validation loss (left axis) and ICL score (right axis) over training.

    ``losses`` is a ``training_log.loss_table``. A dropdown puts steps or tokens on the x axis.
    ``transition``, when given, is shaded: the evaluations between which the best prefix-matching
    score rose most.
    """
    losses = losses.sort_values("step")
    step_to_tokens = dict(zip(losses["step"], losses["tokens"]))
    series = [
        ("training loss", "train_loss", "lines", False, "#1f77b4"),
        ("validation loss", "val_loss", "lines+markers", False, "#2ca02c"),
        ("ICL score (loss at token 500 − loss at token 50)", "icl_score", "lines+markers", True,
         "#d62728"),
    ]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    xs_by_axis = {"step": [], "tokens": []}
    for name, column, mode, secondary, colour in series:
        rows = losses[np.isfinite(losses[column].to_numpy(dtype=float))]
        for axis in xs_by_axis:
            xs_by_axis[axis].append(rows[axis].to_numpy(dtype=float))
        fig.add_trace(go.Scatter(
            x=rows["step"].to_numpy(dtype=float), y=rows[column].to_numpy(dtype=float),
            customdata=np.stack([rows["step"], rows["tokens"]], axis=-1),
            mode=mode, name=name, line={"color": colour}, marker={"size": 6},
            hovertemplate="step %{customdata[0]:,}<br>%{customdata[1]:,} tokens<br>"
            + column.replace("_", " ") + " %{y:.3f}<extra></extra>",
        ), secondary_y=secondary)

    def token_of(step):
        return float(step_to_tokens.get(step, np.nan))

    buttons = [
        {"label": "x: steps", "method": "update",
         "args": [{"x": xs_by_axis["step"]},
                  {"xaxis.title.text": "training step", "shapes": _shade(transition, float)}]},
        {"label": "x: tokens", "method": "update",
         "args": [{"x": xs_by_axis["tokens"]},
                  {"xaxis.title.text": "tokens seen", "shapes": _shade(transition, token_of)}]},
    ]
    title = "Loss and in-context learning score during training"
    if transition is not None:
        title += "<br><sup>shaded: the evaluations between which the best prefix-matching " \
                 "score rose most</sup>"
    fig.update_layout(
        title=title,
        shapes=_shade(transition, float),
        xaxis_title="training step",
        legend={"orientation": "h", "y": -0.2},
        updatemenus=[{"buttons": buttons, "direction": "down", "showactive": True,
                      "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}],
        height=520,
        margin={"t": 110},
    )
    fig.update_yaxes(title_text="loss (nats per token)", secondary_y=False)
    # tickmode "auto" keeps round tick values. Without it, the plotly.js of plotly 7.1 placed
    # this overlaying axis's ticks on the primary axis's grid lines, at odd values.
    fig.update_yaxes(title_text="ICL score (nats)", secondary_y=True, showgrid=False,
                     rangemode="tozero", tickmode="auto", zeroline=True)
    return fig


def validation_loss_figure(tables: dict[str, pd.DataFrame]) -> go.Figure:
    """Plot validation loss against tokens seen, one line per run (a ``loss_table`` per name)."""
    fig = go.Figure()
    for index, (name, table) in enumerate(tables.items()):
        rows = table[np.isfinite(table["val_loss"].to_numpy(dtype=float))]
        fig.add_trace(go.Scatter(
            x=rows["tokens"].to_numpy(dtype=float), y=rows["val_loss"].to_numpy(dtype=float),
            customdata=rows["step"].to_numpy(), mode="lines+markers", name=name,
            line={"color": HEAD_COLOURS[index % len(HEAD_COLOURS)]},
            hovertemplate=name + "<br>step %{customdata:,}<br>%{x:,} tokens<br>"
            "validation loss %{y:.3f}<extra></extra>",
        ))
    fig.update_layout(
        title="Validation loss by run",
        xaxis_title="tokens seen",
        yaxis_title="validation loss (nats per token)",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# Per-head scores


HEAD_FIELD_TITLES = {"previous_token": "previous-token score",
                     "prefix_matching": "prefix-matching score"}


def head_score_slider_figure(history: ProbeHistory) -> go.Figure:
    """Draw previous-token and prefix-matching scores (layer by head) with a slider over steps.

    Both share the colour range 0 to 1, the range of either score.
    """
    fields = ("previous_token", "prefix_matching")
    arrays = [getattr(history, field) for field in fields]
    if any(array is None for array in arrays):
        raise ValueError("the run's probe did not measure per-head scores (no attention layers)")
    _, n_layers, n_heads = arrays[0].shape
    layers = [f"layer {layer}" for layer in range(n_layers)]
    titles = [HEAD_FIELD_TITLES[field] for field in fields]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.08)
    for index, (array, title) in enumerate(zip(arrays, titles)):
        fig.add_trace(go.Heatmap(
            z=array[0].astype(np.float32), x=list(range(n_heads)), y=layers,
            zmin=0, zmax=1, colorscale="Blues", showscale=index == 1, texttemplate="%{z:.2f}",
            name=title, hovertemplate="%{y}, head %{x}<br>" + title + " %{z:.3f}<extra></extra>",
        ), row=1, col=index + 1)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=index + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=index + 1)

    base = "Per-head scores"
    step_titles = [_step_title(base, int(step), tokens)
                   for step, tokens in zip(history.steps, history.tokens)]
    layout = {"title": step_titles[0], "height": 230 + 60 * n_layers, "margin": {"t": 100}}
    if history.n_evaluations > 1:
        args = [[{"z": [array[i].astype(np.float32) for array in arrays]},
                 {"title.text": step_titles[i]}, [0, 1]]
                for i in range(history.n_evaluations)]
        _add_step_slider(layout, history, args)
    fig.update_layout(**layout)
    return fig


def _add_step_slider(layout: dict, history: ProbeHistory, args: list) -> None:
    """Add a slider over evaluation steps to ``layout``, with room for it below the plot."""
    labels = [f"{int(step):,}" for step in history.steps]
    layout["sliders"] = [_slider(labels, args, "evaluation at step ")]
    layout["height"] += 110
    layout["margin"]["b"] = 130


def head_score_lines_figure(history: ProbeHistory, n_top: int = 3) -> go.Figure:
    """Plot the prefix-matching and previous-token score of every head over training.

    Each score picks its own ``n_top`` heads, those with the highest score at the last
    evaluation, and colours and names them in the legend. The other heads are thin grey lines.
    """
    fields = ("prefix_matching", "previous_token")
    titles = [HEAD_FIELD_TITLES[field] for field in fields]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.1)
    steps = history.steps.astype(float)
    for column, (field, title) in enumerate(zip(fields, titles), start=1):
        scores = getattr(history, field)
        top = history.top_heads(field, n_top)
        _, n_layers, n_heads = scores.shape
        others = [(layer, head) for layer in range(n_layers) for head in range(n_heads)
                  if (layer, head) not in top]
        for layer, head in others:
            fig.add_trace(go.Scatter(
                x=steps, y=scores[:, layer, head], mode="lines+markers",
                name=head_name(layer, head), line={"color": OTHER_HEAD_COLOUR, "width": 1},
                marker={"size": 3},
                showlegend=False, legendgroup=f"others-{field}",
                hovertemplate=head_name(layer, head) + "<br>step %{x:,}<br>" + title
                + " %{y:.3f}<extra></extra>",
            ), row=1, col=column)
        for rank, (layer, head) in enumerate(top):
            fig.add_trace(go.Scatter(
                x=steps, y=scores[:, layer, head], mode="lines+markers",
                name=f"{head_name(layer, head)} ({title.split()[0]})",
                line={"color": HEAD_COLOURS[rank % len(HEAD_COLOURS)], "width": 2.5},
                marker={"size": 6},
                hovertemplate=head_name(layer, head) + "<br>step %{x:,}<br>" + title
                + " %{y:.3f}<extra></extra>",
            ), row=1, col=column)
        fig.update_xaxes(title_text="training step", row=1, col=column)
        fig.update_yaxes(title_text="score", rangemode="tozero", row=1, col=column)
    fig.update_layout(
        title=f"Per-head scores over training: the {n_top} highest at the last evaluation "
              "in colour",
        legend={"orientation": "h", "y": -0.2},
        height=480,
    )
    return fig


# Repeated random tokens


def repeated_loss_figure(history: ProbeHistory) -> go.Figure:
    """Plot the loss on each copy of the probe's repeated random tokens over training.

    A dashed line marks ``RATIO_THRESHOLD`` times the first copy's loss: the second copy's loss
    falls below it when the model predicts repeats from context.
    """
    losses = history.repeated_loss_per_copy
    steps = history.steps.astype(float)
    fig = go.Figure()
    for copy in range(losses.shape[1]):
        ratio = losses[:, copy] / losses[:, 0]
        fig.add_trace(go.Scatter(
            x=steps, y=losses[:, copy], customdata=ratio, mode="lines+markers",
            name=f"copy {copy + 1}", line={"color": COPY_COLOURS[copy % len(COPY_COLOURS)]},
            hovertemplate=f"copy {copy + 1}<br>step " + "%{x:,}<br>loss %{y:.3f} nats<br>"
            "%{customdata:.1%} of copy 1<extra></extra>",
        ))
    fig.add_trace(go.Scatter(
        x=steps, y=RATIO_THRESHOLD * losses[:, 0], mode="lines",
        name=f"{RATIO_THRESHOLD:.0%} of copy 1", line={"color": "black", "dash": "dash"},
        hovertemplate="step %{x:,}<br>%{y:.3f} nats<extra></extra>",
    ))
    fig.update_layout(
        title="Loss on repeated random tokens, by copy",
        xaxis_title="training step",
        yaxis_title="loss (nats per token)",
        yaxis_rangemode="tozero",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# K-composition


def k_composition_slider_figure(history: ProbeHistory, baseline: float) -> go.Figure:
    """Draw K-composition minus ``baseline`` (layer-0 by layer-1 head), slider over steps.

    The colour range is symmetric and the same at every step, so the slider compares sizes.
    """
    if history.k_composition is None:
        raise ValueError("the run's probe did not measure K-composition (needs 2 layers, no "
                         "smeared keys)")
    raw = history.k_composition
    excess = raw - baseline
    limit = float(np.abs(excess).max()) or 1.0
    _, n_source, n_target = raw.shape
    sources = [head_name(0, head) for head in range(n_source)]
    targets = [head_name(1, head) for head in range(n_target)]
    fig = go.Figure(go.Heatmap(
        z=excess[0].astype(np.float32), customdata=raw[0].astype(np.float32),
        x=targets, y=sources, zmid=0, zmin=-limit, zmax=limit, colorscale="RdBu_r",
        texttemplate="%{z:.2f}", colorbar={"title": {"text": "score − baseline"}},
        hovertemplate="%{y} → %{x}<br>K-composition %{customdata:.3f}<br>minus baseline "
        f"{baseline:.3f}: " + "%{z:.3f}<extra></extra>",
    ))
    base = f"K-composition − random baseline ({baseline:.3f})"
    step_titles = [_step_title(base, int(step), tokens)
                   for step, tokens in zip(history.steps, history.tokens)]
    layout = {
        "title": step_titles[0],
        "xaxis_title": "layer-1 head (its keys read the residual stream)",
        "yaxis": {"title": "layer-0 head (writes)", "autorange": "reversed"},
        "height": 560, "margin": {"t": 90},
    }
    if history.n_evaluations > 1:
        args = [[{"z": [excess[i].astype(np.float32)], "customdata": [raw[i].astype(np.float32)]},
                 {"title.text": step_titles[i]}, [0]]
                for i in range(history.n_evaluations)]
        _add_step_slider(layout, history, args)
    fig.update_layout(**layout)
    return fig


# Attention at each snapshot


def position_labels(token_strings) -> list[str]:
    """Label position i as ``i 'token'``, unique even where tokens repeat."""
    return [f"{index} {token_label(text)}" for index, text in enumerate(token_strings)]


def snapshot_attention_figure(measurements: SnapshotMeasurements, token_strings) -> go.Figure:
    """Draw the measured heads' attention on one repeated sequence, slider over snapshots.

    One heatmap per head in ``measurements.heads`` (query rows, key columns), colour range 0 to 1
    on ``ATTENTION_COLOURSCALE``. Subplot titles give each head's prefix-matching score in that
    snapshot.
    """
    heads = measurements.heads
    if not heads:
        raise ValueError("the measurements contain no head patterns")
    labels = position_labels(token_strings)
    n_steps = len(measurements.steps)

    def subplot_titles(index: int) -> list[str]:
        return [f"{head_name(layer, head)}: prefix-matching "
                f"{measurements.prefix_matching[index, layer, head]:.3f}"
                for layer, head in heads]

    fig = make_subplots(rows=1, cols=len(heads), subplot_titles=subplot_titles(0),
                        horizontal_spacing=0.06)
    for column, (layer, head) in enumerate(heads):
        fig.add_trace(go.Heatmap(
            z=measurements.patterns[0, column], x=labels, y=labels, zmin=0, zmax=1,
            colorscale=ATTENTION_COLOURSCALE, showscale=column == len(heads) - 1,
            name=head_name(layer, head),
            colorbar={"title": {"text": "attention"}},
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra>"
            + head_name(layer, head) + "</extra>",
        ), row=1, col=column + 1)
        fig.update_xaxes(title_text="key position", showticklabels=False, row=1, col=column + 1)
        fig.update_yaxes(title_text="query position", showticklabels=False, autorange="reversed",
                         row=1, col=column + 1)

    def layout_update(index: int) -> dict:
        # make_subplots writes subplot titles as the first annotations, one per column.
        update = {f"annotations[{column}].text": text
                  for column, text in enumerate(subplot_titles(index))}
        update["title.text"] = f"Attention on repeated random tokens at step " \
                               f"{int(measurements.steps[index]):,}"
        return update

    layout = {"title": layout_update(0)["title.text"], "height": 560, "margin": {"t": 100}}
    if n_steps > 1:
        args = [[{"z": [measurements.patterns[i, column] for column in range(len(heads))]},
                 layout_update(i), list(range(len(heads)))]
                for i in range(n_steps)]
        step_labels = [f"{int(step):,}" for step in measurements.steps]
        layout["sliders"] = [_slider(step_labels, args, "snapshot at step ")]
        layout["height"] += 110
        layout["margin"]["b"] = 130
    fig.update_layout(**layout)
    return fig


# Runs side by side


def run_comparison_figure(histories: dict[str, ProbeHistory]) -> go.Figure:
    """Plot best prefix-matching and copy-2 / copy-1 loss ratio against tokens, one line per run.

    Dashed lines mark the two thresholds of ``training_log.induction_progress``.
    """
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "best prefix-matching score", "copy-2 loss / copy-1 loss"])
    for index, (name, history) in enumerate(histories.items()):
        colour = HEAD_COLOURS[index % len(HEAD_COLOURS)]
        best = history.prefix_matching.reshape(history.n_evaluations, -1).max(1)
        ratio = history.repeated_loss_per_copy[:, 1] / history.repeated_loss_per_copy[:, 0]
        for column, values in ((1, best), (2, ratio)):
            fig.add_trace(go.Scatter(
                x=history.tokens, y=values, customdata=history.steps, mode="lines+markers",
                name=name, legendgroup=name, showlegend=column == 1, line={"color": colour},
                hovertemplate=name + "<br>step %{customdata:,}<br>%{x:,} tokens<br>%{y:.3f}"
                "<extra></extra>",
            ), row=1, col=column)
    fig.add_hline(y=PREFIX_THRESHOLD, line_dash="dash", line_color="black", row=1, col=1)
    fig.add_hline(y=RATIO_THRESHOLD, line_dash="dash", line_color="black", row=1, col=2)
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(title="Runs side by side (dashed: induction thresholds)",
                      legend={"orientation": "h", "y": -0.2}, height=460)
    return fig
