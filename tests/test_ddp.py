"""Data-parallel training with two CPU processes (gloo), all traffic on 127.0.0.1.

The comparison with a single process runs in float32 (autocast off) without dropout. The two runs
then differ only in the order of floating-point sums, because each rank averages the loss over its
half of the batch before the gradients are averaged across ranks.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from circuits.checkpoints import read_log
from circuits.model import AttnOnlyTransformer
from circuits.train import LossModule, RunConfig, train
from conftest import tiny_config
from test_train import assert_same_weights, losses, toml_dump

REPO = Path(__file__).resolve().parents[1]

# Relative difference allowed between the logged losses, and absolute difference allowed between
# the final weights, of the two-process and the single-process run. The measured differences
# over these 12 steps were below 1e-7 and 5e-7, from float32 rounding of the regrouped sums.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def ddp_config(train_file, validation_file, **training) -> dict:
    values = dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=4, seed=7, log_every=2,
                  eval_every=6, eval_windows=4, checkpoint_every=6, autocast=False)
    values.update(training)
    return {
        "tokenizer": {"n_ranks": 512},
        "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16},
        "data": {"train": str(train_file), "validation": str(validation_file)},
        "training": values,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_env() -> dict:
    # GLOO_SOCKET_IFNAME keeps gloo's own connections on the loopback interface.
    return {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


def torchrun(config_path: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "circuits.train", str(config_path), "--out", str(out), "--no-progress"]
    return subprocess.run(command, env=loopback_env(), capture_output=True, text=True,
                          timeout=120)


def test_two_processes_match_one(text_files, tmp_path):
    raw = ddp_config(*text_files)
    single = train(RunConfig.from_dict(raw), tmp_path / "single", progress=False)

    config_path = tmp_path / "run.toml"
    config_path.write_text(toml_dump(raw))
    result = torchrun(config_path, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checkpoint written to") == 1, result.stdout

    single_log, ddp_log = read_log(single), read_log(tmp_path / "ddp")
    assert [r["step"] for r in ddp_log] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in single_log] == [2, 4, 6, 8, 10, 12]
    for expected, actual in zip(single_log, ddp_log):
        assert actual["train_loss"] == pytest.approx(expected["train_loss"], rel=LOSS_RTOL)
        assert ("val_loss" in actual) == ("val_loss" in expected)
        if "val_loss" in expected:
            assert actual["val_loss"] == pytest.approx(expected["val_loss"], rel=LOSS_RTOL)
    # Training moved the loss, so matching losses mean matching updates.
    assert ddp_log[-1]["train_loss"] < ddp_log[0]["train_loss"] - 0.1

    single_weights = load_file(single / "model.safetensors")
    ddp_weights = load_file(tmp_path / "ddp" / "model.safetensors")
    assert single_weights.keys() == ddp_weights.keys()
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], rtol=0,
                                   atol=WEIGHT_ATOL, msg=name)

    latest = json.loads((tmp_path / "ddp" / "resume" / "latest.json").read_text())
    assert latest["step"] == 12
    assert not list((tmp_path / "ddp").glob(".*.tmp")), "a temporary file was left behind"


def _gradient_worker(rank: int, port: int, tokens: torch.Tensor) -> None:
    """Compare one rank's averaged DDP gradients with the full batch's gradients, in float64."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)
        model = AttnOnlyTransformer(tiny_config()).double()
        model.loss(tokens).backward()
        expected = [parameter.grad.clone() for parameter in model.parameters()]
        model.zero_grad(set_to_none=True)

        net = DistributedDataParallel(LossModule(model))
        half = len(tokens) // 2
        net(tokens[rank * half:(rank + 1) * half]).backward()
        for (name, parameter), grad in zip(model.named_parameters(), expected):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-10, atol=1e-12, msg=name)
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_is_full_batch_gradient():
    # Adam's update hardly depends on the gradient's scale, so the loss comparison above would
    # not notice summed instead of averaged gradients. This test compares the gradients.
    tokens = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(3))
    mp.spawn(_gradient_worker, args=(free_port(), tokens), nprocs=2, join=True)


def _resume_worker(rank: int, raw: dict, root: str, ports: list[int]) -> None:
    """One rank of three data-parallel runs: uninterrupted, stopped at step 8, resumed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    root = Path(root)
    runs = [(root / "full", False, None), (root / "part", False, 8), (root / "part", True, None)]
    for port, (out, resume, stop_after) in zip(ports, runs):
        # Each call creates and destroys its own process group, on a fresh port.
        os.environ["MASTER_PORT"] = str(port)
        train(RunConfig.from_dict(raw), out, resume=resume, device="cpu", progress=False,
              stop_after=stop_after)


def test_resume_matches_uninterrupted_ddp_run(text_files, tmp_path):
    raw = ddp_config(*text_files, autocast=True, steps=16, checkpoint_every=6)
    ports = [free_port() for _ in range(3)]
    mp.spawn(_resume_worker, args=(raw, str(tmp_path), ports), nprocs=2, join=True)

    full, part = tmp_path / "full", tmp_path / "part"
    assert_same_weights(load_file(full / "model.safetensors"),
                        load_file(part / "model.safetensors"))
    assert losses(full) == losses(part)
    assert [step for step, _, _ in losses(part)] == [2, 4, 6, 8, 10, 12, 14, 16]
