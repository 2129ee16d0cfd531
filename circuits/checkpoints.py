"""The on-disk checkpoint format: save, load and verify.

A checkpoint is a folder with

- ``model.safetensors``: the weights under TransformerLens's names and shapes (see
  ``circuits.model``);
- ``config.json``: the ``ModelConfig`` fields, ``bos_token_id``, ``tokenizer`` (for example
  ``{"name": "gpt2", "n_ranks": 2048}``), the training record under ``training``, and
  ``sha256``, the SHA-256 of ``model.safetensors``, checked on every load;
- ``log.jsonl``: metrics written during training, one JSON object per line.

Nothing here unpickles: weights are safetensors and everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from circuits.model import AttnOnlyTransformer, ModelConfig
from circuits.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"

# Shipped checkpoints live in the repository's checkpoints/ folder, beside this package.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


@dataclass
class Checkpoint:
    model: AttnOnlyTransformer
    tokenizer: Tokenizer
    config: dict
    path: Path
    log: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_file_mode() -> int:
    # mkstemp creates files readable by their owner only; published files get the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and an atomic rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary,
                  metadata=metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def save_checkpoint(
    model: AttnOnlyTransformer,
    tokenizer: Tokenizer,
    folder: str | os.PathLike,
    training: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (with the weights' SHA-256) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    atomic_save_tensors(model.state_dict(), weights)
    config = {
        **model.cfg.to_dict(),
        "bos_token_id": tokenizer.bos_token_id,
        "tokenizer": tokenizer.describe(),
        "training": training or {},
        "sha256": sha256_file(weights),
    }
    write_json(folder / CONFIG_FILE, config)
    return folder


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Return the folder of a checkpoint given as a path or a shipped name such as ``attn-only-2l``."""
    if not str(name_or_path).strip():
        raise CheckpointError("checkpoint name or path is empty")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = SHIPPED_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    available = ", ".join(list_shipped()) or "none"
    raise CheckpointError(
        f"checkpoint not found: {name_or_path!s} is neither a folder nor a shipped checkpoint "
        f"(shipped: {available})"
    )


def list_shipped() -> list[str]:
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a checkpoint folder needs {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_log(folder: Path) -> list[dict]:
    log_path = Path(folder) / LOG_FILE
    if not log_path.is_file():
        return []
    records = []
    for line_number, line in enumerate(log_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{log_path}:{line_number}: not valid JSON ({error})") from error
    return records


def load_checkpoint(
    name_or_path: str | os.PathLike, verify: bool = True, device: str = "cpu"
) -> Checkpoint:
    """Load a checkpoint folder (or a shipped checkpoint by name) and check it is consistent.

    Raises ``CheckpointError`` naming the file and the fix when a file is missing, corrupt, does
    not match its recorded SHA-256 (skip the check with ``verify=False``), or does not match the
    config's shapes.
    """
    folder = resolve_checkpoint(name_or_path)
    config = read_config(folder)
    config_path = folder / CONFIG_FILE
    try:
        model_config = ModelConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid model configuration: {error}") from error
    try:
        tokenizer = Tokenizer.from_description(config.get("tokenizer"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    if tokenizer.d_vocab != model_config.d_vocab:
        raise CheckpointError(
            f"{config_path}: tokenizer {tokenizer.name} has {tokenizer.d_vocab} ids but d_vocab is "
            f"{model_config.d_vocab}; fix the tokenizer's n_ranks or d_vocab"
        )

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        shipped = weights_path.resolve().is_relative_to(SHIPPED_DIR)
        fix = f"restore it with git checkout -- {weights_path}" if shipped else "restore it"
        raise CheckpointError(f"{weights_path}: missing; {fix}, or retrain the model")
    if verify and "sha256" in config:
        actual = sha256_file(weights_path)
        if actual != config["sha256"]:
            raise CheckpointError(
                f"{weights_path}: SHA-256 {actual} does not match {config['sha256']} recorded in "
                f"{CONFIG_FILE}; the file is corrupt or was replaced. Restore it, or load with "
                "verify=False if you changed it on purpose"
            )
    try:
        state = load_file(weights_path, device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights_path}: not a readable safetensors file ({error}); the file is truncated or "
            "corrupt. Restore it or retrain"
        ) from error

    model = AttnOnlyTransformer(model_config).to(device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match {config_path} (n_layers={model_config.n_layers}): "
            f"missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}. "
            "The config and the weights come from different models"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights_path}: tensor {key} has shape {tuple(state[key].shape)} but "
                f"{config_path} implies {tuple(tensor.shape)}. The config and the weights come "
                "from different models"
            )
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, tokenizer, config, folder, read_log(folder))


def load_model(name_or_path: str | os.PathLike, **kwargs) -> AttnOnlyTransformer:
    return load_checkpoint(name_or_path, **kwargs).model


SNAPSHOT_DIR = "snapshots"


def list_snapshots(name_or_path: str | os.PathLike) -> list[int]:
    """Training steps of the snapshots kept in a checkpoint folder, ascending."""
    folder = resolve_checkpoint(name_or_path) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(path.stem.split("-")[1]) for path in folder.glob("step-*.safetensors"))


def load_snapshot(name_or_path: str | os.PathLike, step: int) -> AttnOnlyTransformer:
    """Load the model as it was at training step ``step`` from ``snapshots/step-N.safetensors``.

    Shipped snapshots are stored in float16; the model is returned in float32 and eval mode.
    """
    folder = resolve_checkpoint(name_or_path)
    path = folder / SNAPSHOT_DIR / f"step-{step:06d}.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no snapshot for step {step}; available steps: {list_snapshots(folder)}"
        )
    model_config = ModelConfig.from_dict(read_config(folder))
    model = AttnOnlyTransformer(model_config)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        model.load_state_dict({key: value.float() for key, value in state.items()})
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match {folder / CONFIG_FILE}: {error}") from error
    return model.eval()
