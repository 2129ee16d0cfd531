import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuits.checkpoints import load_checkpoint, save_checkpoint
from circuits.tokenizer import Tokenizer
from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("ship_run", ROOT / "scripts" / "ship_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(tmp_path):
    model = tiny_model(d_vocab=513)
    folder = tmp_path / "run"
    save_checkpoint(model, Tokenizer(n_ranks=512), folder)
    (folder / "log.jsonl").write_text('{"step": 1}\n')
    (folder / "snapshots").mkdir()
    for step in (0, 10, 20):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  folder / "snapshots" / f"step-{step:06d}.safetensors")
    return folder


def test_ship_keeps_chosen_snapshots_in_float16(run, tmp_path):
    ship_run = load_script()
    destination = tmp_path / "shipped"
    ship_run.ship(run, destination, steps=[20, 0])
    names = sorted(path.name for path in (destination / "snapshots").iterdir())
    assert names == ["step-000000.safetensors", "step-000020.safetensors"]
    original = load_file(run / "snapshots" / "step-000020.safetensors")
    shipped = load_file(destination / "snapshots" / "step-000020.safetensors")
    for key, value in original.items():
        assert shipped[key].dtype == torch.float16
        torch.testing.assert_close(shipped[key].float(), value, rtol=1e-3, atol=1e-4)
    assert load_checkpoint(destination).model is not None


def test_ship_refuses_missing_snapshot_step(run, tmp_path):
    ship_run = load_script()
    with pytest.raises(SystemExit, match=r"no snapshot of step\(s\) 5; it has 0, 10, 20"):
        ship_run.ship(run, tmp_path / "shipped", steps=[5, 10])
