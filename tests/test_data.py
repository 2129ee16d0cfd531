import json
import os
import subprocess
import sys

import numpy as np
import pytest

import torch

from circuits.data import (
    PYTHON_STDLIB,
    PYTHON_STDLIB_TABS,
    DataError,
    MixtureSampler,
    WindowSampler,
    indent_with_tabs,
    load_tokens,
    resolve_data_spec,
    resolve_files,
    token_dtype,
)
from circuits.tokenizer import Tokenizer
from conftest import SAMPLE_TEXT

TOKENIZER = Tokenizer(2048)


def test_tokens_match_direct_encoding(text_files, tmp_path):
    train, _ = text_files
    tokens = load_tokens(train, TOKENIZER, cache_dir=tmp_path / "c", progress=False)
    expected = []
    for line in train.read_text().splitlines():
        expected += [TOKENIZER.bos_token_id, *TOKENIZER.encode(json.loads(line)["text"])]
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected


def test_plain_text_files(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(SAMPLE_TEXT)
    tokens = load_tokens(path, TOKENIZER, cache_dir=tmp_path / "c", progress=False)
    assert tokens.tolist() == [TOKENIZER.bos_token_id, *TOKENIZER.encode(SAMPLE_TEXT)]


def test_glob_and_folder(text_files, tmp_path):
    assert resolve_files(str(tmp_path / "*.jsonl")) == sorted(text_files)
    assert resolve_files(tmp_path) == sorted(text_files)


def test_cache_reused(text_files, tmp_path):
    cache = tmp_path / "c"
    first = load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False)
    (bin_file,) = cache.glob("*.bin")
    stamp = bin_file.stat().st_mtime_ns
    second = load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False)
    assert bin_file.stat().st_mtime_ns == stamp
    assert np.array_equal(first, second)


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_corrupt_cache_rebuilt(text_files, tmp_path, damage):
    cache = tmp_path / "c"
    good = np.array(load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False))
    (bin_file,) = cache.glob("*.bin")
    (meta_file,) = cache.glob("*.json")
    data = bytearray(bin_file.read_bytes())
    if damage == "flip":
        data[10] ^= 0xFF
        bin_file.write_bytes(bytes(data))
    elif damage == "truncate":
        bin_file.write_bytes(bytes(data[:-6]))
    else:
        meta_file.write_text("{")
    rebuilt = load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False)
    assert np.array_equal(rebuilt, good)


def test_stale_cache_not_used(text_files, tmp_path):
    cache = tmp_path / "c"
    load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False)
    text_files[0].write_text(json.dumps({"text": "A different story."}) + "\n")
    tokens = load_tokens(text_files[0], TOKENIZER, cache_dir=cache, progress=False)
    assert tokens.tolist() == [TOKENIZER.bos_token_id, *TOKENIZER.encode("A different story.")]


def test_no_matching_files(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        load_tokens(str(tmp_path / "missing-*.jsonl"), TOKENIZER)
    # A misspelt built-in source is read as a path, and the message lists the real names.
    with pytest.raises(DataError, match=r"built-in source \(python-stdlib, python-stdlib-tabs\)"):
        resolve_files("python-stdlib-tab")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no data files in folder"):
        resolve_files(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load_tokens(path, TOKENIZER)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    with pytest.raises(DataError, match="latin1.txt"):
        load_tokens(path, TOKENIZER, cache_dir=tmp_path / "c", progress=False)


def test_missing_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        load_tokens(path, TOKENIZER, cache_dir=tmp_path / "c", progress=False)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_files(path)


def test_unreachable_hub_dataset(tmp_path):
    # The hub client reads HF_HUB_OFFLINE at import time, so the check runs in a fresh process.
    script = (
        "from circuits.data import DataError, load_tokens\n"
        "from circuits.tokenizer import Tokenizer\n"
        "try:\n"
        "    load_tokens('hf:roneneldan/TinyStories', Tokenizer(2048), cache_dir=%r,\n"
        "                max_documents=3, progress=False)\n"
        "except DataError as error:\n"
        "    print(error)\n" % str(tmp_path)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "could not load hub dataset 'roneneldan/TinyStories'" in result.stdout
    assert "use local files instead" in result.stdout


def test_token_dtype():
    assert token_dtype(2049) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_windows_start_with_bos():
    stream = np.arange(1, 101, dtype=np.uint16)
    sampler = WindowSampler(stream, n_ctx=8, bos_token_id=0)
    batch = sampler.random_batch(5, seed=3, step=7)
    assert batch.shape == (5, 8)
    assert (batch[:, 0] == 0).all()
    # The rest of each window is a contiguous slice of the stream.
    assert ((batch[:, 2:] - batch[:, 1:-1]) == 1).all()
    assert batch.max() <= 100
    assert (sampler.random_batch(5, seed=3, step=7) == batch).all()
    assert not (sampler.random_batch(5, seed=3, step=8) == batch).all()


def test_sequential_windows_do_not_overlap():
    stream = np.arange(1, 30, dtype=np.uint16)
    windows = WindowSampler(stream, n_ctx=5, bos_token_id=0).sequential_windows(100)
    assert windows[:, 1:].flatten().tolist() == list(range(1, 1 + 4 * len(windows)))
    assert len(windows) == 7


def test_too_little_data():
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(np.arange(5, dtype=np.uint16), n_ctx=8, bos_token_id=0)


def test_mixture_draws_by_weight():
    a = WindowSampler(np.full(50, 1, dtype=np.uint16), n_ctx=4, bos_token_id=0)
    b = WindowSampler(np.full(50, 2, dtype=np.uint16), n_ctx=4, bos_token_id=0)
    mixture = MixtureSampler([a, b], [0.25, 0.75])
    batch = mixture.random_batch(400, seed=1, step=0)
    share_b = (batch[:, 1] == 2).float().mean().item()
    assert 0.68 < share_b < 0.82
    assert torch.equal(batch, mixture.random_batch(400, seed=1, step=0))
    only_a = MixtureSampler([a, b], [1.0, 0.0]).random_batch(20, seed=1, step=3)
    assert (only_a[:, 1:] == 1).all()


def test_mixture_rejects_bad_weights():
    a = WindowSampler(np.full(50, 1, dtype=np.uint16), n_ctx=4, bos_token_id=0)
    with pytest.raises(DataError, match="non-negative"):
        MixtureSampler([a], [-1.0])
    with pytest.raises(DataError, match="one weight per source"):
        MixtureSampler([a], [1.0, 2.0])


def test_python_stdlib_source():
    files = resolve_files(PYTHON_STDLIB)
    assert len(files) > 500
    assert all(path.suffix == ".py" for path in files)
    assert not any("site-packages" in path.parts for path in files)


def test_tabs_replace_leading_spaces():
    source = "def f(a,  b):\n    if a:\n        return  b\n      x = 1\n\tkept\n   \n"
    expected = "def f(a,  b):\n\tif a:\n\t\treturn  b\n\t  x = 1\n\tkept\n   \n"
    assert indent_with_tabs(source) == expected
    # Only whitespace changes, so the text without whitespace is the same.
    assert "".join(indent_with_tabs(source).split()) == "".join(source.split())


def test_python_stdlib_tabs_source(monkeypatch, tmp_path):
    # Two small files stand in for the standard library, so the test runs fast.
    files = []
    for name, text in [("a.py", "class A:\n    def f(self):\n        pass\n"),
                       ("b.py", "x = 1\n")]:
        path = tmp_path / name
        path.write_text(text)
        files.append(path)
    monkeypatch.setattr("circuits.data.python_stdlib_files", lambda: files)
    plain = load_tokens(PYTHON_STDLIB, TOKENIZER, cache_dir=tmp_path / "c", progress=False)
    tabs = load_tokens(PYTHON_STDLIB_TABS, TOKENIZER, cache_dir=tmp_path / "c", progress=False)
    bos = TOKENIZER.bos_token_id
    expected = [bos, *TOKENIZER.encode("class A:\n\tdef f(self):\n\t\tpass\n"), bos,
                *TOKENIZER.encode("x = 1\n")]
    assert tabs.tolist() == expected
    assert len(plain) > len(tabs)
    assert resolve_files(PYTHON_STDLIB_TABS) == files


def test_relative_data_path_falls_back_to_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_data_spec("data/*.jsonl", root) == str(root / "data/*.jsonl")
    assert resolve_data_spec(["data/a.jsonl"], root) == [str(root / "data/a.jsonl")]
    # Unmatched anywhere, absolute, stdlib and hub specs stay as written.
    assert resolve_data_spec("missing/*.jsonl", root) == "missing/*.jsonl"
    assert resolve_data_spec(str(root / "data"), root) == str(root / "data")
    assert resolve_data_spec("python-stdlib", root) == "python-stdlib"
    assert resolve_data_spec("python-stdlib-tabs", root) == "python-stdlib-tabs"
    assert resolve_data_spec("hf:user/name", root) == "hf:user/name"


def test_relative_data_path_prefers_current_folder(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    current = tmp_path / "current"
    (current / "data").mkdir(parents=True)
    (current / "data" / "a.jsonl").write_text('{"text": "y"}\n')
    monkeypatch.chdir(current)
    assert resolve_data_spec("data/a.jsonl", root) == "data/a.jsonl"
