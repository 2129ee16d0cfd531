#!/usr/bin/env python3
"""Measure how much an induction head could gain on each training source of a config.

    python scripts/repetition_stats.py configs/attn-only-2l.toml [--windows 400] [--json]

For each source, random windows of n_ctx tokens (raw token stream, no BOS added) are drawn with a
fixed seed. At each position i < n_ctx - 1 whose token t_i also occurred earlier in the window,
let j be the latest such earlier position:

- repeat frequency: the share of positions whose token occurred earlier in the window;
- reliability: among those, the share where the next tokens agree, t_{j+1} = t_{i+1} (a copy of
  "what followed last time" would be right);
- copy gain: the sum, over the positions where the copy is right, of -log p(t_{i+1} | t_i) under
  the source's own bigram statistics (counted on its first 20 M tokens; a pair never seen there
  gets 1 / (count of t_i + 1)), divided by all
  positions. It is the loss in nats per token that a perfect copier would remove beyond a
  perfect bigram model. The copier's wrong guesses are not charged, so it is an upper bound.

The first two follow the "bigram repetition frequency" and "reliability" that Aoyama et al.
(2025, arXiv:2511.16893) relate to when induction heads form.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.train import RunConfig, load_training_data  # noqa: E402

BIGRAM_TOKENS = 20_000_000


def window_stats(window: np.ndarray, log_bigram=None) -> tuple[int, int, int, float]:
    """Count (positions, repeats, reliable repeats, copy gain in nats) in one window."""
    last_seen: dict[int, int] = {}
    repeats = reliable = 0
    gain = 0.0
    for i in range(len(window) - 1):
        token = int(window[i])
        if token in last_seen:
            repeats += 1
            if window[last_seen[token] + 1] == window[i + 1]:
                reliable += 1
                if log_bigram is not None:
                    gain -= log_bigram(token, int(window[i + 1]))
        last_seen[token] = i
    return len(window) - 1, repeats, reliable, gain


def source_stats(tokens: np.ndarray, d_vocab: int, n_ctx: int, n_windows: int,
                 seed: int = 0) -> dict:
    """Return the repeat frequency, reliability and copy gain of one token stream."""
    if len(tokens) <= n_ctx:
        raise ValueError(f"stream too short: {len(tokens)} tokens, needs more than n_ctx = {n_ctx}")
    head = np.asarray(tokens[:BIGRAM_TOKENS], dtype=np.int64)
    counts = np.bincount(head[:-1] * d_vocab + head[1:], minlength=d_vocab * d_vocab)
    counts = counts.reshape(d_vocab, d_vocab)
    row_totals = counts.sum(1)

    def log_bigram(current: int, following: int) -> float:
        # A pair missing from the counted prefix gets probability 1 / (row total + 1).
        count = counts[current, following]
        if count == 0:
            return float(-np.log(row_totals[current] + 1))
        return float(np.log(count / row_totals[current]))

    rng = np.random.default_rng(seed)
    totals = np.zeros(4)
    for start in rng.integers(0, len(tokens) - n_ctx, size=n_windows):
        window = np.asarray(tokens[start:start + n_ctx], dtype=np.int64)
        totals += window_stats(window, log_bigram)
    positions, repeats, reliable, gain = totals
    return {
        "repeat_frequency": repeats / positions,
        "reliability": reliable / max(repeats, 1),
        "copy_gain_nats_per_token": gain / positions,
        "windows": n_windows,
        "n_ctx": n_ctx,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (TOML) whose sources to measure")
    parser.add_argument("--windows", type=int, default=400, help="windows per source")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")

    run = RunConfig.from_toml(args.config)
    sampler, record, _ = load_training_data(run, progress=False)
    samplers = getattr(sampler, "samplers", [sampler])
    result = {}
    for source, part in zip(record, samplers):
        result[source["source"]] = source_stats(part.tokens, run.model.d_vocab, run.model.n_ctx,
                                                args.windows)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, stats in result.items():
        print(f"{name}: repeat frequency {stats['repeat_frequency']:.3f}, reliability "
              f"{stats['reliability']:.3f}, copy gain {stats['copy_gain_nats_per_token']:.3f} "
              f"nats/token ({stats['windows']} windows of {stats['n_ctx']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
