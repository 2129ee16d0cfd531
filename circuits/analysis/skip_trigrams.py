"""Skip-trigrams read off the OV and QK circuits of single heads, over the whole vocabulary.

A head in a one-layer attention-only model implements skip-trigrams "source … destination →
output". At a destination token d it attends back to an earlier source token s, as the QK circuit
decides. The information it moves from s then raises the logit of an output token o, as the OV
circuit decides. For every source token s this module finds

- its top-k output tokens o by ``ov_score = W_E_eff[s] @ W_OV @ W_U_eff[:, o]``, the logit change
  of o when the head attends fully to s (see ``circuits.analysis.circuits`` for the effective
  matrices);
- its top-k destination tokens d by ``qk_score = W_E_eff[d] @ W_QK @ W_E_eff[s] / sqrt(d_head)``,
  the token-token part of the attention score of query d on key s (positional terms left out).

Ranking: skip-trigrams are ranked by ``ov_score`` (how much the head raises the output's logit),
then by ``qk_score``. The qk_score is reported beside it, because a large ov_score matters only
where destinations attend to the source.

The sweep visits the source tokens in batches and never keeps more than
n_heads x batch_size x d_vocab scores, so the d_vocab x d_vocab circuits are never built whole.
It runs in float32, which is enough for ranking. The circuits apply to any layer's heads, but
beyond layer 0 they describe only the direct path from the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuits.analysis.circuits import check_head, head_name, ov_circuits, qk_circuits
from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer

TRIGRAM_COLUMNS = [
    "layer", "head", "name", "source", "destination", "output",
    "source_str", "destination_str", "output_str", "qk_score", "ov_score",
]


@dataclass
class SourceTopTokens:
    """Top tokens of every source token for every head of one layer.

    All tensors are [n_heads, d_vocab (source), k], best first. ``qk_scores`` include the
    1/sqrt(d_head) scale.
    """

    layer: int
    outputs: torch.Tensor
    ov_scores: torch.Tensor
    destinations: torch.Tensor
    qk_scores: torch.Tensor


@torch.no_grad()
def source_top_tokens(
    model: AttnOnlyTransformer, layer: int, k: int = 5, batch_size: int = 256
) -> SourceTopTokens:
    """Find each source token's top-k output tokens (OV) and destination tokens (QK), per head."""
    check_head(model, layer)
    d_vocab = model.cfg.d_vocab
    if not 1 <= k <= d_vocab:
        raise ValueError(f"k must be in [1, d_vocab={d_vocab}], got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    ov = ov_circuits(model, layer).to(torch.float32)
    qk = qk_circuits(model, layer).to(torch.float32) * (1.0 / math.sqrt(model.cfg.d_head))
    ov_left, ov_right = ov.A, ov.B  # [head, source, d_head], [head, d_head, output]
    queries = qk.A  # [head, destination, d_head]
    keys = qk.B.transpose(-1, -2)  # [head, source, d_head]

    pieces: dict[str, list[torch.Tensor]] = {
        "ov_scores": [], "outputs": [], "qk_scores": [], "destinations": []
    }
    for start in range(0, d_vocab, batch_size):
        sources = slice(start, min(start + batch_size, d_vocab))
        ov_rows = ov_left[:, sources] @ ov_right  # [head, batch, output]
        ov_top = ov_rows.topk(k, dim=-1)
        # Scores of every destination (query) token on the batch's source (key) tokens.
        qk_rows = keys[:, sources] @ queries.transpose(-1, -2)  # [head, batch, destination]
        qk_top = qk_rows.topk(k, dim=-1)
        pieces["ov_scores"].append(ov_top.values)
        pieces["outputs"].append(ov_top.indices)
        pieces["qk_scores"].append(qk_top.values)
        pieces["destinations"].append(qk_top.indices)

    joined = {name: torch.cat(parts, dim=1) for name, parts in pieces.items()}
    return SourceTopTokens(layer=layer, **joined)


def _vocabulary(tokenizer: Tokenizer | Sequence[str], d_vocab: int) -> np.ndarray:
    strings = tokenizer.vocabulary_strings if isinstance(tokenizer, Tokenizer) else list(tokenizer)
    if len(strings) != d_vocab:
        raise ValueError(
            f"the tokenizer has {len(strings)} token strings but the model has d_vocab={d_vocab}; "
            "pass the tokenizer the model was trained with"
        )
    return np.array(strings, dtype=object)


def skip_trigrams(
    model: AttnOnlyTransformer,
    tokenizer: Tokenizer | Sequence[str],
    k: int = 3,
    layers: Sequence[int] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Sweep every source token of every head in ``layers`` (default: all) for skip-trigrams.

    Returns one row per (head, source, destination, output) with destination among the source's
    top-k destinations and output among its top-k outputs, so k² rows per source. Columns are
    ``TRIGRAM_COLUMNS``: token ids, their display strings, ``qk_score`` and ``ov_score``. Within a
    head, rows are sorted by ``ov_score`` and then ``qk_score``, both descending.
    ``tokenizer`` may also be a list of the d_vocab display strings.
    """
    vocabulary = _vocabulary(tokenizer, model.cfg.d_vocab)
    layers = range(model.cfg.n_layers) if layers is None else layers
    frames = []
    for layer in layers:
        tops = source_top_tokens(model, layer, k=k, batch_size=batch_size)
        for head in range(model.cfg.n_heads):
            frames.append(_trigram_frame(tops, head, vocabulary))
    if not frames:
        return pd.DataFrame(columns=TRIGRAM_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _trigram_frame(tops: SourceTopTokens, head: int, vocabulary: np.ndarray) -> pd.DataFrame:
    d_vocab, k = tops.outputs.shape[1:]
    # Axes [source, destination rank, output rank], flattened to one row per trigram.
    shape = (d_vocab, k, k)
    source = np.broadcast_to(np.arange(d_vocab)[:, None, None], shape).ravel()
    destination = np.broadcast_to(tops.destinations[head].numpy()[:, :, None], shape).ravel()
    qk_score = np.broadcast_to(tops.qk_scores[head].numpy()[:, :, None], shape).ravel()
    output = np.broadcast_to(tops.outputs[head].numpy()[:, None, :], shape).ravel()
    ov_score = np.broadcast_to(tops.ov_scores[head].numpy()[:, None, :], shape).ravel()

    frame = pd.DataFrame(
        {
            "layer": tops.layer,
            "head": head,
            "name": head_name(tops.layer, head),
            "source": source,
            "destination": destination,
            "output": output,
            "source_str": vocabulary[source],
            "destination_str": vocabulary[destination],
            "output_str": vocabulary[output],
            "qk_score": qk_score,
            "ov_score": ov_score,
        },
        columns=TRIGRAM_COLUMNS,
    )
    frame = frame.sort_values(["ov_score", "qk_score"], ascending=False, kind="stable")
    return frame.reset_index(drop=True)


def top_skip_trigrams(
    model: AttnOnlyTransformer,
    tokenizer: Tokenizer | Sequence[str],
    layer: int,
    head: int,
    k: int = 20,
    source_tokens: Sequence[int] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Return the head's k strongest skip-trigrams, at most one per source token.

    Each source token contributes its best output (largest ov_score) and its best destination
    (largest qk_score). The k sources with the largest best ov_score are returned, in that order,
    with the columns of ``skip_trigrams``. ``source_tokens`` limits the candidate sources, for
    example to tokens that occur often enough in the corpus for the result to matter.
    """
    check_head(model, layer, head)
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    vocabulary = _vocabulary(tokenizer, model.cfg.d_vocab)
    tops = source_top_tokens(model, layer, k=1, batch_size=batch_size)
    frame = _trigram_frame(tops, head, vocabulary)
    if source_tokens is not None:
        allowed = np.asarray(source_tokens, dtype=np.int64)
        if allowed.size and (allowed.min() < 0 or allowed.max() >= model.cfg.d_vocab):
            raise ValueError(
                f"source_tokens must be ids in [0, {model.cfg.d_vocab}), got range "
                f"[{allowed.min()}, {allowed.max()}]"
            )
        frame = frame[np.isin(frame["source"].to_numpy(), allowed)]
    return frame.head(k).reset_index(drop=True)
