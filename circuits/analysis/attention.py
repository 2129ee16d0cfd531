"""Attention-pattern scores: previous-token heads, positional offsets and induction tests.

Patterns are [batch, head, query, key] with rows that sum to 1 over the keys j <= query, as
``AttnOnlyTransformer.run_with_cache`` records them. Each score has a pure function of a pattern
tensor (``*_from_patterns``, returning [batch, head]) and a model-level wrapper that runs the model
on batches of token windows under ``torch.no_grad`` and averages over the windows
([n_layers, n_heads]).

Repeated random tokens. ``repeated_random_tokens`` builds sequences ``BOS, t_1 … t_P, t_1 … t_P,
…`` with period P. Position 0 is BOS, and repeat r (counted from 0) occupies positions
``1 + r·P … (r + 1)·P``, so the token at position p ≥ 1 equals the one at p - P whenever
p - P ≥ 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer

# Single bytes in GPT-2's BPE: rare control bytes and the most common punctuation and spaces.
N_BYTE_TOKENS = 256


def _check_tokens(tokens: torch.Tensor, min_positions: int = 2) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(
            "tokens must be a torch.Tensor of shape [batch, pos], got "
            f"{getattr(tokens, 'shape', type(tokens).__name__)}"
        )
    if tokens.shape[0] == 0:
        raise ValueError("tokens must contain at least one sequence")
    if tokens.shape[1] < min_positions:
        raise ValueError(
            f"sequences need at least {min_positions} positions, got {tokens.shape[1]}"
        )


def _check_pattern(pattern: torch.Tensor) -> None:
    if pattern.ndim < 2 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(
            f"a pattern must be [..., query, key] with as many queries as keys, got shape "
            f"{tuple(pattern.shape)}"
        )


@torch.no_grad()
def pattern_batches(
    model: AttnOnlyTransformer, tokens: torch.Tensor, batch_size: int = 8
) -> Iterator[list[torch.Tensor]]:
    """Run the model on ``batch_size`` sequences at a time and yield each batch's patterns.

    Each item is a list with one [batch, head, query, key] pattern per layer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[start:start + batch_size])
            yield cache.patterns
    finally:
        model.train(was_training)


def _mean_over_batches(model, tokens, batch_size, score_fn) -> torch.Tensor:
    """Average ``score_fn(pattern)`` [batch, head, ...] over all sequences, per layer."""
    if model.cfg.n_layers == 0:
        raise ValueError("the model has no attention layers")
    totals = None
    for patterns in pattern_batches(model, tokens, batch_size):
        sums = torch.stack([score_fn(pattern).double().sum(0) for pattern in patterns])
        totals = sums if totals is None else totals + sums
    return totals / tokens.shape[0]


# Scores of one pattern tensor.


def diagonal_attention_from_patterns(pattern: torch.Tensor, offset: int) -> torch.Tensor:
    """Mean of ``pattern[..., i, i - offset]`` over queries i >= offset, shape [...]."""
    _check_pattern(pattern)
    n_pos = pattern.shape[-1]
    if not 0 <= offset < n_pos:
        raise ValueError(f"offset must be in [0, {n_pos}), got {offset}")
    return pattern.diagonal(offset=-offset, dim1=-2, dim2=-1).mean(-1)


def previous_token_score_from_patterns(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention on the previous token, ``A[i, i - 1]`` over queries i >= 1, shape [...]."""
    return diagonal_attention_from_patterns(pattern, 1)


def offset_profile_from_patterns(pattern: torch.Tensor, max_offset: int) -> torch.Tensor:
    """Mean attention at each relative offset 0 … max_offset, shape [..., max_offset + 1]."""
    return torch.stack(
        [diagonal_attention_from_patterns(pattern, offset) for offset in range(max_offset + 1)],
        dim=-1,
    )


def induction_targets(n_pos: int, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions and target keys of the prefix-matching score for repeated tokens.

    Returns ``queries`` [n_pos] (bool), the positions in the second and later repeats
    (p >= 1 + period), and ``targets`` [n_pos, n_pos] (bool), where ``targets[p, j]`` marks
    j = p - period·m + 1 for m >= 1 with p - period·m >= 1: the positions just after earlier
    copies of the token at p. When p is the last token of its repeat, its nearest target is
    the first token of its own repeat.
    """
    if period < 1:
        raise ValueError(f"period must be positive, got {period}")
    query = torch.arange(n_pos)[:, None]
    key = torch.arange(n_pos)[None, :]
    distance = query - key + 1  # period·m for a target
    targets = (distance >= period) & (distance % period == 0) & (key >= 2)
    queries = torch.arange(n_pos) >= 1 + period
    return queries, targets & queries[:, None]


def prefix_matching_score_from_patterns(pattern: torch.Tensor, period: int) -> torch.Tensor:
    """Mean attention mass on induction targets, over queries in repeats 2 and later, [...].

    See ``induction_targets`` for which keys count. A head that always attends to the token
    after an earlier copy of the current token scores 1.
    """
    _check_pattern(pattern)
    n_pos = pattern.shape[-1]
    queries, targets = induction_targets(n_pos, period)
    if not queries.any():
        raise ValueError(
            f"no query lies in a second repeat: {n_pos} positions with period {period} hold "
            "fewer than two repeats after BOS"
        )
    targets = targets.to(pattern.device, pattern.dtype)
    mass = (pattern * targets).sum(-1)  # [..., query]
    return mass[..., queries.to(pattern.device)].mean(-1)


# Model-level scores.


def previous_token_scores(
    model: AttnOnlyTransformer, windows: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """Previous-token score [n_layers, n_heads]: mean ``A[i, i - 1]`` over i >= 1 and windows.

    ``windows`` is [batch, n_pos] token ids with BOS first, for example validation windows from
    ``WindowSampler(...).sequential_windows(n)``.
    """
    _check_tokens(windows)
    return _mean_over_batches(model, windows, batch_size, previous_token_score_from_patterns)


def offset_profile_after_bos_from_patterns(
    pattern: torch.Tensor, max_offset: int
) -> torch.Tensor:
    """Return the mean of ``A[i, i - o]`` over queries i >= o + 1, shape [..., max_offset + 1].

    The key at position 0 (BOS) is left out. Many heads park unneeded attention on BOS, and
    counting it would make such a head seem to prefer the offset of the last query.
    """
    _check_pattern(pattern)
    n_pos = pattern.shape[-1]
    if not 0 <= max_offset <= n_pos - 2:
        raise ValueError(f"max_offset must be in [0, {n_pos - 2}], got {max_offset}")
    return torch.stack(
        [pattern.diagonal(offset=-offset, dim1=-2, dim2=-1)[..., 1:].mean(-1)
         for offset in range(max_offset + 1)],
        dim=-1,
    )


def preferred_offsets(
    model: AttnOnlyTransformer,
    windows: torch.Tensor,
    max_offset: int | None = None,
    batch_size: int = 8,
    skip_bos: bool = False,
) -> torch.Tensor:
    """Mean attention by relative offset i - j, [n_layers, n_heads, max_offset + 1].

    Entry [l, h, o] averages ``A[i, i - o]`` over queries i >= o and all windows, so a head that
    always attends o tokens back has 1 at offset o. ``max_offset`` defaults to n_pos - 1. With
    ``skip_bos`` the key at position 0 is left out (queries i >= o + 1; ``max_offset`` at most
    and by default n_pos - 2).
    """
    _check_tokens(windows, min_positions=2 if skip_bos else 1)
    n_pos = windows.shape[1]
    last = n_pos - 2 if skip_bos else n_pos - 1
    max_offset = last if max_offset is None else max_offset
    if not 0 <= max_offset <= last:
        raise ValueError(f"max_offset must be in [0, {last}], got {max_offset}")
    profile = offset_profile_after_bos_from_patterns if skip_bos else offset_profile_from_patterns
    return _mean_over_batches(model, windows, batch_size, lambda p: profile(p, max_offset))


def _check_repeated(sequences: torch.Tensor, period: int) -> int:
    """Validate repeated-token sequences and return the number of repeats."""
    _check_tokens(sequences)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int, got {period!r}")
    body = sequences.shape[1] - 1
    if body % period != 0 or body // period < 2:
        raise ValueError(
            f"sequences of {sequences.shape[1]} tokens are not BOS plus at least two repeats of "
            f"period {period}"
        )
    return body // period


def prefix_matching_scores(
    model: AttnOnlyTransformer, sequences: torch.Tensor, period: int, batch_size: int = 8
) -> torch.Tensor:
    """Prefix-matching score [n_layers, n_heads] on repeated random tokens.

    For each query in repeats 2 and later, the attention mass on the positions just after earlier
    copies of its token (``induction_targets``), averaged over queries and sequences.
    """
    _check_repeated(sequences, period)
    return _mean_over_batches(
        model, sequences, batch_size, lambda p: prefix_matching_score_from_patterns(p, period)
    )


@dataclass
class RepeatedTokenLoss:
    """Next-token loss in nats on repeated random tokens, averaged over the sequences.

    ``per_position`` [n_pos - 1]: entry i is the loss of predicting the token at position i + 1.
    ``per_copy`` [n_repeats]: entry r averages the predictions of positions 2 + r·P … (r + 1)·P,
    the tokens of repeat r after its first. Each repeat's first token is left out because it is
    unpredictable in repeats 0 and 1: it follows BOS in repeat 0 and ends the first pass through
    random tokens in repeat 1.
    """

    per_position: torch.Tensor
    per_copy: torch.Tensor


@torch.no_grad()
def repeated_token_loss(
    model: AttnOnlyTransformer, sequences: torch.Tensor, period: int, batch_size: int = 8
) -> RepeatedTokenLoss:
    """Per-position and per-repeat loss of the model on repeated random tokens (see the class)."""
    n_repeats = _check_repeated(sequences, period)
    if period < 2:
        raise ValueError(
            f"per-repeat loss needs period >= 2, got {period}: a repeat of one token has no "
            "prediction left once its first token is excluded"
        )
    was_training = model.training
    model.eval()
    try:
        losses = torch.cat(
            [
                model.loss(sequences[start:start + batch_size], per_token=True).double()
                for start in range(0, sequences.shape[0], batch_size)
            ]
        )
    finally:
        model.train(was_training)
    per_position = losses.mean(0)
    # Target position t is loss index t - 1; repeat r's targets after its first are
    # 2 + r·P … (r + 1)·P, that is indices 1 + r·P … (r + 1)·P - 1.
    per_copy = torch.stack(
        [per_position[1 + r * period:(r + 1) * period].mean() for r in range(n_repeats)]
    )
    return RepeatedTokenLoss(per_position=per_position, per_copy=per_copy)


def repeated_random_tokens(
    vocabulary: Tokenizer | int,
    n_tokens: int = 25,
    n_repeats: int = 4,
    n_sequences: int = 10,
    seed: int = 0,
    low: int | None = None,
    high: int | None = None,
    counts: np.ndarray | None = None,
    exclude_fraction: float = 0.1,
) -> torch.Tensor:
    """Build sequences of BOS then ``n_tokens`` random tokens repeated ``n_repeats`` times.

    Returns int64 [n_sequences, 1 + n_tokens·n_repeats]. ``vocabulary`` is a Tokenizer or the
    vocabulary size d_vocab, whose last id is BOS (the project's convention). The tokens of one
    repeat are distinct (drawn without replacement), so every token's earlier copy is unique.

    Candidate tokens:

    - with ``counts`` (token frequencies [d_vocab], for example row sums of a bigram table): the
      tokens that occur, without BOS, minus the ``exclude_fraction`` most frequent and the
      ``exclude_fraction`` least frequent of them;
    - otherwise the ids in [low, high). When the vocabulary has merged tokens the default range
      is [256, BOS), because GPT-2's single bytes (ids 0-255) include both the most frequent
      characters and control bytes that never occur. Otherwise it is every id below BOS.
    """
    d_vocab = vocabulary.d_vocab if isinstance(vocabulary, Tokenizer) else int(vocabulary)
    bos = d_vocab - 1
    if n_tokens < 1 or n_repeats < 1 or n_sequences < 1:
        raise ValueError(
            f"n_tokens, n_repeats and n_sequences must be positive, got {n_tokens}, {n_repeats}, "
            f"{n_sequences}"
        )
    candidates = _candidate_tokens(bos, low, high, counts, exclude_fraction)
    if len(candidates) < n_tokens:
        raise ValueError(
            f"only {len(candidates)} candidate tokens for {n_tokens} distinct tokens per sequence; "
            "widen the token range or lower exclude_fraction"
        )

    rng = np.random.default_rng(seed)
    sequences = np.empty((n_sequences, 1 + n_tokens * n_repeats), dtype=np.int64)
    sequences[:, 0] = bos
    for row in range(n_sequences):
        repeat = rng.choice(candidates, size=n_tokens, replace=False)
        sequences[row, 1:] = np.tile(repeat, n_repeats)
    return torch.from_numpy(sequences)


def _candidate_tokens(bos, low, high, counts, exclude_fraction) -> np.ndarray:
    if counts is not None:
        if low is not None or high is not None:
            raise ValueError("pass either counts or a token range (low, high), not both")
        counts = np.asarray(counts)
        if counts.shape != (bos + 1,):
            raise ValueError(f"counts must have shape ({bos + 1},), got {counts.shape}")
        if not 0.0 <= exclude_fraction < 0.5:
            raise ValueError(f"exclude_fraction must be in [0, 0.5), got {exclude_fraction}")
        ordinary = np.flatnonzero(counts[:bos] > 0)
        # Stable sort, so tokens with equal counts keep their id order.
        by_frequency = ordinary[np.argsort(-counts[ordinary], kind="stable")]
        n_excluded = int(len(by_frequency) * exclude_fraction)
        return np.sort(by_frequency[n_excluded:len(by_frequency) - n_excluded])

    if low is None:
        low = N_BYTE_TOKENS if bos > N_BYTE_TOKENS else 0
    high = bos if high is None else high
    if not 0 <= low < high <= bos:
        raise ValueError(
            f"token range [low, high) must satisfy 0 <= low < high <= {bos} (the BOS id), got "
            f"[{low}, {high})"
        )
    return np.arange(low, high)
