"""Layernorm folding: equivalent weights in which each layernorm is a per-position scale only.

Row vectors, as in ``circuits.model``. For a residual vector x with mean μ(x) over d_model,

    LN(x) = (x − μ(x)) / σ(x) ⊙ w + β,        σ(x) = sqrt(var(x) + eps),

and x̂ = (x − μ(x)) / σ(x) is the normalised vector before the gain w and the bias β.

Derivation for layer l, head h (w, β the gain and bias of layer l's layernorm, p_i = W_pos[i]).
For any matrix W [d_model, n], (x̂ ⊙ w) W = x̂ (diag(w) W). Positions are added after the
layernorm and only to queries and keys, so

    q_i = (LN(x_i) + p_i) W_Q = x̂_i (diag(w) W_Q) + (β + p_i) W_Q = x̂_i W_Q' + b_Q[i]
    k_i = (LN(x_i) + p_i) W_K = x̂_i (diag(w) W_K) + (β + p_i) W_K = x̂_i W_K' + b_K[i]
    v_i =  LN(x_i) W_V        = x̂_i (diag(w) W_V) + β W_V         = x̂_i W_V' + b_V

The layernorm bias joins the positional term of queries and keys, so b_Q and b_K have one row per
position ([n_heads, n_ctx, d_head]). The value bias b_V does not depend on the position. The
head's output at position i is

    Σ_j A[i, j] v_j W_O = Σ_j A[i, j] x̂_j W_V' W_O + (Σ_j A[i, j]) b_V W_O.

Each row of a softmax pattern sums to 1, so the second term is the constant b_O = β W_V W_O per
head. That holds for the patterns the model computes in evaluation. It fails for a pattern after
dropout or for an edited pattern whose rows do not sum to 1, which is why the folded forward pass
keeps b_V inside the values instead of adding b_O. The unembedding folds the same way:
LN_final(x) W_U = x̂ (diag(w_f) W_U) + β_f W_U = x̂ W_U' + b_U.

Centring the writers. Every reader of the residual stream applies a layernorm, which starts by
subtracting the mean over d_model, so adding a multiple of the all-ones vector to any residual
vector changes nothing downstream. Replacing each row of W_E and of every W_O by itself minus its
mean over d_model therefore keeps the logits, and every residual vector then has mean 0, so
x̂ = x / σ(x): the per-position factor 1/σ is all that is left of each layernorm. The scale σ is
unchanged because σ depends only on x − μ(x). Centring is wrong for a model without layernorm,
where nothing removes the mean, and ``fold_state_dict`` raises ValueError for that combination.

The folding is a sequence of small pure steps on state dicts with ``circuits.model``'s parameter
names, run in this order because the bias and position terms use the weights before the gain is
folded in:

1. ``fold_positions``: W_pos into b_Q and b_K (also needed without layernorm);
2. ``fold_layernorm_bias``: each layernorm's β into b_Q, b_K, b_V and b_U;
3. ``fold_layernorm_gain``: each layernorm's w into W_Q, W_K, W_V and W_U;
4. ``center_writing_weights``: W_E and every W_O centred over d_model.

``fold_layernorm(model)`` runs them and returns a ``FoldedWeights``; ``folded_forward`` computes
logits from it. Smeared keys are supported: the smear mixes each key with the previous one after
b_K is added, exactly as the model mixes keys computed from the layer-normed residual plus
positions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from circuits.model import AttnOnlyTransformer, ModelConfig

StateDict = dict[str, torch.Tensor]

_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.attn\.W_Q$")


def _layer_indices(state: Mapping[str, torch.Tensor]) -> list[int]:
    layers = sorted(int(match.group(1)) for key in state if (match := _LAYER_KEY.match(key)))
    if layers != list(range(len(layers))):
        raise ValueError(f"state dict has attention weights for layers {layers}, expected 0 … n-1")
    return layers


def _require(state: Mapping[str, torch.Tensor], key: str, step: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{step}: the state dict has no {key!r}")
    return state[key]


def fold_positions(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Move the positional embedding into per-position query and key biases.

    Adds ``blocks.{l}.attn.b_Q`` and ``b_K`` [n_heads, n_ctx, d_head] equal to W_pos @ W_Q and
    W_pos @ W_K, zero ``b_V`` [n_heads, d_head] and a zero ``unembed.b_U`` [d_vocab], and removes
    ``pos_embed.W_pos``. Run it before ``fold_layernorm_gain``: positions are added after the
    layernorm, so they meet W_Q and W_K without the gain. Unchanged tensors are shared with the
    input, not copied.
    """
    step = "fold_positions"
    W_pos = _require(state, "pos_embed.W_pos", step)
    if any(key.endswith(".attn.b_Q") for key in state):
        raise ValueError(f"{step}: the state dict already has query biases; fold positions once")
    out = dict(state)
    del out["pos_embed.W_pos"]
    for layer in _layer_indices(state):
        prefix = f"blocks.{layer}.attn."
        W_Q = _require(state, prefix + "W_Q", step)
        W_K = _require(state, prefix + "W_K", step)
        W_V = _require(state, prefix + "W_V", step)
        out[prefix + "b_Q"] = W_pos @ W_Q  # [n_heads, n_ctx, d_head]
        out[prefix + "b_K"] = W_pos @ W_K
        out[prefix + "b_V"] = W_V.new_zeros(W_V.shape[0], W_V.shape[2])
    W_U = _require(state, "unembed.W_U", step)
    out["unembed.b_U"] = W_U.new_zeros(W_U.shape[1])
    return out


def fold_layernorm_bias(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Move each layernorm bias β into the biases of the weights that read from it.

    For layer l: b_Q += β W_Q, b_K += β W_K (every position), b_V += β W_V; for the final
    layernorm: b_U += β_f W_U. Removes the ``ln1.b`` and ``ln_final.b`` entries. Needs
    ``fold_positions`` first (it creates the biases) and must run before ``fold_layernorm_gain``.
    A model without layernorm passes through unchanged.
    """
    step = "fold_layernorm_bias"
    if "pos_embed.W_pos" in state:
        raise ValueError(f"{step}: fold the positions first (fold_positions creates b_Q and b_K)")
    out = dict(state)
    for layer in _layer_indices(state):
        bias_key = f"blocks.{layer}.ln1.b"
        if bias_key not in state:
            continue
        beta = out.pop(bias_key)
        prefix = f"blocks.{layer}.attn."
        for name in ("Q", "K"):
            shift = beta @ state[prefix + f"W_{name}"]  # [n_heads, d_head]
            out[prefix + f"b_{name}"] = _require(state, prefix + f"b_{name}", step) + shift[:, None]
        out[prefix + "b_V"] = _require(state, prefix + "b_V", step) + beta @ state[prefix + "W_V"]
    if "ln_final.b" in state:
        beta = out.pop("ln_final.b")
        out["unembed.b_U"] = _require(state, "unembed.b_U", step) + beta @ state["unembed.W_U"]
    return out


def fold_layernorm_gain(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Multiply each layernorm gain w into the rows of the weights that read from it.

    W_Q, W_K, W_V of layer l become diag(w) W (rows scaled), W_U becomes diag(w_f) W_U, and the
    ``ln1.w`` and ``ln_final.w`` entries are removed. Raises ValueError while positions or a
    layernorm bias are still unfolded, because those terms need the weights without the gain.
    """
    step = "fold_layernorm_gain"
    pending = [key for key in state if key == "pos_embed.W_pos" or key.endswith("ln1.b")
               or key == "ln_final.b"]
    if pending:
        raise ValueError(
            f"{step}: fold {pending} first (fold_positions, fold_layernorm_bias); they multiply "
            "the weights without the gain"
        )
    out = dict(state)
    for layer in _layer_indices(state):
        gain_key = f"blocks.{layer}.ln1.w"
        if gain_key not in state:
            continue
        gain = out.pop(gain_key)
        prefix = f"blocks.{layer}.attn."
        for name in ("W_Q", "W_K", "W_V"):
            out[prefix + name] = gain[None, :, None] * state[prefix + name]
    if "ln_final.w" in state:
        gain = out.pop("ln_final.w")
        out["unembed.W_U"] = gain[:, None] * state["unembed.W_U"]
    return out


def center_writing_weights(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Subtract from each row of W_E and of every W_O its mean over d_model.

    Valid only when every reader of the residual stream applies layernorm (see the module
    docstring); ``fold_state_dict`` checks that before calling this step.
    """
    step = "center_writing_weights"
    out = dict(state)
    W_E = _require(state, "embed.W_E", step)
    out["embed.W_E"] = W_E - W_E.mean(-1, keepdim=True)
    for layer in _layer_indices(state):
        key = f"blocks.{layer}.attn.W_O"
        W_O = _require(state, key, step)
        out[key] = W_O - W_O.mean(-1, keepdim=True)
    return out


def fold_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, center_writers: bool | None = None
) -> StateDict:
    """Run the folding steps on a model state dict; ``center_writers`` defaults to "has LN"."""
    _check_config(cfg)
    normalized = cfg.normalization_type == "LN"
    if center_writers is None:
        center_writers = normalized
    if center_writers and not normalized:
        raise ValueError(
            "center_writers=True needs layernorm: without it nothing removes the mean of the "
            "residual stream, so centring W_E and W_O would change the logits"
        )
    _check_state(state, cfg)
    folded = fold_layernorm_gain(fold_layernorm_bias(fold_positions(state)))
    if center_writers:
        folded = center_writing_weights(folded)
    return folded


def _check_config(cfg: ModelConfig) -> None:
    if cfg.positional_embedding_type != "shortformer":
        raise ValueError(
            "folding supports only positional_embedding_type='shortformer' (positions added to the "
            f"layer-normed queries and keys), got {cfg.positional_embedding_type!r}"
        )
    if not cfg.attn_only:
        raise ValueError("folding supports only attention-only models (attn_only=True)")
    if cfg.normalization_type not in ("LN", None):
        raise ValueError(
            f"folding supports normalization_type 'LN' or None, got {cfg.normalization_type!r}"
        )


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "embed.W_E": (cfg.d_vocab, cfg.d_model),
        "pos_embed.W_pos": (cfg.n_ctx, cfg.d_model),
        "unembed.W_U": (cfg.d_model, cfg.d_vocab),
    }
    if cfg.normalization_type == "LN":
        shapes["ln_final.w"] = shapes["ln_final.b"] = (cfg.d_model,)
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}."
        for name in ("W_Q", "W_K", "W_V"):
            shapes[prefix + "attn." + name] = (cfg.n_heads, cfg.d_model, cfg.d_head)
        shapes[prefix + "attn.W_O"] = (cfg.n_heads, cfg.d_head, cfg.d_model)
        if cfg.smear_keys:
            shapes[prefix + "attn.smear"] = (cfg.n_heads,)
        if cfg.normalization_type == "LN":
            shapes[prefix + "ln1.w"] = shapes[prefix + "ln1.b"] = (cfg.d_model,)
    return shapes


def _check_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not match the config (n_layers={cfg.n_layers}, "
            f"normalization_type={cfg.normalization_type!r}, smear_keys={cfg.smear_keys}): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}. Pass an unfolded "
            "AttnOnlyTransformer state dict"
        )
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the config implies {shape}")
        if not tensor.is_floating_point():
            raise ValueError(
                f"{key} has dtype {tensor.dtype}; folding needs floating-point weights"
            )


@dataclass
class FoldedLayer:
    """One attention layer with its layernorm folded in (shapes per head, see the module docstring).

    ``W_Q``, ``W_K``, ``W_V`` [n_heads, d_model, d_head] carry the layernorm gain; ``W_O``
    [n_heads, d_head, d_model] is centred over d_model when the writers were centred. ``b_Q`` and
    ``b_K`` [n_heads, n_ctx, d_head] are (β + W_pos) @ W_Q and (β + W_pos) @ W_K with the weights
    before the gain. ``b_V`` [n_heads, d_head] is β @ W_V. ``smear`` [n_heads] contains the
    smeared-key logits, or is None.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor
    b_K: torch.Tensor
    b_V: torch.Tensor
    smear: torch.Tensor | None = None

    @property
    def b_O(self) -> torch.Tensor:
        """Constant output of each head [n_heads, d_model], b_V @ W_O = β W_V W_O.

        Equal to the bias's share of the head's output only when the pattern's rows sum to 1.
        """
        return torch.einsum("hd,hdm->hm", self.b_V, self.W_O)

    @property
    def W_OV(self) -> torch.Tensor:
        """Dense OV circuits [n_heads, d_model, d_model], W_V @ W_O (small models and tests)."""
        return self.W_V @ self.W_O

    @property
    def W_QK(self) -> torch.Tensor:
        """Dense QK circuits [n_heads, d_model, d_model], W_Q @ W_Kᵀ (small models and tests)."""
        return self.W_Q @ self.W_K.transpose(-1, -2)


@dataclass
class FoldedWeights:
    """All weights of a model with its layernorms folded in.

    ``W_E`` [d_vocab, d_model] (centred when ``writers_centred``), ``W_U`` [d_model, d_vocab] with
    the final gain, ``b_U`` [d_vocab] = β_f W_U, and one ``FoldedLayer`` per layer. ``cfg`` is the
    original model's config; ``normalized`` is True when the 1/σ factors apply.
    """

    cfg: ModelConfig
    W_E: torch.Tensor
    W_U: torch.Tensor
    b_U: torch.Tensor
    layers: list[FoldedLayer]
    writers_centred: bool

    @property
    def normalized(self) -> bool:
        return self.cfg.normalization_type == "LN"

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], cfg: ModelConfig, writers_centred: bool
    ) -> "FoldedWeights":
        """Collect the output of ``fold_state_dict`` into typed fields."""
        leftover = [key for key in state if ".ln" in key or key.startswith("ln_") or "W_pos" in key]
        if leftover:
            raise ValueError(f"the state dict is not fully folded: {leftover[:6]} remain")
        layers = []
        for layer in range(cfg.n_layers):
            prefix = f"blocks.{layer}.attn."
            layers.append(
                FoldedLayer(
                    **{name: _require(state, prefix + name, "FoldedWeights")
                       for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")},
                    smear=state.get(prefix + "smear"),
                )
            )
        return cls(
            cfg=cfg,
            W_E=_require(state, "embed.W_E", "FoldedWeights"),
            W_U=_require(state, "unembed.W_U", "FoldedWeights"),
            b_U=_require(state, "unembed.b_U", "FoldedWeights"),
            layers=layers,
            writers_centred=writers_centred,
        )


def fold_layernorm(
    model: AttnOnlyTransformer,
    center_writers: bool | None = None,
    dtype: torch.dtype | None = None,
) -> FoldedWeights:
    """Fold a model's layernorms (see the module docstring) into a ``FoldedWeights``.

    ``center_writers`` defaults to True for a model with layernorm and must be False without.
    ``dtype`` (for example ``torch.float64``) converts the weights before folding, so the folding
    itself runs in that precision. The model is not modified.
    """
    if not isinstance(model, AttnOnlyTransformer):
        raise TypeError(f"expected an AttnOnlyTransformer, got {type(model).__name__}")
    state = {key: value.detach() for key, value in model.state_dict().items()}
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        state = {key: value.to(dtype) for key, value in state.items()}
    if center_writers is None:
        center_writers = model.cfg.normalization_type == "LN"
    folded = fold_state_dict(state, model.cfg, center_writers=center_writers)
    return FoldedWeights.from_state_dict(folded, model.cfg, writers_centred=center_writers)


class FoldedCache(NamedTuple):
    """Activations of ``folded_run_with_cache``, one entry per layer.

    ``patterns[l]`` is [batch, head, query, key], and ``head_outputs[l]`` [batch, pos, head,
    d_model] includes each head's constant b_O. ``resid_pre[l]`` is [batch, pos, d_model], with
    ``resid_pre[n_layers]`` the stream the unembedding reads. ``scales[l]`` [batch, pos, 1] is
    σ of ``resid_pre[l]`` (ones without layernorm), with ``scales[n_layers]`` the final one.
    """

    patterns: list[torch.Tensor]
    head_outputs: list[torch.Tensor]
    resid_pre: list[torch.Tensor]
    scales: list[torch.Tensor]


def layernorm_scale(folded: FoldedWeights, resid: torch.Tensor) -> torch.Tensor:
    """σ(x) = sqrt(var(x) + eps) over d_model [..., 1], or ones for a model without layernorm."""
    if not folded.normalized:
        return torch.ones_like(resid[..., :1])
    centred = resid - resid.mean(-1, keepdim=True)
    return (centred.pow(2).mean(-1, keepdim=True) + folded.cfg.eps).sqrt()


def normalize(folded: FoldedWeights, resid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = (x − μ(x)) / σ with a given σ; the mean is ~0 already when the writers are centred."""
    if not folded.normalized:
        return resid
    return (resid - resid.mean(-1, keepdim=True)) / scale


def attention_pattern(layer: FoldedLayer, normed: torch.Tensor) -> torch.Tensor:
    """Compute a folded layer's causal pattern [batch, head, query, key] from x̂ [batch, pos, d]."""
    n_pos = normed.shape[1]
    q = torch.einsum("bpm,hmd->bhpd", normed, layer.W_Q) + layer.b_Q[None, :, :n_pos]
    k = torch.einsum("bpm,hmd->bhpd", normed, layer.W_K) + layer.b_K[None, :, :n_pos]
    if layer.smear is not None:
        weight = torch.sigmoid(layer.smear).to(k.dtype)[None, :, None, None]
        previous = F.pad(k, (0, 0, 1, 0))[:, :, :-1]
        k = weight * k + (1 - weight) * previous
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def head_outputs(layer: FoldedLayer, normed: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Per-head outputs [batch, pos, head, d_model] = Σ_j A[i, j] (x̂_j W_V + b_V) W_O."""
    v = torch.einsum("bpm,hmd->bhpd", normed, layer.W_V) + layer.b_V[None, :, None]
    return torch.einsum("bhqk,bhkd,hdm->bqhm", pattern, v, layer.W_O)


def _check_tokens(folded: FoldedWeights, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError("tokens must be an integer torch.Tensor of shape [batch, pos]")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.shape[1] > folded.cfg.n_ctx:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds the context length n_ctx={folded.cfg.n_ctx}"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= folded.cfg.d_vocab):
        raise ValueError(
            f"token ids must be in [0, {folded.cfg.d_vocab}), got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )


def folded_run_with_cache(
    folded: FoldedWeights, tokens: torch.Tensor
) -> tuple[torch.Tensor, FoldedCache]:
    """Compute logits [batch, pos, d_vocab] from folded weights, recording a ``FoldedCache``.

    Per layer: σ = sqrt(var(x) + eps), x̂ = (x − μ)/σ, q = x̂ W_Q + b_Q, k = x̂ W_K + b_K (then
    smeared if the model smears keys), v = x̂ W_V + b_V, x += Σ_h A v W_O; finally
    logits = x̂ W_U + b_U. Evaluation only: no dropout.
    """
    _check_tokens(folded, tokens)
    cache = FoldedCache([], [], [], [])
    resid = folded.W_E[tokens]
    for layer in folded.layers:
        scale = layernorm_scale(folded, resid)
        normed = normalize(folded, resid, scale)
        pattern = attention_pattern(layer, normed)
        out = head_outputs(layer, normed, pattern)
        cache.resid_pre.append(resid)
        cache.scales.append(scale)
        cache.patterns.append(pattern)
        cache.head_outputs.append(out)
        resid = resid + out.sum(2)

    scale = layernorm_scale(folded, resid)
    cache.resid_pre.append(resid)
    cache.scales.append(scale)
    logits = normalize(folded, resid, scale) @ folded.W_U + folded.b_U
    return logits, cache


def folded_forward(folded: FoldedWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] computed from folded weights (see ``folded_run_with_cache``)."""
    return folded_run_with_cache(folded, tokens)[0]
