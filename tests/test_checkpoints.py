import json

import pytest
import torch
from safetensors.torch import save_file

from circuits.checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    list_shipped,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from circuits.tokenizer import Tokenizer
from conftest import tiny_model

TOKENIZER = Tokenizer(299)  # d_vocab 300, as the tiny models


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    folder = save_checkpoint(model, TOKENIZER, tmp_path / "ckpt", training={"steps": 3})
    return model, folder


def test_round_trip(saved):
    model, folder = saved
    loaded = load_checkpoint(folder)
    tokens = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.tokenizer == TOKENIZER
    assert loaded.config["training"] == {"steps": 3}
    assert loaded.config["bos_token_id"] == 299
    assert loaded.config["sha256"] == sha256_file(folder / "model.safetensors")


def test_config_uses_transformerlens_field_names(saved):
    config = json.loads((saved[1] / "config.json").read_text())
    for key in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab",
                "normalization_type", "eps"):
        assert key in config
    assert config["positional_embedding_type"] == "shortformer"
    assert config["attn_only"] is True


def test_missing_weights(saved):
    (saved[1] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(saved[1])


def test_missing_config(saved):
    (saved[1] / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(saved[1])


def test_truncated_weights(saved):
    path = saved[1] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="SHA-256 .* does not match"):
        load_checkpoint(saved[1])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved[1], verify=False)


def test_corrupted_byte_detected(saved):
    path = saved[1] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_checkpoint(saved[1])


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_layer_count_mismatch(saved):
    rewrite_config(saved[1], n_layers=3)
    with pytest.raises(CheckpointError, match="missing tensors .*blocks.2"):
        load_checkpoint(saved[1])


def test_shape_mismatch(saved):
    rewrite_config(saved[1], d_model=64)
    with pytest.raises(CheckpointError, match="has shape .* implies"):
        load_checkpoint(saved[1])


def test_vocabulary_mismatch(saved):
    rewrite_config(saved[1], tokenizer={"name": "gpt2", "n_ranks": 1000})
    with pytest.raises(CheckpointError, match="d_vocab is 300"):
        load_checkpoint(saved[1])


def test_unknown_tokenizer(saved):
    rewrite_config(saved[1], tokenizer={"name": "sentencepiece"})
    with pytest.raises(CheckpointError, match="config.json: unknown tokenizer"):
        load_checkpoint(saved[1])


def test_invalid_json_config(saved):
    (saved[1] / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved[1])


def test_weights_from_another_model(saved, tmp_path):
    other = tiny_model(n_layers=1)
    save_file(other.state_dict(), saved[1] / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(saved[1])
    with pytest.raises(CheckpointError, match="unexpected tensors|missing tensors"):
        load_checkpoint(saved[1], verify=False)


def test_unknown_path():
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint("no-such-checkpoint")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    path.write_text("old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_shipped_checkpoints_load():
    for name in list_shipped():
        checkpoint = load_checkpoint(name)
        assert checkpoint.model.cfg.d_vocab == checkpoint.tokenizer.d_vocab


def test_snapshots_listed_and_loaded(saved):
    from safetensors.torch import save_file as save_tensors

    from circuits.checkpoints import list_snapshots, load_snapshot

    model, folder = saved
    (folder / "snapshots").mkdir()
    for step in (30, 5):
        save_tensors({k: v.half() for k, v in model.state_dict().items()},
                     folder / "snapshots" / f"step-{step:06d}.safetensors")
    assert list_snapshots(folder) == [5, 30]
    snapshot = load_snapshot(folder, 30)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(snapshot.state_dict()[key], value.half().float())
    with pytest.raises(CheckpointError, match="no snapshot for step 7; available steps: \\[5, 30\\]"):
        load_snapshot(folder, 7)
