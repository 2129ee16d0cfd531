"""The attention explorer, driven through its update methods without a browser."""

from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.checkpoints import Checkpoint
from circuits.tokenizer import Tokenizer
from circuits.widgets import AttentionExplorer, attention_explorer
from conftest import tiny_model

N_CTX = 24


def decode(values):
    if isinstance(values, dict) and "bdata" in values:
        import base64

        array = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        return array.reshape(values["shape"]) if "shape" in values else array
    return np.asarray(values)


@pytest.fixture
def checkpoint():
    return Checkpoint(tiny_model(n_ctx=N_CTX), Tokenizer(299), {}, Path("tiny"))


def model_pattern(checkpoint, ids, layer, head):
    with torch.no_grad():
        _, cache = checkpoint.model.run_with_cache(torch.tensor([ids]))
    return cache.patterns[layer][0, head].numpy()


def test_initial_figure_shows_last_layer(checkpoint):
    explorer = attention_explorer(checkpoint, text="the cat sat on the mat")

    assert isinstance(explorer, AttentionExplorer)
    assert explorer.selected_head == (1, 0)
    ids = explorer.analysis.token_ids
    assert ids == checkpoint.tokenizer.encode_for_model("the cat sat on the mat", N_CTX)
    heatmap, predictions = explorer.figure.data
    np.testing.assert_allclose(decode(heatmap.z), model_pattern(checkpoint, ids, 1, 0),
                               rtol=1e-6)
    assert predictions.name == "predictions"
    assert explorer.figure.layout.title.text.startswith("L1H0")
    assert f"{len(ids) - 1} tokens after BOS" in explorer.message.value
    assert "⚠" not in explorer.message.value


def test_head_change_redraws_without_rerun(checkpoint):
    explorer = attention_explorer(checkpoint, text="the cat sat")
    analysis = explorer.analysis

    explorer.layer.value = 0
    explorer.head.value = 3

    assert explorer.analysis is analysis
    assert explorer.figure.layout.title.text.startswith("L0H3")
    np.testing.assert_array_equal(decode(explorer.figure.data[0].z), analysis.patterns[0, 3])


def test_text_change_needs_update(checkpoint):
    explorer = attention_explorer(checkpoint, text="the cat")
    explorer.text.value = "a dog ran far away"
    assert explorer.analysis.token_ids == checkpoint.tokenizer.encode_for_model("the cat", N_CTX)

    figure = explorer.update()

    ids = checkpoint.tokenizer.encode_for_model("a dog ran far away", N_CTX)
    assert explorer.analysis.token_ids == ids
    assert figure is explorer.figure
    assert len(decode(figure.data[0].z)) == len(ids)


def test_empty_text(checkpoint):
    explorer = attention_explorer(checkpoint, text="")

    assert explorer.analysis.token_ids == [299]
    assert decode(explorer.figure.data[0].z).tolist() == [[1.0]]
    assert "The text is empty" in explorer.message.value


def test_long_text_shows_truncation(checkpoint):
    explorer = attention_explorer(checkpoint, text="one two three four five " * 10)

    assert len(explorer.analysis.token_ids) == N_CTX
    assert "⚠" in explorer.message.value
    assert "dropping" in explorer.message.value
    assert decode(explorer.figure.data[0].z).shape == (N_CTX, N_CTX)


def test_characters_outside_vocabulary(checkpoint):
    explorer = attention_explorer(checkpoint, text="tea <b>日本</b>")

    assert explorer.analysis.split_characters == ["日", "本"]
    assert "split into UTF-8 bytes" in explorer.message.value
    # The message is HTML: the text's own markup must arrive escaped.
    assert "<b>" not in explorer.message.value


def test_top_predictions_in_figure(checkpoint):
    explorer = attention_explorer(checkpoint, text="the cat", top_k=2)

    predictions = explorer.figure.data[1]
    ids = torch.tensor([explorer.analysis.token_ids])
    with torch.no_grad():
        probabilities = checkpoint.model(ids)[0].softmax(-1)
    expected = probabilities.topk(2, dim=-1).values.T.numpy()
    np.testing.assert_allclose(decode(predictions.z), expected, rtol=1e-5)
    assert list(predictions.y) == ["top 1", "top 2"]


def test_rejects_model_without_layers():
    checkpoint = Checkpoint(tiny_model(n_layers=0), Tokenizer(299), {}, Path("bigram"))
    with pytest.raises(ValueError, match="no attention layers"):
        attention_explorer(checkpoint)
