"""Layernorm folding: each step's values, the folded forward pass, and rejected configurations."""

import math
import os
import tomllib
from pathlib import Path

import pytest
import torch

from circuits.folding import (
    FoldedWeights,
    center_writing_weights,
    fold_layernorm,
    fold_layernorm_bias,
    fold_layernorm_gain,
    fold_positions,
    fold_state_dict,
    folded_forward,
    folded_run_with_cache,
)
from conftest import tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
# float32 folded logits differ from the model's by rounding only: measured 2e-5 with logits up to
# about 9 in these tests.
FLOAT32_TOLERANCE = 2e-4


def sharp_model(seed=0, dtype=torch.float64, **overrides):
    """A tiny model with non-uniform attention and logits of order 10, so differences show."""
    model = tiny_model(seed=seed, **overrides).to(dtype)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(15)
            block.attn.W_K.mul_(15)
            block.attn.W_O.mul_(20)
            if model.cfg.smear_keys:
                block.attn.smear.copy_(torch.randn_like(block.attn.smear))
        model.unembed.W_U.mul_(15)
        model.embed.W_E.add_(0.1)  # rows with a nonzero mean, so centring matters
        if model.cfg.normalization_type is None:
            model.embed.W_E.mul_(30)  # no layernorm to bring the residual to unit scale
    return model


def naive_layernorm(x, ln, eps):
    if ln is None:
        return x
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * ln.w + ln.b


def naive_logits(model, tokens):
    """Forward pass written out per head and position from the model's formulas, in float64."""
    cfg = model.cfg
    params = {k: v.detach().double() for k, v in model.state_dict().items()}
    batch, n_pos = tokens.shape
    resid = params["embed.W_E"][tokens]
    positions = params["pos_embed.W_pos"][:n_pos]
    for layer in range(cfg.n_layers):
        block = model.blocks[layer]
        ln = None
        if block.ln1 is not None:
            ln = type("LN", (), {"w": params[f"blocks.{layer}.ln1.w"],
                                 "b": params[f"blocks.{layer}.ln1.b"]})
        normed = naive_layernorm(resid, ln, cfg.eps)
        update = torch.zeros_like(resid)
        for head in range(cfg.n_heads):
            W_Q = params[f"blocks.{layer}.attn.W_Q"][head]
            W_K = params[f"blocks.{layer}.attn.W_K"][head]
            W_V = params[f"blocks.{layer}.attn.W_V"][head]
            W_O = params[f"blocks.{layer}.attn.W_O"][head]
            q = (normed + positions) @ W_Q
            k = (normed + positions) @ W_K
            if cfg.smear_keys:
                weight = torch.sigmoid(params[f"blocks.{layer}.attn.smear"][head])
                previous = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], dim=1)
                k = weight * k + (1 - weight) * previous
            v = normed @ W_V
            for i in range(n_pos):
                scores = torch.stack([(q[:, i] * k[:, j]).sum(-1) for j in range(i + 1)], -1)
                weights = torch.softmax(scores / math.sqrt(cfg.d_head), -1)
                mixed = (weights[:, :, None] * v[:, : i + 1]).sum(1)
                update[:, i] += mixed @ W_O
        resid = resid + update
    ln = None
    if model.ln_final is not None:
        ln = type("LN", (), {"w": params["ln_final.w"], "b": params["ln_final.b"]})
    return naive_layernorm(resid, ln, cfg.eps) @ params["unembed.W_U"]


CASES = [
    dict(n_layers=0),
    dict(n_layers=1),
    dict(n_layers=2),
    dict(n_layers=2, smear_keys=True),
    dict(n_layers=2, normalization_type=None),
]


def case_id(overrides):
    return "-".join(f"{key}={value}" for key, value in overrides.items())


def random_tokens(model, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, shape, generator=generator)


@pytest.mark.parametrize("overrides", CASES, ids=case_id)
def test_folded_logits_match_naive_float64(overrides):
    model = sharp_model(**overrides)
    tokens = random_tokens(model, (3, 12), seed=1)
    expected = naive_logits(model, tokens)

    folded = fold_layernorm(model, dtype=torch.float64)
    actual = folded_forward(folded, tokens)

    assert expected.abs().max() > 1.0  # large enough that a missing term would show
    assert torch.allclose(actual, expected, rtol=0, atol=1e-8)
    assert torch.allclose(model(tokens), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_folded_float32_matches_model(n_layers):
    model = sharp_model(n_layers=n_layers, dtype=torch.float32)
    tokens = random_tokens(model, (4, 24), seed=2)

    expected = model(tokens)
    actual = folded_forward(fold_layernorm(model), tokens)

    assert actual.dtype == torch.float32
    assert (actual - expected).abs().max() < FLOAT32_TOLERANCE


def test_folding_leaves_model_unchanged():
    model = sharp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_layernorm(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cache_matches_model_patterns_and_scales():
    model = sharp_model()
    tokens = random_tokens(model, (2, 10), seed=3)
    _, model_cache = model.run_with_cache(tokens)
    _, cache = folded_run_with_cache(fold_layernorm(model), tokens)

    for layer in range(model.cfg.n_layers):
        assert torch.allclose(cache.patterns[layer], model_cache.patterns[layer], atol=1e-10)
        expected_scale = model.blocks[layer].ln1.scale(model_cache.resid_pre[layer])
        assert torch.allclose(cache.scales[layer], expected_scale, atol=1e-12)
        # Centred writers: the folded residual is the model's minus its mean over d_model.
        model_resid = model_cache.resid_pre[layer]
        centred = model_resid - model_resid.mean(-1, keepdim=True)
        assert torch.allclose(cache.resid_pre[layer], centred, atol=1e-10)
    final_scale = model.ln_final.scale(model_cache.resid_pre[-1])
    assert torch.allclose(cache.scales[-1], final_scale, atol=1e-12)


def test_fold_positions_values():
    model = sharp_model(n_layers=1)
    state = model.state_dict()
    folded = fold_positions(state)

    W_pos = state["pos_embed.W_pos"]
    W_Q = state["blocks.0.attn.W_Q"]
    W_K = state["blocks.0.attn.W_K"]
    assert "pos_embed.W_pos" not in folded
    for head, position in [(0, 0), (2, 5), (3, 23)]:
        expected_q = sum(W_pos[position, m] * W_Q[head, m] for m in range(model.cfg.d_model))
        expected_k = sum(W_pos[position, m] * W_K[head, m] for m in range(model.cfg.d_model))
        assert torch.allclose(folded["blocks.0.attn.b_Q"][head, position], expected_q, atol=1e-12)
        assert torch.allclose(folded["blocks.0.attn.b_K"][head, position], expected_k, atol=1e-12)
    assert torch.count_nonzero(folded["blocks.0.attn.b_V"]) == 0
    assert torch.count_nonzero(folded["unembed.b_U"]) == 0


def test_fold_bias_values():
    model = sharp_model(n_layers=1)
    state = model.state_dict()
    with_positions = fold_positions(state)
    folded = fold_layernorm_bias(with_positions)

    beta = state["blocks.0.ln1.b"]
    W_pos = state["pos_embed.W_pos"]
    for head in range(model.cfg.n_heads):
        expected_v = beta @ state["blocks.0.attn.W_V"][head]
        assert torch.allclose(folded["blocks.0.attn.b_V"][head], expected_v, atol=1e-12)
        # The bias joins the positional term: (β + p_i) W_Q.
        expected_q = (beta + W_pos[7]) @ state["blocks.0.attn.W_Q"][head]
        assert torch.allclose(folded["blocks.0.attn.b_Q"][head, 7], expected_q, atol=1e-12)
    expected_u = state["ln_final.b"] @ state["unembed.W_U"]
    assert torch.allclose(folded["unembed.b_U"], expected_u, atol=1e-12)
    assert "blocks.0.ln1.b" not in folded
    assert "ln_final.b" not in folded
    assert "blocks.0.ln1.w" in folded


def test_fold_gain_values():
    model = sharp_model(n_layers=1)
    state = model.state_dict()
    folded = fold_layernorm_gain(fold_layernorm_bias(fold_positions(state)))

    gain = state["blocks.0.ln1.w"]
    for name in ("W_Q", "W_K", "W_V"):
        original = state[f"blocks.0.attn.{name}"]
        assert folded[f"blocks.0.attn.{name}"][1, 4, 2] == gain[4] * original[1, 4, 2]
        assert folded[f"blocks.0.attn.{name}"][3, 0, 7] == gain[0] * original[3, 0, 7]
    final_gain = state["ln_final.w"]
    assert folded["unembed.W_U"][5, 9] == final_gain[5] * state["unembed.W_U"][5, 9]
    assert torch.equal(folded["blocks.0.attn.W_O"], state["blocks.0.attn.W_O"])
    assert not any(key.endswith(".w") for key in folded)


def test_gain_before_bias_raises():
    state = sharp_model(n_layers=1).state_dict()
    with pytest.raises(ValueError, match="fold_positions"):
        fold_layernorm_gain(state)
    with pytest.raises(ValueError, match="fold_layernorm_bias"):
        fold_layernorm_gain(fold_positions(state))
    with pytest.raises(ValueError, match="fold the positions first"):
        fold_layernorm_bias(state)


def test_fold_positions_twice_raises():
    state = fold_positions(sharp_model(n_layers=1).state_dict())
    state["pos_embed.W_pos"] = torch.zeros(24, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="already has query biases"):
        fold_positions(state)


def test_center_writing_weights_values():
    state = sharp_model(n_layers=2).state_dict()
    centred = center_writing_weights(state)

    assert centred["embed.W_E"].mean(-1).abs().max() < 1e-15
    assert centred["blocks.1.attn.W_O"].mean(-1).abs().max() < 1e-15
    row = state["embed.W_E"][3]
    assert torch.allclose(centred["embed.W_E"][3], row - row.mean(), atol=1e-15)
    assert torch.equal(centred["blocks.0.attn.W_Q"], state["blocks.0.attn.W_Q"])


def test_centring_keeps_logits():
    model = sharp_model()
    tokens = random_tokens(model, (2, 16), seed=4)
    centred = folded_forward(fold_layernorm(model, center_writers=True), tokens)
    uncentred = folded_forward(fold_layernorm(model, center_writers=False), tokens)
    assert torch.allclose(centred, uncentred, rtol=0, atol=1e-10)


def test_centring_without_layernorm_raises():
    model = sharp_model(normalization_type=None)
    with pytest.raises(ValueError, match="needs layernorm"):
        fold_layernorm(model, center_writers=True)


def test_folded_weights_fields():
    model = sharp_model(n_layers=2)
    folded = fold_layernorm(model)
    layer = folded.layers[1]
    cfg = model.cfg

    assert isinstance(folded, FoldedWeights)
    assert folded.writers_centred
    assert layer.b_Q.shape == (cfg.n_heads, cfg.n_ctx, cfg.d_head)
    assert layer.b_V.shape == (cfg.n_heads, cfg.d_head)
    expected_b_O = model.blocks[1].ln1.b @ model.blocks[1].attn.W_V[2] @ layer.W_O[2]
    assert torch.allclose(layer.b_O[2], expected_b_O, atol=1e-12)


def test_unknown_positional_type_raises():
    model = sharp_model(n_layers=1)
    model.cfg.positional_embedding_type = "standard"  # bypasses ModelConfig's own check
    with pytest.raises(ValueError, match="shortformer"):
        fold_layernorm(model)


def test_mismatched_state_dict_raises():
    model = sharp_model(n_layers=2)
    state = model.state_dict()
    del state["blocks.1.ln1.b"]
    with pytest.raises(ValueError, match="missing"):
        fold_state_dict(state, model.cfg)

    state = model.state_dict()
    state["blocks.0.attn.W_V"] = state["blocks.0.attn.W_V"][:, :, :4]
    with pytest.raises(ValueError, match="W_V has shape"):
        fold_state_dict(state, model.cfg)


def test_integer_dtype_raises():
    with pytest.raises(ValueError, match="floating-point"):
        fold_layernorm(sharp_model(n_layers=1), dtype=torch.int64)


def test_folded_forward_rejects_bad_tokens():
    folded = fold_layernorm(sharp_model(n_layers=1))
    with pytest.raises(ValueError, match="token ids"):
        folded_forward(folded, torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match="exceeds the context length"):
        folded_forward(folded, torch.zeros(1, 25, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        folded_forward(folded, torch.zeros(1, 3))


@pytest.mark.skipif(
    os.environ.get("CIRCUITS_SLOW_TESTS") != "1",
    reason="slow: tokenizes the validation corpus; set CIRCUITS_SLOW_TESTS=1",
)
def test_folding_on_validation_text():
    from circuits.data import WindowSampler, load_tokens
    from circuits.tokenizer import Tokenizer

    config = tomllib.loads((REPO_ROOT / "configs" / "attn-only-2l.toml").read_text())
    tokenizer = Tokenizer(**config["tokenizer"])
    tokens = load_tokens(str(REPO_ROOT / config["data"]["validation"]), tokenizer, progress=False)
    model = sharp_model(n_layers=2, d_vocab=tokenizer.d_vocab, n_ctx=128)
    windows = WindowSampler(tokens, 128, tokenizer.bos_token_id).sequential_windows(4)

    folded = fold_layernorm(model, dtype=torch.float64)
    assert torch.allclose(folded_forward(folded, windows), model(windows), rtol=0, atol=1e-8)
