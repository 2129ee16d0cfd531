"""Each head's strongest skip-trigrams among chosen source tokens, from one vocabulary sweep.

``top_skip_trigrams`` (in ``circuits.analysis.skip_trigrams``) sweeps the whole vocabulary for
every head of a layer each time it is called. ``skip_trigram_tables`` sweeps once and returns the
top rows of every head, with the same ranking: each source contributes its best output (largest
OV score) with its best destination (largest QK score), and sources are ranked by that OV score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from circuits.analysis.circuits import check_head
from circuits.analysis.skip_trigrams import skip_trigrams
from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer


def skip_trigram_tables(
    model: AttnOnlyTransformer,
    tokenizer: Tokenizer | Sequence[str],
    layer: int = 0,
    k: int = 12,
    source_tokens: Sequence[int] | None = None,
) -> dict[str, pd.DataFrame]:
    """Map each head name of ``layer`` to its k strongest skip-trigrams, one per source token.

    ``source_tokens`` limits the sources, for example to tokens frequent enough in the corpus for
    the trigram to matter. The frames have the columns of ``skip_trigrams``.
    """
    check_head(model, layer)
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    trigrams = skip_trigrams(model, tokenizer, k=1, layers=[layer])
    if source_tokens is not None:
        allowed = np.asarray(source_tokens, dtype=np.int64)
        trigrams = trigrams[np.isin(trigrams["source"].to_numpy(), allowed)]
    tables = {}
    for name, rows in trigrams.groupby("name", sort=False):
        tables[name] = rows.head(k).reset_index(drop=True)
    return tables
