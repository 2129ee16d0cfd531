"""Train an attention-only transformer from a TOML config file.

    python -m circuits.train configs/attn-only-2l.toml --out checkpoints/attn-only-2l
    python -m circuits.train configs/attn-only-2l.toml --out checkpoints/attn-only-2l --resume
    torchrun --standalone --nproc_per_node=2 -m circuits.train configs/attn-only-2l.toml --out ...

The optimiser is AdamW with linear warm-up then cosine decay and gradient clipping. The loss runs
under bf16 autocast where the hardware computes bf16 natively (``autocast = "auto"``, the
default; see ``native_bf16``) and in float32 elsewhere. Every ``checkpoint_every`` steps the run
writes

- ``resume/step-N/``: weights, optimiser state, log and step, filled under a temporary name and
  renamed, then ``resume/latest.json`` pointing at it (replaced atomically);
- the checkpoint itself (``model.safetensors``, ``config.json``, ``log.jsonl``), each file
  atomically.

A run killed at any moment therefore continues with ``--resume`` from the last complete state.
Batches and dropout masks are pure functions of (seed, step), so on CPU a resumed run ends with the
same parameters and the same logged losses, bit for bit, as an uninterrupted one.

Under ``torchrun`` the run is data-parallel, with DistributedDataParallel over gloo on CPU and
NCCL on CUDA. Every rank builds the same global batch of ``batch_size`` windows and trains on its
own contiguous slice of ``batch_size / world_size`` windows, so the global batch at each step is
the single-process one. Only rank 0 evaluates and writes checkpoints and logs. The logged training
loss is the mean over all ranks. Dropout masks are drawn per rank and therefore differ from the
single-process run's.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from circuits.checkpoints import (
    CONFIG_FILE,
    LOG_FILE,
    WEIGHTS_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    save_checkpoint,
    write_json,
)
from circuits.data import DataError, MixtureSampler, WindowSampler, load_tokens, resolve_data_spec
from circuits.model import AttnOnlyTransformer, ModelConfig
from circuits.tokenizer import Tokenizer

log = logging.getLogger("circuits.train")

RESUME_DIR = "resume"
SNAPSHOT_DIR = "snapshots"


@dataclass
class TrainConfig:
    """Optimisation settings (the ``[training]`` table of a config file)."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    # Linear warm-up over this many steps, then cosine decay to min_lr_ratio * lr at the end.
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    # Training loss is logged as the mean over each interval of log_every steps.
    log_every: int = 50
    eval_every: int = 500
    eval_windows: int = 64
    checkpoint_every: int = 500
    # Steps at which a copy of the weights is kept under snapshots/.
    snapshot_steps: list[int] = field(default_factory=list)
    # bf16 autocast: true, false, or "auto" (on only where the device computes bf16 natively).
    autocast: bool | str = "auto"
    # Log the training probe's per-head measurements at every evaluation (circuits.dynamics).
    probe: bool = False
    probe_icl_windows: int = 200
    # Run the loss under torch.compile. The first step then compiles, for 20-35 s with the
    # 2-layer configuration on a 2-core CPU, where later steps were at most 9% faster
    # (benchmarks/RESULTS.md).
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"training.{name} must be positive, got {value}")
        if self.checkpoint_every % self.log_every != 0:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                f"({self.log_every}) so a resumed run logs the same intervals"
            )
        self.betas = tuple(self.betas)
        if self.autocast not in (True, False, "auto"):
            raise ValueError(f'autocast must be true, false or "auto", got {self.autocast!r}')


@dataclass
class RunConfig:
    """A whole config file: model shape, tokenizer, data and training settings."""

    model: ModelConfig
    tokenizer: Tokenizer
    train_data: str | list[str]
    validation_data: str | list[str]
    training: TrainConfig
    raw: dict

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as error:
            raise SystemExit(f"error: config file not found: {path}") from error
        except OSError as error:
            raise SystemExit(f"error: cannot read config file {path}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise SystemExit(f"error: {path} is not valid TOML: {error}") from error
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<config>") -> "RunConfig":
        try:
            tokenizer = Tokenizer(**raw.get("tokenizer", {}))
            model = ModelConfig(**raw["model"], d_vocab=tokenizer.d_vocab)
            training = TrainConfig(**raw["training"])
            data = raw["data"]
            return cls(model, tokenizer, data["train"], data["validation"], training, raw)
        except KeyError as error:
            raise SystemExit(f"error: {source}: missing section or key {error}") from error
        except (TypeError, ValueError) as error:
            raise SystemExit(f"error: {source}: {error}") from error


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update at ``step`` (0-based): warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def native_bf16(device: str) -> bool:
    """Return whether ``device`` computes bf16 matrix products in hardware.

    On CUDA this is ``torch.cuda.is_bf16_supported()``. On a CPU it is the check PyTorch makes
    before it uses oneDNN's bf16 kernels: true with AVX-512 (fastest with AMX), false with AVX2
    only. Without that support autocast emulates bf16: on a 2-core AVX2 CPU one step of the
    2-layer configuration took 9.4 s under autocast against 0.33 s in float32 (measured with
    torch 2.13.0).
    """
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_autocast(setting: bool | str, device: str) -> bool:
    """Resolve the ``autocast`` setting for ``device``: ``"auto"`` follows ``native_bf16``."""
    if setting == "auto":
        return native_bf16(device)
    if setting and not native_bf16(device):
        log.warning("bf16 autocast is on, but %s has no native bf16 support, so training may be "
                    "many times slower than in float32. Set autocast = \"auto\" or false to "
                    "train in float32", device)
    return bool(setting)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only, never on layernorm gains and biases or smear weights.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        foreach=False,
    )


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value)
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def check_writable(folder: Path) -> None:
    """Fail before training when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        advice = "free disk space or choose another --out" if error.errno == errno.ENOSPC else (
            "choose another --out")
        raise SystemExit(
            f"error: cannot write to the output folder {folder}: {error.strerror or error}; "
            f"{advice}"
        ) from error


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device: str, autocast: bool, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=autocast):
            losses = model.loss(batch, per_token=True)
        total += losses.double().sum().item()
        count += losses.numel()
    model.train()
    return total / count


def log_lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def save_resume_state(resume_dir: Path, step: int, elapsed: float, model, optimizer,
                      records: list[dict]) -> None:
    """Write everything a resumed run needs into ``resume/step-N/``, then point ``latest.json`` at it.

    The folder is filled under a temporary name and renamed, and ``latest.json`` is replaced
    atomically afterwards, so a crash at any moment leaves the previous complete state in use.
    """
    name = f"step-{step:06d}"
    staging = resume_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    atomic_save_tensors(model.state_dict(), staging / WEIGHTS_FILE)
    atomic_save_tensors(optimizer_tensors(optimizer), staging / "optimizer.safetensors")
    atomic_write_bytes(staging / LOG_FILE, log_lines(records))
    write_json(staging / "state.json", {"step": step, "elapsed_s": elapsed})
    shutil.rmtree(resume_dir / name, ignore_errors=True)
    os.replace(staging, resume_dir / name)
    write_json(resume_dir / "latest.json", {"step": step, "folder": name})

    for stale in resume_dir.iterdir():
        if stale.is_dir() and stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run left in ``out``.

    A run folder has one writer, which calls this before it writes anything, so none of these files
    belongs to a write in progress.
    """
    for folder in (out, out / SNAPSHOT_DIR):
        for stale in folder.glob(".*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def restore(resume_dir: Path, model, optimizer, device: str) -> tuple[int, float, list[dict]]:
    """Load the state ``latest.json`` points to; return (step, elapsed seconds, log records)."""
    from safetensors.torch import load_file

    latest = json.loads((resume_dir / "latest.json").read_text())
    folder = resume_dir / latest["folder"]
    try:
        model.load_state_dict(load_file(folder / WEIGHTS_FILE, device=device))
        load_optimizer_tensors(optimizer, load_file(folder / "optimizer.safetensors",
                                                    device=device))
        state = json.loads((folder / "state.json").read_text())
        records = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(
            f"error: the resume state in {folder} is unreadable ({error}); delete "
            f"{resume_dir} to start the run again from step 0"
        ) from error
    return state["step"], state["elapsed_s"], records


def make_train_sampler(run: RunConfig, progress: bool):
    """Build the training sampler: one source, or a weighted mixture of ``{source, weight}``."""
    sources = run.train_data
    if isinstance(sources, list) and sources and isinstance(sources[0], dict):
        mixture = [(item["source"], float(item.get("weight", 1.0))) for item in sources]
    else:
        mixture = [(sources, 1.0)]

    samplers, record = [], []
    for source, weight in mixture:
        tokens = load_tokens(resolve_data_spec(source), run.tokenizer, progress=progress)
        samplers.append(WindowSampler(tokens, run.model.n_ctx, run.tokenizer.bos_token_id))
        record.append({"source": source, "weight": weight, "tokens": int(len(tokens))})
    if len(samplers) == 1:
        return samplers[0], record
    return MixtureSampler(samplers, [weight for _, weight in mixture]), record


def load_training_data(run: RunConfig, progress: bool):
    """Return (training sampler, its data record, validation token stream), building caches."""
    try:
        sampler, data_record = make_train_sampler(run, progress)
        validation_tokens = load_tokens(resolve_data_spec(run.validation_data), run.tokenizer,
                                        progress=progress)
    except DataError as error:
        raise SystemExit(f"error: {error}") from error
    return sampler, data_record, validation_tokens


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch; rank 0 of 1 for a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str) -> tuple[Distributed, str, bool]:
    """Join the process group that torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK.

    Returns this process's place, its device (``cuda:LOCAL_RANK`` on CUDA) and whether this
    call created the process group. Without torchrun (WORLD_SIZE unset or 1) nothing happens.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device, False
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Distributed(rank, world_size), device, False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank, world_size), device, True


class LossModule(torch.nn.Module):
    """``model.loss(tokens)`` as a forward pass, the call that DistributedDataParallel wraps."""

    def __init__(self, model: AttnOnlyTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.loss(tokens)


MetricsHook = Callable[[AttnOnlyTransformer, int], dict]


def train(
    run: RunConfig,
    out: str | os.PathLike,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    metrics_hook: MetricsHook | None = None,
    stop_after: int | None = None,
    stop_at: int | None = None,
) -> Path:
    """Train (or continue training) and write the checkpoint folder ``out``.

    ``metrics_hook(model, step)`` returns extra metrics to log at each evaluation.
    ``stop_after`` ends the run early after that many steps and ``stop_at`` once it reaches
    that step; either way the schedule still assumes ``run.training.steps``, the state at the
    stop is saved, and ``resume=True`` continues from it. Under torchrun
    each process calls this function and the run is data-parallel (see the module docstring).
    """
    check_output_folder(Path(out), resume)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    place, device, owns_group = init_distributed(device)
    try:
        if run.training.batch_size % place.world_size != 0:
            raise SystemExit(
                f"error: batch_size {run.training.batch_size} is not divisible by the "
                f"{place.world_size} processes; choose a multiple of {place.world_size}"
            )
        if stop_at is not None and (stop_at < 1 or stop_at % run.training.log_every != 0):
            raise SystemExit(
                f"error: the stop step must be a positive multiple of log_every "
                f"({run.training.log_every}), got {stop_at}"
            )
        return _train(run, Path(out), resume, device, progress, metrics_hook, stop_after,
                      stop_at, place)
    finally:
        if owns_group:
            dist.destroy_process_group()


def check_output_folder(out: Path, resume: bool) -> None:
    """Refuse to train over a run that needs --resume, or over a checkpoint with no run state."""
    if (out / RESUME_DIR / "latest.json").is_file():
        if not resume:
            raise SystemExit(
                f"error: {out} already contains a training run; pass --resume to continue it or "
                "choose another --out"
            )
        return
    if (out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists():
        raise SystemExit(
            f"error: {out} contains a checkpoint but no resume state (a shipped checkpoint, for "
            "example), so training would overwrite it; choose another --out"
        )


def _train(run: RunConfig, out: Path, resume: bool, device: str, progress: bool,
           metrics_hook: MetricsHook | None, stop_after: int | None, stop_at: int | None,
           place: Distributed) -> Path:
    from tqdm.auto import tqdm

    cfg = run.training
    created = not out.exists()
    if place.is_main:
        check_writable(out)

    # Rank 0 builds any missing token cache alone; the other ranks then read it.
    if not place.is_main:
        place.barrier()
    try:
        sampler, data_record, validation_tokens = load_training_data(run,
                                                                     progress and place.is_main)
    except SystemExit:
        # Remove the output folder this call created, so a failed start leaves nothing behind.
        if place.is_main and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if place.is_main:
        # Made only once the data loads, so a failed start leaves no empty run state behind.
        (out / RESUME_DIR).mkdir(exist_ok=True)
        place.barrier()
    validation = WindowSampler(
        validation_tokens, run.model.n_ctx, run.tokenizer.bos_token_id
    ).sequential_windows(cfg.eval_windows)
    if metrics_hook is None and cfg.probe and place.is_main:
        from circuits.dynamics import TrainingProbe

        metrics_hook = TrainingProbe(validation_tokens, run.tokenizer, run.model.n_ctx,
                                     icl_windows=cfg.probe_icl_windows, seed=cfg.seed)

    autocast = use_autocast(cfg.autocast, device)
    if place.is_main:
        log.info("training %s", "under bf16 autocast" if autocast else "in float32")
    torch.manual_seed(cfg.seed)
    model = AttnOnlyTransformer(run.model).to(device)
    optimizer = make_optimizer(model, cfg)
    start_step, records, elapsed_before = 0, [], 0.0

    resume_dir = out / RESUME_DIR
    latest_path = resume_dir / "latest.json"
    if resume and latest_path.is_file():
        start_step, elapsed_before, records = restore(resume_dir, model, optimizer, device)
        log.info("resuming %s from step %d", out, start_step)
        if place.is_main:
            remove_stale_temporaries(out)
    elif resume:
        log.info("no resume state in %s, starting from step 0", out)
    elif latest_path.exists():
        raise SystemExit(
            f"error: {out} already contains a training run; pass --resume to continue it or choose "
            "another --out"
        )
    # Every rank has read the resume state before rank 0 writes a new one.
    place.barrier()

    def training_record(step: int, elapsed: float) -> dict:
        return {
            "config": run.raw,
            "steps": step,
            "tokens_seen": step * cfg.batch_size * run.model.n_ctx,
            "wall_time_s": round(elapsed, 1),
            "device": device,
            "autocast": autocast,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "data": data_record,
        }

    def publish(step: int, elapsed: float) -> None:
        """Write the user-facing checkpoint: weights, config and log at the top of ``out``."""
        save_checkpoint(model, run.tokenizer, out, training=training_record(step, elapsed))
        atomic_write_bytes(out / LOG_FILE, log_lines(records))

    def save(step: int, elapsed: float) -> None:
        if not place.is_main:
            return
        save_resume_state(resume_dir, step, elapsed, model, optimizer, records)
        publish(step, elapsed)
        if step in cfg.snapshot_steps:
            (out / SNAPSHOT_DIR).mkdir(exist_ok=True)
            atomic_save_tensors(model.state_dict(),
                                out / SNAPSHOT_DIR / f"step-{step:06d}.safetensors")

    if start_step > 0 and place.is_main:
        # A crash between the two files of the last publish may have left them out of step.
        publish(start_step, elapsed_before)

    tokens_per_step = cfg.batch_size * run.model.n_ctx
    end_step = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    if stop_at is not None:
        end_step = min(end_step, stop_at)
    checkpoint_steps = set(range(cfg.checkpoint_every, cfg.steps + 1, cfg.checkpoint_every))
    checkpoint_steps |= set(cfg.snapshot_steps) | {cfg.steps}
    if stop_at is not None:
        checkpoint_steps.add(end_step)
    if start_step == 0 and 0 in cfg.snapshot_steps:
        save(0, 0.0)

    net: torch.nn.Module = LossModule(model)
    if place.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        cuda = device.startswith("cuda")
        net = DistributedDataParallel(net, device_ids=[torch.device(device)] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    local_batch = cfg.batch_size // place.world_size
    rows = slice(place.rank * local_batch, (place.rank + 1) * local_batch)

    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=out.name, unit="step",
               disable=not (progress and place.is_main), dynamic_ncols=True)
    started = time.perf_counter()
    interval_loss, interval_steps = 0.0, 0
    device_type = device.split(":")[0]
    for step in range(start_step, end_step):
        batch = sampler.random_batch(cfg.batch_size, cfg.seed, step)[rows].to(device)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks depend on (seed, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)

        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = net(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        if place.world_size > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # the sum of the ranks' means; equal slices make it the mean
            loss /= place.world_size
        interval_loss += loss.item()
        interval_steps += 1
        done = step + 1
        elapsed = elapsed_before + time.perf_counter() - started
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {
                "step": done,
                "tokens": done * tokens_per_step,
                "lr": learning_rate(step, cfg),
                "train_loss": interval_loss / interval_steps,
                "elapsed_s": round(elapsed, 2),
            }
            if place.is_main and (done % cfg.eval_every == 0 or done == cfg.steps):
                # Per-process batches: the global batch may not fit in one device's memory.
                record["val_loss"] = evaluate(model, validation, device, autocast,
                                              local_batch)
                if metrics_hook is not None:
                    record.update(metrics_hook(model, done))
            records.append(record)
            interval_loss, interval_steps = 0.0, 0
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            tok_s=f"{done * tokens_per_step / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if done in checkpoint_steps:
            save(done, elapsed)
    bar.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m circuits.train", description="Train an attention-only transformer."
    )
    parser.add_argument("config", help="TOML config file (see configs/)")
    parser.add_argument("--out", help="checkpoint folder to write (required unless --prepare-data)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the number of training steps in the config")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop once the run reaches this step (a multiple of log_every), saving "
                             "its state; the schedule still runs to the config's steps, and "
                             "--resume continues")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--prepare-data", action="store_true",
                        help="tokenize the training and validation data into the token cache, "
                             "then exit without training (run once before a multi-process launch "
                             "on a large dataset)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.out is None and not args.prepare_data:
        parser.error("the following arguments are required: --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.device is not None:
        try:
            requested = torch.device(args.device)
        except RuntimeError as error:
            raise SystemExit(f"error: invalid --device {args.device!r}: {error}") from error
        if requested.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                f"error: --device {args.device} requested but this torch build or machine has no "
                "CUDA device; leave --device out to use the CPU"
            )
    run = RunConfig.from_toml(args.config)
    if args.steps is not None:
        run.raw["training"]["steps"] = args.steps
        run = RunConfig.from_dict(run.raw, source=args.config)
    if args.prepare_data:
        load_training_data(run, progress=not args.no_progress)
        print("token caches are ready")
        return 0
    try:
        train(run, args.out, resume=args.resume, device=args.device,
              progress=not args.no_progress, stop_at=args.stop_at)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out} keeps the state of its last checkpoint; continue with "
              "--resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
