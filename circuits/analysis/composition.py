"""Q-, K- and V-composition scores between heads in different layers.

Convention: row vectors, as in ``circuits.model``. A head reads a residual row x as ``x @ W_Q``, so
its QK circuit is W_QK = W_Q W_Kᵀ and its OV circuit is W_OV = W_V W_O, both d_model x d_model
(Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", use column vectors and
write the same maps as W_QK = W_Qᵀ W_K and W_OV = W_O W_V).

Derivation. A source head h1 writes y = x W_OV^h1 into the residual stream, where x is the vector it
reads at the attended position. A later target head h2 reads y in three places:

- as part of its query: the score with a key input k_in is (y W_Q^h2)(k_in W_K^h2)ᵀ
  = x (W_OV^h1 W_QK^h2) k_inᵀ, so Q-composition measures W_OV^h1 W_QK^h2;
- as part of its key: the score with a query input q_in is q_in W_QK^h2 (x W_OV^h1)ᵀ
  = x (W_OV^h1 (W_QK^h2)ᵀ) q_inᵀ, so K-composition measures W_OV^h1 (W_QK^h2)ᵀ;
- as part of its value: y W_OV^h2 = x (W_OV^h1 W_OV^h2), so V-composition measures W_OV^h1 W_OV^h2.

Each score divides the Frobenius norm of the product by the product of its two factors' norms:

    Q = ‖W_OV^h1 W_QK^h2‖_F / (‖W_OV^h1‖_F ‖W_QK^h2‖_F)
    K = ‖W_OV^h1 (W_QK^h2)ᵀ‖_F / (‖W_OV^h1‖_F ‖W_QK^h2‖_F)
    V = ‖W_OV^h1 W_OV^h2‖_F / (‖W_OV^h1‖_F ‖W_OV^h2‖_F)

Transposing every matrix gives the column-vector forms of Elhage et al. ‖(W_QK^h2)ᵀ W_OV^h1‖,
‖W_QK^h2 W_OV^h1‖ and ‖W_OV^h2 W_OV^h1‖. The order of the factors matters. A cyclic permutation
such as W_QK^h2 W_OV^h1 in place of W_OV^h1 W_QK^h2 has the same trace but, in general, a different
Frobenius norm. The scores are computed from exactly these products, and
``tests/test_composition.py`` compares them with dense matrices.

Weights with layernorm: W_Q, W_K, W_V carry their layernorm's gain and W_O is centred over d_model
(``circuits.folding.fold_layernorm``). Biases and positions do not enter the scores. Every norm
comes from r x r Gram matrices of the factors (r = d_head, see ``_scores_from_factors``), so no
d_model x d_model product is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis.circuits import head_name
from circuits.folding import FoldedWeights, fold_layernorm, layernorm_scale
from circuits.model import AttnOnlyTransformer

COMPOSITION_KINDS = ("q", "k", "v")


def _as_folded(model: AttnOnlyTransformer | FoldedWeights) -> FoldedWeights:
    """Fold an ``AttnOnlyTransformer`` in float64; pass a ``FoldedWeights`` through unchanged."""
    if isinstance(model, FoldedWeights):
        return model
    if isinstance(model, AttnOnlyTransformer):
        return fold_layernorm(model, dtype=torch.float64)
    raise TypeError(f"expected an AttnOnlyTransformer or FoldedWeights, got {type(model).__name__}")


def _check_layers(folded: FoldedWeights, source_layer: int, target_layer: int) -> None:
    n_layers = folded.cfg.n_layers
    for name, layer in (("source_layer", source_layer), ("target_layer", target_layer)):
        if not 0 <= layer < n_layers:
            raise ValueError(f"{name} must be in [0, {n_layers}), got {layer}")
    if source_layer >= target_layer:
        raise ValueError(
            f"the source head's layer must come before the target's: got source_layer="
            f"{source_layer}, target_layer={target_layer}"
        )


def _gram(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """MᵀM for a [.., d_model, r] factor ("columns") or MMᵀ for a [.., r, d_model] one ("rows")."""
    if side == "columns":
        return matrix.transpose(-1, -2) @ matrix
    return matrix @ matrix.transpose(-1, -2)


def _squared_norm(left_gram: torch.Tensor, middle: torch.Tensor, right_gram: torch.Tensor):
    """‖A M B‖_F² = tr(Mᵀ (AᵀA) M (BBᵀ)) from the r x r Gram matrices of A and B."""
    # tr(Xᵀ Y) is the sum of the elementwise product of X and Y.
    return ((left_gram @ middle) * (middle @ right_gram)).sum((-1, -2))


def _scores_from_factors(
    V1: torch.Tensor, O1: torch.Tensor, Q2: torch.Tensor, K2: torch.Tensor,
    V2: torch.Tensor, O2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V scores for factors with broadcastable batch axes (sources first, targets second).

    V1, Q2, K2, V2 are [..., d_model, d_head]; O1 and O2 are [..., d_head, d_model]. With
    W_OV^h1 = V1 O1, W_QK^h2 = Q2 K2ᵀ and W_OV^h2 = V2 O2 the three products are
    V1 (O1 Q2) K2ᵀ, V1 (O1 K2) Q2ᵀ and V1 (O1 V2) O2, each a d_head x d_head core between two
    factors, so ``_squared_norm`` needs only d_head x d_head matrices.
    """
    gram_V1, gram_O1 = _gram(V1, "columns"), _gram(O1, "rows")
    gram_Q2, gram_K2 = _gram(Q2, "columns"), _gram(K2, "columns")
    gram_V2, gram_O2 = _gram(V2, "columns"), _gram(O2, "rows")
    # ‖XY‖_F² = tr((XᵀX)(YYᵀ)) for the factors' own products; the Gram matrices are symmetric.
    ov_source = (gram_V1 * gram_O1).sum((-1, -2)).sqrt()
    qk_target = (gram_Q2 * gram_K2).sum((-1, -2)).sqrt()
    ov_target = (gram_V2 * gram_O2).sum((-1, -2)).sqrt()

    q = _squared_norm(gram_V1, O1 @ Q2, gram_K2).clamp(min=0).sqrt() / (ov_source * qk_target)
    k = _squared_norm(gram_V1, O1 @ K2, gram_Q2).clamp(min=0).sqrt() / (ov_source * qk_target)
    v = _squared_norm(gram_V1, O1 @ V2, gram_O2).clamp(min=0).sqrt() / (ov_source * ov_target)
    return q, k, v


@dataclass
class CompositionScores:
    """Composition scores of every head of ``source_layer`` into every head of ``target_layer``.

    ``q``, ``k``, ``v`` are [n_heads source, n_heads target]; entry [h1, h2] is the score of
    L{source_layer}H{h1} into L{target_layer}H{h2}.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    source_layer: int
    target_layer: int


@torch.no_grad()
def composition_scores(
    model: AttnOnlyTransformer | FoldedWeights, source_layer: int, target_layer: int
) -> CompositionScores:
    """Q-, K- and V-composition scores between two layers (see the module docstring).

    A model is folded in float64 first; a ``FoldedWeights`` is used as it is. NaN marks a pair where
    a factor is the zero matrix.
    """
    folded = _as_folded(model)
    _check_layers(folded, source_layer, target_layer)
    source = folded.layers[source_layer]
    target = folded.layers[target_layer]
    q, k, v = _scores_from_factors(
        source.W_V[:, None], source.W_O[:, None],
        target.W_Q[None], target.W_K[None], target.W_V[None], target.W_O[None],
    )
    return CompositionScores(q=q, k=k, v=v, source_layer=source_layer, target_layer=target_layer)


def all_composition_scores(
    model: AttnOnlyTransformer | FoldedWeights,
) -> dict[tuple[int, int], CompositionScores]:
    """``composition_scores`` for every pair of layers (source_layer < target_layer)."""
    folded = _as_folded(model)
    n_layers = folded.cfg.n_layers
    return {
        (source, target): composition_scores(folded, source, target)
        for source in range(n_layers)
        for target in range(source + 1, n_layers)
    }


@dataclass
class CompositionBaseline:
    """Mean Q, K and V scores of independent Gaussian factors of the model's shapes."""

    q: float
    k: float
    v: float
    n_samples: int
    seed: int

    def as_dict(self) -> dict[str, float]:
        return {"q": self.q, "k": self.k, "v": self.v}


@torch.no_grad()
def composition_baseline(
    d_model: int, d_head: int, n_samples: int = 200, seed: int = 0
) -> CompositionBaseline:
    """Random expectation of the composition scores, as the mean over ``n_samples`` draws.

    Each draw takes six independent matrices with standard normal entries, W_V, W_Q, W_K of shape
    [d_model, d_head] and W_O of shape [d_head, d_model] for the source and the target, and scores
    them exactly as ``composition_scores`` does. The scores do not depend on the scale of a factor,
    so the standard deviation is irrelevant. Deterministic for a given seed.

    Expected value: the source's W_OV has the same distribution as W_OV U for any rotation U, and
    the mean of ‖W_OV U X‖² over uniformly random rotations U is ‖W_OV‖² ‖X‖² / d_model, so
    E[score²] = 1/d_model for all three kinds. The mean score is therefore close to, and by
    Jensen's inequality at most, 1/sqrt(d_model).
    NOTE: the factors are not centred like a folded W_O, a small difference when d_model >> 1.
    """
    for name, value in (("d_model", d_model), ("d_head", d_head), ("n_samples", n_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    generator = torch.Generator().manual_seed(seed)

    def draw(rows: int, columns: int) -> torch.Tensor:
        # Drawn in float32 (about twice as fast as float64 draws), then scored in float64.
        return torch.randn(n_samples, rows, columns, generator=generator).double()

    V1, O1 = draw(d_model, d_head), draw(d_head, d_model)
    Q2, K2 = draw(d_model, d_head), draw(d_model, d_head)
    V2, O2 = draw(d_model, d_head), draw(d_head, d_model)
    q, k, v = _scores_from_factors(V1, O1, Q2, K2, V2, O2)
    return CompositionBaseline(
        q=float(q.mean()), k=float(k.mean()), v=float(v.mean()), n_samples=n_samples, seed=seed
    )


def model_composition_baseline(
    model: AttnOnlyTransformer | FoldedWeights, n_samples: int = 200, seed: int = 0
) -> CompositionBaseline:
    """``composition_baseline`` for a model's d_model and d_head."""
    cfg = model.cfg
    return composition_baseline(cfg.d_model, cfg.d_head, n_samples=n_samples, seed=seed)


def composition_table(
    model: AttnOnlyTransformer | FoldedWeights, baseline: CompositionBaseline | None = None
) -> pd.DataFrame:
    """Tabulate all composition scores, one row per (source head, target head, kind).

    Columns: ``source`` and ``target`` (``L{layer}H{head}``), ``source_layer``, ``source_head``,
    ``target_layer``, ``target_head``, ``composition`` ("q", "k" or "v") and ``score``. With a
    ``baseline``, the column ``baseline`` contains the random expectation of that kind. Only pairs
    with the source in an earlier layer appear, source layer first.
    """
    rows = []
    for (source_layer, target_layer), scores in all_composition_scores(model).items():
        n_source, n_target = scores.q.shape
        for source_head in range(n_source):
            for target_head in range(n_target):
                for kind in COMPOSITION_KINDS:
                    row = {
                        "source": head_name(source_layer, source_head),
                        "target": head_name(target_layer, target_head),
                        "source_layer": source_layer,
                        "source_head": source_head,
                        "target_layer": target_layer,
                        "target_head": target_head,
                        "composition": kind,
                        "score": float(getattr(scores, kind)[source_head, target_head]),
                    }
                    if baseline is not None:
                        row["baseline"] = getattr(baseline, kind)
                    rows.append(row)
    columns = ["source", "target", "source_layer", "source_head", "target_layer", "target_head",
               "composition", "score"] + (["baseline"] if baseline is not None else [])
    return pd.DataFrame(rows, columns=columns)


@dataclass
class KCompositionPositivity:
    """Sign of the induction-style K-composition of each source head into each target head.

    ``pair_ratio`` [n_heads source, n_heads target]: Σ Re λ / Σ |λ| over the eigenvalues of M_h1h2.
    ``weighted_ratio`` and ``weighted_trace`` [n_heads target]: the same ratio and the trace of
    Σ_h1 prev(h1) M_h1h2. ``previous_token_scores`` [n_heads source] are the weights prev(h1).
    """

    pair_ratio: torch.Tensor
    weighted_ratio: torch.Tensor
    weighted_trace: torch.Tensor
    previous_token_scores: torch.Tensor
    source_layer: int
    target_layer: int


def normalized_embedding(folded: FoldedWeights) -> torch.Tensor:
    """Return W_E [d_vocab, d_model] with each row centred and divided by its own σ.

    This is how layer 0 reads the embedding: its layernorm without the gain (folded into W_Q, W_K,
    W_V) and without the bias. Without layernorm it is W_E itself.
    """
    if not folded.normalized:
        return folded.W_E
    centred = folded.W_E - folded.W_E.mean(-1, keepdim=True)
    return centred / layernorm_scale(folded, centred)


@torch.no_grad()
def k_composition_positivity(
    model: AttnOnlyTransformer | FoldedWeights,
    previous_token_scores: torch.Tensor,
    source_layer: int = 0,
    target_layer: int = 1,
) -> KCompositionPositivity:
    """Measure whether target heads attend to keys whose previous token equals the query token.

    For a source head h1 (ideally a previous-token head) and a target head h2,

        M_h1h2 = Ŵ_E W_QK^h2 (W_OV^h1)ᵀ Ŵ_Eᵀ    [query token, token before the key]

    where Ŵ_E is ``normalized_embedding``: the embedding as layer 0's layernorm normalises it,
    before its gain and without its bias. Ŵ_E also represents the query token read by the target
    layer, which approximates that layer's scale σ by the token's own. The biases are left out
    because they do not pair the query token with the key's previous token.
    M[a, b] is the attention score (before 1/sqrt(d_head)) that the query token a gives a key
    whose previous token is b, through h1's output alone. A positive diagonal means "attend where
    the previous token matches me", the induction pattern.

    The ratio Σ Re λ / Σ |λ| of M's eigenvalues is in [-1, 1] (+1: all eigenvalues positive real).
    The eigenvalues come from the d_head x d_head product
    Wᵀ_K2 (W_OV^h1)ᵀ (Ŵ_Eᵀ Ŵ_E) W_Q2, which has the same nonzero eigenvalues as M; the trace of
    Σ_h1 prev(h1) M_h1h2 is that product's trace. ``previous_token_scores`` weights the heads of
    ``source_layer``: a tensor [n_heads], or [n_layers, n_heads] (the shape that
    ``circuits.analysis.attention.previous_token_scores`` returns), whose row ``source_layer`` is
    used.
    """
    folded = _as_folded(model)
    _check_layers(folded, source_layer, target_layer)
    n_heads = folded.cfg.n_heads
    weights = torch.as_tensor(previous_token_scores, dtype=folded.dtype)
    if weights.shape == (folded.cfg.n_layers, n_heads):
        weights = weights[source_layer]
    if weights.shape != (n_heads,):
        raise ValueError(
            f"previous_token_scores must have shape [{n_heads}] (one per head of layer "
            f"{source_layer}) or [{folded.cfg.n_layers}, {n_heads}], got {tuple(weights.shape)}"
        )

    source = folded.layers[source_layer]
    target = folded.layers[target_layer]
    embedding = normalized_embedding(folded)
    gram = embedding.T @ embedding  # [d_model, d_model]
    # small[h1, h2] = K2ᵀ O1ᵀ V1ᵀ G Q2, the d_head x d_head product B A of M = A B.
    keys_side = torch.einsum("tmd,hem,hne->htdn", target.W_K, source.W_O, source.W_V)
    small = keys_side @ (gram @ target.W_Q)[None]  # [h1, h2, d_head, d_head]

    eigenvalues = torch.linalg.eigvals(small)
    pair_ratio = eigenvalues.real.sum(-1) / eigenvalues.abs().sum(-1)
    weighted = torch.einsum("s,stde->tde", weights, small)
    weighted_eigenvalues = torch.linalg.eigvals(weighted)
    weighted_ratio = weighted_eigenvalues.real.sum(-1) / weighted_eigenvalues.abs().sum(-1)
    weighted_trace = weighted.diagonal(dim1=-2, dim2=-1).sum(-1)
    return KCompositionPositivity(
        pair_ratio=pair_ratio,
        weighted_ratio=weighted_ratio,
        weighted_trace=weighted_trace,
        previous_token_scores=weights,
        source_layer=source_layer,
        target_layer=target_layer,
    )
