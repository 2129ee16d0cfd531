"""QK and OV circuits of every head restricted to a chosen set of tokens, as dense blocks.

The full circuits are d_vocab x d_vocab per head; a figure can show a few hundred tokens. The
blocks use the effective embedding and unembedding of ``circuits.analysis.circuits`` (layernorms
folded in), so entry values are those of ``qk_circuits`` and ``ov_circuits``:

- ``qk[h, d, s]``: attention score of a query (destination) token d on a key (source) token s,
  token terms only, divided by sqrt(d_head) as in the model's softmax;
- ``ov[h, s, o]``: logit change of output token o when head h attends fully to source token s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from circuits.analysis.circuits import check_head, ov_circuits, qk_circuits
from circuits.model import AttnOnlyTransformer


@dataclass
class CircuitBlocks:
    """Dense circuit blocks over ``tokens`` [n] for every head of one layer.

    ``qk`` [n_heads, n, n] has query (destination) rows and key (source) columns; ``ov``
    [n_heads, n, n] has source rows and output columns. Both are float32.
    """

    layer: int
    tokens: np.ndarray
    qk: torch.Tensor
    ov: torch.Tensor

    def copy_rate(self) -> torch.Tensor:
        """Fraction of source tokens whose largest OV entry among ``tokens`` is the token itself.

        One value per head [n_heads]. A head that copies every shown token scores 1; a random
        matrix about 1 / n.
        """
        own = torch.arange(len(self.tokens))
        return (self.ov.argmax(-1) == own).float().mean(-1)


@torch.no_grad()
def circuit_blocks(model: AttnOnlyTransformer, layer: int, tokens: Sequence[int]) -> CircuitBlocks:
    """Compute the QK and OV blocks of every head in ``layer`` over ``tokens``."""
    check_head(model, layer)
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("tokens must be a non-empty list of token ids")
    if ids.min() < 0 or ids.max() >= model.cfg.d_vocab:
        raise ValueError(
            f"tokens must be ids in [0, {model.cfg.d_vocab}), got range [{ids.min()}, {ids.max()}]"
        )
    index = torch.from_numpy(ids)
    qk = qk_circuits(model, layer)
    ov = ov_circuits(model, layer)
    qk_block = (qk.A[:, index] @ qk.B[..., index]) / math.sqrt(model.cfg.d_head)
    ov_block = ov.A[:, index] @ ov.B[..., index]
    return CircuitBlocks(layer, ids, qk_block.float(), ov_block.float())
