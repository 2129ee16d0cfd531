"""Copy a training run's checkpoint into the repository, with its log and compact snapshots.

    python scripts/ship_run.py /path/to/run checkpoints/attn-only-2l

Copies ``config.json``, ``model.safetensors`` and ``log.jsonl`` as they are, and stores each
snapshot under ``snapshots/`` in float16, which halves its size. The snapshots serve the
training-dynamics chapter, which needs attention patterns and losses rather than exact weights.
The resume state is never copied.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from circuits.checkpoints import CONFIG_FILE, LOG_FILE, WEIGHTS_FILE, load_checkpoint


def ship(run: Path, destination: Path) -> list[Path]:
    load_checkpoint(run)  # refuse to ship a checkpoint that does not load and verify
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE):
        shutil.copy2(run / name, destination / name)
        written.append(destination / name)

    snapshots = destination / "snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)
    for source in sorted((run / "snapshots").glob("step-*.safetensors")):
        snapshots.mkdir(exist_ok=True)
        tensors = {key: value.to(torch.float16) for key, value in load_file(source).items()}
        save_file(tensors, snapshots / source.name, metadata={"dtype": "float16"})
        written.append(snapshots / source.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training output folder (--out of circuits.train)")
    parser.add_argument("destination", type=Path, help="checkpoint folder to write")
    args = parser.parse_args(argv)
    written = ship(args.run, args.destination)
    total = sum(path.stat().st_size for path in written)
    print(f"wrote {len(written)} files, {total / 2**20:.1f} MiB, to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
