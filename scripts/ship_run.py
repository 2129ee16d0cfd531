"""Copy a training run's checkpoint into the repository, with its log and compact snapshots.

    python scripts/ship_run.py /path/to/run checkpoints/attn-only-2l
    python scripts/ship_run.py /path/to/run checkpoints/attn-only-1l --snapshots 0 1000 5000

Copies ``config.json``, ``model.safetensors`` and ``log.jsonl`` as they are, and stores each
snapshot under ``snapshots/`` in float16, which halves its size. The snapshots serve the
training-dynamics chapter, which needs attention patterns and losses rather than exact weights.
``--snapshots`` keeps only the snapshots of the listed steps (default: all). The resume state is
never copied.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from circuits.checkpoints import CONFIG_FILE, LOG_FILE, WEIGHTS_FILE, load_checkpoint


def ship(run: Path, destination: Path, steps: list[int] | None = None) -> list[Path]:
    load_checkpoint(run)  # refuse to ship a checkpoint that does not load and verify
    sources = sorted((run / "snapshots").glob("step-*.safetensors"))
    if steps is not None:
        available = {int(path.stem.split("-")[1]): path for path in sources}
        missing = sorted(set(steps) - set(available))
        if missing:
            raise SystemExit(
                f"error: {run} has no snapshot of step(s) {', '.join(map(str, missing))}; it has "
                f"{', '.join(map(str, sorted(available))) or 'none'}"
            )
        sources = [available[step] for step in sorted(set(steps))]
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE):
        shutil.copy2(run / name, destination / name)
        written.append(destination / name)

    snapshots = destination / "snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)
    for source in sources:
        snapshots.mkdir(exist_ok=True)
        tensors = {key: value.to(torch.float16) for key, value in load_file(source).items()}
        save_file(tensors, snapshots / source.name, metadata={"dtype": "float16"})
        written.append(snapshots / source.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training output folder (--out of circuits.train)")
    parser.add_argument("destination", type=Path, help="checkpoint folder to write")
    parser.add_argument("--snapshots", type=int, nargs="+", metavar="STEP",
                        help="ship only the snapshots of these steps (default: all)")
    args = parser.parse_args(argv)
    written = ship(args.run, args.destination, args.snapshots)
    total = sum(path.stat().st_size for path in written)
    print(f"wrote {len(written)} files, {total / 2**20:.1f} MiB, to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
