"""Next-token tables of models set against the corpus's bigram statistics.

A bigram table is a [d_vocab, d_vocab] tensor of next-token log-probabilities whose row s is a
prediction made from the current token s alone. Two kinds come from the models here:

- a zero-layer model's whole prediction, ``model_next_token_log_probs`` in
  ``circuits.analysis.bigrams``, which equals ``direct_path_log_probs`` for such a model;
- ``direct_path_log_probs`` of a model with layers: the softmax of its direct path
  ``LN_final(W_E) @ W_U``, the prediction left when no head writes to the residual stream;
- ``after_bos_log_probs``: the whole model's prediction on the two-token sequence [BOS, t].

``bigram_fit`` measures a table against the corpus's conditional distribution P(next | source)
from bigram counts, per source token and weighted by how often each source occurs. All
quantities are in nats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuits.analysis.bigrams import BigramCounts, corpus_next_token_probs
from circuits.analysis.circuits import direct_path
from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer


def frequent_tokens(counts: BigramCounts, n: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """Return the ids of the ``n`` most frequent source tokens, most frequent first.

    Frequency is the number of times a token is followed by another one in the counted stream.
    Tokens in ``exclude`` (for example BOS) and tokens that never occur are left out, so fewer
    than ``n`` ids come back when fewer tokens occur.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    totals = counts.source_totals().astype(np.float64)
    totals[np.asarray(exclude, dtype=np.int64)] = 0
    order = np.argsort(-totals, kind="stable")
    occurring = order[totals[order] > 0]
    return occurring[:n]


@torch.no_grad()
def direct_path_log_probs(model: AttnOnlyTransformer) -> torch.Tensor:
    """Next-token log-probabilities [d_vocab, d_vocab] (float64) of the direct path alone.

    Row t is ``log_softmax(LN_final(W_E[t]) @ W_U)``. For a zero-layer model this is its whole
    bigram table. In a model with layers the final layernorm normalises the sum of the embedding
    and every head's output, so this row is what the model would predict if no head wrote
    anything.
    """
    return direct_path(model).dense().log_softmax(-1)


@torch.no_grad()
def after_bos_log_probs(model: AttnOnlyTransformer, batch_size: int = 512) -> torch.Tensor:
    """Next-token log-probabilities [d_vocab, d_vocab] (float64) of the model on [BOS, t].

    Row t is the whole model's prediction at position 1 of the sequence BOS, t: every head
    may attend to BOS and to t, so this is the model's bigram table when the context contains
    nothing else. BOS is the last id, as everywhere in this project.
    """
    d_vocab = model.cfg.d_vocab
    device = model.embed.W_E.device
    tokens = torch.stack(
        [torch.full((d_vocab,), d_vocab - 1), torch.arange(d_vocab)], dim=1
    ).to(device)
    was_training = model.training
    model.eval()
    try:
        rows = [
            model(tokens[start:start + batch_size])[:, -1].double().log_softmax(-1)
            for start in range(0, d_vocab, batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(rows).cpu()


def _token_strings(tokenizer: Tokenizer | Sequence[str]) -> list[str]:
    return tokenizer.vocabulary_strings if isinstance(tokenizer, Tokenizer) else list(tokenizer)


def _check_table(log_probs: torch.Tensor, d_vocab: int) -> None:
    if tuple(log_probs.shape) != (d_vocab, d_vocab):
        raise ValueError(
            f"a bigram table must be [d_vocab, d_vocab] = [{d_vocab}, {d_vocab}] "
            f"log-probabilities, got shape {tuple(log_probs.shape)}"
        )


@dataclass
class BigramFit:
    """Agreement of one bigram table with the corpus, per source token.

    Arrays are [d_vocab], indexed by source token; sources that never occur have NaN ``kl`` and
    ``entropy`` and a False ``top1_match``.

    - ``kl``: KL(P_corpus(· | s) ‖ P_table(· | s)) in nats.
    - ``entropy``: the corpus's entropy H(next | source = s) in nats, the loss of a perfect table.
    - ``top1_match``: the table's most likely next token is the corpus's most likely one.
    - ``source_counts``: how often s is followed by another token in the counted stream.
    """

    kl: np.ndarray
    entropy: np.ndarray
    top1_match: np.ndarray
    source_counts: np.ndarray

    def _weighted_mean(self, values: np.ndarray) -> float:
        seen = self.source_counts > 0
        return float(np.average(values[seen], weights=self.source_counts[seen]))

    @property
    def mean_kl(self) -> float:
        """KL averaged over all counted pairs, so each source weighs as much as it occurs."""
        return self._weighted_mean(self.kl)

    @property
    def corpus_entropy(self) -> float:
        """Conditional entropy H(next | source) of the corpus, the best loss of any bigram table."""
        return self._weighted_mean(self.entropy)

    @property
    def cross_entropy(self) -> float:
        """The table's mean loss on the counted pairs, ``corpus_entropy + mean_kl``."""
        return self.corpus_entropy + self.mean_kl

    @property
    def top1_agreement(self) -> float:
        """Fraction of counted pairs whose source gets the corpus's top next token as top 1."""
        return self._weighted_mean(self.top1_match.astype(np.float64))

    @property
    def n_sources(self) -> int:
        return int((self.source_counts > 0).sum())

    def summary(self) -> dict[str, float]:
        """Return the measures above under short names, with KL, cross-entropy and entropy in nats.

        ``mean KL``, ``cross-entropy``, ``bigram entropy`` and ``top-1 agreement`` are weighted by
        count; ``median KL`` is over source tokens; ``sources`` counts the sources that occur.
        """
        seen = self.source_counts > 0
        return {
            "mean KL": self.mean_kl,
            "median KL": float(np.median(self.kl[seen])),
            "cross-entropy": self.cross_entropy,
            "bigram entropy": self.corpus_entropy,
            "top-1 agreement": self.top1_agreement,
            "sources": self.n_sources,
        }


@torch.no_grad()
def bigram_fit(log_probs: torch.Tensor, counts: BigramCounts) -> BigramFit:
    """Compare a bigram table of log-probabilities [d_vocab, d_vocab] with the corpus counts."""
    _check_table(log_probs, counts.d_vocab)
    corpus = torch.from_numpy(corpus_next_token_probs(counts))
    log_probs = log_probs.detach().double().cpu()
    source_counts = counts.source_totals()
    seen = torch.from_numpy(source_counts > 0)

    occurs = corpus > 0
    log_corpus = torch.where(occurs, corpus, torch.ones_like(corpus)).log()
    entropy = -torch.where(occurs, corpus * log_corpus, 0.0).sum(1)
    kl = torch.where(occurs, corpus * (log_corpus - log_probs), 0.0).sum(1)
    kl[~seen] = float("nan")
    entropy[~seen] = float("nan")

    corpus_top = torch.where(seen[:, None], corpus, 0.0).argmax(1)
    top1_match = (log_probs.argmax(1) == corpus_top) & seen
    return BigramFit(
        kl=kl.numpy(),
        entropy=entropy.numpy(),
        top1_match=top1_match.numpy(),
        source_counts=source_counts,
    )


def compare_fits(fits: Mapping[str, BigramFit]) -> pd.DataFrame:
    """Put the ``summary`` of several fits in one table, one row per table, indexed by name."""
    frame = pd.DataFrame([fit.summary() for fit in fits.values()], index=list(fits))
    return frame.astype({"sources": "int64"})


def per_source_kl(
    fits: Mapping[str, BigramFit],
    tokenizer: Tokenizer | Sequence[str],
    sources: Sequence[int],
) -> pd.DataFrame:
    """Tabulate each fit's KL per source token, with ``source``, ``source_str`` and ``count``.

    The KL columns are named after the keys of ``fits``; the rows keep the order of ``sources``.
    """
    strings = _token_strings(tokenizer)
    sources = np.asarray(sources, dtype=np.int64)
    first = next(iter(fits.values()))
    frame = pd.DataFrame({
        "source": sources,
        "source_str": [strings[s] for s in sources],
        "count": first.source_counts[sources],
    })
    for name, fit in fits.items():
        frame[name] = fit.kl[sources]
    return frame


def next_token_comparison(
    tables: Mapping[str, torch.Tensor],
    counts: BigramCounts,
    tokenizer: Tokenizer | Sequence[str],
    sources: Sequence[int],
    k: int = 8,
) -> pd.DataFrame:
    """Set the corpus's next-token probabilities beside those of each table, per source token.

    For each source the rows are the union of the corpus's top-k next tokens and every table's
    top-k (only the tables' for a source the corpus never shows), ordered by corpus probability
    and then by the first table's. Columns: ``source``, ``source_str``, ``token``,
    ``token_str``, ``corpus`` (NaN for an unseen source) and one probability column per table,
    named after the keys of ``tables``.
    """
    d_vocab = counts.d_vocab
    if not 1 <= k <= d_vocab:
        raise ValueError(f"k must be in [1, {d_vocab}], got {k}")
    for table in tables.values():
        _check_table(table, d_vocab)
    strings = _token_strings(tokenizer)
    if len(strings) != d_vocab:
        raise ValueError(f"the tokenizer has {len(strings)} strings but d_vocab is {d_vocab}")

    probabilities = {name: table.detach().double().cpu().exp() for name, table in tables.items()}
    rows = []
    for source in np.asarray(sources, dtype=np.int64):
        corpus_row = counts.row(int(source)).astype(np.float64)
        total = corpus_row.sum()
        corpus_row = corpus_row / total if total > 0 else np.full(d_vocab, np.nan)
        table_rows = {name: probs[source].numpy() for name, probs in probabilities.items()}

        candidates = set()
        if total > 0:
            candidates.update(np.argsort(-corpus_row, kind="stable")[:k].tolist())
        for row in table_rows.values():
            candidates.update(np.argsort(-row, kind="stable")[:k].tolist())
        first_row = next(iter(table_rows.values()), np.zeros(d_vocab))
        ordered = sorted(
            candidates, key=lambda t: (-np.nan_to_num(corpus_row[t]), -first_row[t], t)
        )

        for token in ordered:
            entry = {
                "source": int(source),
                "source_str": strings[source],
                "token": int(token),
                "token_str": strings[token],
                "corpus": corpus_row[token],
            }
            entry.update({name: float(row[token]) for name, row in table_rows.items()})
            rows.append(entry)
    columns = ["source", "source_str", "token", "token_str", "corpus", *tables]
    return pd.DataFrame(rows, columns=columns)
