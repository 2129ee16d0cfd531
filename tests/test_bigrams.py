"""Bigram counting, the counts file, the bigram script and KL against naive computations."""

import collections
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.analysis.bigrams import (
    bigram_kl,
    count_bigrams,
    load_bigram_counts,
    model_next_token_log_probs,
    save_bigram_counts,
    top_next_tokens,
)
from circuits.analysis.circuits import direct_path
from circuits.model import AttnOnlyTransformer, ModelConfig
from circuits.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bigram_counts.py"
STREAM = [5, 1, 2, 1, 2, 3, 5, 1]
D_VOCAB = 6
STRINGS = ["a", "b", "c", "d", "e", "<bos>"]


def zero_layer_model(seed=0, **overrides):
    values = dict(n_layers=0, d_model=4, n_heads=1, d_head=4, n_ctx=4, d_vocab=D_VOCAB)
    values.update(overrides)
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(ModelConfig(**values)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0)
    return model


def test_hand_counted_stream():
    counts = count_bigrams(np.array(STREAM, dtype=np.uint16), D_VOCAB)
    expected = np.zeros((D_VOCAB, D_VOCAB), dtype=np.int64)
    expected[5, 1] = 2
    expected[1, 2] = 2
    expected[2, 1] = 1
    expected[2, 3] = 1
    expected[3, 5] = 1
    np.testing.assert_array_equal(counts.dense(), expected)
    assert counts.n_tokens == 8
    assert counts.counts.sum() == 7
    np.testing.assert_array_equal(counts.source_totals(), [0, 2, 2, 1, 0, 2])
    np.testing.assert_array_equal(counts.row(2), [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(counts.row(4), np.zeros(D_VOCAB))
    assert counts.sources.dtype == np.uint16
    assert counts.counts.dtype == np.uint32


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 1000])
def test_chunked_counts_match_counter(chunk_size):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 9, size=500)
    counts = count_bigrams(stream, 9, chunk_size=chunk_size)
    naive = collections.Counter(zip(stream[:-1].tolist(), stream[1:].tolist()))
    found = {
        (int(s), int(n)): int(c)
        for s, n, c in zip(counts.sources, counts.next_tokens, counts.counts)
    }
    assert found == dict(naive)
    pairs = list(zip(counts.sources.tolist(), counts.next_tokens.tolist()))
    assert pairs == sorted(pairs)


def test_count_rejects_bad_streams():
    with pytest.raises(ValueError, match="no bigrams"):
        count_bigrams(np.array([1]), 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        count_bigrams(np.array([1, 4]), 4)
    with pytest.raises(ValueError, match="1-D"):
        count_bigrams(np.ones((2, 2), dtype=np.int64), 4)


def test_save_load_round_trip(tmp_path):
    counts = count_bigrams(np.array(STREAM), D_VOCAB)
    path = tmp_path / "counts.npz"
    save_bigram_counts(counts, path)
    loaded = load_bigram_counts(path)
    assert loaded.d_vocab == D_VOCAB
    assert loaded.n_tokens == 8
    np.testing.assert_array_equal(loaded.dense(), counts.dense())
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["count", "d_vocab", "format", "n_tokens", "next", "source"]


def test_load_rejects_malformed_files(tmp_path):
    text = tmp_path / "not_numpy.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        load_bigram_counts(text)
    partial = tmp_path / "partial.npz"
    np.savez_compressed(partial, source=np.zeros(1, dtype=np.uint16))
    with pytest.raises(ValueError, match="missing arrays"):
        load_bigram_counts(partial)
    with pytest.raises(ValueError, match="not a readable"):
        load_bigram_counts(tmp_path / "absent.npz")


def test_model_log_probs_are_the_direct_path():
    model = zero_layer_model(seed=1)
    log_probs = model_next_token_log_probs(model, batch_size=4)
    expected = direct_path(model).dense().log_softmax(-1)
    torch.testing.assert_close(log_probs, expected)


def test_bigram_kl_matches_naive():
    model = zero_layer_model(seed=2)
    counts = count_bigrams(np.array(STREAM), D_VOCAB)
    kl = bigram_kl(model, counts)
    dense = counts.dense()
    for source in range(D_VOCAB):
        total = dense[source].sum()
        if total == 0:
            assert math.isnan(kl[source].item())
            continue
        with torch.no_grad():
            logits = model(torch.tensor([[source]]))[0, 0].tolist()
        log_norm = math.log(sum(math.exp(value) for value in logits))
        expected = 0.0
        for nxt in range(D_VOCAB):
            p = dense[source, nxt] / total
            if p > 0:
                expected += p * (math.log(p) - (logits[nxt] - log_norm))
        assert kl[source].item() == pytest.approx(expected, rel=1e-9)
        assert kl[source].item() > 0


def test_bigram_kl_of_exact_table_is_zero():
    counts = count_bigrams(np.array(STREAM), D_VOCAB)
    probs = counts.dense() / np.maximum(counts.dense().sum(1, keepdims=True), 1)
    model = zero_layer_model(d_model=D_VOCAB, normalization_type=None)
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(D_VOCAB))
        model.unembed.W_U.copy_(torch.from_numpy(np.log(probs + 1e-12)))
    kl = bigram_kl(model, counts)
    seen = counts.source_totals() > 0
    assert np.all(np.abs(kl.numpy()[seen]) < 1e-9)


def test_bigram_kl_rejects_other_vocabulary():
    counts = count_bigrams(np.array(STREAM), D_VOCAB + 1)
    with pytest.raises(ValueError, match="d_vocab"):
        bigram_kl(zero_layer_model(), counts)


def test_top_next_tokens_side_by_side():
    model = zero_layer_model(seed=3)
    counts = count_bigrams(np.array(STREAM), D_VOCAB)
    table = top_next_tokens(model, counts, STRINGS, source=2, k=3)
    assert isinstance(table, pd.DataFrame)
    assert table["rank"].tolist() == [0, 1, 2]
    # After token 2 the stream has 1 once and 3 once; ties keep id order.
    assert table["corpus_token"].tolist()[:2] == [1, 3]
    assert table["corpus_str"].tolist()[:2] == ["b", "d"]
    assert table["corpus_prob"].tolist() == pytest.approx([0.5, 0.5, 0.0])

    with torch.no_grad():
        probs = model(torch.tensor([[2]]))[0, 0].softmax(-1)
    expected = probs.argsort(descending=True)[:3].tolist()
    assert table["model_token"].tolist() == expected
    assert table["model_str"].tolist() == [STRINGS[i] for i in expected]
    assert table["model_prob"].tolist() == pytest.approx(probs[expected].tolist())


def test_top_next_tokens_of_unseen_source():
    counts = count_bigrams(np.array(STREAM), D_VOCAB)
    table = top_next_tokens(zero_layer_model(), counts, STRINGS, source=4, k=2)
    assert table["corpus_prob"].isna().all()
    assert table["corpus_token"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="source must be in"):
        top_next_tokens(zero_layer_model(), counts, STRINGS, source=6)


def load_script():
    spec = importlib.util.spec_from_file_location("bigram_counts_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_counts_a_small_corpus(tmp_path):
    documents = ["the cat sat on the mat", "a dog and the cat"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    out = tmp_path / "counts.npz"
    script = load_script()
    status = script.main([
        "--data", str(data), "--n-ranks", "300", "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"),
    ])
    assert status == 0

    tokenizer = Tokenizer(n_ranks=300)
    stream = []
    for text in documents:
        stream += tokenizer.encode_with_bos(text)
    expected = collections.Counter(zip(stream[:-1], stream[1:]))
    loaded = load_bigram_counts(out)
    assert loaded.d_vocab == 301
    assert loaded.n_tokens == len(stream)
    found = {
        (int(s), int(n)): int(c)
        for s, n, c in zip(loaded.sources, loaded.next_tokens, loaded.counts)
    }
    assert found == dict(expected)

    too_small = tmp_path / "small.npz"
    status = script.main([
        "--data", str(data), "--n-ranks", "300", "--out", str(too_small),
        "--cache-dir", str(tmp_path / "cache"), "--max-mb", "0.0001",
    ])
    assert status == 1
    assert not too_small.exists()


def test_script_rejects_bad_arguments(tmp_path):
    script = load_script()
    assert script.main(["--data", "x", "--n-ranks", "2048", "--out", str(tmp_path / "a.txt")]) == 2
    missing_folder = tmp_path / "absent" / "a.npz"
    assert script.main(["--data", "x", "--n-ranks", "2048", "--out", str(missing_folder)]) == 2
    assert script.main(["--data", str(tmp_path / "none-*.jsonl"), "--n-ranks", "300",
                        "--out", str(tmp_path / "a.npz")]) == 1
