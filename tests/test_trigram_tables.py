"""Per-head skip-trigram tables from one sweep equal top_skip_trigrams head by head."""

import pandas as pd
import pytest

from circuits.analysis.skip_trigrams import TRIGRAM_COLUMNS, top_skip_trigrams
from circuits.analysis.trigram_tables import skip_trigram_tables
from conftest import tiny_model

STRINGS = [f"t{i}" for i in range(300)]


@pytest.mark.parametrize("sources", [None, list(range(40, 140))])
def test_tables_match_top_skip_trigrams(sources):
    model = tiny_model(seed=7, n_layers=2)
    tables = skip_trigram_tables(model, STRINGS, layer=1, k=6, source_tokens=sources)
    assert list(tables) == [f"L1H{head}" for head in range(4)]
    for head in range(4):
        expected = top_skip_trigrams(model, STRINGS, 1, head, k=6, source_tokens=sources)
        table = tables[f"L1H{head}"]
        assert table.columns.tolist() == TRIGRAM_COLUMNS
        pd.testing.assert_frame_equal(table, expected)


def test_tables_reject_bad_k():
    with pytest.raises(ValueError, match="k must be positive"):
        skip_trigram_tables(tiny_model(n_layers=1), STRINGS, k=0)
