"""Every head's attention and the model's top predictions on a piece of text.

This is the computation behind the attention explorer (``circuits.widgets``) and the
precomputed example that the book shows in its place. The text is encoded as model input: BOS,
then at most n_ctx − 1 tokens. Text longer than that is truncated, and the warning is kept in the
result instead of being printed. The tokenizer is GPT-2's BPE cut to the model's ranks, so a
character with no token of its own is split into its UTF-8 bytes. The result lists those
characters, because their byte tokens show as "�" on their own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from circuits.checkpoints import Checkpoint
from circuits.tokenizer import TruncationWarning


@dataclass
class TextAttention:
    """Attention patterns and top-k next-token predictions for one encoded text.

    ``token_ids`` and ``token_strings`` start with BOS. ``patterns`` is float32
    [n_layers, n_heads, pos, pos] (query, key). ``top_ids``, ``top_strings`` and
    ``top_probabilities`` are [pos, k]: row i is the model's k most likely next tokens after
    position i. ``warnings`` contains messages for the reader (truncation, split characters);
    ``split_characters`` lists the characters that were encoded as several byte tokens.
    """

    token_ids: list[int]
    token_strings: list[str]
    patterns: np.ndarray
    top_ids: np.ndarray
    top_strings: list[list[str]]
    top_probabilities: np.ndarray
    warnings: list[str] = field(default_factory=list)
    split_characters: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]


def split_characters(tokenizer, ids: list[int]) -> list[str]:
    """Return, in order of appearance, the characters encoded as runs of partial-UTF-8 tokens.

    A token whose bytes are not valid UTF-8 alone is part of a character that has no token of its
    own in the truncated vocabulary. Consecutive such tokens are joined and decoded back into the
    characters they spell.
    """
    found: list[str] = []
    run = b""
    for token in list(ids) + [None]:
        piece = None
        if token is not None and token != tokenizer.bos_token_id:
            piece = tokenizer.encoding.decode_single_token_bytes(int(token))
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                run += piece
                continue
        if run:
            for character in run.decode("utf-8", errors="replace"):
                if character not in found:
                    found.append(character)
            run = b""
    return found


@torch.no_grad()
def analyse_text(checkpoint: Checkpoint, text: str, top_k: int = 5) -> TextAttention:
    """Encode ``text``, run the model once and collect patterns and top predictions.

    Empty text gives the single position BOS, whose predictions are the model's guesses for the
    first token of a document.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    model, tokenizer = checkpoint.model, checkpoint.tokenizer

    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        ids = tokenizer.encode_for_model(text, model.cfg.n_ctx)
    for item in caught:
        if issubclass(item.category, TruncationWarning):
            messages.append(str(item.message))

    characters = split_characters(tokenizer, ids)
    if characters:
        shown = "".join(characters[:20]) + (" …" if len(characters) > 20 else "")
        messages.append(
            f"{len(characters)} distinct characters have no token in the model's "
            f"{tokenizer.n_ranks}-token vocabulary and are split into UTF-8 bytes, which show "
            f"as \N{REPLACEMENT CHARACTER} on their own: {shown}"
        )

    was_training = model.training
    model.eval()
    try:
        logits, cache = model.run_with_cache(torch.tensor([ids], dtype=torch.int64))
    finally:
        model.train(was_training)
    patterns = torch.stack([pattern[0] for pattern in cache.patterns]) if cache.patterns else (
        torch.zeros(0, 0, len(ids), len(ids))
    )
    probabilities = logits[0].float().softmax(-1)
    k = min(top_k, probabilities.shape[-1])
    top = probabilities.topk(k, dim=-1)
    top_ids = top.indices.numpy()
    strings = tokenizer.vocabulary_strings
    return TextAttention(
        token_ids=[int(i) for i in ids],
        token_strings=tokenizer.token_strings(ids),
        patterns=patterns.float().numpy(),
        top_ids=top_ids,
        top_strings=[[strings[i] for i in row] for row in top_ids],
        top_probabilities=top.values.numpy(),
        warnings=messages,
        split_characters=characters,
    )
