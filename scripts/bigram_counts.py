"""Count the bigrams of a tokenized training corpus and save them for the zero-layer chapter.

Example:

    python scripts/bigram_counts.py --data '../shared/corpus/pd-books/train-*.jsonl.gz' \\
        --n-ranks 2048 --out checkpoints/attn-only-0l/bigram_counts.npz

The corpus is tokenized through ``circuits.data.load_tokens``, which reuses its token cache, and
the nonzero counts are written in the format of ``circuits.analysis.bigrams.save_bigram_counts``.
The file is removed again, with exit status 1, when it is larger than ``--max-mb``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from circuits.analysis.bigrams import count_bigrams, save_bigram_counts
from circuits.data import DataError, load_tokens
from circuits.tokenizer import Tokenizer

log = logging.getLogger("bigram_counts")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", required=True,
        help="training data: a file, folder or glob pattern of .jsonl(.gz)/.txt files, or hf:NAME",
    )
    parser.add_argument(
        "--n-ranks", type=int, required=True,
        help="tokenizer size K: GPT-2's first K ranks, so d_vocab is K + 1",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .npz file")
    parser.add_argument(
        "--cache-dir", default=None,
        help="token cache folder (default: circuits.data's cache, ~/.cache/circuits/tokens "
        "unless CIRCUITS_CACHE or XDG_CACHE_HOME is set)",
    )
    parser.add_argument(
        "--max-mb", type=float, default=5.0,
        help="largest allowed output size in megabytes (10^6 bytes); default 5",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.out.suffix != ".npz":
        log.error("--out must end in .npz, got %s", args.out)
        return 2
    if not args.out.parent.is_dir():
        log.error("output folder %s does not exist", args.out.parent)
        return 2

    try:
        tokenizer = Tokenizer(n_ranks=args.n_ranks)
    except (TypeError, ValueError) as error:
        log.error("invalid --n-ranks: %s", error)
        return 2
    start = time.perf_counter()
    try:
        tokens = load_tokens(args.data, tokenizer, cache_dir=args.cache_dir)
    except DataError as error:
        log.error("could not load the training data: %s", error)
        return 1
    log.info("loaded %d tokens in %.1f s", len(tokens), time.perf_counter() - start)

    start = time.perf_counter()
    counts = count_bigrams(tokens, tokenizer.d_vocab)
    log.info(
        "counted %d pairs (%d distinct) in %.1f s",
        len(tokens) - 1, len(counts.counts), time.perf_counter() - start,
    )

    save_bigram_counts(counts, args.out)
    size_mb = args.out.stat().st_size / 1e6
    if size_mb > args.max_mb:
        args.out.unlink()
        log.error(
            "%s would be %.2f MB, over the %.2f MB limit; removed it. Raise --max-mb or use a "
            "smaller tokenizer", args.out, size_mb, args.max_mb,
        )
        return 1
    log.info("wrote %s (%.2f MB)", args.out, size_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
