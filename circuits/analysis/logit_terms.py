"""The logit of each actual next token, split into the terms of the path expansion.

``path_expansion`` (in ``circuits.analysis.paths``) writes a model's logits on a passage as a sum
of terms with every attention pattern and layernorm scale frozen. ``target_logit_terms`` reads,
at each position, every term's contribution to the logit of the token that actually comes next.

Logits are defined up to a constant per position (softmax ignores it), and so is each term. Every
term is therefore centred over the vocabulary first: its mean over all d_vocab outputs is
subtracted at each position. The centred terms still sum to the centred logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from circuits.analysis.circuits import head_name
from circuits.analysis.paths import PathExpansion
from circuits.tokenizer import Tokenizer

TERM_COLUMNS = ["position", "token", "next_token", "token_str", "next_str", "term", "value"]


def _centred(term: torch.Tensor) -> torch.Tensor:
    return term - term.mean(-1, keepdim=True)


def named_terms(expansion: PathExpansion) -> dict[str, torch.Tensor]:
    """Name the expansion's terms [batch, pos, d_vocab], each centred over the vocabulary.

    Names: ``direct path`` (the embedding's direct path plus the unembedding bias b_U), one
    ``L{layer}H{head}`` per head (its term plus its constant bias output), and ``virtual heads``
    (every order-2 term summed) for a two-layer model. They sum to the centred logits.
    """
    terms = {"direct path": _centred(expansion.direct + expansion.unembed_bias)}
    n_layers, n_heads = expansion.heads.shape[:2]
    for layer in range(n_layers):
        for head in range(n_heads):
            term = expansion.heads[layer, head] + expansion.head_bias[layer, head]
            terms[head_name(layer, head)] = _centred(term)
    if expansion.virtual is not None:
        terms["virtual heads"] = _centred(expansion.order(2))
    return terms


def target_logit_terms(
    expansion: PathExpansion,
    tokens: torch.Tensor,
    tokenizer: Tokenizer | Sequence[str],
    sequence: int = 0,
) -> pd.DataFrame:
    """Tabulate each term's contribution to the logit of the actual next token, for one sequence.

    ``tokens`` [batch, pos] are the ids the expansion was computed on. Returns one row per
    (position, term) for positions 0 … pos − 2, with the columns ``TERM_COLUMNS``. ``value`` is
    the term's centred logit for ``next_token``, and the terms come in the order of
    ``named_terms``.
    """
    strings = tokenizer.vocabulary_strings if isinstance(tokenizer, Tokenizer) else list(tokenizer)
    if tokens.ndim != 2 or tuple(tokens.shape) != tuple(expansion.logits.shape[:2]):
        raise ValueError(
            f"tokens must be the [batch, pos] ids of the expansion, shape "
            f"{tuple(expansion.logits.shape[:2])}, got {tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError("a sequence needs at least two tokens to have a next token")
    current = tokens[sequence, :-1]
    following = tokens[sequence, 1:]
    positions = torch.arange(len(following))

    rows = []
    for name, term in named_terms(expansion).items():
        values = term[sequence, positions, following]
        for position, value in enumerate(values.tolist()):
            rows.append({
                "position": position,
                "token": int(current[position]),
                "next_token": int(following[position]),
                "token_str": strings[int(current[position])],
                "next_str": strings[int(following[position])],
                "term": name,
                "value": value,
            })
    return pd.DataFrame(rows, columns=TERM_COLUMNS)
