import math

import pytest
import torch
import torch.nn.functional as F

import circuits.model as model_module
from circuits.model import AttnOnlyTransformer, ModelConfig, sinusoidal_positions
from conftest import tiny_config, tiny_model


def naive_forward(model: AttnOnlyTransformer, tokens: list[int]) -> torch.Tensor:
    """The documented forward pass written with explicit loops over positions and heads."""
    cfg = model.cfg

    def layer_norm(x, ln):
        if ln is None:
            return torch.stack(x)
        mean = sum(x) / len(x)
        var = sum((v - mean) ** 2 for v in x) / len(x)
        return torch.stack([(v - mean) / math.sqrt(var + cfg.eps) for v in x]) * ln.w + ln.b

    n = len(tokens)
    resid = [model.embed.W_E[t].clone() for t in tokens]
    for block in model.blocks:
        normed = [layer_norm(list(r), block.ln1) for r in resid]
        new = [r.clone() for r in resid]
        for h in range(cfg.n_heads):
            W_Q, W_K = block.attn.W_Q[h], block.attn.W_K[h]
            W_V, W_O = block.attn.W_V[h], block.attn.W_O[h]
            for i in range(n):
                q = (normed[i] + model.pos_embed.W_pos[i]) @ W_Q
                scores = torch.stack(
                    [q @ ((normed[j] + model.pos_embed.W_pos[j]) @ W_K) for j in range(i + 1)]
                ) / math.sqrt(cfg.d_head)
                weights = torch.softmax(scores, 0)
                z = sum(weights[j] * (normed[j] @ W_V) for j in range(i + 1))
                new[i] = new[i] + z @ W_O
        resid = new
    return torch.stack([layer_norm(list(r), model.ln_final) @ model.unembed.W_U for r in resid])


@pytest.mark.parametrize("n_layers", [0, 1, 2])
@pytest.mark.parametrize("normalization_type", ["LN", None])
def test_forward_matches_naive_loops(n_layers, normalization_type):
    model = tiny_model(n_layers=n_layers, normalization_type=normalization_type,
                       dtype=torch.float64)
    tokens = [299, 3, 17, 17, 250, 3, 9]
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
        expected = naive_forward(model, tokens)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_zero_layer_is_bigram_table():
    model = tiny_model(n_layers=0, dtype=torch.float64)
    tokens = torch.tensor([[5, 6, 7, 5]])
    with torch.no_grad():
        logits = model(tokens)[0]
        table = model.ln_final(model.embed.W_E) @ model.unembed.W_U
    torch.testing.assert_close(logits, table[[5, 6, 7, 5]])
    # Position does not matter: the same token gives the same logits at positions 0 and 3.
    torch.testing.assert_close(logits[0], logits[3])


def test_causal():
    model = tiny_model()
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 2, 3, 9, 9, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :3], model(b)[:, :3])
        assert not torch.allclose(model(a)[:, 3:], model(b)[:, 3:])


def test_cache_patterns_and_outputs():
    model = tiny_model(dtype=torch.float64)
    tokens = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        fused = model(tokens)
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, fused)
    assert len(cache.patterns) == 2
    for pattern in cache.patterns:
        assert pattern.shape == (3, 4, 20, 20)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(3, 4, 20, dtype=torch.float64))
        assert torch.all(pattern.triu(1) == 0)
    # The residual stream is the embedding plus every head's output.
    total = model.embed.W_E[tokens] + sum(out.sum(2) for out in cache.head_outputs)
    torch.testing.assert_close(cache.resid_pre[-1], total)


def test_positions_reach_only_queries_and_keys():
    model = tiny_model(n_layers=1, dtype=torch.float64)
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        # With W_Q = 0 every query is zero, so attention is uniform and W_pos has no effect.
        model.blocks[0].attn.W_Q.zero_()
        before = model(tokens)
        model.pos_embed.W_pos.normal_()
        after = model(tokens)
    torch.testing.assert_close(before, after)


def test_attention_scale_and_mask():
    # One head, d_head 4, whose scores are known: q·k = 8 for every pair, so after the
    # 1/sqrt(d_head) scale the pattern is uniform over the allowed keys.
    cfg = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_head=4, n_ctx=5, d_vocab=3,
                      normalization_type=None)
    model = AttnOnlyTransformer(cfg).double()
    with torch.no_grad():
        model.embed.W_E.copy_(torch.tensor([[1.0, 1, 1, 1]] * 3))
        model.pos_embed.W_pos.zero_()
        model.blocks[0].attn.W_Q.copy_(torch.eye(4)[None])
        model.blocks[0].attn.W_K.copy_(torch.eye(4)[None])
        _, cache = model.run_with_cache(torch.tensor([[0, 1, 2, 0]]))
    expected = torch.tensor([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [1 / 3] * 3 + [0], [1 / 4] * 4],
                            dtype=torch.float64)
    torch.testing.assert_close(cache.patterns[0][0, 0], expected)


def test_dropout_reaches_attention():
    model = tiny_model(attn_dropout=0.5).train()
    tokens = torch.randint(0, 300, (2, 16))
    torch.manual_seed(1)
    first = model(tokens)
    torch.manual_seed(2)
    second = model(tokens)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))


def test_smeared_keys_mix_previous_key():
    model = tiny_model(n_layers=1, smear_keys=True, dtype=torch.float64)
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        attn.smear.copy_(torch.tensor([0.0, 2.0, -1.0, 5.0]))
        keys = attn.keys(x)
        plain = torch.einsum("bpm,hmd->bhpd", x, attn.W_K)
    for h in range(4):
        w = torch.sigmoid(attn.smear[h])
        torch.testing.assert_close(keys[0, h, 0], w * plain[0, h, 0])
        for i in range(1, 6):
            torch.testing.assert_close(keys[0, h, i], w * plain[0, h, i] + (1 - w) * plain[0, h, i - 1])


def test_parameter_names_match_transformerlens():
    names = set(tiny_model().state_dict())
    assert {"embed.W_E", "pos_embed.W_pos", "blocks.1.ln1.w", "blocks.1.ln1.b",
            "blocks.0.attn.W_Q", "blocks.0.attn.W_O", "ln_final.w", "ln_final.b",
            "unembed.W_U"} == names - {"blocks.0.ln1.w", "blocks.0.ln1.b", "blocks.0.attn.W_K",
                                       "blocks.0.attn.W_V", "blocks.1.attn.W_Q", "blocks.1.attn.W_K",
                                       "blocks.1.attn.W_V", "blocks.1.attn.W_O"}
    model = tiny_model()
    assert model.blocks[0].attn.W_Q.shape == (4, 32, 8)
    assert model.blocks[0].attn.W_O.shape == (4, 8, 32)


def test_no_layernorm_option_has_no_ln_parameters():
    names = set(tiny_model(normalization_type=None).state_dict())
    assert not any(".ln" in name or name.startswith("ln_") for name in names)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(1, 25, dtype=torch.long), "exceeds the context length"),
        (torch.tensor([[1, 300]]), "token ids must be in"),
        (torch.tensor([[-1, 2]]), "token ids must be in"),
        (torch.zeros(3, dtype=torch.long), "shape \\[batch, pos\\]"),
    ],
)
def test_invalid_tokens(tokens, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(tokens)


def test_float_tokens_rejected():
    with pytest.raises(TypeError, match="integer"):
        tiny_model()(torch.zeros(1, 3))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_layers": -1}, "must be positive"),
        ({"d_model": 0}, "must be positive"),
        ({"normalization_type": "RMS"}, "normalization_type"),
        ({"positional_embedding_type": "standard"}, "shortformer"),
        ({"attn_dropout": 1.0}, "attn_dropout"),
    ],
)
def test_invalid_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_sinusoidal_positions():
    table = sinusoidal_positions(10, 8)
    assert table.shape == (10, 8)
    torch.testing.assert_close(table[0, 0::2], torch.zeros(4))
    torch.testing.assert_close(table[0, 1::2], torch.ones(4))
    torch.testing.assert_close(table[3, 0], torch.tensor(math.sin(3.0)))


def test_chunked_cross_entropy_matches_reference(monkeypatch):
    # Three rows per chunk, so ten rows make four chunks, the last one ragged.
    monkeypatch.setattr(model_module, "CPU_CHUNK_ELEMENTS", 3 * 50)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(10, 50, dtype=torch.float64, generator=generator)).requires_grad_()
    targets = torch.randint(0, 50, (10,), generator=generator)
    upstream = torch.rand(10, dtype=torch.float64, generator=generator)

    losses = model_module.cross_entropy(logits, targets)
    (losses * upstream).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = F.cross_entropy(logits, targets, reduction="none")
    (expected * upstream).sum().backward()

    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=1e-12)


def test_cross_entropy_of_bf16_logits_is_float32():
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(64, 300, generator=generator)).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (64,), generator=generator)

    losses = model_module.cross_entropy(logits, targets)
    losses.mean().backward()
    reference_logits = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(reference_logits, targets, reduction="none")
    expected.mean().backward()

    assert losses.dtype == torch.float32
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-5)
    # The gradient is rounded to bf16 once, which keeps about 3 significant digits.
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=1e-6)


def test_loss_matches_cross_entropy_of_logits():
    model = tiny_model(dtype=torch.float64)
    tokens = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens)
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, 300), tokens[:, 1:].reshape(-1),
                                   reduction="none").view(3, 19)
        torch.testing.assert_close(model.loss(tokens, per_token=True), expected, rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(model.loss(tokens), expected.mean(), rtol=0, atol=1e-12)
