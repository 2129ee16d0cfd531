"""The in-context learning score with its standard error over windows.

The score of ``circuits.analysis.icl`` is the mean loss at a late token index minus the mean loss
at an early one. The mean of differences equals the difference of means, so the score is also
the mean over windows of each window's own late-minus-early difference. The spread of those
per-window differences gives the standard error of the score, which shows whether a score (or a
change in it) is larger than sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis.icl import icl_score_from_losses, token_losses
from circuits.model import AttnOnlyTransformer


@dataclass
class ICLSpread:
    """An in-context learning score (nats) with the standard error of its mean over windows.

    ``standard_error`` is NaN for a single window. ``loss_by_position`` is the mean loss of the
    token at every index 1 … pos − 1, the Series that ``icl.loss_by_position`` returns for the
    same windows.
    """

    score: float
    standard_error: float
    late_index: int
    early_index: int
    n_windows: int
    loss_by_position: pd.Series


@torch.no_grad()
def icl_score_spread(
    model: AttnOnlyTransformer,
    windows: torch.Tensor,
    late_index: int | None = None,
    early_index: int | None = None,
    batch_size: int = 8,
) -> ICLSpread:
    """Score in-context learning on ``windows`` [n, pos] and estimate its standard error.

    The indices default as in ``circuits.analysis.icl.icl_indices`` (500 and 50 for windows of
    512 tokens). The standard error is the sample standard deviation of the per-window
    differences divided by sqrt(n).
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must have shape [n_windows, pos], got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    try:
        losses = torch.cat([
            token_losses(model(windows[start:start + batch_size]),
                         windows[start:start + batch_size]).double()
            for start in range(0, windows.shape[0], batch_size)
        ])
    finally:
        model.train(was_training)

    n_windows, n_pos = windows.shape
    means = losses.mean(0)
    score = icl_score_from_losses(means, n_windows, late_index, early_index)
    # Column i − 1 is the loss of the token at index i.
    differences = losses[:, score.late_index - 1] - losses[:, score.early_index - 1]
    standard_error = (
        float(differences.std(correction=1)) / math.sqrt(n_windows) if n_windows > 1
        else math.nan
    )
    return ICLSpread(
        score=score.score,
        standard_error=standard_error,
        late_index=score.late_index,
        early_index=score.early_index,
        n_windows=n_windows,
        loss_by_position=pd.Series(
            means.numpy(), index=pd.RangeIndex(1, n_pos, name="token_index"), name="loss"
        ),
    )
