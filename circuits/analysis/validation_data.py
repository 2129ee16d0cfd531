"""Validation windows for a checkpoint, with a stated fallback when the corpus is missing.

The training record of a checkpoint names its validation data
(``config["training"]["config"]["data"]["validation"]``), as a path relative to the repository
root. Chapters execute from a copy of ``book/``, so the path is resolved the way
``circuits.report.load_validation_windows`` does it: from the current folder first, then from the
repository root.
"""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass

import torch

from circuits.checkpoints import Checkpoint
from circuits.report import ReportError, load_validation_windows


@dataclass
class ContextWindows:
    """Token windows [n_windows, pos] that start with BOS, and where they came from.

    ``from_corpus`` is False when the recorded validation data could not be read, and the windows
    then hold the fallback text. ``problem`` gives the reason the corpus was not used.
    """

    windows: torch.Tensor
    source: str
    from_corpus: bool
    problem: str | None = None

    def describe(self) -> str:
        """Return one sentence naming the data, for a chapter to print under its numbers."""
        n_windows, n_pos = self.windows.shape
        if self.from_corpus:
            return f"{n_windows} validation windows of {n_pos} tokens from {self.source}"
        return (
            f"the validation corpus is not available ({self.problem}), so these numbers use "
            f"{self.source} instead: {n_windows} window of {n_pos} tokens, far too little data "
            "for stable averages"
        )


def validation_windows_for(
    checkpoint: Checkpoint, n_windows: int, fallback_text: str | None = None
) -> ContextWindows:
    """Return the first ``n_windows`` non-overlapping validation windows of a checkpoint.

    When the recorded validation data is missing or unreadable, and ``fallback_text`` is given,
    return that text as one window (BOS, then at most n_ctx − 1 tokens) with ``from_corpus``
    False. Without ``fallback_text`` the ``ReportError`` propagates. The corpus may also hold
    fewer windows than requested; the result then has fewer rows.
    """
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, got {n_windows!r}")
    try:
        data = load_validation_windows(checkpoint, None, n_windows)
    except ReportError as error:
        if fallback_text is None:
            raise
        ids = checkpoint.tokenizer.encode_for_model(fallback_text, checkpoint.model.cfg.n_ctx)
        # The ReportError's own message ends with advice for the report command's options, so
        # the underlying data error is the clearer reason when there is one.
        problem = str(error.__cause__) if error.__cause__ is not None else (
            "the checkpoint records no validation data")
        return ContextWindows(
            windows=torch.tensor([ids], dtype=torch.int64),
            source="the fallback text",
            from_corpus=False,
            problem=problem,
        )
    # Name the data by its corpus folder and file pattern, not the path on the building machine.
    shown = "/".join(Path(str(data.source)).parts[-2:])
    return ContextWindows(windows=data.windows, source=shown, from_corpus=True)
