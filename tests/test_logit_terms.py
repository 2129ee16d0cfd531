"""Path-expansion terms of the actual next token: they sum to the centred logits."""

import pytest
import torch

from circuits.analysis.logit_terms import TERM_COLUMNS, named_terms, target_logit_terms
from circuits.analysis.paths import path_expansion
from conftest import tiny_model

STRINGS = [f"t{i}" for i in range(300)]


def tokens(n_pos=7, seed=0):
    return torch.randint(0, 300, (2, n_pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_named_terms_sum_to_centred_logits(n_layers):
    model = tiny_model(seed=1, n_layers=n_layers).double()
    ids = tokens()
    expansion = path_expansion(model, ids)
    total = sum(named_terms(expansion).values())
    with torch.no_grad():
        logits = model(ids)
    centred = logits - logits.mean(-1, keepdim=True)
    torch.testing.assert_close(total, centred, rtol=1e-7, atol=1e-7)


def test_term_names_per_layer_count():
    expansion = path_expansion(tiny_model(n_layers=2).double(), tokens())
    names = list(named_terms(expansion))
    assert names[0] == "direct path"
    assert names[1:9] == [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
    assert names[-1] == "virtual heads"


def test_target_terms_read_the_next_token():
    model = tiny_model(seed=2, n_layers=1).double()
    ids = tokens(n_pos=6)
    expansion = path_expansion(model, ids)
    frame = target_logit_terms(expansion, ids, STRINGS, sequence=1)

    assert frame.columns.tolist() == TERM_COLUMNS
    assert len(frame) == 5 * (1 + model.cfg.n_heads)
    row = frame[(frame["term"] == "L0H3") & (frame["position"] == 2)].iloc[0]
    assert row["token"] == ids[1, 2].item()
    assert row["next_token"] == ids[1, 3].item()
    assert row["next_str"] == STRINGS[ids[1, 3].item()]
    term = expansion.heads[0, 3, 1, 2] + expansion.head_bias[0, 3, 1, 2]
    assert row["value"] == pytest.approx((term - term.mean())[ids[1, 3]].item())

    # Summed over terms, each position's values give the centred logit of the next token.
    with torch.no_grad():
        logits = model(ids)[1]
    centred = logits - logits.mean(-1, keepdim=True)
    sums = frame.groupby("position")["value"].sum()
    for position in range(5):
        expected = centred[position, ids[1, position + 1]].item()
        assert sums[position] == pytest.approx(expected, abs=1e-9)


def test_target_terms_reject_other_tokens():
    model = tiny_model(n_layers=1).double()
    expansion = path_expansion(model, tokens(n_pos=6))
    with pytest.raises(ValueError, match="tokens must be the"):
        target_logit_terms(expansion, tokens(n_pos=5), STRINGS)
