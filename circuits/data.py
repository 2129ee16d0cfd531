"""Training text: loading through ``datasets``, a token cache on disk, and context windows.

A data source is one of four kinds:

- local files: a path, a folder, or a glob pattern of ``.jsonl``, ``.jsonl.gz``, ``.json`` or
  ``.txt`` files. JSON lines need a ``"text"`` field.
- a Hugging Face hub dataset written ``hf:NAME`` or ``hf:NAME:SPLIT``, which needs network access.
- ``python-stdlib``: the ``.py`` files of the running Python's standard library, real source code
  that every Python installation carries. Each file is one document, and the few files that are
  not UTF-8 are left out.
- ``python-stdlib-tabs``: the same files with each line's indentation rewritten by
  ``indent_with_tabs`` (one tab per four leading spaces). GPT-2's BPE spends about one token per
  space of indentation and one per tab, so this leaves more identifiers in each context window.

The documents are tokenized once into a flat stream, each document preceded by
``<|endoftext|>`` (the BOS token), and cached as a memmap (uint16 while the vocabulary fits,
uint32 otherwise). The cache is keyed by the tokenizer and the inputs (path, size and
modification time of each file), and a JSON sidecar records the token count and a SHA-256 of the
tokens, so a truncated, corrupt or stale cache is rebuilt rather than used.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from circuits.checkpoints import atomic_write_bytes, write_json
from circuits.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz")
HUB_PREFIX = "hf:"
PYTHON_STDLIB = "python-stdlib"
PYTHON_STDLIB_TABS = "python-stdlib-tabs"
PYTHON_SOURCES = (PYTHON_STDLIB, PYTHON_STDLIB_TABS)
# The repository root: relative data paths in configs and checkpoints start here.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Documents are tokenized in batches of this many, with tiktoken's threads.
ENCODE_BATCH = 64


class DataError(Exception):
    """Training data that cannot be read; the message names the path or dataset id."""


def default_cache_dir() -> Path:
    root = os.environ.get("CIRCUITS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "circuits"
    )
    return Path(root) / "tokens"


def python_stdlib_files() -> list[Path]:
    """List the UTF-8 ``.py`` files of this interpreter's standard library, without site-packages."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
    if not files:
        raise DataError(f"no Python source files found under {root}")
    return files


_LEADING_SPACES = re.compile(r"^ +", re.MULTILINE)


def indent_with_tabs(text: str) -> str:
    """Rewrite the spaces that start each line as one tab per four spaces.

    A remainder of one to three spaces stays after the tabs. A line that starts with a tab keeps
    its indentation, and nothing after the indentation changes.
    """

    def replace(match: re.Match) -> str:
        width = len(match.group(0))
        return "\t" * (width // 4) + " " * (width % 4)

    return _LEADING_SPACES.sub(replace, text)


def resolve_data_spec(spec, root: str | os.PathLike | None = None):
    """Make each relative path of ``spec`` that matches nothing here absolute from ``root``.

    Configs and checkpoints write data paths relative to the repository root (``root``'s
    default), so a command run from another folder still finds them. A path that matches files
    from the current folder, an absolute path, a hub name and the Python sources stay as given,
    and so does a path that matches nothing from either place (its error names it as written).
    """
    if isinstance(spec, (list, tuple)):
        return [resolve_data_spec(item, root) for item in spec]
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    item = os.fspath(spec)
    if item in PYTHON_SOURCES or item.startswith(HUB_PREFIX) or os.path.isabs(item):
        return spec
    if glob.glob(item):
        return spec
    from_root = os.path.join(REPO_ROOT if root is None else root, item)
    return from_root if glob.glob(from_root) else spec


def resolve_files(spec: str | os.PathLike | list) -> list[Path]:
    """Expand paths, folders and glob patterns into a sorted list of data files."""
    if spec in PYTHON_SOURCES:
        return python_stdlib_files()
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for item in specs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = [p for p in sorted(Path(item).iterdir()) if p.name.endswith(LOCAL_SUFFIXES)]
            if not found:
                raise DataError(
                    f"no data files in folder {item}: expected files ending in "
                    f"{', '.join(LOCAL_SUFFIXES)}"
                )
        else:
            found = [Path(p) for p in sorted(glob.glob(item))]
            if not found:
                raise DataError(
                    f"no files match {item!r}: check the path or pattern, or name a built-in "
                    f"source ({', '.join(PYTHON_SOURCES)})"
                )
        for path in found:
            if not path.name.endswith(LOCAL_SUFFIXES):
                raise DataError(
                    f"{path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}"
                )
            if path.stat().st_size == 0:
                raise DataError(f"{path}: the file is empty")
        files.extend(found)
    return files


def _load_local(files: list[Path], progress: bool = True):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return _read_local(datasets, files)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_local(datasets, files: list[Path]):
    json_files = [str(p) for p in files if ".json" in p.name]
    text_files = [str(p) for p in files if ".txt" in p.name]
    if json_files and text_files:
        raise DataError("mix of JSON and text files in one source; give one kind at a time")
    builder, kwargs = ("json", {}) if json_files else ("text", {"sample_by": "document"})
    try:
        dataset = datasets.load_dataset(
            builder, data_files={"train": json_files or text_files}, split="train", **kwargs
        )
    except UnicodeDecodeError as error:
        raise DataError(
            f"one of {json_files or text_files} is not UTF-8 text ({error}); convert it to UTF-8"
        ) from error
    except Exception as error:  # datasets wraps parse errors in several exception types
        raise DataError(
            f"could not read {json_files or text_files}: {type(error).__name__}: {error}"
        ) from error
    if "text" not in dataset.column_names:
        raise DataError(
            f"{json_files or text_files}: no 'text' field (fields: {dataset.column_names})"
        )
    if len(dataset) == 0:
        raise DataError(f"{json_files or text_files}: no documents")
    return dataset


def _load_hub(spec: str, max_documents: int | None):
    import datasets

    name, _, split = spec[len(HUB_PREFIX):].partition(":")
    split = split or "train"
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        if max_documents is not None:
            stream = stream.take(max_documents)
        return [row["text"] for row in stream]
    except Exception as error:  # offline failures surface as several exception types
        raise DataError(
            f"could not load hub dataset {name!r} (split {split!r}): {type(error).__name__}: "
            f"{error}. Without network access, use local files instead, for example "
            "--data '../shared/corpus/pd-books/train-*.jsonl.gz'"
        ) from error


def _cache_key(tokenizer: Tokenizer, spec, files: list[Path] | None) -> str:
    description = {"tokenizer": tokenizer.describe(), "format": 1, "spec": str(spec)}
    if files is None:
        description["hub"] = spec
    else:
        description["files"] = [
            [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files
        ]
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def token_dtype(d_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if d_vocab <= 1 << 16 else np.dtype(np.uint32)


def _valid_cache(bin_path: Path, meta_path: Path, key: str) -> dict | None:
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("token cache %s: unreadable metadata, rebuilding", meta_path)
        return None
    expected_size = meta.get("n_tokens", -1) * np.dtype(meta.get("dtype", "uint16")).itemsize
    if meta.get("key") != key or bin_path.stat().st_size != expected_size:
        log.warning("token cache %s: stale or truncated, rebuilding", bin_path)
        return None
    if hashlib.sha256(bin_path.read_bytes()).hexdigest() != meta.get("sha256"):
        log.warning("token cache %s: checksum mismatch, rebuilding", bin_path)
        return None
    return meta


def load_tokens(
    spec,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    max_documents: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Return the token stream of a data source as a read-only memmap, building the cache once."""
    is_hub = isinstance(spec, str) and spec.startswith(HUB_PREFIX)
    files = None if is_hub else resolve_files(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(tokenizer, spec, files)
    if max_documents is not None:
        key += f"-first{max_documents}"
    bin_path = cache_dir / f"{key}.bin"
    meta_path = cache_dir / f"{key}.json"

    meta = _valid_cache(bin_path, meta_path, key)
    if meta is None:
        meta = _build_cache(spec, files, tokenizer, bin_path, meta_path, key, max_documents,
                            progress)
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


def _build_cache(spec, files, tokenizer, bin_path, meta_path, key, max_documents, progress):
    from tqdm.auto import tqdm

    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the token cache folder {bin_path.parent}: {error}") from error
    if files is None:
        documents = _load_hub(spec, max_documents)
    elif spec in PYTHON_SOURCES:
        documents = [path.read_text(encoding="utf-8") for path in files[:max_documents]]
        if spec == PYTHON_STDLIB_TABS:
            documents = [indent_with_tabs(text) for text in documents]
    else:
        documents = _load_local(files, progress)
        if max_documents is not None:
            documents = documents.select(range(min(max_documents, len(documents))))
        documents = documents["text"]

    dtype = token_dtype(tokenizer.d_vocab)
    pieces = []
    bos = np.array([tokenizer.bos_token_id], dtype=dtype)
    bar = tqdm(total=len(documents), desc="tokenizing", unit="doc", disable=not progress)
    for start in range(0, len(documents), ENCODE_BATCH):
        batch = [text for text in documents[start:start + ENCODE_BATCH] if text]
        for ids in tokenizer.encode_batch(batch):
            pieces.append(bos)
            pieces.append(np.asarray(ids, dtype=dtype))
        bar.update(min(ENCODE_BATCH, len(documents) - start))
    bar.close()
    if not pieces:
        raise DataError(f"{spec}: every document is empty")
    tokens = np.concatenate(pieces)

    meta = {
        "key": key,
        "source": str(spec),
        "tokenizer": tokenizer.describe(),
        "n_tokens": int(tokens.size),
        "n_documents": len(pieces) // 2,
        "dtype": dtype.name,
        "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }
    atomic_write_bytes(bin_path, tokens.tobytes())
    write_json(meta_path, meta)
    return meta


@dataclass
class WindowSampler:
    """Context windows of ``n_ctx`` tokens from a token stream, each starting with BOS.

    A window is BOS followed by the ``n_ctx - 1`` stream tokens after a start index. Windows may
    cross document boundaries, where the stream has its own BOS separators. Random batches are a
    pure function of ``(seed, step)``, so a resumed run sees the same batches.
    """

    tokens: np.ndarray
    n_ctx: int
    bos_token_id: int

    def __post_init__(self) -> None:
        if len(self.tokens) < self.n_ctx:
            raise DataError(
                f"the data has {len(self.tokens)} tokens, fewer than one window of {self.n_ctx}"
            )

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        body = np.stack([self.tokens[s:s + self.n_ctx - 1] for s in starts]).astype(np.int64)
        bos = np.full((len(starts), 1), self.bos_token_id, dtype=np.int64)
        return torch.from_numpy(np.concatenate([bos, body], axis=1))

    def random_batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.tokens) - self.n_ctx + 2, size=batch_size)
        return self._windows(starts)

    def sequential_windows(self, n_windows: int) -> torch.Tensor:
        """Return the first ``n_windows`` non-overlapping windows (fewer if the stream is short)."""
        stride = self.n_ctx - 1
        n_windows = min(n_windows, (len(self.tokens) - 1) // stride)
        return self._windows(np.arange(n_windows) * stride)


@dataclass
class MixtureSampler:
    """Windows drawn from several token streams, each window's stream chosen by weight.

    Like ``WindowSampler``, a batch is a pure function of ``(seed, step)``.
    """

    samplers: list[WindowSampler]
    weights: list[float]

    def __post_init__(self) -> None:
        if len(self.samplers) != len(self.weights) or not self.samplers:
            raise DataError("a data mixture needs one weight per source and at least one source")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise DataError(f"mixture weights must be non-negative with a positive sum: "
                            f"{self.weights}")
        total = sum(self.weights)
        self.probabilities = np.array(self.weights, dtype=np.float64) / total

    def random_batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step, 1])
        choice = rng.choice(len(self.samplers), size=batch_size, p=self.probabilities)
        windows = []
        for index, sampler in enumerate(self.samplers):
            count = int((choice == index).sum())
            if count:
                windows.append(sampler.random_batch(count, seed * 1000 + index, step))
        batch = torch.cat(windows)
        # Shuffle so the order inside a batch does not reveal the source.
        order = torch.from_numpy(rng.permutation(batch_size))
        return batch[order]
