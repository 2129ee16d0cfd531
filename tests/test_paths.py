"""Path expansion identity, single terms against direct computations, term importance, ablation."""

import math

import pytest
import torch
import torch.nn.functional as F

from circuits.analysis.icl import in_context_learning_score
from circuits.analysis.paths import (
    ablate_heads,
    head_ablation_icl,
    path_expansion,
    term_importance,
)
from circuits.folding import fold_layernorm
from conftest import tiny_model


def sharp_model(n_layers, seed=0, dtype=torch.float64, **overrides):
    """A tiny model with non-uniform attention and logits of order 10 (layernorm by default)."""
    model = tiny_model(seed=seed, n_layers=n_layers, **overrides).to(dtype)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(15)
            block.attn.W_K.mul_(15)
            block.attn.W_O.mul_(20)
        model.unembed.W_U.mul_(15)
        model.embed.W_E.add_(0.1)
        if model.cfg.normalization_type is None:
            model.embed.W_E.mul_(30)
        if model.cfg.smear_keys:
            for block in model.blocks:
                block.attn.smear.normal_()
    return model


def random_tokens(shape, seed=1, d_vocab=300):
    return torch.randint(0, d_vocab, shape, generator=torch.Generator().manual_seed(seed))


def parameters(model):
    """Folded matrices computed directly from the parameters (gains folded, writers centred)."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = {"W_E": p["embed.W_E"] - p["embed.W_E"].mean(-1, keepdim=True),
           "W_U": p["ln_final.w"][:, None] * p["unembed.W_U"],
           "b_U": p["ln_final.b"] @ p["unembed.W_U"]}
    for layer in range(model.cfg.n_layers):
        gain = p[f"blocks.{layer}.ln1.w"][None, :, None]
        W_O = p[f"blocks.{layer}.attn.W_O"]
        out[f"W_V{layer}"] = gain * p[f"blocks.{layer}.attn.W_V"]
        out[f"W_O{layer}"] = W_O - W_O.mean(-1, keepdim=True)
        out[f"bias_out{layer}"] = torch.einsum(
            "m,hmd,hdn->hn", p[f"blocks.{layer}.ln1.b"], p[f"blocks.{layer}.attn.W_V"],
            out[f"W_O{layer}"])
    return out


def frozen_scales(model, tokens):
    _, cache = model.run_with_cache(tokens)
    scales = [model.blocks[layer].ln1.scale(cache.resid_pre[layer])
              for layer in range(model.cfg.n_layers)]
    scales.append(model.ln_final.scale(cache.resid_pre[-1]))
    return cache, scales


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_terms_sum_to_logits(n_layers):
    model = sharp_model(n_layers)
    tokens = random_tokens((2, 16))
    expansion = path_expansion(model, tokens)

    logits = model(tokens)
    assert logits.abs().max() > 1.0
    assert torch.allclose(expansion.logits, logits, rtol=0, atol=1e-8)
    assert torch.allclose(expansion.total(), logits, rtol=0, atol=1e-8)
    if n_layers < 2:
        assert expansion.virtual is None


@pytest.mark.parametrize("overrides", [dict(normalization_type=None), dict(smear_keys=True)],
                         ids=["no-layernorm", "smeared-keys"])
def test_terms_sum_to_logits_other_configs(overrides):
    model = sharp_model(2, **overrides)
    tokens = random_tokens((2, 16))
    expansion = path_expansion(model, tokens)

    logits = model(tokens)
    assert torch.allclose(expansion.total(), logits, rtol=0, atol=1e-8)
    if "normalization_type" in overrides:
        assert torch.count_nonzero(expansion.head_bias) == 0  # no layernorm bias to carry


def test_head_terms_match_direct_computation():
    model = sharp_model(1)
    tokens = random_tokens((2, 12))
    expansion = path_expansion(model, tokens)
    cache, scales = frozen_scales(model, tokens)
    p = parameters(model)
    x0 = p["W_E"][tokens]

    direct = (x0 / scales[-1]) @ p["W_U"]
    assert torch.allclose(expansion.direct, direct, atol=1e-10)
    assert torch.allclose(expansion.unembed_bias, p["b_U"], atol=1e-12)
    for head in range(model.cfg.n_heads):
        pattern = cache.patterns[0][:, head]
        moved = pattern @ ((x0 / scales[0]) @ p["W_V0"][head] @ p["W_O0"][head])
        expected = (moved / scales[-1]) @ p["W_U"]
        assert torch.allclose(expansion.heads[0, head], expected, atol=1e-10)
        expected_bias = (p["bias_out0"][head] / scales[-1]) @ p["W_U"]
        assert torch.allclose(expansion.head_bias[0, head], expected_bias, atol=1e-10)


def test_virtual_term_matches_direct_computation():
    model = sharp_model(2)
    tokens = random_tokens((2, 12))
    expansion = path_expansion(model, tokens)
    cache, scales = frozen_scales(model, tokens)
    p = parameters(model)
    x0 = p["W_E"][tokens]

    for source, target in [(0, 0), (1, 3), (3, 2)]:
        ov_source = p["W_V0"][source] @ p["W_O0"][source]
        ov_target = p["W_V1"][target] @ p["W_O1"][target]
        first = cache.patterns[0][:, source] @ (x0 / scales[0])
        second = cache.patterns[1][:, target] @ (first / scales[1])
        expected = (second @ ov_source @ ov_target / scales[-1]) @ p["W_U"]
        assert torch.allclose(expansion.virtual[source, target], expected, atol=1e-10)

        bias_path = cache.patterns[1][:, target] @ (p["bias_out0"][source] / scales[1])
        expected_bias = (bias_path @ ov_target / scales[-1]) @ p["W_U"]
        assert torch.allclose(expansion.virtual_bias[source, target], expected_bias, atol=1e-10)


def test_three_layers_rejected():
    model = sharp_model(3)
    with pytest.raises(ValueError, match="0, 1 and 2 layers"):
        path_expansion(model, random_tokens((1, 4)))


def test_uncentred_folding_rejected():
    folded = fold_layernorm(sharp_model(1), center_writers=False)
    with pytest.raises(ValueError, match="centred writers"):
        path_expansion(folded, random_tokens((1, 4)))


def mean_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1)).item()


def test_term_importance_matches_partial_sums():
    model = sharp_model(2)
    windows = random_tokens((5, 16), seed=2)
    importance = term_importance(model, windows, batch_size=2, dtype=torch.float64)
    expansion = path_expansion(model, windows)

    order0 = expansion.order(0)
    by_layer = [(expansion.heads[layer] + expansion.head_bias[layer]).sum(0) for layer in range(2)]
    assert importance.loss_order0 == pytest.approx(mean_loss(order0, windows), abs=1e-10)
    for layer in range(2):
        assert importance.loss_order0_plus_layer[layer] == pytest.approx(
            mean_loss(order0 + by_layer[layer], windows), abs=1e-10)
    assert importance.loss_upto_order1 == pytest.approx(
        mean_loss(order0 + expansion.order(1), windows), abs=1e-10)
    assert importance.loss_full == pytest.approx(model.loss(windows).item(), abs=1e-10)
    assert importance.loss_upto_order2 == pytest.approx(importance.loss_full, abs=1e-10)
    assert importance.uniform_loss == pytest.approx(math.log(300))
    assert importance.n_tokens == 5 * 15

    table = importance.marginal_reductions()
    assert list(table["terms"]) == ["order 0", "order 1", "order 1, layer 0", "order 1, layer 1",
                                    "order 2"]
    assert table["reduction"].iloc[0] == pytest.approx(math.log(300) - importance.loss_order0)
    total_reduction = table["reduction"].iloc[[0, 1, 4]].sum()
    assert total_reduction == pytest.approx(math.log(300) - importance.loss_full, abs=1e-10)


def test_term_importance_zero_layers():
    model = sharp_model(0)
    windows = random_tokens((3, 8))
    importance = term_importance(model, windows, dtype=torch.float64)
    assert importance.loss_order0 == pytest.approx(model.loss(windows).item(), abs=1e-10)
    assert importance.loss_upto_order1 is None
    assert importance.loss_upto_order2 is None
    assert importance.loss_order0_plus_layer == []


def test_frozen_ablation_removes_paths_through_head():
    model = sharp_model(2)
    tokens = random_tokens((2, 12))
    expansion = path_expansion(model, tokens)

    ablated = ablate_heads(model, tokens, [(0, 2)])
    expected = (expansion.total() - expansion.heads[0, 2] - expansion.head_bias[0, 2]
                - expansion.virtual[2].sum(0) - expansion.virtual_bias[2].sum(0))
    assert torch.allclose(ablated, expected, atol=1e-8)

    both = ablate_heads(model, tokens, [(0, 2), (1, 1)])
    expected_both = (expected - expansion.heads[1, 1] - expansion.head_bias[1, 1]
                     - expansion.virtual[:, 1].sum(0) - expansion.virtual_bias[:, 1].sum(0)
                     + expansion.virtual[2, 1] + expansion.virtual_bias[2, 1])
    assert torch.allclose(both, expected_both, atol=1e-8)


def test_ablating_nothing_keeps_logits():
    model = sharp_model(2)
    tokens = random_tokens((2, 12))
    assert torch.allclose(ablate_heads(model, tokens, []), model(tokens), atol=1e-10)


def test_last_layer_ablation_with_recomputed_layernorm():
    model = sharp_model(2)
    tokens = random_tokens((2, 12))
    _, cache = model.run_with_cache(tokens)

    ablated = ablate_heads(model, tokens, [(1, 3)], freeze_scales=False)
    resid = cache.resid_pre[-1] - cache.head_outputs[1][:, :, 3]
    expected = model.ln_final(resid) @ model.unembed.W_U
    assert torch.allclose(ablated, expected, atol=1e-10)


def test_ablation_rejects_unknown_head():
    model = sharp_model(2)
    with pytest.raises(ValueError, match="out of range"):
        ablate_heads(model, random_tokens((1, 4)), [(2, 0)])


def test_head_ablation_icl_values():
    model = sharp_model(2)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0] = 0  # L1H0 writes nothing, so removing it changes nothing
    windows = random_tokens((6, 24), seed=5)
    table = head_ablation_icl(model, windows, batch_size=4, dtype=torch.float64)

    assert list(table["name"]) == [f"L{l}H{h}" for l in range(2) for h in range(4)]
    clean = in_context_learning_score(model, windows)
    assert table["icl_score"].iloc[0] == pytest.approx(clean.score, abs=1e-10)
    silent = table.set_index("name").loc["L1H0"]
    assert silent["change"] == pytest.approx(0.0, abs=1e-12)

    # L0H1 by hand: ablated logits, per-token losses, then index 22 minus index 2 (24 tokens).
    ablated = ablate_heads(model, windows, [(0, 1)])
    losses = F.cross_entropy(ablated[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    expected = (losses[:, 21].mean() - losses[:, 1].mean()).item()
    assert table.set_index("name").loc["L0H1", "ablated_icl_score"] == pytest.approx(expected,
                                                                                    abs=1e-10)
