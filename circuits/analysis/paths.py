"""Path expansion of the logits, term importance by order, and pattern-preserving head ablation.

Row vectors, as in ``circuits.model``. The weights are folded (``circuits.folding``), with the
layernorm gains inside W_Q, W_K, W_V, W_U and the writers W_E and W_O centred. So every residual
vector has mean 0, and each layernorm is x ↦ x / σ plus its bias, which is inside b_V and b_U.

Freeze, from one run of the model, every attention pattern A^{l,h} [query, key] and every
per-position layernorm scale σ_l (of the residual read by layer l) and σ_f (read by the
unembedding). Write S_l = diag(1/σ_l) and S_f = diag(1/σ_f) over positions, x_0 = W_E[tokens]
[pos, d_model], W_OV^h = W_V^h W_O^h, and b_O^h = b_V^h W_O^h = β_l W_V^h W_O^h the constant
output of head h (constant because each row of A sums to 1). Then every layer is linear in its
input, and the logits expand exactly into

    order 0:  S_f x_0 W_U                                      (direct path)
              b_U = β_f W_U                                    (final layernorm bias)
    order 1:  S_f A^h S_l x_0 W_OV^h W_U                       (one term per head, any layer)
              S_f 1 b_O^h W_U                                  (the head's bias output)
    order 2:  S_f A^h2 S_1 A^h1 S_0 x_0 W_OV^h1 W_OV^h2 W_U     (virtual head h1 → h2)
              S_f A^h2 S_1 1 b_O^h1 W_OV^h2 W_U                (h1's bias output read by h2)

for 0, 1 and 2 layers (h1 in layer 0, h2 in layer 1). The constant terms from the layernorm
biases join the order of the path that carries them: b_U order 0, a head's b_O order 1, and b_O of
a layer-0 head passed through a layer-1 head order 2. The order of a term is the number of heads
on its path. Query and key biases (which hold the positions) act only through the frozen patterns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis.circuits import head_name
from circuits.analysis.icl import icl_score_from_losses, token_losses
from circuits.folding import (
    FoldedCache,
    FoldedWeights,
    fold_layernorm,
    folded_run_with_cache,
    head_outputs,
    layernorm_scale,
    normalize,
)
from circuits.model import AttnOnlyTransformer

MAX_LAYERS = 2


def _as_folded(model: AttnOnlyTransformer | FoldedWeights, dtype: torch.dtype) -> FoldedWeights:
    """Fold a model in ``dtype``; pass a ``FoldedWeights`` through unchanged."""
    if isinstance(model, FoldedWeights):
        return model
    if isinstance(model, AttnOnlyTransformer):
        return fold_layernorm(model, dtype=dtype)
    raise TypeError(f"expected an AttnOnlyTransformer or FoldedWeights, got {type(model).__name__}")


def _fold_for_paths(
    model: AttnOnlyTransformer | FoldedWeights, dtype: torch.dtype
) -> FoldedWeights:
    """``_as_folded`` plus the checks the expansion needs: at most two layers, centred writers."""
    folded = _as_folded(model, dtype)
    if folded.normalized and not folded.writers_centred:
        raise ValueError(
            "path expansion needs centred writers with layernorm; fold with center_writers=True "
            "(the default)"
        )
    if folded.cfg.n_layers > MAX_LAYERS:
        raise ValueError(
            "path expansion is implemented for 0, 1 and 2 layers, got "
            f"n_layers={folded.cfg.n_layers}"
        )
    return folded


@dataclass(frozen=True)
class PathTerm:
    """One term of the expansion in residual space [batch, pos, d_model], before S_f and W_U.

    ``kind`` is "direct", "head", "head_bias", "virtual" or "virtual_bias"; ``heads`` lists the
    (layer, head) pairs on the path, in the order the path visits them.
    """

    kind: str
    heads: tuple[tuple[int, int], ...]
    residual: torch.Tensor

    @property
    def order(self) -> int:
        return len(self.heads)


def _through_head(
    folded: FoldedWeights, layer: int, head: int, pattern: torch.Tensor, normed: torch.Tensor
) -> torch.Tensor:
    """A^h x̂ W_V^h W_O^h for an already scaled input x̂ [batch, pos, d_model], without b_V."""
    weights = folded.layers[layer]
    values = normed @ weights.W_V[head]
    return (pattern[:, head] @ values) @ weights.W_O[head]


def iter_path_terms(
    folded: FoldedWeights, tokens: torch.Tensor, cache: FoldedCache
) -> Iterator[PathTerm]:
    """Yield every term of the expansion (see the module docstring) except b_U, in residual space.

    ``cache`` comes from ``folded_run_with_cache(folded, tokens)`` and supplies the frozen patterns
    and scales. The sum of all yielded residuals equals the final residual ``cache.resid_pre[-1]``.
    """
    inverse_scales = [1 / scale for scale in cache.scales]
    embedding = folded.W_E[tokens]
    batch_shape = embedding.shape
    yield PathTerm("direct", (), embedding)

    layer_zero_outputs = []
    for layer in range(folded.cfg.n_layers):
        bias_outputs = folded.layers[layer].b_O
        for head in range(folded.cfg.n_heads):
            through = _through_head(
                folded, layer, head, cache.patterns[layer], embedding * inverse_scales[layer]
            )
            if layer == 0:
                layer_zero_outputs.append(through)
            yield PathTerm("head", ((layer, head),), through)
            yield PathTerm("head_bias", ((layer, head),), bias_outputs[head].expand(batch_shape))

    if folded.cfg.n_layers == 2:
        bias_outputs = folded.layers[0].b_O
        for source in range(folded.cfg.n_heads):
            source_bias = bias_outputs[source].expand(batch_shape)
            for target in range(folded.cfg.n_heads):
                heads = ((0, source), (1, target))
                yield PathTerm("virtual", heads, _through_head(
                    folded, 1, target, cache.patterns[1],
                    layer_zero_outputs[source] * inverse_scales[1],
                ))
                yield PathTerm("virtual_bias", heads, _through_head(
                    folded, 1, target, cache.patterns[1], source_bias * inverse_scales[1]
                ))


def _unembed(folded: FoldedWeights, cache: FoldedCache, residual: torch.Tensor) -> torch.Tensor:
    """S_f residual W_U, without b_U."""
    return (residual / cache.scales[-1]) @ folded.W_U


@dataclass
class PathExpansion:
    """The logits [batch, pos, d_vocab] split into the path terms of the module docstring.

    ``direct`` and ``unembed_bias`` (b_U, [d_vocab]) are order 0; ``heads[l, h]`` and
    ``head_bias[l, h]`` [n_layers, n_heads, batch, pos, d_vocab] order 1; ``virtual[h1, h2]`` and
    ``virtual_bias[h1, h2]`` [n_heads, n_heads, batch, pos, d_vocab] order 2 (None with fewer than
    two layers). ``logits`` are the folded model's own logits from the same run.
    """

    direct: torch.Tensor
    unembed_bias: torch.Tensor
    heads: torch.Tensor
    head_bias: torch.Tensor
    virtual: torch.Tensor | None
    virtual_bias: torch.Tensor | None
    logits: torch.Tensor

    def order(self, order: int) -> torch.Tensor:
        """Sum of the terms of one order, biases included [batch, pos, d_vocab]."""
        if order == 0:
            return self.direct + self.unembed_bias
        if order == 1:
            return (self.heads + self.head_bias).sum((0, 1))
        if order == 2:
            if self.virtual is None:
                return torch.zeros_like(self.direct)
            return (self.virtual + self.virtual_bias).sum((0, 1))
        raise ValueError(f"order must be 0, 1 or 2, got {order}")

    def total(self) -> torch.Tensor:
        """Sum of all terms; equals ``logits`` up to rounding."""
        return self.order(0) + self.order(1) + self.order(2)


@torch.no_grad()
def path_expansion(
    model: AttnOnlyTransformer | FoldedWeights,
    tokens: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> PathExpansion:
    """Expand the logits of a 0-, 1- or 2-layer model on ``tokens`` into path terms.

    A model is folded in ``dtype`` first. Memory grows as n_heads² x batch x pos x d_vocab, so use a
    few short sequences; ``term_importance`` streams the terms instead.
    """
    folded = _fold_for_paths(model, dtype)
    logits, cache = folded_run_with_cache(folded, tokens)
    cfg = folded.cfg
    shape = (*tokens.shape, cfg.d_vocab)
    heads = logits.new_zeros(cfg.n_layers, cfg.n_heads, *shape)
    head_bias = torch.zeros_like(heads)
    virtual = logits.new_zeros(cfg.n_heads, cfg.n_heads, *shape) if cfg.n_layers == 2 else None
    virtual_bias = torch.zeros_like(virtual) if virtual is not None else None
    direct = None

    for term in iter_path_terms(folded, tokens, cache):
        unembedded = _unembed(folded, cache, term.residual)
        if term.kind == "direct":
            direct = unembedded
        elif term.kind in ("head", "head_bias"):
            target = heads if term.kind == "head" else head_bias
            target[term.heads[0]] = unembedded
        else:
            target = virtual if term.kind == "virtual" else virtual_bias
            target[term.heads[0][1], term.heads[1][1]] = unembedded

    return PathExpansion(direct, folded.b_U, heads, head_bias, virtual, virtual_bias, logits)


@dataclass
class TermImportance:
    """Mean next-token losses (nats) of partial sums of the path expansion.

    Over all predicted positions of all windows, with patterns and scales frozen from the full
    model on those windows:

    - ``loss_order0``: logits = order-0 terms (direct path + b_U);
    - ``loss_order0_plus_layer[l]``: order 0 plus the order-1 terms of layer l's heads only;
    - ``loss_upto_order1``: order 0 plus all order-1 terms;
    - ``loss_upto_order2``: all terms, which equals ``loss_full`` (None for fewer than two layers);
    - ``loss_full``: the model's own loss; ``uniform_loss``: log(d_vocab), the loss of zero logits.

    The marginal loss reduction of order k is the loss with the terms up to order k − 1 minus the
    loss with the terms up to order k, with uniform_loss in place of "up to order −1". The
    layer-l share of order 1 is ``loss_order0 − loss_order0_plus_layer[l]``, and the layer shares
    need not add up to the whole order-1 reduction.
    """

    loss_order0: float
    loss_order0_plus_layer: list[float]
    loss_upto_order1: float | None
    loss_upto_order2: float | None
    loss_full: float
    uniform_loss: float
    n_tokens: int

    def marginal_reductions(self) -> pd.DataFrame:
        """Tabulate each term group: ``terms``, ``loss`` with them added, ``reduction`` (nats)."""
        rows = [{"terms": "order 0", "loss": self.loss_order0,
                 "reduction": self.uniform_loss - self.loss_order0}]
        if self.loss_upto_order1 is not None:
            rows.append({"terms": "order 1", "loss": self.loss_upto_order1,
                         "reduction": self.loss_order0 - self.loss_upto_order1})
            for layer, loss in enumerate(self.loss_order0_plus_layer):
                rows.append({"terms": f"order 1, layer {layer}", "loss": loss,
                             "reduction": self.loss_order0 - loss})
        if self.loss_upto_order2 is not None:
            rows.append({"terms": "order 2", "loss": self.loss_upto_order2,
                         "reduction": self.loss_upto_order1 - self.loss_upto_order2})
        return pd.DataFrame(rows, columns=["terms", "loss", "reduction"])


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def term_importance(
    model: AttnOnlyTransformer | FoldedWeights,
    windows: torch.Tensor,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> TermImportance:
    """Losses of the partial sums of the path expansion over ``windows`` (see ``TermImportance``).

    The terms are summed in residual space batch by batch, so memory stays at a few
    [batch, pos, d_model] tensors. ``dtype`` is the precision of the folded weights.
    """
    folded = _fold_for_paths(model, dtype)
    _check_batch_size(batch_size)
    n_layers = folded.cfg.n_layers
    sums = {"order0": 0.0, "upto1": 0.0, "upto2": 0.0, "full": 0.0}
    layer_sums = [0.0] * n_layers
    n_tokens = 0

    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits, cache = folded_run_with_cache(folded, batch)
        by_order = [torch.zeros_like(cache.resid_pre[0]) for _ in range(3)]
        by_layer = [torch.zeros_like(cache.resid_pre[0]) for _ in range(n_layers)]
        for term in iter_path_terms(folded, batch, cache):
            by_order[term.order] += term.residual
            if term.order == 1:
                by_layer[term.heads[0][0]] += term.residual

        def loss_sum(residual: torch.Tensor) -> float:
            partial = _unembed(folded, cache, residual) + folded.b_U
            return float(token_losses(partial, batch).double().sum())

        sums["order0"] += loss_sum(by_order[0])
        sums["upto1"] += loss_sum(by_order[0] + by_order[1])
        sums["upto2"] += loss_sum(by_order[0] + by_order[1] + by_order[2])
        sums["full"] += float(token_losses(logits, batch).double().sum())
        for layer in range(n_layers):
            layer_sums[layer] += loss_sum(by_order[0] + by_layer[layer])
        n_tokens += batch.shape[0] * (batch.shape[1] - 1)

    if n_tokens == 0:
        raise ValueError("windows must hold at least one window of two or more tokens")
    return TermImportance(
        loss_order0=sums["order0"] / n_tokens,
        loss_order0_plus_layer=[total / n_tokens for total in layer_sums],
        loss_upto_order1=sums["upto1"] / n_tokens if n_layers >= 1 else None,
        loss_upto_order2=sums["upto2"] / n_tokens if n_layers >= 2 else None,
        loss_full=sums["full"] / n_tokens,
        uniform_loss=math.log(folded.cfg.d_vocab),
        n_tokens=n_tokens,
    )


def _check_heads(folded: FoldedWeights, heads) -> set[tuple[int, int]]:
    checked = set()
    for item in heads:
        layer, head = item
        if not (0 <= layer < folded.cfg.n_layers and 0 <= head < folded.cfg.n_heads):
            raise ValueError(
                f"head {item!r} is out of range: layers 0–{folded.cfg.n_layers - 1}, heads "
                f"0–{folded.cfg.n_heads - 1}"
            )
        checked.add((int(layer), int(head)))
    return checked


def _frozen_pattern_logits(
    folded: FoldedWeights,
    tokens: torch.Tensor,
    cache: FoldedCache,
    removed: set[tuple[int, int]],
    freeze_scales: bool,
) -> torch.Tensor:
    resid = folded.W_E[tokens]
    for layer, weights in enumerate(folded.layers):
        scale = cache.scales[layer] if freeze_scales else layernorm_scale(folded, resid)
        outputs = head_outputs(weights, normalize(folded, resid, scale), cache.patterns[layer])
        for removed_layer, head in removed:
            if removed_layer == layer:
                outputs[:, :, head] = 0
        resid = resid + outputs.sum(2)
    scale = cache.scales[-1] if freeze_scales else layernorm_scale(folded, resid)
    return normalize(folded, resid, scale) @ folded.W_U + folded.b_U


@torch.no_grad()
def ablate_heads(
    model: AttnOnlyTransformer | FoldedWeights,
    tokens: torch.Tensor,
    heads: list[tuple[int, int]],
    freeze_scales: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Logits with the outputs of ``heads`` removed while every attention pattern stays frozen.

    Pattern-preserving ablation: run the model once to record every pattern (and layernorm scale),
    then run it again with those patterns, setting the listed heads' outputs (including their
    bias outputs b_O) to zero. Later heads still read the changed residual through their values,
    but attend exactly as before. With ``freeze_scales`` the layernorm scales stay frozen too, so
    the result is the path expansion without every term whose path visits a removed head. Without
    it, the layernorms are recomputed from the changed residual.
    """
    folded = _as_folded(model, dtype)
    removed = _check_heads(folded, heads)
    _, cache = folded_run_with_cache(folded, tokens)
    return _frozen_pattern_logits(folded, tokens, cache, removed, freeze_scales)


@torch.no_grad()
def head_ablation_icl(
    model: AttnOnlyTransformer | FoldedWeights,
    windows: torch.Tensor,
    heads: list[tuple[int, int]] | None = None,
    freeze_scales: bool = True,
    late_index: int | None = None,
    early_index: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> pd.DataFrame:
    """Score in-context learning with each head ablated in turn (``ablate_heads``, one at a time).

    Returns one row per head (default: every head) with ``name``, ``layer``, ``head``,
    ``icl_score`` (the unablated model), ``ablated_icl_score``, ``change`` (ablated − unablated;
    positive means the head helps the model use its context) and ``ablated_loss`` (mean loss over
    all predicted tokens). Scores are late-index minus early-index mean losses, as in
    ``circuits.analysis.icl``.
    """
    folded = _as_folded(model, dtype)
    _check_batch_size(batch_size)
    cfg = folded.cfg
    if heads is None:
        heads = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    heads = [tuple(item) for item in heads]
    _check_heads(folded, heads)

    n_pos = windows.shape[1]
    clean_sum = torch.zeros(n_pos - 1, dtype=torch.float64)
    ablated_sums = {item: torch.zeros(n_pos - 1, dtype=torch.float64) for item in heads}
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits, cache = folded_run_with_cache(folded, batch)
        clean_sum += token_losses(logits, batch).double().sum(0)
        for item in heads:
            ablated = _frozen_pattern_logits(folded, batch, cache, {item}, freeze_scales)
            ablated_sums[item] += token_losses(ablated, batch).double().sum(0)

    n_windows = windows.shape[0]
    clean = icl_score_from_losses(clean_sum / n_windows, n_windows, late_index, early_index)
    rows = []
    for (layer, head), total in ablated_sums.items():
        means = total / n_windows
        ablated = icl_score_from_losses(means, n_windows, late_index, early_index)
        rows.append({
            "name": head_name(layer, head),
            "layer": layer,
            "head": head,
            "icl_score": clean.score,
            "ablated_icl_score": ablated.score,
            "change": ablated.score - clean.score,
            "ablated_loss": float(means.mean()),
        })
    return pd.DataFrame(rows, columns=["name", "layer", "head", "icl_score", "ablated_icl_score",
                                       "change", "ablated_loss"])
