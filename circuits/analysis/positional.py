"""Heads that attend by relative position, measured on windows of real text.

``preferred_offsets`` (in ``circuits.analysis.attention``) gives each head's mean attention at
every relative offset o = query − key. This module adds

- ``validation_windows``: windows of a checkpoint's validation text, or, when that text is not on
  this machine, windows of ``SAMPLE_PASSAGE`` (English prose written for this project), with a
  record of which one was used;
- ``offset_profile``: the offsets, beside the same profile for a head that spreads its attention
  evenly over every key it may see, so that a peak can be read as a lift over that baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from circuits.analysis.attention import preferred_offsets
from circuits.analysis.circuits import head_name
from circuits.checkpoints import SHIPPED_DIR, Checkpoint
from circuits.data import PYTHON_SOURCES, DataError, WindowSampler, load_tokens

# Relative data paths in checkpoint configs are written from the repository root.
REPOSITORY_ROOT = SHIPPED_DIR.parent

# Fallback text, written for this project, used when the training corpus is not on the machine.
SAMPLE_PASSAGE = """\
The ferry left the harbour an hour late, because the fog had settled over the water before dawn \
and the captain would not move until he could see the lighthouse. Nobody on board complained. The \
farmers going to market sat on their baskets and talked about the price of wool, and the two \
students from the college read their books with their collars turned up against the damp. A small \
boy stood at the rail and counted the gulls that followed the boat. He counted eleven, then \
fourteen, then lost count when a gull landed on the rail beside him and looked at him with one \
yellow eye.

When the fog lifted, the town on the far shore came into view all at once: the white houses, the \
church with its green roof, the long stone wall of the quay. The boy's mother called him back from \
the rail and told him to keep his hands in his pockets, because the wind was cold and he had left \
his gloves at home. He kept his hands in his pockets for almost a minute. Then the ferry turned \
towards the quay, the engine slowed, and he ran back to the rail to watch the sailors throw the \
ropes.

On the quay a woman in a grey coat was waiting with a letter in her hand. She had been waiting \
since seven o'clock, and she had read the letter so many times that she knew it by heart. It said \
that her brother was coming home after nine years at sea. It did not say what he looked like now, \
or whether he would know her. She watched each passenger step off the ferry, the farmers with \
their baskets, the students with their books, the boy and his mother, and she began to think that \
the letter had been wrong. Then an old man with a brown beard came down the gangway last of all, \
stopped, and said her name.
"""


@dataclass
class TextWindows:
    """Token windows [n_windows, n_pos], each starting with BOS, and where they came from.

    ``source`` names the data (a folder and file pattern, or the sample passage).
    ``from_corpus`` is False when the windows come from ``SAMPLE_PASSAGE`` because the corpus
    could not be read, and ``reason`` then gives the error.
    """

    tokens: torch.Tensor
    source: str
    from_corpus: bool
    reason: str = ""

    def describe(self) -> str:
        """Describe the windows in one sentence: how many, how long, and from what data."""
        n_windows, n_pos = self.tokens.shape
        text = f"{n_windows} windows of {n_pos} tokens from {self.source}"
        if not self.from_corpus:
            text += f" (the validation text is not available: {self.reason})"
        return text


def _resolve_data_spec(spec: str, root: Path) -> str:
    """Make a relative local path in a checkpoint config absolute, against the repository root."""
    if spec.startswith("hf:") or spec in PYTHON_SOURCES or os.path.isabs(spec):
        return spec
    return str(root / spec)


def _short_name(spec: str) -> str:
    """Return the last two parts of a local data path (folder and file pattern), for display."""
    if spec.startswith("hf:") or spec in PYTHON_SOURCES:
        return spec
    return "/".join(Path(spec).parts[-2:])


def passage_windows(
    tokenizer, n_windows: int, n_pos: int, text: str = SAMPLE_PASSAGE
) -> torch.Tensor:
    """Cut ``text`` into at most ``n_windows`` windows of BOS plus the next n_pos − 1 tokens.

    The windows follow each other without overlap, as ``WindowSampler.sequential_windows`` lays
    them out. A text shorter than one window gives a single window of BOS and all its tokens.
    """
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the passage has no tokens")
    body = min(n_pos - 1, len(ids))
    n_windows = max(1, min(n_windows, len(ids) // body))
    rows = [[tokenizer.bos_token_id, *ids[i * body:(i + 1) * body]] for i in range(n_windows)]
    return torch.tensor(rows, dtype=torch.int64)


def validation_windows(
    checkpoint: Checkpoint,
    n_windows: int = 32,
    n_pos: int = 128,
    root: str | os.PathLike | None = None,
) -> TextWindows:
    """Return the first ``n_windows`` windows of the checkpoint's validation text.

    The data source is ``checkpoint.config["training"]["config"]["data"]["validation"]``; a
    relative path is read from ``root`` (default: the repository root). When the config names no
    validation data or the data cannot be read (for example on a machine without the corpus),
    the windows come from ``SAMPLE_PASSAGE`` instead and ``from_corpus`` is False.
    """
    if n_windows < 1 or n_pos < 2:
        raise ValueError(f"need n_windows >= 1 and n_pos >= 2, got {n_windows} and {n_pos}")
    n_pos = min(n_pos, checkpoint.model.cfg.n_ctx)
    tokenizer = checkpoint.tokenizer
    root = Path(root) if root is not None else REPOSITORY_ROOT

    spec = checkpoint.config.get("training", {}).get("config", {}).get("data", {}).get("validation")
    if not spec:
        reason = "the checkpoint's config names no validation data"
    else:
        resolved = _resolve_data_spec(str(spec), root)
        try:
            stream = load_tokens(resolved, tokenizer, progress=False)
            sampler = WindowSampler(stream, n_pos, tokenizer.bos_token_id)
            return TextWindows(
                sampler.sequential_windows(n_windows), _short_name(str(spec)), from_corpus=True
            )
        except DataError as error:
            reason = str(error)

    tokens = passage_windows(tokenizer, n_windows, n_pos)
    return TextWindows(tokens, "the sample passage in circuits.analysis.positional", False, reason)


def uniform_offset_profile(n_pos: int, max_offset: int) -> torch.Tensor:
    """Mean attention at each offset 0 … max_offset [max_offset + 1] of an evenly spread head.

    A query at position i that spreads its attention evenly over keys 0 … i gives 1 / (i + 1) to
    each, so the mean over queries i >= o (as in ``preferred_offsets``) is
    mean_{i = o … n_pos − 1} 1 / (i + 1).
    """
    if not 0 <= max_offset < n_pos:
        raise ValueError(f"max_offset must be in [0, {n_pos}), got {max_offset}")
    per_query = 1.0 / torch.arange(1, n_pos + 1, dtype=torch.float64)
    # Suffix sums give Σ_{i >= o} 1 / (i + 1) for every o at once.
    suffix = per_query.flip(0).cumsum(0).flip(0)
    counts = torch.arange(n_pos, 0, -1, dtype=torch.float64)
    return (suffix / counts)[: max_offset + 1]


@dataclass
class OffsetProfile:
    """Mean attention by relative offset, per head, with the evenly-spread baseline.

    ``attention`` is [n_layers, n_heads, max_offset + 1] from ``preferred_offsets``; ``uniform``
    is [max_offset + 1] from ``uniform_offset_profile``; ``n_pos`` is the window length.
    """

    attention: torch.Tensor
    uniform: torch.Tensor
    n_pos: int

    @property
    def lift(self) -> torch.Tensor:
        """Attention over the evenly-spread baseline, [n_layers, n_heads, max_offset + 1]."""
        return self.attention / self.uniform

    def head_table(self, min_lift: float = 4.0) -> pd.DataFrame:
        """Tabulate each head's peak offset, the attention there, the lift and a verdict.

        Columns: ``name``, ``layer``, ``head``, ``peak_offset`` (the offset with the largest lift),
        ``attention`` (mean attention at that offset), ``lift`` and ``positional``. A head is
        positional when its lift is at least ``min_lift``, so it looks at that relative position
        at least ``min_lift`` times as often as a head that ignores position would.
        """
        rows = []
        n_layers, n_heads, _ = self.attention.shape
        lift = self.lift
        for layer in range(n_layers):
            for head in range(n_heads):
                peak = int(lift[layer, head].argmax())
                rows.append({
                    "name": head_name(layer, head),
                    "layer": layer,
                    "head": head,
                    "peak_offset": peak,
                    "attention": float(self.attention[layer, head, peak]),
                    "lift": float(lift[layer, head, peak]),
                    "positional": bool(lift[layer, head, peak] >= min_lift),
                })
        return pd.DataFrame(rows)


def offset_profile(
    model, windows: torch.Tensor, max_offset: int = 16, batch_size: int = 8
) -> OffsetProfile:
    """Measure every head's mean attention at offsets 0 … max_offset on ``windows``."""
    attention = preferred_offsets(model, windows, max_offset=max_offset, batch_size=batch_size)
    n_pos = windows.shape[1]
    return OffsetProfile(attention, uniform_offset_profile(n_pos, max_offset), n_pos)
