"""The stand-alone induction check must agree with the package it does not import."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.analysis.attention import prefix_matching_scores
from circuits.checkpoints import save_checkpoint
from circuits.tokenizer import Tokenizer
from conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_induction.py"
spec = importlib.util.spec_from_file_location("check_induction", SCRIPT)
check_induction = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_induction)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"normalization_type": None}, {"smear_keys": True}, {"n_layers": 0}],
)
def test_forward_matches_package(tmp_path, overrides):
    model = tiny_model(d_vocab=257, n_ctx=110, **overrides)
    if overrides.get("smear_keys"):
        with torch.no_grad():
            model.blocks[0].attn.smear.normal_()
    folder = save_checkpoint(model, Tokenizer(256), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    from safetensors.numpy import load_file

    weights = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    tokens = np.array([256, 5, 17, 200, 5, 17, 3])
    logits, patterns = check_induction.forward(weights, config, tokens)
    with torch.no_grad():
        expected, cache = model.double().run_with_cache(torch.from_numpy(tokens)[None])
    np.testing.assert_allclose(logits, expected[0].numpy(), atol=1e-9)
    for layer, pattern in enumerate(patterns):
        np.testing.assert_allclose(pattern, cache.patterns[layer][0].numpy(), atol=1e-12)


def test_prefix_matching_matches_package(tmp_path):
    model = tiny_model(d_vocab=1001, n_ctx=110)
    folder = save_checkpoint(model, Tokenizer(1000), tmp_path / "ckpt")
    result = check_induction.check(folder, seed=3)

    # Rebuild the script's prefix-matching sequences (drawn after the 20 loss sequences).
    rng = np.random.default_rng(3)
    for _ in range(20):
        check_induction.random_repeats(rng, 1000, 999, 50, 2)
    sequences = torch.tensor(np.stack(
        [check_induction.random_repeats(rng, 1000, 999, 25, 4) for _ in range(10)]))
    expected = prefix_matching_scores(model.double(), sequences, period=25)
    np.testing.assert_allclose(result["prefix_matching"], expected.numpy(), atol=1e-4)


def test_losses_of_a_perfect_copier():
    # Logits that put all mass on the true next token give zero loss.
    tokens = np.array([3, 1, 2, 1, 2])
    logits = np.full((5, 4), -50.0)
    logits[np.arange(4), tokens[1:]] = 50.0
    np.testing.assert_allclose(check_induction.token_losses(logits, tokens), 0.0, atol=1e-12)


def test_missing_checkpoint_files(tmp_path, capsys):
    assert check_induction.main([str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_unknown_name_lists_shipped_checkpoints(tmp_path, capsys):
    assert check_induction.main([str(tmp_path / "no-such-model")]) == 2
    error = capsys.readouterr().err
    assert "neither a folder nor a shipped checkpoint" in error
    assert "attn-only-2l" in error


def test_corrupt_checkpoint_reported(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=257, n_ctx=110), Tokenizer(256), tmp_path / "c")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert check_induction.main([str(folder)]) == 2
    assert "error: cannot check" in capsys.readouterr().err


def test_zero_layer_model_reported(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(n_layers=0, d_vocab=257, n_ctx=110), Tokenizer(256),
                             tmp_path / "c")
    assert check_induction.main([str(folder)]) == 2
    assert "no attention layers" in capsys.readouterr().err


def test_failing_model_exits_one(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=1001, n_ctx=110), Tokenizer(1000), tmp_path / "c")
    assert check_induction.main([str(folder)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 3, "lacks blocks.2.attn.W_Q"),
    ("n_layers", 1, "has blocks.1."),
    ("smear_keys", True, "lacks blocks.0.attn.smear"),
    ("d_model", 16, "embed.W_E has shape"),
])
def test_config_disagreeing_with_weights(tmp_path, capsys, field, value, message):
    folder = save_checkpoint(tiny_model(d_vocab=257, n_ctx=110), Tokenizer(256), tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert check_induction.main([str(folder)]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_weights_of_another_model_reported(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=257, n_ctx=110), Tokenizer(256), tmp_path / "c")
    other = save_checkpoint(tiny_model(seed=1, d_vocab=257, n_ctx=110), Tokenizer(256),
                            tmp_path / "other")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    assert check_induction.main([str(folder)]) == 2
    assert "records" in capsys.readouterr().err


def test_negative_seed_rejected(tmp_path):
    folder = save_checkpoint(tiny_model(d_vocab=257, n_ctx=110), Tokenizer(256), tmp_path / "c")
    with pytest.raises(SystemExit) as exit_info:
        check_induction.main([str(folder), "--seed", "-1"])
    assert exit_info.value.code == 2
