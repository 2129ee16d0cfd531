import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.checkpoints import load_checkpoint, read_log
from circuits.data import PYTHON_SOURCES
import circuits.train as train_module
from circuits.train import RunConfig, TrainConfig, learning_rate, native_bf16, train, use_autocast


def run_config(train_file, validation_file, **training) -> dict:
    values = dict(steps=24, batch_size=4, lr=3e-3, warmup_steps=4, seed=5, log_every=2,
                  eval_every=6, eval_windows=4, checkpoint_every=6, snapshot_steps=[0, 12])
    values.update(training)
    return {
        "tokenizer": {"n_ranks": 512},
        "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16,
                  "attn_dropout": 0.1},
        "data": {"train": str(train_file), "validation": str(validation_file)},
        "training": values,
    }


def losses(folder: Path) -> list[tuple]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_log(folder)]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_lowers_loss_and_writes_checkpoint(text_files, tmp_path):
    raw = run_config(*text_files, steps=60, checkpoint_every=30, log_every=10, eval_every=30)
    out = train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)
    records = read_log(out)
    assert records[-1]["step"] == 60
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5
    assert "val_loss" in records[-1]
    checkpoint = load_checkpoint(out)
    assert checkpoint.config["training"]["steps"] == 60
    assert checkpoint.config["training"]["tokens_seen"] == 60 * 4 * 16
    assert checkpoint.config["training"]["config"] == raw
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "step-000000.safetensors", "step-000012.safetensors"]


def test_resume_matches_uninterrupted_run(text_files, tmp_path):
    raw = run_config(*text_files)
    full = train(RunConfig.from_dict(raw), tmp_path / "full", progress=False)

    # Stop after 8 steps: the last checkpoint is at step 6, so steps 7-8 are lost and redone.
    part = tmp_path / "part"
    train(RunConfig.from_dict(raw), part, progress=False, stop_after=8)
    assert json.loads((part / "resume" / "latest.json").read_text())["step"] == 6
    train(RunConfig.from_dict(raw), part, resume=True, progress=False, stop_after=10)
    # A planned stop saves its own step, off the checkpoint grid of every 6 steps.
    train(RunConfig.from_dict(raw), part, resume=True, progress=False, stop_at=14)
    assert json.loads((part / "resume" / "latest.json").read_text())["step"] == 14
    assert read_log(part)[-1]["step"] == 14
    train(RunConfig.from_dict(raw), part, resume=True, progress=False)

    assert_same_weights(weights(full), weights(part))
    assert losses(full) == losses(part)
    assert_same_weights(load_file(full / "snapshots" / "step-000012.safetensors"),
                        load_file(part / "snapshots" / "step-000012.safetensors"))


def test_resume_removes_stale_temporaries(text_files, tmp_path):
    raw = run_config(*text_files)
    out = tmp_path / "run"
    train(RunConfig.from_dict(raw), out, progress=False, stop_after=8)
    # What a kill in the middle of an atomic write leaves behind.
    stale = [
        out / ".model.safetensors.x1.tmp",
        out / "snapshots" / ".step-000006.safetensors.x2.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    train(RunConfig.from_dict(raw), out, resume=True, progress=False, stop_after=10)
    assert not any(path.exists() for path in stale)
    assert (out / "model.safetensors").is_file()


def test_resume_after_kill(text_files, tmp_path):
    """kill -9 at several moments, then resume: same weights and loss curve as one run."""
    raw = run_config(*text_files, steps=300, checkpoint_every=6)
    config_path = tmp_path / "run.toml"
    config_path.write_text(toml_dump(raw))
    full = train(RunConfig.from_dict(raw), tmp_path / "full", progress=False)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "circuits.train", str(config_path), "--out", str(out),
               "--resume", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Kill once each checkpoint below has been written, plus a short random delay, so the kills
    # land mid-run (often mid-write) however loaded the machine is.
    latest = out / "resume" / "latest.json"
    rng = random.Random(0)
    reached = []
    for target in (6, 30, 60):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if latest.exists() and json.loads(latest.read_text())["step"] >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        reached.append(json.loads(latest.read_text())["step"] if latest.exists() else 0)
    assert all(0 < step < 300 for step in reached), f"a kill did not land mid-run: {reached}"

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert_same_weights(weights(full), weights(out))
    assert losses(full) == losses(out)
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def toml_dump(raw: dict) -> str:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_existing_run_needs_resume(text_files, tmp_path):
    raw = run_config(*text_files, steps=6)
    train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)
    with pytest.raises(SystemExit, match="pass --resume"):
        train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_folder(text_files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(SystemExit, match="cannot write to the output folder"):
        train(RunConfig.from_dict(run_config(*text_files)), locked / "run", progress=False)


def test_output_path_is_a_file(text_files, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(SystemExit, match="cannot write to the output folder .*blocker"):
        train(RunConfig.from_dict(run_config(*text_files)), blocker / "run", progress=False)


def test_full_disk_fails_before_training(text_files, tmp_path, monkeypatch):
    def no_space(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(SystemExit, match="No space left on device"):
        train(RunConfig.from_dict(run_config(*text_files)), tmp_path / "run", progress=False)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, log_every=1,
                      checkpoint_every=10)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.55)
    assert learning_rate(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw.pop("data"), "missing section or key 'data'"),
        (lambda raw: raw["model"].update(d_model=-4), "must be positive"),
        (lambda raw: raw["training"].update(steps=-5), "training.steps must be positive, got -5"),
        (lambda raw: raw["training"].update(batch_size=0),
         "training.batch_size must be positive, got 0"),
        (lambda raw: raw["training"].update(checkpoint_every=5), "multiple of log_every"),
        (lambda raw: raw["training"].update(nonsense=1), "nonsense"),
        (lambda raw: raw["tokenizer"].update(n_ranks=10), "n_ranks must be between"),
        (lambda raw: raw["training"].update(autocast="yes"),
         'autocast must be true, false or "auto"'),
    ],
)
def test_invalid_config(text_files, change, message):
    raw = run_config(*text_files)
    change(raw)
    with pytest.raises(SystemExit, match=message):
        RunConfig.from_dict(raw)


def test_missing_data_files(tmp_path):
    raw = run_config(tmp_path / "none-*.jsonl", tmp_path / "none.jsonl")
    with pytest.raises(SystemExit, match="no files match"):
        train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)
    # The failed start leaves neither the output folder it created nor empty run state.
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit, match="no files match"):
        train(RunConfig.from_dict(raw), tmp_path / "kept", progress=False)
    assert (tmp_path / "kept").is_dir()
    assert not (tmp_path / "kept" / "resume").exists()


def test_cli_reports_missing_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "circuits.train", str(tmp_path / "nope.toml"), "--out",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_mixture(text_files, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    raw = run_config(*text_files, steps=6)
    raw["data"]["train"] = [{"source": str(text_files[0]), "weight": 0.5},
                            {"source": str(other), "weight": 0.5}]
    out = train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)
    record = load_checkpoint(out).config["training"]["data"]
    assert [item["weight"] for item in record] == [0.5, 0.5]
    assert all(item["tokens"] > 100 for item in record)


def test_shipped_style_checkpoint_not_overwritten(text_files, tmp_path):
    raw = run_config(*text_files, steps=6)
    out = train(RunConfig.from_dict(raw), tmp_path / "run", progress=False)
    shutil.rmtree(out / "resume")
    before = (out / "model.safetensors").read_bytes()
    for resume in (False, True):
        with pytest.raises(SystemExit, match="contains a checkpoint but no resume state"):
            train(RunConfig.from_dict(raw), out, resume=resume, progress=False)
    assert (out / "model.safetensors").read_bytes() == before


def test_config_path_is_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="cannot read config file"):
        RunConfig.from_toml(tmp_path)


@pytest.mark.parametrize("device, message", [("banana", "invalid --device"),
                                             ("cuda", "no CUDA device")])
def test_cli_rejects_bad_device(tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from circuits.train import main

    with pytest.raises(SystemExit, match=message):
        main([str(tmp_path / "none.toml"), "--out", str(tmp_path / "o"), "--device", device])


def test_cli_rejects_zero_steps(tmp_path, capsys):
    from circuits.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "none.toml"), "--out", str(tmp_path / "o"), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("stop_at", [0, 7])
def test_stop_step_must_fall_on_the_log_grid(text_files, tmp_path, stop_at):
    raw = run_config(*text_files)
    with pytest.raises(SystemExit, match="positive multiple of log_every"):
        train(RunConfig.from_dict(raw), tmp_path / "run", progress=False, stop_at=stop_at)
    assert not (tmp_path / "run" / "resume" / "latest.json").exists()


def test_cli_interrupt_points_to_resume(text_files, tmp_path, monkeypatch, capsys):
    import circuits.train as train_module

    config_path = tmp_path / "run.toml"
    config_path.write_text(toml_dump(run_config(*text_files)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    out = tmp_path / "out"
    assert train_module.main([str(config_path), "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert f"interrupted: {out} keeps the state of its last checkpoint" in error
    assert "--resume" in error


def test_autocast_setting_follows_native_bf16(monkeypatch, caplog):
    for native in (True, False):
        monkeypatch.setattr(train_module, "native_bf16", lambda device, native=native: native)
        assert use_autocast("auto", "cpu") is native
        assert use_autocast(False, "cpu") is False
        caplog.clear()
        assert use_autocast(True, "cpu") is True
        # Autocast forced on without hardware support logs a warning that it will be slow.
        assert ("no native bf16 support" in caplog.text) is (not native)


def test_native_bf16_false_without_support():
    assert native_bf16("meta") is False
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False
    assert isinstance(native_bf16("cpu"), bool)


def test_auto_precision_runs_and_is_recorded(text_files, tmp_path, monkeypatch):
    def run(name, autocast, native):
        monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
        raw = run_config(*text_files, steps=6, checkpoint_every=6, eval_every=6,
                         snapshot_steps=[], autocast=autocast)
        out = train(RunConfig.from_dict(raw), tmp_path / name, progress=False)
        return weights(out), load_checkpoint(out).config["training"]["autocast"]

    float32, recorded = run("float32", False, True)
    assert recorded is False
    auto_off, recorded = run("auto-off", "auto", False)
    assert recorded is False
    assert_same_weights(auto_off, float32)
    auto_on, recorded = run("auto-on", "auto", True)
    assert recorded is True
    # bf16 products round differently, so the weights must differ from the float32 run's.
    assert any(not torch.equal(auto_on[key], float32[key]) for key in float32)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")),
                         ids=lambda path: path.name)
def test_every_config_file_loads(path):
    run = RunConfig.from_toml(path)
    assert run.model.d_vocab == run.tokenizer.n_ranks + 1

    sources = run.train_data
    if not isinstance(sources, list):
        sources = [sources]
    for source in sources:
        spec = source["source"] if isinstance(source, dict) else source
        # Each source is built in, on the hub, or a path into the corpus folder.
        known = spec in PYTHON_SOURCES or spec.startswith("hf:") or "corpus/" in spec
        assert known, f"unexpected data source {spec!r} in {path.name}"
