"""Bigram statistics of a token stream, and how a model's next-token table compares with them.

A model with no layers predicts from the current token alone: its logits after token t are
``LN_final(W_E[t]) @ W_U`` at every position, a bigram table. This module counts the bigrams of
the tokenized training stream and measures, per source token s, the KL divergence
KL(P_corpus(· | s) ‖ P_model(· | s)) in nats.

The counts cover every adjacent pair of the stream that ``circuits.data.load_tokens`` builds, in
which each document starts with BOS. So pairs (last token of a document, BOS) and (BOS, first
token of the next document) are counted too. The training windows also put a BOS before each
window's first token, which these counts do not include.

File format (``save_bigram_counts``): a compressed ``.npz`` without pickled objects, holding the
nonzero entries of the d_vocab x d_vocab count matrix sorted by (source, next): ``source`` and
``next`` (uint16 while d_vocab <= 65536, else uint32), ``count`` (uint32, or uint64 for counts
of 2^32 and more), and the scalars ``d_vocab``, ``n_tokens`` and ``format``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer

FORMAT_VERSION = 1
# Tokens per chunk when counting: each chunk needs an int64 pair index per token (64 MB).
COUNT_CHUNK = 8_000_000


@dataclass
class BigramCounts:
    """Nonzero bigram counts, sorted by (source, next).

    ``sources``, ``next_tokens`` and ``counts`` are parallel arrays; ``n_tokens`` is the length of
    the counted stream, which contains ``n_tokens - 1`` pairs.
    """

    d_vocab: int
    sources: np.ndarray
    next_tokens: np.ndarray
    counts: np.ndarray
    n_tokens: int

    def dense(self) -> np.ndarray:
        """Build the count matrix [source, next] as int64 (d_vocab² entries)."""
        matrix = np.zeros((self.d_vocab, self.d_vocab), dtype=np.int64)
        matrix[self.sources, self.next_tokens] = self.counts
        return matrix

    def row(self, source: int) -> np.ndarray:
        """Return the counts [d_vocab] of the tokens that follow ``source``."""
        if not 0 <= source < self.d_vocab:
            raise ValueError(f"source must be in [0, {self.d_vocab}), got {source}")
        start, stop = np.searchsorted(self.sources, [source, source + 1])
        row = np.zeros(self.d_vocab, dtype=np.int64)
        row[self.next_tokens[start:stop]] = self.counts[start:stop]
        return row

    def source_totals(self) -> np.ndarray:
        """Count how often each token [d_vocab] is followed by another one (its row sum)."""
        return np.bincount(self.sources, weights=self.counts, minlength=self.d_vocab).astype(
            np.int64
        )


def count_bigrams(tokens: np.ndarray, d_vocab: int, chunk_size: int = COUNT_CHUNK) -> BigramCounts:
    """Count every adjacent pair (tokens[i], tokens[i + 1]) of a token stream.

    Works in chunks of ``chunk_size`` tokens with ``np.bincount`` over ``source * d_vocab + next``,
    so a memmapped stream is never loaded whole.
    """
    # A memmap stays a view of the file here; nothing is read until a chunk is sliced.
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if len(tokens) < 2:
        raise ValueError(f"a stream of {len(tokens)} tokens has no bigrams")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    totals = np.zeros(d_vocab * d_vocab, dtype=np.int64)
    for start in range(0, len(tokens) - 1, chunk_size):
        # One token of overlap, so the pair across the chunk boundary is counted once.
        chunk = np.asarray(tokens[start:start + chunk_size + 1]).astype(np.int64)
        if chunk.min() < 0 or chunk.max() >= d_vocab:
            raise ValueError(
                f"token ids must be in [0, {d_vocab}), got range [{chunk.min()}, {chunk.max()}] "
                f"near stream offset {start}; is d_vocab right for this tokenizer?"
            )
        totals += np.bincount(chunk[:-1] * d_vocab + chunk[1:], minlength=d_vocab * d_vocab)

    pairs = np.flatnonzero(totals)
    index_dtype = np.uint16 if d_vocab <= 1 << 16 else np.uint32
    counts = totals[pairs]
    count_dtype = np.uint32 if counts.max() < 1 << 32 else np.uint64
    return BigramCounts(
        d_vocab=d_vocab,
        sources=(pairs // d_vocab).astype(index_dtype),
        next_tokens=(pairs % d_vocab).astype(index_dtype),
        counts=counts.astype(count_dtype),
        n_tokens=len(tokens),
    )


def save_bigram_counts(counts: BigramCounts, path: str | os.PathLike) -> None:
    """Write the counts as a compressed ``.npz`` (see the module docstring for the layout)."""
    np.savez_compressed(
        path,
        source=counts.sources,
        next=counts.next_tokens,
        count=counts.counts,
        d_vocab=np.int64(counts.d_vocab),
        n_tokens=np.int64(counts.n_tokens),
        format=np.int64(FORMAT_VERSION),
    )


def load_bigram_counts(path: str | os.PathLike) -> BigramCounts:
    """Read counts written by ``save_bigram_counts``; raise ValueError on a malformed file."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable bigram counts file ({error})") from error
    with archive:
        missing = {"source", "next", "count", "d_vocab", "n_tokens", "format"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{path}: missing arrays {sorted(missing)}; rerun scripts/bigram_counts.py"
            )
        if int(archive["format"]) != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format {int(archive['format'])}, expected {FORMAT_VERSION}; rerun "
                "scripts/bigram_counts.py"
            )
        counts = BigramCounts(
            d_vocab=int(archive["d_vocab"]),
            sources=archive["source"],
            next_tokens=archive["next"],
            counts=archive["count"],
            n_tokens=int(archive["n_tokens"]),
        )
    lengths = {len(counts.sources), len(counts.next_tokens), len(counts.counts)}
    if len(lengths) != 1:
        raise ValueError(f"{path}: source, next and count arrays differ in length")
    largest_id = max(counts.sources.max(), counts.next_tokens.max()) if len(counts.sources) else 0
    if largest_id >= counts.d_vocab:
        raise ValueError(f"{path}: token ids outside [0, d_vocab={counts.d_vocab})")
    return counts


def corpus_next_token_probs(counts: BigramCounts) -> np.ndarray:
    """Compute P_corpus(next | source) [d_vocab, d_vocab] in float64 (NaN rows: unseen sources)."""
    matrix = counts.dense().astype(np.float64)
    totals = matrix.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return matrix / totals


@torch.no_grad()
def model_next_token_log_probs(model: AttnOnlyTransformer, batch_size: int = 512) -> torch.Tensor:
    """Compute the log-probabilities [d_vocab, d_vocab] (float64) after each one-token sequence.

    Row t comes from the model's forward pass on the sequence [t]. For a model with no layers this
    is its bigram table, the same at every position. For a model with layers it is the prediction
    from a context of t alone.
    """
    was_training = model.training
    model.eval()
    try:
        tokens = torch.arange(model.cfg.d_vocab, device=model.embed.W_E.device)[:, None]
        rows = [
            model(tokens[start:start + batch_size])[:, 0].double().log_softmax(-1)
            for start in range(0, len(tokens), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(rows).cpu()


def bigram_kl(model: AttnOnlyTransformer, counts: BigramCounts) -> torch.Tensor:
    """KL(P_corpus(· | s) ‖ P_model(· | s)) in nats for every source token s, [d_vocab] float64.

    Terms with P_corpus = 0 contribute 0. Sources that never occur (row sum 0) get NaN. The mean
    weighted by ``counts.source_totals()`` is the model's loss on the counted pairs minus the
    corpus's conditional bigram entropy.
    """
    if counts.d_vocab != model.cfg.d_vocab:
        raise ValueError(
            f"the counts have d_vocab={counts.d_vocab} but the model has "
            f"d_vocab={model.cfg.d_vocab}; count bigrams with the model's tokenizer"
        )
    corpus = torch.from_numpy(corpus_next_token_probs(counts))
    model_log_probs = model_next_token_log_probs(model)
    seen = corpus > 0
    safe_corpus = torch.where(seen, corpus, torch.ones_like(corpus))
    terms = torch.where(seen, corpus * (safe_corpus.log() - model_log_probs), 0.0)
    kl = terms.sum(1)
    kl[torch.from_numpy(counts.source_totals() == 0)] = float("nan")
    return kl


def top_next_tokens(
    model: AttnOnlyTransformer,
    counts: BigramCounts,
    tokenizer: Tokenizer | Sequence[str],
    source: int,
    k: int = 10,
) -> pd.DataFrame:
    """List the k most likely tokens after ``source`` in the corpus and under the model.

    Returns k rows (``rank`` 0 is the most likely) with columns ``corpus_token``, ``corpus_str``,
    ``corpus_prob``, ``model_token``, ``model_str`` and ``model_prob``. ``tokenizer`` may also be a
    list of the d_vocab display strings. A source the corpus never shows has NaN corpus columns.
    """
    d_vocab = model.cfg.d_vocab
    if not 0 <= source < d_vocab:
        raise ValueError(f"source must be in [0, {d_vocab}), got {source}")
    if not 1 <= k <= d_vocab:
        raise ValueError(f"k must be in [1, {d_vocab}], got {k}")
    strings = tokenizer.vocabulary_strings if isinstance(tokenizer, Tokenizer) else list(tokenizer)
    if len(strings) != d_vocab or counts.d_vocab != d_vocab:
        raise ValueError(
            f"vocabulary sizes differ: model {d_vocab}, counts {counts.d_vocab}, tokenizer "
            f"{len(strings)}"
        )

    row = counts.row(source).astype(np.float64)
    total = row.sum()
    corpus_probs = row / total if total > 0 else np.full(d_vocab, np.nan)
    corpus_order = np.argsort(-row, kind="stable")[:k]

    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            logits = model(torch.tensor([[source]], device=model.embed.W_E.device))[0, 0]
        finally:
            model.train(was_training)
    model_probs = logits.double().softmax(-1).cpu()
    model_top = model_probs.topk(k)

    unseen = total == 0
    return pd.DataFrame(
        {
            "rank": np.arange(k),
            "corpus_token": np.where(unseen, -1, corpus_order),
            "corpus_str": [None if unseen else strings[i] for i in corpus_order],
            "corpus_prob": corpus_probs[corpus_order],
            "model_token": model_top.indices.numpy(),
            "model_str": [strings[i] for i in model_top.indices.tolist()],
            "model_prob": model_top.values.numpy(),
        }
    )
