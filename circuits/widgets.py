"""ipywidgets explorers for live Jupyter sessions (the static book cannot run them).

``attention_explorer(checkpoint)`` shows a text box, layer and head selectors, and a figure with
the chosen head's attention over the text above the model's top predictions at every position:

    from circuits.checkpoints import load_checkpoint
    from circuits.widgets import attention_explorer
    attention_explorer(load_checkpoint("attn-only-2l"))

The model runs once per text (``circuits.analysis.text_attention.analyse_text``); changing the
layer or head only redraws. Warnings about the text (truncation to the context, characters split
into bytes) appear above the figure.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go

from circuits.analysis.text_attention import TextAttention, analyse_text
from circuits.checkpoints import Checkpoint
from circuits.figures_two_layer import text_attention_figure
from circuits.viz import show

DEFAULT_TEXT = (
    "Ada Lark mended nets by the harbour. When the gulls came, Ada Lark threw them scraps, "
    "and the gulls followed Ada Lark home."
)


class AttentionExplorer:
    """Text box, layer and head selectors, and the resulting attention-and-predictions figure.

    ``update()`` re-runs the model on the text box's value and redraws; ``redraw()`` only redraws
    for the selected head. Both are what the widgets' callbacks call, so they can be driven
    without a browser. ``analysis``, ``figure`` and ``message.value`` hold the latest results.
    """

    def __init__(self, checkpoint: Checkpoint, text: str = DEFAULT_TEXT, top_k: int = 5):
        self.checkpoint = checkpoint
        self.top_k = top_k
        cfg = checkpoint.model.cfg
        if cfg.n_layers == 0:
            raise ValueError(f"{checkpoint.path}: the model has no attention layers to explore")

        self.text = widgets.Textarea(
            value=text, placeholder="Type any text, then press Analyse",
            layout=widgets.Layout(width="100%", height="6em"),
        )
        self.layer = widgets.Dropdown(options=list(range(cfg.n_layers)), value=cfg.n_layers - 1,
                                      description="layer")
        self.head = widgets.Dropdown(options=list(range(cfg.n_heads)), value=0,
                                     description="head")
        self.analyse_button = widgets.Button(description="Analyse", button_style="primary")
        self.message = widgets.HTML()
        self.output = widgets.Output()
        self.analysis: TextAttention | None = None
        self.figure: go.Figure | None = None

        self.analyse_button.on_click(lambda _: self.update())
        self.layer.observe(lambda _: self.redraw(), names="value")
        self.head.observe(lambda _: self.redraw(), names="value")
        self.widget = widgets.VBox([
            self.text,
            widgets.HBox([self.analyse_button, self.layer, self.head]),
            self.message,
            self.output,
        ])
        self.update()

    @property
    def selected_head(self) -> tuple[int, int]:
        return int(self.layer.value), int(self.head.value)

    def update(self) -> go.Figure:
        """Analyse the current text, show its warnings, and redraw; return the new figure."""
        self.analysis = analyse_text(self.checkpoint, self.text.value, top_k=self.top_k)
        n_tokens = len(self.analysis.token_ids) - 1
        lines = [f"{n_tokens} tokens after BOS (context: {self.checkpoint.model.cfg.n_ctx} "
                 "positions including BOS)."]
        if n_tokens == 0:
            lines.append("The text is empty: only BOS is analysed, and the predictions are the "
                         "model's guesses for the first token.")
        lines += [f"⚠ {warning}" for warning in self.analysis.warnings]
        self.message.value = "<br>".join(html.escape(line) for line in lines)
        return self.redraw()

    def redraw(self) -> go.Figure:
        """Rebuild the figure for the selected head from the stored analysis and display it."""
        if self.analysis is None:
            return self.update()
        self.figure = text_attention_figure(self.analysis, head=self.selected_head)
        self.output.clear_output(wait=True)
        with self.output:
            show(self.figure)
        return self.figure

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def attention_explorer(
    checkpoint: Checkpoint, text: str = DEFAULT_TEXT, top_k: int = 5
) -> AttentionExplorer:
    """Build an ``AttentionExplorer`` for a checkpoint; display it as a cell's last value."""
    return AttentionExplorer(checkpoint, text=text, top_k=top_k)
