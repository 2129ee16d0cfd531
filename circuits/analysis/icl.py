"""In-context learning score and loss by context position.

Definitions, for a window of tokens t_0 … t_{n-1} with BOS at index 0:

- The loss of the token at index i (1 <= i <= n - 1) is −log p(t_i | t_0 … t_{i-1}), the
  cross-entropy in nats of the logits at position i − 1 against t_i. Index 0 has no loss.
- The loss by context position is, for every index i, the mean of that loss over the windows.
- The in-context learning score is the mean loss at a late index minus the mean loss at an
  early one, by default 500 and 50 as in Olsson et al. (2022), "In-context Learning and
  Induction Heads" (arXiv:2209.11895). A negative score means later tokens are predicted better,
  so the model uses the context. Windows shorter than 512 tokens use round(0.9 n) and
  round(0.1 n) instead, rounding half up and capped to [1, n − 1]. The result records the
  indices it used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from circuits.data import WindowSampler

# Indices of Olsson et al. (2022), used when the windows have at least this many tokens.
STANDARD_LENGTH = 512
STANDARD_LATE_INDEX = 500
STANDARD_EARLY_INDEX = 50


def icl_indices(n_pos: int) -> tuple[int, int]:
    """(late, early) token indices for windows of ``n_pos`` tokens (see the module docstring)."""
    if isinstance(n_pos, bool) or not isinstance(n_pos, int) or n_pos < 3:
        raise ValueError(
            f"windows need at least 3 tokens for two distinct indices with a loss, got {n_pos!r}"
        )
    if n_pos >= STANDARD_LENGTH:
        return STANDARD_LATE_INDEX, STANDARD_EARLY_INDEX
    # round(0.9 n) and round(0.1 n), half up, in integer arithmetic.
    late = min((9 * n_pos + 5) // 10, n_pos - 1)
    early = max((n_pos + 5) // 10, 1)
    if early >= late:
        raise ValueError(
            f"windows of {n_pos} tokens are too short for an in-context learning score"
        )
    return late, early


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Losses [batch, pos − 1] in nats; column i − 1 is the loss of the token at index i."""
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"logits [batch, pos, d_vocab] and tokens [batch, pos] do not match: "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    predictions = logits[:, :-1]
    targets = tokens[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]).to(dtype), targets.reshape(-1),
        reduction="none",
    )
    return losses.view(targets.shape)


def _check_windows(windows: torch.Tensor, bos_token_id: int | None) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dtype not in (torch.int64, torch.int32):
        raise TypeError("windows must be an integer torch.Tensor of shape [n_windows, pos]")
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must have shape [n_windows, pos] with n_windows >= 1, got "
                         f"{tuple(windows.shape)}")
    if bos_token_id is not None and bool((windows[:, 0] != bos_token_id).any()):
        raise ValueError(f"every window must start with the BOS token {bos_token_id}")


LogitsFunction = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def mean_token_losses(
    model: torch.nn.Module | LogitsFunction,
    windows: torch.Tensor,
    batch_size: int = 8,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Average each index's token loss over the windows: float64 [pos − 1], entry i − 1 for index i.

    ``model`` is any callable from tokens [batch, pos] to logits [batch, pos, d_vocab], such as an
    ``AttnOnlyTransformer``, which runs in eval mode and gets its training mode back afterwards.
    Windows run in batches of ``batch_size``. With ``bos_token_id``, every window must start with
    it.
    """
    _check_windows(windows, bos_token_id)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            total += token_losses(model(batch), batch).double().sum(0)
    finally:
        if was_training:
            model.train()
    return total / windows.shape[0]


def loss_by_position(
    model: torch.nn.Module | LogitsFunction,
    windows: torch.Tensor,
    batch_size: int = 8,
    bos_token_id: int | None = None,
) -> pd.Series:
    """Mean loss of the token at every index 1 … n − 1, as a Series indexed by ``token_index``."""
    means = mean_token_losses(model, windows, batch_size=batch_size, bos_token_id=bos_token_id)
    index = pd.RangeIndex(1, windows.shape[1], name="token_index")
    return pd.Series(means.numpy(), index=index, name="loss")


@dataclass
class ICLScore:
    """An in-context learning score, ``late_loss − early_loss`` in nats, over ``n_windows``."""

    score: float
    late_index: int
    early_index: int
    late_loss: float
    early_loss: float
    n_windows: int


def icl_score_from_losses(
    mean_losses: torch.Tensor,
    n_windows: int,
    late_index: int | None = None,
    early_index: int | None = None,
) -> ICLScore:
    """``ICLScore`` from the per-index mean losses of ``mean_token_losses`` [pos − 1]."""
    n_pos = mean_losses.shape[0] + 1
    default_late, default_early = icl_indices(n_pos)
    late = default_late if late_index is None else late_index
    early = default_early if early_index is None else early_index
    for name, value in (("late_index", late), ("early_index", early)):
        if not 1 <= value <= n_pos - 1:
            raise ValueError(f"{name} must be in [1, {n_pos - 1}] for windows of {n_pos} tokens, "
                             f"got {value}")
    late_loss = float(mean_losses[late - 1])
    early_loss = float(mean_losses[early - 1])
    return ICLScore(
        score=late_loss - early_loss,
        late_index=late,
        early_index=early,
        late_loss=late_loss,
        early_loss=early_loss,
        n_windows=n_windows,
    )


def in_context_learning_score(
    model: torch.nn.Module | LogitsFunction,
    windows: torch.Tensor,
    late_index: int | None = None,
    early_index: int | None = None,
    batch_size: int = 8,
    bos_token_id: int | None = None,
) -> ICLScore:
    """Mean loss at ``late_index`` minus mean loss at ``early_index`` over all the windows.

    The indices default to (500, 50), or to ``icl_indices`` for windows under 512 tokens. Use at
    least 1000 windows for a stable score (``validation_windows`` draws that many by default).
    """
    means = mean_token_losses(model, windows, batch_size=batch_size, bos_token_id=bos_token_id)
    return icl_score_from_losses(means, windows.shape[0], late_index, early_index)


def validation_windows(
    tokens: np.ndarray, n_ctx: int, bos_token_id: int, n_windows: int = 1000
) -> torch.Tensor:
    """Cut the first ``n_windows`` non-overlapping windows, each starting with BOS, from a stream.

    Raises ValueError when the stream contains fewer windows than requested, so a score is never
    computed on fewer windows than requested without notice.
    """
    windows = WindowSampler(tokens, n_ctx, bos_token_id).sequential_windows(n_windows)
    if windows.shape[0] < n_windows:
        raise ValueError(
            f"the token stream has {len(tokens)} tokens, enough for {windows.shape[0]} windows of "
            f"{n_ctx} but {n_windows} were requested; lower n_windows or use more data"
        )
    return windows
