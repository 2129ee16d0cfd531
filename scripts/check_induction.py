#!/usr/bin/env python3
"""Check a checkpoint for induction heads, reading only config.json and model.safetensors.

    python scripts/check_induction.py checkpoints/attn-only-2l [--json]

This script does not import the ``circuits`` package: it reimplements in NumPy (float64) the
forward pass that ``checkpoints/README.md`` documents, so a pass here also confirms that the
documented forward pass is the one the checkpoint was trained with.

Two measurements, on sequences of BOS followed by random tokens, drawn without replacement from
ids 100 to min(8000, K − 1) − 1 with a fixed seed:

- repeated-copy loss: 50 random tokens, repeated once (101 tokens). The first-copy loss is the
  mean next-token loss on positions 1-50 (each predicted from everything before it), the
  second-copy loss the mean on positions 51-100, averaged over 20 sequences. Induction shows as a
  second-copy loss far below the first; the criterion is a ratio below 0.35.
- prefix-matching score of every head: 25 random tokens repeated 4 times (101 tokens); for each
  query position p in repeats 2-4, the attention on the positions p − 25k + 1 (k >= 1) that lie
  in earlier repeats, averaged over queries and 10 sequences. The criterion is a head above 0.5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

RATIO_THRESHOLD = 0.35
PREFIX_THRESHOLD = 0.5


def layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float):
    if w is None:
        return x
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * w + b


def forward(weights: dict, config: dict, tokens: np.ndarray):
    """Return (logits [T, d_vocab], patterns [n_layers][n_heads, T, T]) for one sequence."""
    eps = config["eps"]
    normalized = config["normalization_type"] == "LN"
    n = len(tokens)
    resid = weights["embed.W_E"][tokens]
    pos = weights["pos_embed.W_pos"][:n]
    mask = np.tril(np.ones((n, n), dtype=bool))

    patterns = []
    for layer in range(config["n_layers"]):
        prefix = f"blocks.{layer}."
        w = weights.get(prefix + "ln1.w") if normalized else None
        b = weights.get(prefix + "ln1.b") if normalized else None
        normed = layer_norm(resid, w, b, eps)
        W_Q, W_K = weights[prefix + "attn.W_Q"], weights[prefix + "attn.W_K"]
        W_V, W_O = weights[prefix + "attn.W_V"], weights[prefix + "attn.W_O"]
        q = np.einsum("pm,hmd->hpd", normed + pos, W_Q)
        k = np.einsum("pm,hmd->hpd", normed + pos, W_K)
        if config.get("smear_keys", False):
            gate = 1 / (1 + np.exp(-weights[prefix + "attn.smear"]))[:, None, None]
            previous = np.concatenate([np.zeros_like(k[:, :1]), k[:, :-1]], axis=1)
            k = gate * k + (1 - gate) * previous
        v = np.einsum("pm,hmd->hpd", normed, W_V)

        scores = q @ k.transpose(0, 2, 1) / np.sqrt(config["d_head"])
        scores = np.where(mask, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        pattern = np.exp(scores)
        pattern /= pattern.sum(-1, keepdims=True)
        patterns.append(pattern)
        resid = resid + np.einsum("hpd,hdm->pm", pattern @ v, W_O)

    w = weights.get("ln_final.w") if normalized else None
    b = weights.get("ln_final.b") if normalized else None
    return layer_norm(resid, w, b, eps) @ weights["unembed.W_U"], patterns


def token_losses(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Loss of token i (i >= 1) predicted from the logits at position i − 1, [T − 1]."""
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(tokens) - 1), tokens[1:]]


def random_repeats(rng, bos: int, high: int, n_tokens: int, n_repeats: int) -> np.ndarray:
    body = rng.choice(np.arange(100, high), size=n_tokens, replace=False)
    return np.concatenate([[bos], np.tile(body, n_repeats)]).astype(np.int64)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Map each tensor the forward pass reads to the shape that config.json implies."""
    d_model, d_head, n_heads = config["d_model"], config["d_head"], config["n_heads"]
    shapes = {
        "embed.W_E": (config["d_vocab"], d_model),
        "pos_embed.W_pos": (config["n_ctx"], d_model),
        "unembed.W_U": (d_model, config["d_vocab"]),
    }
    for layer in range(config["n_layers"]):
        prefix = f"blocks.{layer}.attn."
        for name in ("W_Q", "W_K", "W_V"):
            shapes[prefix + name] = (n_heads, d_model, d_head)
        shapes[prefix + "W_O"] = (n_heads, d_head, d_model)
        if config.get("smear_keys", False):
            shapes[prefix + "smear"] = (n_heads,)
    return shapes


def check_shapes(weights: dict, config: dict) -> None:
    """Raise ValueError for a missing or extra tensor, or a shape that config.json contradicts."""
    for name in weights:
        if name.startswith("blocks.") and int(name.split(".")[1]) >= config["n_layers"]:
            raise ValueError(f"model.safetensors has {name}, but config.json has n_layers = "
                             f"{config['n_layers']}; the two files do not belong together")
        if name.endswith("attn.smear") and not config.get("smear_keys", False):
            raise ValueError(f"model.safetensors has {name}, but config.json does not set "
                             "smear_keys; the two files do not belong together")
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            raise ValueError(f"model.safetensors lacks {name}, which config.json implies")
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(weights[name].shape)} in model.safetensors but "
                f"config.json implies {shape}"
            )


def check_sha256(folder: Path, config: dict) -> None:
    """Raise ValueError when config.json records a SHA-256 that model.safetensors does not have."""
    if "sha256" not in config:
        return
    actual = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if actual != config["sha256"]:
        raise ValueError(f"model.safetensors has SHA-256 {actual}, but config.json records "
                         f"{config['sha256']}; the two files do not belong together")


def check(folder: Path, seed: int = 0) -> dict:
    config = json.loads((folder / "config.json").read_text())
    check_sha256(folder, config)
    weights = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    check_shapes(weights, config)
    n_ranks = config["tokenizer"]["n_ranks"]
    bos = config["bos_token_id"]
    high = min(8000, n_ranks - 1)
    rng = np.random.default_rng(seed)

    first, second = [], []
    for _ in range(20):
        tokens = random_repeats(rng, bos, high, 50, 2)
        losses = token_losses(forward(weights, config, tokens)[0], tokens)
        first.append(losses[:50].mean())   # targets at positions 1-50
        second.append(losses[50:].mean())  # targets at positions 51-100

    period, n_layers, n_heads = 25, config["n_layers"], config["n_heads"]
    prefix = np.zeros((n_layers, n_heads))
    n_pos = 1 + 4 * period
    queries = np.arange(1 + period, n_pos)
    targets = np.zeros((n_pos, n_pos))
    for p in queries:
        for k in range(1, 4):
            if p - k * period >= 1:
                targets[p, p - k * period + 1] = 1.0
    for _ in range(10):
        tokens = random_repeats(rng, bos, high, period, 4)
        _, patterns = forward(weights, config, tokens)
        for layer, pattern in enumerate(patterns):
            prefix[layer] += (pattern * targets).sum(-1)[:, queries].mean(-1) / 10

    first_loss, second_loss = float(np.mean(first)), float(np.mean(second))
    best = np.unravel_index(np.argmax(prefix), prefix.shape) if n_layers else None
    result = {
        "checkpoint": str(folder),
        "first_copy_loss": first_loss,
        "second_copy_loss": second_loss,
        "loss_ratio": second_loss / first_loss,
        "prefix_matching": prefix.round(4).tolist(),
        "best_head": f"L{best[0]}H{best[1]}" if best else None,
        "best_prefix_matching": float(prefix.max()) if n_layers else 0.0,
    }
    result["passed"] = bool(
        result["loss_ratio"] < RATIO_THRESHOLD and result["best_prefix_matching"] > PREFIX_THRESHOLD
    )
    return result


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
REQUIRED_FIELDS = ("n_layers", "n_heads", "d_head", "d_model", "d_vocab", "n_ctx", "eps",
                   "normalization_type", "bos_token_id", "tokenizer")


def checked_folder(argument: Path) -> Path:
    """Return the checkpoint folder for a path or the name of a shipped checkpoint."""
    if not argument.is_dir() and (SHIPPED / argument).is_dir():
        return SHIPPED / argument
    return argument


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when both criteria are met, 1 when not, 2 for an unreadable checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or shipped name")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random tokens (0 or more)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"invalid --seed {args.seed}: seeds are 0 or more")
    folder = checked_folder(args.checkpoint)
    if not folder.is_dir():
        shipped = sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())
        print(f"error: {args.checkpoint} is neither a folder nor a shipped checkpoint "
              f"({', '.join(shipped)})", file=sys.stderr)
        return 2
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            print(f"error: {folder / name} not found", file=sys.stderr)
            return 2
    try:
        config = json.loads((folder / "config.json").read_text())
        missing = [field for field in REQUIRED_FIELDS if field not in config]
        if missing:
            raise ValueError(f"config.json lacks the fields {missing}")
        if config["n_layers"] < 1:
            raise ValueError("the model has no attention layers, so it cannot have induction heads")
        result = check(folder, args.seed)
    except (OSError, ValueError, KeyError, IndexError) as error:
        # safetensors raises its own error type, a subclass of none of these, for a corrupt file.
        print(f"error: cannot check {folder}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - reported as one line rather than a traceback
        print(f"error: cannot check {folder}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"first copy {result['first_copy_loss']:.3f} nats, second copy "
              f"{result['second_copy_loss']:.3f} nats, ratio {result['loss_ratio']:.3f} "
              f"(needs < {RATIO_THRESHOLD})")
        print(f"best prefix-matching head {result['best_head']}: "
              f"{result['best_prefix_matching']:.3f} (needs > {PREFIX_THRESHOLD})")
        print("PASS" if result["passed"] else "FAIL")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
