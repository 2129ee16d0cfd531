"""Bigram tables of models against corpus counts, checked on a hand-counted stream."""

import math

import numpy as np
import pytest
import torch

from circuits.analysis.bigram_tables import (
    after_bos_log_probs,
    bigram_fit,
    compare_fits,
    direct_path_log_probs,
    frequent_tokens,
    next_token_comparison,
    per_source_kl,
)
from circuits.analysis.bigrams import bigram_kl, count_bigrams, model_next_token_log_probs
from circuits.model import AttnOnlyTransformer, ModelConfig
from conftest import tiny_model

# Pairs: (5,1) x2, (1,2) x2, (2,1), (2,3), (3,5). Token 4 never occurs; 5 is BOS.
STREAM = np.array([5, 1, 2, 1, 2, 3, 5, 1])
D_VOCAB = 6
STRINGS = ["a", "b", "c", "d", "e", "<bos>"]


def counts():
    return count_bigrams(STREAM, D_VOCAB)


def zero_layer_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(n_layers=0, d_model=4, n_heads=1, d_head=4, n_ctx=4, d_vocab=D_VOCAB)
    model = AttnOnlyTransformer(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0)
    return model


def table_from_probs(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_frequent_tokens_order_and_exclusion():
    # Source totals: 1 -> 2, 2 -> 2, 3 -> 1, 5 -> 2; ties keep id order.
    assert frequent_tokens(counts(), 10).tolist() == [1, 2, 5, 3]
    assert frequent_tokens(counts(), 2).tolist() == [1, 2]
    assert frequent_tokens(counts(), 10, exclude=[5]).tolist() == [1, 2, 3]


def test_frequent_tokens_rejects_zero():
    with pytest.raises(ValueError, match="n must be positive"):
        frequent_tokens(counts(), 0)


def test_zero_layer_tables_agree():
    model = zero_layer_model(seed=1)
    torch.testing.assert_close(direct_path_log_probs(model), model_next_token_log_probs(model))


def test_after_bos_matches_forward_pass():
    model = tiny_model(seed=2, n_layers=1).double()
    table = after_bos_log_probs(model, batch_size=7)
    bos = model.cfg.d_vocab - 1
    for token in [0, 17, 150, bos]:
        with torch.no_grad():
            expected = model(torch.tensor([[bos, token]]))[0, -1].double().log_softmax(-1)
        torch.testing.assert_close(table[token], expected)


def test_fit_kl_matches_bigram_kl():
    model = zero_layer_model(seed=3)
    fit = bigram_fit(direct_path_log_probs(model), counts())
    expected = bigram_kl(model, counts()).numpy()
    np.testing.assert_allclose(fit.kl, expected, rtol=1e-10, equal_nan=True)
    assert np.isnan(fit.kl[4])
    assert np.isnan(fit.kl[0])


def test_fit_weighted_means_by_hand():
    # Uniform predictions: cross-entropy log(6) on every pair.
    uniform = torch.full((D_VOCAB, D_VOCAB), -math.log(D_VOCAB), dtype=torch.float64)
    fit = bigram_fit(uniform, counts())

    # Entropy per source: 1 -> 0 (always 2), 2 -> log 2, 3 -> 0, 5 -> 0 (always 1).
    assert fit.corpus_entropy == pytest.approx(2 * math.log(2) / 7)
    assert fit.cross_entropy == pytest.approx(math.log(D_VOCAB))
    assert fit.mean_kl == pytest.approx(math.log(D_VOCAB) - 2 * math.log(2) / 7)
    assert fit.n_sources == 4


def test_fit_top1_agreement_by_hand():
    probs = np.full((D_VOCAB, D_VOCAB), 0.1)
    probs[1, 2] = 0.5  # corpus top after 1 is 2: match (2 pairs)
    probs[2, 1] = 0.5  # corpus after 2 ties 1 and 3, the lower id 1 counts as top: match (2 pairs)
    probs[3, 0] = 0.5  # corpus top after 3 is 5: miss (1 pair)
    probs[5, 4] = 0.5  # corpus top after 5 is 1: miss (2 pairs)
    fit = bigram_fit(table_from_probs(probs), counts())
    assert fit.top1_match.tolist() == [False, True, True, False, False, False]
    assert fit.top1_agreement == pytest.approx(4 / 7)


def test_exact_table_has_zero_kl():
    dense = counts().dense().astype(np.float64)
    probs = (dense + 1e-300) / np.maximum(dense.sum(1, keepdims=True), 1)
    fit = bigram_fit(table_from_probs(probs), counts())
    seen = fit.source_counts > 0
    assert np.abs(fit.kl[seen]).max() < 1e-9
    assert fit.top1_agreement == 1.0


def test_fit_rejects_wrong_shape():
    with pytest.raises(ValueError, match="bigram table must be"):
        bigram_fit(torch.zeros(D_VOCAB, D_VOCAB + 1), counts())


def test_summary_and_comparison_layout():
    uniform = torch.full((D_VOCAB, D_VOCAB), -math.log(D_VOCAB), dtype=torch.float64)
    fits = {"uniform": bigram_fit(uniform, counts()),
            "model": bigram_fit(direct_path_log_probs(zero_layer_model()), counts())}
    frame = compare_fits(fits)
    assert frame.index.tolist() == ["uniform", "model"]
    assert frame.columns.tolist() == [
        "mean KL", "median KL", "cross-entropy", "bigram entropy", "top-1 agreement", "sources"
    ]
    assert frame.loc["uniform", "mean KL"] == pytest.approx(fits["uniform"].mean_kl)
    assert frame.loc["uniform", "cross-entropy"] == pytest.approx(math.log(D_VOCAB))
    assert frame.loc["model", "sources"] == 4
    assert frame["sources"].dtype == "int64"


def test_per_source_kl_rows():
    fits = {"model": bigram_fit(direct_path_log_probs(zero_layer_model()), counts())}
    frame = per_source_kl(fits, STRINGS, [2, 1])
    assert frame["source"].tolist() == [2, 1]
    assert frame["source_str"].tolist() == ["c", "b"]
    assert frame["count"].tolist() == [2, 2]
    assert frame["model"].tolist() == pytest.approx(fits["model"].kl[[2, 1]].tolist())


def test_next_token_comparison_union_and_order():
    probs = np.full((D_VOCAB, D_VOCAB), 0.01)
    probs[2, 4] = 0.9  # the model's top after 2 is 4, which the corpus never shows
    frame = next_token_comparison({"model": table_from_probs(probs)}, counts(), STRINGS, [2], k=1)

    # Corpus top-1 after 2 is 1 (tied with 3, lower id first); model top-1 is 4.
    assert frame["token"].tolist() == [1, 4]
    assert frame["token_str"].tolist() == ["b", "e"]
    assert frame["corpus"].tolist() == pytest.approx([0.5, 0.0])
    assert frame["model"].tolist() == pytest.approx([0.01, 0.9])
    assert frame.columns.tolist() == [
        "source", "source_str", "token", "token_str", "corpus", "model"
    ]


def test_next_token_comparison_unseen_source():
    table = direct_path_log_probs(zero_layer_model())
    frame = next_token_comparison({"model": table}, counts(), STRINGS, [4], k=2)
    assert frame["corpus"].isna().all()
    assert len(frame) == 2


def test_next_token_comparison_rejects_bad_k():
    table = direct_path_log_probs(zero_layer_model())
    with pytest.raises(ValueError, match="k must be in"):
        next_token_comparison({"model": table}, counts(), STRINGS, [1], k=0)
