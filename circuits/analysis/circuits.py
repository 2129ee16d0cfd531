"""OV and QK circuits of single heads, their eigenvalues, and copying scores.

Convention: row vectors, as in ``circuits.model``. A head reads a residual row x as ``x @ W_Q``,
so ``W_QK = W_Q @ W_Kᵀ`` and ``W_OV = W_V @ W_O`` are d_model x d_model. Elhage et al. (2021),
"A Mathematical Framework for Transformer Circuits", use column vectors, where the same maps read
W_QK = W_Qᵀ W_K and W_OV = W_O W_V. Their OV circuit ``W_U W_O W_V W_E`` [output, source] is the
transpose of the ``W_E W_V W_O W_U`` [source, output] used here.

Effective embedding and unembedding. The circuits go through the layernorms as follows.

- ``W_E_eff`` for a head in layer l is layer l's ``ln1`` applied to every row of W_E, gain and
  bias included: ``W_E_eff[t] = (W_E[t] - mean(W_E[t])) / sqrt(var(W_E[t]) + eps) * w + b``. This
  is exact in layer 0, whose residual stream holds only the token embedding (positions enter the
  queries and keys only, after the layernorm). In later layers the residual also contains earlier
  heads' outputs, so the circuit describes only the direct path from the embedding.
- ``W_U_eff`` is the final layernorm's gain folded into W_U and then centred over d_model:
  ``M = diag(w_final) W_U``, ``W_U_eff = M - M.mean(0)``. The layernorm centres the residual
  before the gain, and for any mean-zero row x, ``x @ M.mean(0)`` summed is 0, so
  ``h @ W_U_eff = centred(h) @ diag(w_final) @ W_U`` for every head output h. Two factors are left
  out: the final layernorm's division by the residual's standard deviation (a positive number
  per position, so it rescales but never reorders a row), and its bias's term ``b_final @ W_U``
  (the same for every source token, so not part of any head's circuit).
- Without layernorm (``normalization_type=None``) both are the plain W_E and W_U.

The factors are computed in float64, so eigenvalues of nearly singular products stay accurate.
NOTE: with ``smear_keys`` the key at position j mixes the keys of tokens j and j - 1; the QK
circuits here describe the unmixed bilinear form only.
"""

from __future__ import annotations

import pandas as pd
import torch

from circuits.factored import FactoredMatrix
from circuits.model import AttnOnlyTransformer, LayerNorm, ModelConfig


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def check_head(model: AttnOnlyTransformer, layer: int, head: int | None = None) -> None:
    """Raise ValueError unless ``layer`` (and ``head``, when given) exist in the model."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be in [0, {cfg.n_layers}), got {layer}")
    if head is not None and not 0 <= head < cfg.n_heads:
        raise ValueError(f"head must be in [0, {cfg.n_heads}), got {head}")


def layer_norm_rows(x: torch.Tensor, ln: LayerNorm | None) -> torch.Tensor:
    """Apply a model layernorm to every row of x in float64 (the identity when ``ln`` is None)."""
    x = x.detach().double()
    if ln is None:
        return x
    centred = x - x.mean(-1, keepdim=True)
    normed = centred / (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    return normed * ln.w.detach().double() + ln.b.detach().double()


@torch.no_grad()
def effective_embedding(model: AttnOnlyTransformer, layer: int) -> torch.Tensor:
    """Apply ``layer``'s ln1 to each row of W_E, giving ``W_E_eff`` [d_vocab, d_model]."""
    check_head(model, layer)
    return layer_norm_rows(model.embed.W_E, model.blocks[layer].ln1)


@torch.no_grad()
def effective_unembedding(model: AttnOnlyTransformer) -> torch.Tensor:
    """Fold the final gain into W_U and centre it over d_model, giving ``W_U_eff``."""
    W_U = model.unembed.W_U.detach().double()
    if model.ln_final is None:
        return W_U
    folded = model.ln_final.w.detach().double()[:, None] * W_U
    return folded - folded.mean(0, keepdim=True)


@torch.no_grad()
def _ov_factors(model: AttnOnlyTransformer, layer: int, heads: int | slice) -> FactoredMatrix:
    attn = model.blocks[layer].attn
    W_E_eff = effective_embedding(model, layer)
    W_U_eff = effective_unembedding(model)
    left = W_E_eff @ attn.W_V[heads].detach().double()  # [(head,) d_vocab, d_head]
    right = attn.W_O[heads].detach().double() @ W_U_eff  # [(head,) d_head, d_vocab]
    return FactoredMatrix(left, right)


@torch.no_grad()
def _qk_factors(model: AttnOnlyTransformer, layer: int, heads: int | slice) -> FactoredMatrix:
    attn = model.blocks[layer].attn
    W_E_eff = effective_embedding(model, layer)
    queries = W_E_eff @ attn.W_Q[heads].detach().double()  # [(head,) d_vocab, d_head]
    keys = W_E_eff @ attn.W_K[heads].detach().double()
    return FactoredMatrix(queries, keys.transpose(-1, -2))


def ov_circuits(model: AttnOnlyTransformer, layer: int) -> FactoredMatrix:
    """OV circuits of every head in ``layer``, [n_heads, source token, output token].

    Entry [h, s, o] is ``W_E_eff[s] @ W_V^h @ W_O^h @ W_U_eff[:, o]``: the logit change of output
    token o when head h attends fully to a key whose token is s. Factored with inner dim d_head.
    """
    check_head(model, layer)
    return _ov_factors(model, layer, slice(None))


def ov_circuit(model: AttnOnlyTransformer, layer: int, head: int) -> FactoredMatrix:
    """OV circuit ``W_E_eff W_V W_O W_U_eff`` [source token, output token] of one head."""
    check_head(model, layer, head)
    return _ov_factors(model, layer, head)


def qk_circuits(model: AttnOnlyTransformer, layer: int) -> FactoredMatrix:
    """QK circuits of every head in ``layer``, [n_heads, query token, key token].

    Entry [h, d, s] is ``W_E_eff[d] @ W_Q^h @ W_K^hᵀ @ W_E_eff[s]``, the token-token term of the
    attention score before the 1/sqrt(d_head) scale. The positional terms are left out (see
    ``positional_qk``).
    """
    check_head(model, layer)
    return _qk_factors(model, layer, slice(None))


def qk_circuit(model: AttnOnlyTransformer, layer: int, head: int) -> FactoredMatrix:
    """QK circuit ``W_E_eff W_Q W_Kᵀ W_E_effᵀ`` [query token, key token] of one head, unscaled."""
    check_head(model, layer, head)
    return _qk_factors(model, layer, head)


@torch.no_grad()
def positional_qk(model: AttnOnlyTransformer, layer: int, head: int) -> torch.Tensor:
    """Position-position attention term ``W_pos W_Q W_Kᵀ W_posᵀ`` [query pos, key pos], dense.

    Unscaled (divide by sqrt(d_head) for the score's units). Positions enter the queries and keys
    without a layernorm, so this term is exact in every layer. Entries above the diagonal are
    masked in the model and carry no meaning.
    """
    check_head(model, layer, head)
    attn = model.blocks[layer].attn
    W_pos = model.pos_embed.W_pos.detach().double()
    queries = W_pos @ attn.W_Q[head].detach().double()
    keys = W_pos @ attn.W_K[head].detach().double()
    return queries @ keys.T


@torch.no_grad()
def direct_path(model: AttnOnlyTransformer) -> FactoredMatrix:
    """Direct path ``LN_final(W_E) @ W_U`` [token, next-token logit].

    Row t is exactly the logits that a model without layers gives after token t. In a model with
    layers it is the part of the logits that skips every head. The final layernorm is applied in
    full (gain and bias) to each embedding row, so W_U is used as it is.
    """
    W_E_final = layer_norm_rows(model.embed.W_E, model.ln_final)
    return FactoredMatrix(W_E_final, model.unembed.W_U.detach().double())


def copying_score(circuit: FactoredMatrix) -> torch.Tensor:
    """Return ``Σ Re(λ) / Σ |λ|`` over the eigenvalues λ of a square circuit, per batch entry.

    The score is in [-1, 1]: +1 when every eigenvalue is positive real (the circuit raises the
    logits of the tokens it reads, as a copying head does), -1 when all are negative real. The
    eigenvalues come from the small r x r product, so the d_vocab x d_vocab matrix is never built.
    A circuit whose eigenvalues are all zero gets NaN.
    """
    eigenvalues = circuit.eigenvalues()
    return eigenvalues.real.sum(-1) / eigenvalues.abs().sum(-1)


def ov_eigenvalues(model: AttnOnlyTransformer, layer: int, head: int) -> torch.Tensor:
    """Complex eigenvalues [d_head] of a head's OV circuit, as a complex128 tensor."""
    return ov_circuit(model, layer, head).eigenvalues()


def copying_scores(model: AttnOnlyTransformer) -> pd.DataFrame:
    """Copying score of every head's OV circuit.

    Returns a DataFrame with one row per head and columns ``layer``, ``head``, ``name``
    (``L{layer}H{head}``) and ``copying_score``.
    """
    rows = []
    for layer in range(model.cfg.n_layers):
        scores = copying_score(ov_circuits(model, layer))
        for head, score in enumerate(scores.tolist()):
            rows.append(
                {"layer": layer, "head": head, "name": head_name(layer, head),
                 "copying_score": score}
            )
    return pd.DataFrame(rows, columns=["layer", "head", "name", "copying_score"])


def direct_path_copying_score(model: AttnOnlyTransformer) -> float:
    """Copying score of the direct path ``LN_final(W_E) @ W_U`` (see ``direct_path``)."""
    return float(copying_score(direct_path(model)))


def random_control(config: ModelConfig, seed: int = 0) -> pd.DataFrame:
    """``copying_scores`` of a freshly initialised model with this config, as a baseline.

    The model is built under ``torch.manual_seed(seed)`` inside a forked random state, so the
    caller's random stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttnOnlyTransformer(config)
    return copying_scores(model)

