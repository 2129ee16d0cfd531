"""Skip-trigram bug search on a hand-built "keep … in mind / keep … at bay" head."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.analysis.bigrams import count_bigrams
from circuits.analysis.circuits import ov_circuit, qk_circuit
from circuits.analysis.paths import path_expansion
from circuits.analysis.skip_trigram_bugs import (
    BUG_COLUMNS,
    EFFECT_COLUMNS,
    crossed_to_paired_ratio,
    find_skip_trigram_bugs,
    skip_trigram_bug_effects,
    word_tokens,
)
from circuits.model import AttnOnlyTransformer, ModelConfig

STRINGS = [" keep", " in", " at", " mind", " bay", " the", "<bos>"]
KEEP, IN, AT, MIND, BAY, THE, BOS = range(7)
VOCAB = len(STRINGS)


def keep_model():
    """One head, W_E = W_Q = W_V = W_O = I and no layernorm.

    The OV circuit sends " keep" to " mind" and " bay" (W_U), and the QK circuit makes " in" and
    " at" attend to " keep" (W_K). A small ramp breaks ties; positions are zero.
    """
    config = ModelConfig(
        n_layers=1, d_model=VOCAB, n_heads=1, d_head=VOCAB, n_ctx=4, d_vocab=VOCAB,
        normalization_type=None,
    )
    model = AttnOnlyTransformer(config).double()
    eye = torch.eye(VOCAB, dtype=torch.float64)
    ramp = torch.arange(VOCAB * VOCAB, dtype=torch.float64).view(VOCAB, VOCAB) / 1000.0
    W_U = ramp.clone()
    W_U[KEEP, MIND] += 2.0
    W_U[KEEP, BAY] += 1.8
    W_K = ramp.clone()
    # qk[d, s] = (W_Q W_Kᵀ)[d, s] = W_K[s, d] with W_Q = I.
    W_K[KEEP, IN] += 3.0
    W_K[KEEP, AT] += 2.5
    with torch.no_grad():
        model.embed.W_E.copy_(eye)
        model.pos_embed.W_pos.zero_()
        attn = model.blocks[0].attn
        attn.W_Q.copy_(eye[None])
        attn.W_K.copy_(W_K[None])
        attn.W_V.copy_(eye[None])
        attn.W_O.copy_(eye[None])
        model.unembed.W_U.copy_(W_U)
    return model.eval()


def keep_counts():
    """A stream where " in" is followed by " mind" and " at" by " bay", never crossed."""
    phrase = [KEEP, THE, IN, MIND, KEEP, THE, AT, BAY, BOS]
    return count_bigrams(np.array(phrase * 30), VOCAB)


def search(**overrides):
    arguments = dict(
        sources=[KEEP, THE], candidates=[KEEP, IN, AT, MIND, BAY, THE], n_top=2,
        min_pair_count=10,
    )
    arguments.update(overrides)
    return find_skip_trigram_bugs(keep_model(), keep_counts(), STRINGS, **arguments)


def test_search_finds_keep_in_mind_at_bay():
    bugs = search()
    assert bugs.columns.tolist() == BUG_COLUMNS
    assert len(bugs) == 1
    bug = bugs.iloc[0]
    assert bug["name"] == "L0H0"
    assert bug["source_str"] == " keep"
    assert (bug["destination_1"], bug["output_1"]) in [(IN, MIND), (AT, BAY)]
    assert {bug["destination_1"], bug["destination_2"]} == {IN, AT}
    assert {bug["output_1"], bug["output_2"]} == {MIND, BAY}
    # Paired bigrams occur 30 times each, crossed ones never: log((30.5)² / 0.5²).
    assert bug["log_odds_ratio"] == pytest.approx(2 * math.log(30.5 / 0.5))


def test_search_scores_match_circuits():
    bug = search().iloc[0]
    model = keep_model()
    ov = ov_circuit(model, 0, 0).dense()
    qk = qk_circuit(model, 0, 0).dense() / math.sqrt(model.cfg.d_head)
    assert bug["ov_score_1"] == pytest.approx(ov[KEEP, bug["output_1"]].item())
    assert bug["ov_score_2"] == pytest.approx(ov[KEEP, bug["output_2"]].item())
    assert bug["qk_score_1"] == pytest.approx(qk[bug["destination_1"], KEEP].item())
    assert bug["qk_score_2"] == pytest.approx(qk[bug["destination_2"], KEEP].item())
    assert bug["strength"] == pytest.approx(min(bug["ov_score_1"], bug["ov_score_2"]))


def test_search_needs_frequent_pairs():
    assert search(min_pair_count=31).empty


def test_search_needs_a_strong_pairing():
    assert search(min_log_odds=2 * math.log(30.5 / 0.5) + 0.1).empty


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_top must be in"):
        search(n_top=1)
    with pytest.raises(ValueError, match="per_head must be positive"):
        search(per_head=0)
    with pytest.raises(ValueError, match="sources must be ids"):
        search(sources=[VOCAB])
    with pytest.raises(ValueError, match="d_vocab"):
        find_skip_trigram_bugs(keep_model(), count_bigrams(np.array([0, 1]), VOCAB + 1), STRINGS,
                               [KEEP], [IN, AT])


def test_effects_match_path_expansion():
    model = keep_model()
    bugs = search()
    effects = skip_trigram_bug_effects(model, bugs, keep_counts(), STRINGS)
    assert effects.columns.tolist() == EFFECT_COLUMNS
    assert len(effects) == 4
    assert effects["paired"].tolist() == [True, False, False, True]

    bug = bugs.iloc[0]
    for row in effects.itertuples():
        tokens = torch.tensor([[BOS, KEEP, row.destination]])
        term = path_expansion(model, tokens).heads[0, 0, 0, -1]
        assert row.head_effect == pytest.approx((term - term.mean())[row.output].item())
        _, cache = model.run_with_cache(tokens)
        assert row.attention_to_source == pytest.approx(cache.patterns[0][0, 0, -1, 1].item())
    paired = effects[effects["paired"]]
    assert set(zip(paired["destination"], paired["output"])) == {
        (bug["destination_1"], bug["output_1"]), (bug["destination_2"], bug["output_2"])
    }
    assert paired["corpus_prob"].tolist() == pytest.approx([1.0, 1.0])


def test_crossed_outputs_raised_like_paired():
    effects = skip_trigram_bug_effects(keep_model(), search(), keep_counts(), STRINGS)
    ratio = crossed_to_paired_ratio(effects)
    # The head's output depends on the destination only through attention, so both
    # continuations of " keep" rise after either destination.
    assert ratio.iloc[0] == pytest.approx(1.0, abs=0.1)
    assert (effects["head_effect"] > 0.5).all()


def test_ratio_by_hand():
    effects = pd.DataFrame({
        "example": [0, 0, 0, 0],
        "paired": [True, False, False, True],
        "head_effect": [2.0, 1.0, 1.0, 2.0],
    })
    assert crossed_to_paired_ratio(effects).tolist() == [0.5]


def test_word_tokens_filter():
    strings = [" keep", "keep", " in", " 12", " don't", "\n", " at", " Mind"]
    assert word_tokens(strings, [7, 0, 1, 2, 3, 4, 5, 6]).tolist() == [7, 0, 2, 6]
