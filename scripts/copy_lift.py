#!/usr/bin/env python3
"""Measure how strongly a checkpoint copies on random tokens repeated once.

    python scripts/copy_lift.py attn-only-2l [--steps 3000 10000] [--json]

The check script (`scripts/check_induction.py`) tests whether the second copy of 50 random tokens
costs under 35% of the first. This script measures why it does or does not. On 20 sequences of BOS
followed by 50 distinct random tokens repeated once (101 tokens), at the 49 query positions
p = 51, ..., 99 of the second copy (the current token occurred 50 positions earlier, so the next
one is known from the first copy), with y the correct next token:

- gap: the largest logit at p minus the logit of y;
- lift: the part of the logits that the last layer's heads contribute, at y, minus its mean over
  the vocabulary. That part is ((o − mean(o)) / σ(r)) ⊙ w_f · W_U. Here o is the sum of the last
  layer's head outputs at p, r the final residual stream at p, σ(r) the final layernorm's scale
  (standard deviation over d_model, with its eps) and w_f the final layernorm's weight. The logits
  are the sum of such parts over everything written into the residual stream, plus the layernorm
  bias times W_U. So the lift is the last layer's share of the margin of y over the average token;
- induction attention: the largest, over the last layer's heads, of the mean attention from p to
  p − 49, the token after the earlier occurrence.

The copy losses are the mean next-token losses on positions 1-50 (copy 1) and 51-100 (copy 2).
Token ids run from 100 up to min(8000, K) − 1, K being the number of BPE ranks (100 to 2047 for
K = 2048): one torch generator seeded 0, then for each sequence
``torch.randperm(min(8000, K) - 100, generator=g)[:50] + 100``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.checkpoints import (  # noqa: E402
    CheckpointError,
    list_snapshots,
    load_checkpoint,
    load_snapshot,
)
from circuits.model import AttnOnlyTransformer  # noqa: E402

N_TOKENS = 50
N_SEQUENCES = 20
LOW_ID = 100
HIGH_ID = 8000


@dataclass
class CopyLift:
    copy1_loss: float
    copy2_loss: float
    ratio: float
    induction_attention: float
    induction_head: str
    lift: float
    gap: float


def repeated_sequences(n_ranks: int, bos: int, seed: int = 0) -> torch.Tensor:
    """Return BOS + 50 distinct random tokens + the same 50 again, [N_SEQUENCES, 101]."""
    high = min(HIGH_ID, n_ranks)
    if high - LOW_ID < N_TOKENS:
        raise ValueError(f"invalid vocabulary: {n_ranks} BPE ranks leave fewer than {N_TOKENS} "
                         f"ids from {LOW_ID} on")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(N_SEQUENCES):
        copy = torch.randperm(high - LOW_ID, generator=generator)[:N_TOKENS] + LOW_ID
        rows.append(torch.cat([torch.tensor([bos]), copy, copy]))
    return torch.stack(rows)


def check_layers(model: AttnOnlyTransformer, name: str = "the model") -> None:
    """Raise ValueError for a model without attention layers, which has no heads to copy with."""
    if model.cfg.n_layers < 1:
        raise ValueError(f"invalid model: {name} has no attention layers, so no heads to copy with")


@torch.no_grad()
def copy_lift(model: AttnOnlyTransformer, tokens: torch.Tensor) -> CopyLift:
    """Measure losses, induction attention, lift and gap on ``repeated_sequences`` output."""
    check_layers(model)
    if tokens.shape[1] != 2 * N_TOKENS + 1:
        raise ValueError(f"invalid tokens: expected sequences of {2 * N_TOKENS + 1} tokens, got "
                         f"{tokens.shape[1]}")
    model.eval()
    logits, cache = model.run_with_cache(tokens)
    compute = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute)
    losses = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    copy1 = losses[:, :N_TOKENS].mean().item()
    copy2 = losses[:, N_TOKENS:].mean().item()

    queries = torch.arange(N_TOKENS + 1, 2 * N_TOKENS)
    targets = tokens[:, queries + 1]
    last = model.cfg.n_layers - 1
    attention = cache.patterns[last][:, :, queries, queries - N_TOKENS + 1].mean((0, 2))
    best = int(attention.argmax())

    resid = cache.resid_pre[-1][:, queries].to(compute)
    output = cache.head_outputs[last][:, queries].sum(2).to(compute)
    ln = model.ln_final
    if ln is None:
        part = output
    else:
        part = (output - output.mean(-1, keepdim=True)) / ln.scale(resid) * ln.w
    part_logits = part @ model.unembed.W_U
    lift = part_logits.gather(-1, targets[..., None])[..., 0] - part_logits.mean(-1)

    at_queries = logits[:, queries]
    gap = at_queries.max(-1).values - at_queries.gather(-1, targets[..., None])[..., 0]
    return CopyLift(
        copy1_loss=copy1,
        copy2_loss=copy2,
        ratio=copy2 / copy1,
        induction_attention=float(attention[best]),
        induction_head=f"L{last}H{best}",
        lift=lift.mean().item(),
        gap=gap.mean().item(),
    )


def _step(text: str) -> int:
    try:
        step = int(text)
    except ValueError:
        message = f"invalid step {text!r}: expected a whole number"
        raise argparse.ArgumentTypeError(message) from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"invalid step {step}: steps are 0 or more")
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="lift: nats the last layer's heads add to the correct token over the average "
        "token; gap: nats between the top guess and the correct token. The script's docstring "
        "and checkpoints/README.md define both.",
    )
    parser.add_argument("checkpoint", help="a shipped model's name or a checkpoint folder")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--steps", type=_step, nargs="+",
                           help="measure these snapshots instead of the final weights")
    selection.add_argument("--all-snapshots", action="store_true", help="measure every snapshot")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:
        checkpoint = load_checkpoint(args.checkpoint)
        # Checked before any snapshot is loaded, so the message names the real problem.
        check_layers(checkpoint.model, checkpoint.name)
        # Each requested step once, in the order given.
        steps = list(dict.fromkeys(args.steps)) if args.steps else None
        if args.all_snapshots:
            steps = list_snapshots(args.checkpoint)
            if not steps:
                raise ValueError(f"{checkpoint.name} has no snapshots; leave out --all-snapshots "
                                 "to measure its final weights")
        if steps:
            models = [(str(step), load_snapshot(args.checkpoint, step)) for step in steps]
        else:
            final = checkpoint.config.get("training", {}).get("steps")
            models = [(str(final) if final is not None else "final", checkpoint.model)]
        tokens = repeated_sequences(checkpoint.tokenizer.n_ranks,
                                    checkpoint.tokenizer.bos_token_id)
        # Keyed by step, or "final" for weights whose config records no step count.
        results = {key: copy_lift(model, tokens) for key, model in models}
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps({key: asdict(result) for key, result in results.items()}))
        return 0
    print(f"{checkpoint.name}: {N_SEQUENCES} sequences of {N_TOKENS} random tokens repeated once")
    for key, r in results.items():
        label = "final weights" if key == "final" else f"step {key:>6}"
        print(f"{label}: copy 1 {r.copy1_loss:.2f} nats, copy 2 {r.copy2_loss:.2f} "
              f"(ratio {r.ratio:.3f}); induction attention {r.induction_attention:.2f} "
              f"({r.induction_head}); lift {r.lift:.2f} nats; gap {r.gap:.2f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
