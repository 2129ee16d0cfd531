"""Skip-trigram "bugs": a head that raises two continuations of a source also raises their swaps.

In a one-layer attention-only model, a head attends from a destination token d to a source token
s with a weight that the QK circuit sets from (d, s). What it then adds to the logits is that
weight times a logit change that the OV circuit sets from s alone. So when a head learns
"s … d1 → o1" and "s … d2 → o2" through the same source, it also raises o2 after "s … d1" and
o1 after "s … d2". Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", give
"keep … in mind" and "keep … at bay", which also raise "keep … in bay" and "keep … at mind".

``find_skip_trigram_bugs`` searches every head for such quadruples (s; d1, d2; o1, o2):

1. For each candidate source s, take the head's top ``n_top`` output tokens by OV score and its
   top ``n_top`` destination tokens by QK score, among ``candidates``.
2. Score each pairing of two destinations with two outputs by how strongly the corpus pairs them
   one way. The score is the log odds ratio of their bigram counts c, each plus 0.5:
   log c(d1, o1) + log c(d2, o2) − log c(d1, o2) − log c(d2, o1). A large value means "d1 is
   followed by o1 and d2 by o2, rarely the other way round". The pairs (d1, o1) and (d2, o2)
   must each occur at least ``min_pair_count`` times.
3. Keep pairings whose log odds ratio is at least ``min_log_odds``, and rank them by the smaller
   of the two OV scores, the logit change of the weaker continuation when the head attends fully
   to s. At most one quadruple per (head, source) is kept.

Bigram counts stand in for the corpus's skip-trigram statistics, which would need a pass over the
training text per source; they say which continuation each destination takes, not whether the
source came before it.

``skip_trigram_bug_effects`` then runs the model on "BOS s d" for both destinations and reads the
head's own term of the path expansion (``circuits.analysis.paths``) for both outputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from circuits.analysis.bigrams import BigramCounts
from circuits.analysis.circuits import check_head, head_name, ov_circuits, qk_circuits
from circuits.analysis.paths import path_expansion
from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer

BUG_COLUMNS = [
    "name", "layer", "head", "source", "destination_1", "destination_2", "output_1", "output_2",
    "source_str", "destination_1_str", "destination_2_str", "output_1_str", "output_2_str",
    "qk_score_1", "qk_score_2", "ov_score_1", "ov_score_2", "log_odds_ratio", "strength",
]

EFFECT_COLUMNS = [
    "example", "name", "source", "destination", "output", "source_str", "destination_str",
    "output_str", "paired", "attention_to_source", "head_effect", "corpus_prob",
]


# A space followed by ASCII letters: how GPT-2's byte-pair encoding starts a word that follows a
# space. Most such tokens are whole words (" keep"), some only the start of one (" sm").
WORD_PATTERN = re.compile(r" [A-Za-z]+")


def word_tokens(tokenizer: Tokenizer | Sequence[str], tokens: Sequence[int]) -> np.ndarray:
    """Keep the tokens that start a word (a space, then ASCII letters), in their given order.

    With a truncated vocabulary many tokens are pieces inside words; restricting a search to
    word tokens gives skip-trigrams that read as text.
    """
    strings = _strings(tokenizer)
    return np.array([t for t in tokens if WORD_PATTERN.fullmatch(strings[int(t)])], dtype=np.int64)


def _strings(tokenizer: Tokenizer | Sequence[str]) -> list[str]:
    return tokenizer.vocabulary_strings if isinstance(tokenizer, Tokenizer) else list(tokenizer)


def _as_ids(tokens: Sequence[int], d_vocab: int, name: str) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of token ids")
    if ids.min() < 0 or ids.max() >= d_vocab:
        raise ValueError(
            f"{name} must be ids in [0, {d_vocab}), got range [{ids.min()}, {ids.max()}]"
        )
    return ids


def _best_pairings(
    log_counts: torch.Tensor, counts: torch.Tensor, min_pair_count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pairing per source from [sources, n_dest, n_out] log counts and raw counts.

    Returns the log odds ratio [sources, n_dest, n_dest, n_out, n_out] and a mask of the
    admissible quadruples (distinct destinations and outputs, both paired bigrams frequent).
    Axes: (source, d1, d2, o1, o2).
    """
    paired = log_counts[:, :, None, :, None] + log_counts[:, None, :, None, :]
    crossed = log_counts[:, :, None, None, :] + log_counts[:, None, :, :, None]
    log_odds = paired - crossed

    n_dest, n_out = log_counts.shape[1:]
    distinct_dest = ~torch.eye(n_dest, dtype=torch.bool)[:, :, None, None]
    distinct_out = ~torch.eye(n_out, dtype=torch.bool)[None, None, :, :]
    frequent = counts >= min_pair_count
    both_frequent = frequent[:, :, None, :, None] & frequent[:, None, :, None, :]
    return log_odds, both_frequent & distinct_dest & distinct_out


@torch.no_grad()
def find_skip_trigram_bugs(
    model: AttnOnlyTransformer,
    counts: BigramCounts,
    tokenizer: Tokenizer | Sequence[str],
    sources: Sequence[int],
    candidates: Sequence[int],
    layer: int = 0,
    n_top: int = 8,
    min_pair_count: int = 20,
    min_log_odds: float = math.log(100),
    per_head: int | None = None,
) -> pd.DataFrame:
    """Search every head of ``layer`` for skip-trigram bugs (see the module docstring).

    ``sources`` are the candidate source tokens and ``candidates`` the tokens allowed as
    destinations and outputs (for example the most frequent tokens of the corpus). Returns one row
    per (head, source) with an admissible quadruple, columns ``BUG_COLUMNS``, sorted by
    ``strength`` (the smaller OV score, in logits) descending. ``qk_score_*`` are attention scores
    of d1 and d2 on s, with the 1/sqrt(d_head) scale; ``ov_score_*`` the logit changes of o1 and o2.
    ``per_head`` keeps only each head's strongest rows, at most that many.
    """
    check_head(model, layer)
    d_vocab = model.cfg.d_vocab
    if counts.d_vocab != d_vocab:
        raise ValueError(f"the counts have d_vocab={counts.d_vocab} but the model has {d_vocab}")
    source_ids = _as_ids(sources, d_vocab, "sources")
    candidate_ids = _as_ids(candidates, d_vocab, "candidates")
    if per_head is not None and per_head < 1:
        raise ValueError(f"per_head must be positive or None, got {per_head}")
    if not 2 <= n_top <= len(candidate_ids):
        raise ValueError(
            f"n_top must be in [2, {len(candidate_ids)}] (the number of candidates), got {n_top}"
        )
    strings = _strings(tokenizer)

    ov = ov_circuits(model, layer)
    qk = qk_circuits(model, layer)
    scale = 1.0 / math.sqrt(model.cfg.d_head)
    dense_counts = torch.from_numpy(counts.dense())
    log_counts_all = (dense_counts.double() + 0.5).log()

    rows = []
    for head in range(model.cfg.n_heads):
        # OV rows of the sources over candidate outputs, and QK scores of candidate destinations
        # (queries) on each source (key): both [source, candidate].
        ov_scores = ov.A[head, source_ids] @ ov.B[head][:, candidate_ids]
        qk_scores = (qk.A[head, candidate_ids] @ qk.B[head][:, source_ids]).T * scale
        ov_top = ov_scores.topk(n_top, dim=1)
        qk_top = qk_scores.topk(n_top, dim=1)
        outputs = candidate_ids[ov_top.indices]  # [source, n_top]
        destinations = candidate_ids[qk_top.indices]

        pair_counts = dense_counts[destinations[:, :, None], outputs[:, None, :]]
        pair_log_counts = log_counts_all[destinations[:, :, None], outputs[:, None, :]]
        log_odds, admissible = _best_pairings(pair_log_counts, pair_counts, min_pair_count)
        admissible &= log_odds >= min_log_odds

        # Strength of a quadruple: the smaller of its two OV scores.
        ov_values = ov_top.values
        strength = torch.minimum(
            ov_values[:, None, None, :, None], ov_values[:, None, None, None, :]
        )
        strength = strength.expand_as(log_odds).masked_fill(~admissible, float("-inf"))
        flat = strength.flatten(1)
        best = flat.argmax(1)
        for row, source in enumerate(source_ids.tolist()):
            if not torch.isfinite(flat[row, best[row]]):
                continue
            i1, i2, j1, j2 = np.unravel_index(int(best[row]), tuple(strength.shape[1:]))
            d1, d2 = int(destinations[row, i1]), int(destinations[row, i2])
            o1, o2 = int(outputs[row, j1]), int(outputs[row, j2])
            rows.append({
                "name": head_name(layer, head),
                "layer": layer,
                "head": head,
                "source": source,
                "destination_1": d1,
                "destination_2": d2,
                "output_1": o1,
                "output_2": o2,
                "source_str": strings[source],
                "destination_1_str": strings[d1],
                "destination_2_str": strings[d2],
                "output_1_str": strings[o1],
                "output_2_str": strings[o2],
                "qk_score_1": float(qk_top.values[row, i1]),
                "qk_score_2": float(qk_top.values[row, i2]),
                "ov_score_1": float(ov_values[row, j1]),
                "ov_score_2": float(ov_values[row, j2]),
                "log_odds_ratio": float(log_odds[row, i1, i2, j1, j2]),
                "strength": float(strength[row, i1, i2, j1, j2]),
            })

    frame = pd.DataFrame(rows, columns=BUG_COLUMNS)
    frame = frame.sort_values("strength", ascending=False, kind="stable")
    if per_head is not None:
        frame = frame.groupby(["layer", "head"], sort=False).head(per_head)
    return frame.reset_index(drop=True)


@torch.no_grad()
def skip_trigram_bug_effects(
    model: AttnOnlyTransformer,
    bugs: pd.DataFrame,
    counts: BigramCounts,
    tokenizer: Tokenizer | Sequence[str],
) -> pd.DataFrame:
    """Measure each quadruple of ``bugs`` on the model: four rows per example.

    For destination d in (d1, d2) the model runs on [BOS, s, d]. Each row gives, at the last
    position, the head's attention on s, the head's term of the path expansion for output o
    (``head_effect``, in logits, centred over the vocabulary so that rows compare across
    destinations), and the corpus's P(o | d). ``paired`` is True for (d1, o1) and (d2, o2), the
    continuations the head was found for, and False for the two crossed ones.
    """
    strings = _strings(tokenizer)
    bos = model.cfg.d_vocab - 1
    corpus_rows = {}
    rows = []
    for example, bug in enumerate(bugs.itertuples(index=False)):
        layer, head = int(bug.layer), int(bug.head)
        check_head(model, layer, head)
        destinations = [int(bug.destination_1), int(bug.destination_2)]
        outputs = [int(bug.output_1), int(bug.output_2)]
        tokens = torch.tensor([[bos, int(bug.source), d] for d in destinations])

        expansion = path_expansion(model, tokens)
        term = expansion.heads[layer, head, :, -1]  # [destination, d_vocab]
        term = term - term.mean(-1, keepdim=True)
        _, cache = model.run_with_cache(tokens)
        attention = cache.patterns[layer][:, head, -1, 1]

        for i, destination in enumerate(destinations):
            if destination not in corpus_rows:
                row = counts.row(destination).astype(np.float64)
                corpus_rows[destination] = row / max(row.sum(), 1.0)
            for j, output in enumerate(outputs):
                rows.append({
                    "example": example,
                    "name": head_name(layer, head),
                    "source": int(bug.source),
                    "destination": destination,
                    "output": output,
                    "source_str": strings[int(bug.source)],
                    "destination_str": strings[destination],
                    "output_str": strings[output],
                    "paired": i == j,
                    "attention_to_source": float(attention[i]),
                    "head_effect": float(term[i, output]),
                    "corpus_prob": float(corpus_rows[destination][output]),
                })
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def crossed_to_paired_ratio(effects: pd.DataFrame) -> pd.Series:
    """Per example, the head's mean effect on the crossed continuations over the paired ones.

    A ratio near 1 means the head raises "s … d1 → o2" as much as the continuations it was found
    for, as the factored QK and OV circuits predict when both destinations attend alike.
    """
    grouped = effects.groupby(["example", "paired"])["head_effect"].mean().unstack("paired")
    return (grouped[False] / grouped[True]).rename("crossed_to_paired")
