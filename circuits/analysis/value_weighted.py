"""Value-weighted attention: how much each attended position actually moves into the residual.

An attention weight gives where a head looks, not how much it writes. For head h of layer l and a
window of tokens, the head's output at query i is Σ_j A[i, j] v_j W_O^h, with the value vector
v_j = LN1_l(x_l[j]) @ W_V^h (row vectors, as in ``circuits.model``). The value-weighted pattern
scales every weight by the size of what that key would write:

    W[i, j] = A[i, j] · ‖v_j W_O^h‖₂

so a key the head attends to but whose value is nearly zero (often BOS, which many heads use as a
resting place) fades out. By the triangle inequality, the norm of the head's output at i is at
most Σ_j W[i, j].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuits.analysis.circuits import head_name
from circuits.model import AttnOnlyTransformer


@dataclass
class ValueWeightedAttention:
    """Attention and value-weighted attention of every head, one entry per layer.

    ``patterns[l]`` and ``weighted[l]`` are [batch, head, query, key]; ``value_norms[l]`` is
    [batch, head, key], the norm ‖v_j W_O^h‖ of what each key position would write.
    """

    patterns: list[torch.Tensor]
    value_norms: list[torch.Tensor]
    weighted: list[torch.Tensor]

    def pattern_stack(self, sequence: int = 0) -> np.ndarray:
        """Stack the attention of one sequence as float32 [n_layers, n_heads, query, key]."""
        return torch.stack([pattern[sequence] for pattern in self.patterns]).float().numpy()

    def weighted_stack(self, sequence: int = 0) -> np.ndarray:
        """Stack the value-weighted attention of one sequence, [n_layers, n_heads, query, key]."""
        return torch.stack([weighted[sequence] for weighted in self.weighted]).float().numpy()

    def first_key_share(self) -> pd.DataFrame:
        """Tabulate the share of each head's attention on key 0 (BOS), plain and value-weighted.

        Over every sequence and every query i >= 1 (query 0 can only attend to key 0):
        ``attention_share`` is the mean of A[i, 0], and ``weighted_share`` is
        Σ_i W[i, 0] / Σ_i Σ_j W[i, j]. A head that parks its attention on BOS but reads almost
        nothing from it has a high first share and a low second one.
        """
        rows = []
        for layer, (pattern, weighted) in enumerate(zip(self.patterns, self.weighted)):
            later = pattern[:, :, 1:]
            later_weighted = weighted[:, :, 1:].double()
            attention_share = later[..., 0].double().mean((0, 2))
            total = later_weighted.sum((0, 2, 3))
            weighted_share = later_weighted[..., 0].sum((0, 2)) / total
            for head in range(pattern.shape[1]):
                rows.append({
                    "layer": layer,
                    "head": head,
                    "name": head_name(layer, head),
                    "attention_share": float(attention_share[head]),
                    "weighted_share": float(weighted_share[head]),
                })
        return pd.DataFrame(rows, columns=["layer", "head", "name", "attention_share",
                                           "weighted_share"])


@torch.no_grad()
def value_weighted_attention(
    model: AttnOnlyTransformer, tokens: torch.Tensor
) -> ValueWeightedAttention:
    """Run the model once on ``tokens`` [batch, pos] and weight every pattern by value norms."""
    was_training = model.training
    model.eval()
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.train(was_training)

    patterns, value_norms, weighted = [], [], []
    for layer, block in enumerate(model.blocks):
        resid = cache.resid_pre[layer]
        normed = block.ln1(resid) if block.ln1 is not None else resid
        values = torch.einsum("bpm,hmd->bhpd", normed, block.attn.W_V)
        # v_j W_O, what each key position writes when attended with weight 1, [batch, head, key,
        # d_model].
        written = torch.einsum("bhpd,hdm->bhpm", values, block.attn.W_O)
        norms = written.norm(dim=-1)
        pattern = cache.patterns[layer]
        patterns.append(pattern)
        value_norms.append(norms)
        weighted.append(pattern * norms[:, :, None, :])
    return ValueWeightedAttention(patterns=patterns, value_norms=value_norms, weighted=weighted)
