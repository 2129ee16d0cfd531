"""Name previous-token and induction heads by measured scores, never by index.

Two attention scores per head (``circuits.analysis.attention``):

- the previous-token score, the mean of A[i, i − 1] over queries of natural-text windows;
- the prefix-matching score, the mean attention mass on "the token after an earlier copy of the
  current token" over queries in the second and later repeats of repeated random tokens.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", describe the induction
mechanism of two-layer attention-only models in two steps. A previous-token head in layer 0
writes each token's predecessor into its position. A layer-1 head reads that output through
K-composition, so it attends to the token after an earlier copy of the current one, and its OV
circuit copies that token. ``induction_plane`` places every layer-1 head on
the two axes of that story: the sign of its K-composition with the previous-token heads (QK side)
and the copying score of its OV circuit (OV side).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis.attention import (
    prefix_matching_score_from_patterns,
    prefix_matching_scores,
    previous_token_score_from_patterns,
    previous_token_scores,
)
from circuits.analysis.circuits import copying_scores, head_name
from circuits.analysis.composition import k_composition_positivity
from circuits.model import AttnOnlyTransformer

# A head counts as an induction head when at least this share of its attention, averaged over
# the queries of later repeats, lands on induction targets. A project convention, not the paper's:
# evenly spread attention scores about 0.04 on BOS plus 4 repeats of 25 tokens
# (``uniform_attention_scores``).
INDUCTION_THRESHOLD = 0.3


def uniform_causal_pattern(n_pos: int) -> torch.Tensor:
    """Return the pattern [n_pos, n_pos] of a head that spreads its attention evenly over j <= i."""
    mask = torch.ones(n_pos, n_pos, dtype=torch.float64).tril()
    return mask / mask.sum(-1, keepdim=True)


def uniform_attention_scores(window_length: int, sequence_length: int, period: int) -> dict:
    """Scores of evenly spread causal attention: the level a head must beat to mean anything.

    Returns ``previous_token`` for windows of ``window_length`` tokens and ``prefix_matching`` for
    repeated sequences of ``sequence_length`` tokens with the given ``period``.
    """
    return {
        "previous_token": float(previous_token_score_from_patterns(
            uniform_causal_pattern(window_length))),
        "prefix_matching": float(prefix_matching_score_from_patterns(
            uniform_causal_pattern(sequence_length), period)),
    }


def head_scores(
    model: AttnOnlyTransformer,
    windows: torch.Tensor,
    sequences: torch.Tensor,
    period: int,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Tabulate both scores of every head, one row per head.

    ``windows`` [n, pos] are natural-text windows for the previous-token score; ``sequences`` are
    repeated random tokens with ``period`` (``repeated_random_tokens``) for the prefix-matching
    score. Columns: ``layer``, ``head``, ``name``, ``previous_token_score``,
    ``prefix_matching_score``.
    """
    previous = previous_token_scores(model, windows, batch_size=batch_size)
    prefix = prefix_matching_scores(model, sequences, period, batch_size=batch_size)
    rows = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            rows.append({
                "layer": layer,
                "head": head,
                "name": head_name(layer, head),
                "previous_token_score": float(previous[layer, head]),
                "prefix_matching_score": float(prefix[layer, head]),
            })
    return pd.DataFrame(rows, columns=["layer", "head", "name", "previous_token_score",
                                       "prefix_matching_score"])


@dataclass
class HeadRoles:
    """Heads named by their scores (see ``identify_heads``).

    ``previous_token_head`` and ``top_induction_head`` are (layer, head) pairs;
    ``induction_heads`` lists every head at or above ``threshold``, highest score first, and may
    be empty.
    """

    previous_token_head: tuple[int, int]
    previous_token_score: float
    top_induction_head: tuple[int, int]
    top_prefix_matching_score: float
    induction_heads: list[tuple[int, int]]
    threshold: float

    @property
    def previous_token_name(self) -> str:
        return head_name(*self.previous_token_head)

    @property
    def top_induction_name(self) -> str:
        return head_name(*self.top_induction_head)

    @property
    def induction_names(self) -> list[str]:
        return [head_name(*pair) for pair in self.induction_heads]


def identify_heads(scores: pd.DataFrame, threshold: float = INDUCTION_THRESHOLD) -> HeadRoles:
    """Pick the previous-token head and the induction heads from a ``head_scores`` table.

    The previous-token head is the layer-0 head with the highest previous-token score (the only
    layer whose output a later head can K-compose with in a two-layer model). The top induction
    head is the head with the highest prefix-matching score in any layer. The induction heads
    are every head whose prefix-matching score is at least ``threshold``.
    """
    if scores.empty:
        raise ValueError("the score table is empty: the model has no attention heads")
    first_layer = scores[scores["layer"] == 0]
    previous = first_layer.loc[first_layer["previous_token_score"].idxmax()]
    top = scores.loc[scores["prefix_matching_score"].idxmax()]
    passing = scores[scores["prefix_matching_score"] >= threshold]
    passing = passing.sort_values("prefix_matching_score", ascending=False, kind="stable")
    return HeadRoles(
        previous_token_head=(int(previous["layer"]), int(previous["head"])),
        previous_token_score=float(previous["previous_token_score"]),
        top_induction_head=(int(top["layer"]), int(top["head"])),
        top_prefix_matching_score=float(top["prefix_matching_score"]),
        induction_heads=[(int(row.layer), int(row.head)) for row in passing.itertuples()],
        threshold=threshold,
    )


def induction_plane(model: AttnOnlyTransformer, scores: pd.DataFrame) -> pd.DataFrame:
    """Place every layer-1 head on the QK and OV axes of the induction mechanism.

    Columns: ``name``, ``head``, ``k_composition_positivity`` (Σ Re λ / Σ |λ| of
    Σ_h1 prev(h1) M_h1h2, with layer-0 heads weighted by their previous-token scores, from
    ``k_composition_positivity``), ``copying_score`` (of the head's OV circuit, from
    ``copying_scores``) and ``prefix_matching_score`` (from ``scores``, a ``head_scores``
    table). An induction head sits near (1, 1): its keys match the query token against the
    previous token, and what it reads it copies.
    NOTE: the copying score of a layer-1 head reads the raw token embedding through the layer's
    layernorm, so it describes the head's direct path only, not the copy of a token that arrived
    through V-composition.
    """
    if model.cfg.n_layers < 2:
        raise ValueError(f"the induction plane needs two layers, got n_layers={model.cfg.n_layers}")
    previous = torch.tensor(
        scores[scores["layer"] == 0].sort_values("head")["previous_token_score"].to_numpy()
    )
    positivity = k_composition_positivity(model, previous, source_layer=0, target_layer=1)
    copying = copying_scores(model)
    copying = copying[copying["layer"] == 1].set_index("head")["copying_score"]
    prefix = scores[scores["layer"] == 1].set_index("head")["prefix_matching_score"]
    rows = []
    for head in range(model.cfg.n_heads):
        rows.append({
            "name": head_name(1, head),
            "head": head,
            "k_composition_positivity": float(positivity.weighted_ratio[head]),
            "copying_score": float(copying[head]),
            "prefix_matching_score": float(prefix[head]),
        })
    return pd.DataFrame(rows, columns=["name", "head", "k_composition_positivity",
                                       "copying_score", "prefix_matching_score"])
