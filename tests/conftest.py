"""Shared fixtures: tiny models, tiny data files and an isolated token cache."""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest
import torch

from circuits.model import AttnOnlyTransformer, ModelConfig

# Hand-written sentences for tiny training runs; repeated names give the data some structure.
SAMPLE_TEXT = (
    "Mara packed the lantern, the rope and the map. Tobin asked Mara where the map led, and "
    "Mara said the map led to the old mill by the river. The river was high that spring. "
    "Tobin carried the rope and Mara carried the lantern, and they walked until the mill "
    "came into view. "
)


def is_loopback(address) -> bool:
    """True for an AF_INET/AF_INET6 address tuple on the loopback network, or a Unix socket path."""
    if isinstance(address, (str, bytes)):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Reject connections to any host but loopback, so a test never depends on the network."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if not is_loopback(address):
            raise OSError(f"network access is disabled in tests (connection to {address!r})")
        return real_connect(self, address)

    socket.socket.connect = guarded_connect
    yield
    socket.socket.connect = real_connect


@pytest.fixture(autouse=True)
def isolated_token_cache(tmp_path_factory, monkeypatch):
    """Keep every test's token cache out of the user's cache folder."""
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def text_files(tmp_path):
    """A small JSON-lines corpus: train and validation files."""
    train = tmp_path / "train.jsonl"
    validation = tmp_path / "validation.jsonl"
    train.write_text(
        "".join(json.dumps({"text": SAMPLE_TEXT * (i + 3)}) + "\n" for i in range(6))
    )
    validation.write_text(json.dumps({"text": SAMPLE_TEXT * 4}) + "\n")
    return train, validation


def tiny_config(**overrides) -> ModelConfig:
    values = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=300)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> AttnOnlyTransformer:
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(tiny_config(**overrides)).to(dtype)
    # Random layernorm parameters, so tests exercise the gain and bias too.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".w"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".b"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
    return model.eval()
