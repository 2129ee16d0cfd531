"""The attention-only transformer of Elhage et al. (2021), "A Mathematical Framework for
Transformer Circuits".

Convention: row vectors, as TransformerLens. A head reads a residual vector x (a row of the
residual stream) as ``x @ W_Q``. Token embeddings are the rows of ``W_E`` [d_vocab, d_model], and
``W_U`` is [d_model, d_vocab]. Per head, ``W_Q``, ``W_K`` and ``W_V`` are [d_model, d_head] and
``W_O`` is [d_head, d_model].

Forward pass, for tokens t_0 … t_{T-1} (position i, layer l, head h):

    x_0[i]      = W_E[t_i]                                  (positions never enter the residual)
    r[i]        = LN1_l(x_l[i])                             (identity when normalization_type is None)
    q[i], k[i]  = (r[i] + W_pos[i]) @ W_Q^h, (r[i] + W_pos[i]) @ W_K^h    ("shortformer" positions)
    v[i]        = r[i] @ W_V^h
    A^h[i, j]   = softmax_j(q[i]·k[j] / sqrt(d_head)) over j <= i, 0 for j > i
    x_{l+1}[i]  = x_l[i] + Σ_h Σ_j A^h[i, j] v[j] @ W_O^h
    logits[i]   = LN_final(x_L[i]) @ W_U

LN(x) = (x − mean(x)) / sqrt(var(x) + eps) * w + b, with the biased variance over d_model.
With 0 layers this is the bigram model LN_final(W_E[t]) @ W_U. There are no biases.
Parameter names and shapes are TransformerLens's, so a state dict loads in either library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Shape and options of an attention-only transformer.

    Field names follow TransformerLens's ``HookedTransformerConfig`` where one exists.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_vocab: int
    normalization_type: Literal["LN"] | None = "LN"
    positional_embedding_type: Literal["shortformer"] = "shortformer"
    attn_only: bool = True
    eps: float = 1e-5
    # Dropout applied to the attention pattern (after the softmax) during training.
    attn_dropout: float = 0.0
    # Standard deviation of the normal initialisation of W_E, W_Q, W_K, W_V, W_U; W_O also
    # divides it by sqrt(2 * n_layers) so the residual stream's scale does not grow with depth.
    init_range: float = 0.02
    # "sinusoidal": W_pos starts as the sine/cosine table of Vaswani et al. (2017) scaled by
    # pos_init_scale and stays learnable; "normal": normal with std init_range.
    pos_init: Literal["sinusoidal", "normal"] = "sinusoidal"
    pos_init_scale: float = 1.0
    # "smeared keys": each head's key at position i becomes
    # sigmoid(a) * k[i] + (1 - sigmoid(a)) * k[i - 1], with one learned a per head.
    smear_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ModelConfig.{name} must be an int, got {value!r}")
            if value < (0 if name == "n_layers" else 1):
                raise ValueError(f"ModelConfig.{name} must be positive, got {value}")
        if self.normalization_type not in ("LN", None):
            raise ValueError(
                f"normalization_type must be 'LN' or None, got {self.normalization_type!r}"
            )
        if self.positional_embedding_type != "shortformer":
            raise ValueError(
                "only positional_embedding_type='shortformer' (positions added to queries and "
                f"keys only) is implemented, got {self.positional_embedding_type!r}"
            )
        if not self.attn_only:
            raise ValueError("only attention-only models (attn_only=True) are implemented")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")
        if self.pos_init not in ("sinusoidal", "normal"):
            raise ValueError(f"pos_init must be 'sinusoidal' or 'normal', got {self.pos_init!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build a config from a dict, ignoring keys that are not config fields."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class LayerNorm(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position sqrt(var + eps) [..., 1], the factor the folded circuits keep explicit."""
        centred = x - x.mean(-1, keepdim=True)
        return (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 even under bf16 autocast: the variance of bf16 values is too coarse.
        # F.layer_norm is the same formula (biased variance) in one fused kernel.
        dtype = x.dtype
        compute = torch.promote_types(dtype, torch.float32)
        normed = F.layer_norm(x.to(compute), x.shape[-1:], self.w.to(compute), self.b.to(compute),
                              self.eps)
        return normed.to(dtype)


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shape = (cfg.n_heads, cfg.d_model, cfg.d_head)
        self.W_Q = nn.Parameter(torch.empty(shape))
        self.W_K = nn.Parameter(torch.empty(shape))
        self.W_V = nn.Parameter(torch.empty(shape))
        self.W_O = nn.Parameter(torch.empty(cfg.n_heads, cfg.d_head, cfg.d_model))
        if cfg.smear_keys:
            # Logit of the weight on the current key; 0 starts as an even mix.
            self.smear = nn.Parameter(torch.zeros(cfg.n_heads))

    def keys(self, key_input: torch.Tensor) -> torch.Tensor:
        """Keys [batch, head, pos, d_head] from the layer-normed residual plus positions."""
        return self._smear(torch.einsum("bpm,hmd->bhpd", key_input, self.W_K))

    def _smear(self, k: torch.Tensor) -> torch.Tensor:
        if not self.cfg.smear_keys:
            return k
        weight = torch.sigmoid(self.smear).to(k.dtype)[None, :, None, None]
        previous = F.pad(k, (0, 0, 1, 0))[:, :, :-1]
        return weight * k + (1 - weight) * previous

    def _qkv(self, normed: torch.Tensor, pos: torch.Tensor):
        """Project to queries, keys and values, each [batch, head, pos, d_head] (strided views).

        W_Q and W_K are applied together as one [d_model, 2 * n_heads * d_head] matrix, so their
        shared input is cast to bf16 once under autocast, and W_V as one [d_model, n_heads *
        d_head] matrix.
        """
        batch, n_pos, d_model = normed.shape
        n_heads, d_head = self.cfg.n_heads, self.cfg.d_head
        qk_weight = torch.cat([self.W_Q, self.W_K]).permute(1, 0, 2).reshape(d_model, -1)
        qk = ((normed + pos) @ qk_weight).view(batch, n_pos, 2, n_heads, d_head)
        q = qk[:, :, 0].transpose(1, 2)
        k = self._smear(qk[:, :, 1].transpose(1, 2))
        v_weight = self.W_V.permute(1, 0, 2).reshape(d_model, -1)
        v = (normed @ v_weight).view(batch, n_pos, n_heads, d_head).transpose(1, 2)
        return q, k, v

    def residual_update(self, normed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Compute the sum of all heads' outputs [batch, pos, d_model] with the fused kernel.

        This is the value of ``forward(...)[0].sum(2)``, but W_O is applied as one
        [n_heads * d_head, d_model] matrix, which sums over heads inside the matrix product
        instead of materialising every head's output.
        """
        batch, n_pos, d_model = normed.shape
        q, k, v = self._qkv(normed, pos)
        dropout = self.cfg.attn_dropout if self.training else 0.0
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        z = z.transpose(1, 2).reshape(batch, n_pos, -1)
        return z @ self.W_O.reshape(-1, d_model)

    def forward(
        self,
        normed: torch.Tensor,
        pos: torch.Tensor,
        return_pattern: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return per-head outputs [batch, pos, head, d_model] and optionally the pattern.

        The pattern [batch, head, query, key] is computed explicitly when requested; otherwise
        the fused scaled-dot-product kernel runs, which never materialises it.
        """
        q, k, v = self._qkv(normed, pos)
        dropout = self.cfg.attn_dropout if self.training else 0.0

        pattern = None
        if return_pattern:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)
            n_pos = scores.shape[-1]
            mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).tril()
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
            pattern = scores.softmax(-1)
            z = F.dropout(pattern, p=dropout, training=self.training).to(v.dtype) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)

        head_out = torch.einsum("bhpd,hdm->bphm", z, self.W_O)
        return head_out, pattern


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps) if cfg.normalization_type == "LN" else None
        self.attn = Attention(cfg)


class ActivationCache(NamedTuple):
    """Activations recorded by ``run_with_cache``, one entry per layer.

    ``patterns[l]`` [batch, head, query, key]; ``head_outputs[l]`` [batch, pos, head, d_model];
    ``resid_pre[l]`` [batch, pos, d_model], the residual stream read by layer l
    (``resid_pre[n_layers]`` is the stream read by the unembedding).
    """

    patterns: list[torch.Tensor]
    head_outputs: list[torch.Tensor]
    resid_pre: list[torch.Tensor]


class AttnOnlyTransformer(nn.Module):
    """Attention-only transformer with any number of layers (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.pos_embed = PosEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps) if cfg.normalization_type == "LN" else None
        self.unembed = Unembed(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        std = cfg.init_range
        nn.init.normal_(self.embed.W_E, std=std)
        nn.init.normal_(self.unembed.W_U, std=std)
        if cfg.pos_init == "sinusoidal":
            self.pos_embed.W_pos.copy_(sinusoidal_positions(cfg.n_ctx, cfg.d_model))
            self.pos_embed.W_pos.mul_(cfg.pos_init_scale)
        else:
            nn.init.normal_(self.pos_embed.W_pos, std=std)
        for block in self.blocks:
            for weight in (block.attn.W_Q, block.attn.W_K, block.attn.W_V):
                nn.init.normal_(weight, std=std)
            nn.init.normal_(block.attn.W_O, std=std / math.sqrt(2 * max(cfg.n_layers, 1)))

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (
            torch.int64,
            torch.int32,
        ):
            raise TypeError("tokens must be an integer torch.Tensor of shape [batch, pos]")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the context length n_ctx="
                f"{self.cfg.n_ctx}; split the text into windows of at most {self.cfg.n_ctx} tokens"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            raise ValueError(
                f"token ids must be in [0, {self.cfg.d_vocab}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _residual(self, tokens: torch.Tensor, cache: ActivationCache | None) -> torch.Tensor:
        """Run every layer and return the final residual stream [batch, pos, d_model]."""
        self._check_tokens(tokens)
        n_pos = tokens.shape[1]
        resid = F.embedding(tokens, self.embed.W_E)
        pos = self.pos_embed.W_pos[:n_pos]

        for block in self.blocks:
            if cache is not None:
                cache.resid_pre.append(resid)
            normed = block.ln1(resid) if block.ln1 is not None else resid
            if cache is None:
                resid = resid + block.attn.residual_update(normed, pos)
                continue
            head_out, pattern = block.attn(normed, pos, return_pattern=True)
            cache.patterns.append(pattern)
            cache.head_outputs.append(head_out)
            resid = resid + head_out.sum(2)

        if cache is not None:
            cache.resid_pre.append(resid)
        return resid

    def _unembed(self, resid: torch.Tensor) -> torch.Tensor:
        final = self.ln_final(resid) if self.ln_final is not None else resid
        return final @ self.unembed.W_U

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, d_vocab] for token ids [batch, pos]."""
        return self._unembed(self._residual(tokens, cache=None))

    def run_with_cache(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ActivationCache]:
        """Logits plus every head's attention pattern and output (see ``ActivationCache``)."""
        cache = ActivationCache([], [], [])
        logits = self._unembed(self._residual(tokens, cache))
        return logits, cache

    def loss(self, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy in nats: the mean, or [batch, pos - 1] with per_token.

        Only the positions that have a next token are unembedded, and the cross-entropy runs in
        float32 (float64 for a float64 model) one chunk of rows at a time (``cross_entropy``).
        """
        logits = self._unembed(self._residual(tokens, cache=None)[:, :-1])
        targets = tokens[:, 1:]
        losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        losses = losses.view(targets.shape)
        return losses if per_token else losses.mean()


# Logits per chunk in ``cross_entropy``. On CPU a chunk's float32 copy (4 MiB) stays in cache. For
# [8176, 2049] bf16 logits (2049 tokens, batch 16 x 511) on a 2-core Xeon with AMX and torch 2.13,
# forward plus backward took 32-34 ms with 2^18-2^20 elements per chunk and 51 ms with 2^22. It
# took 86 ms as F.cross_entropy of a float32 copy. On GPUs, larger chunks launch fewer kernels.
CPU_CHUNK_ELEMENTS = 1 << 20
# NOTE: a guess, not measured: no GPU was available when the CPU figure was measured.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(logits: torch.Tensor) -> int:
    elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // logits.shape[-1])


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        rows = _chunk_rows(logits)
        logsumexp = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].to(compute)
            logsumexp[start:start + rows] = torch.logsumexp(chunk, dim=-1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).to(compute)
        ctx.save_for_backward(logits, targets, logsumexp)
        return logsumexp - target_logits

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        rows = _chunk_rows(logits)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            # d loss_i / d logit_ij = softmax_ij - [j == target_i]. torch.sub promotes the chunk
            # to logsumexp's dtype, so the saved logits are never written.
            grad = torch.sub(logits[start:end], logsumexp[start:end, None]).exp_()
            grad[torch.arange(end - start, device=grad.device), targets[start:end]] -= 1.0
            grad.mul_(grad_losses[start:end, None].to(grad.dtype))
            grad_logits[start:end] = grad
        return grad_logits, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Compute the cross-entropy [rows] of logits [rows, d_vocab] against target ids [rows].

    The value of ``F.cross_entropy(logits.float(), targets, reduction="none")``, computed in
    float32 (float64 for float64 logits) one chunk of rows at a time. Unlike that call it never
    keeps a float32 copy of all the bf16 logits, nor the float32 log-softmax for the backward
    pass, which recomputes the softmax from the saved logits and each row's logsumexp.
    """
    return _ChunkedCrossEntropy.apply(logits, targets)


def sinusoidal_positions(n_ctx: int, d_model: int) -> torch.Tensor:
    """Sine/cosine position table [n_ctx, d_model] (Vaswani et al., 2017); entries in [-1, 1]."""
    position = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    frequency = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return table.float()
