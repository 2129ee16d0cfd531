"""Measurements taken during training, for the training-dynamics chapter.

``TrainingProbe`` is a metrics hook for ``circuits.train.train``: at every evaluation it adds to
the log, per head where it applies,

- ``icl_score``: mean loss at token index 500 minus mean loss at index 50 (indices scaled to
  0.9 and 0.1 of the context below 512 tokens) over ``icl_windows`` validation windows;
- ``previous_token``: [layer][head] mean attention A[i, i − 1] over ``score_windows`` validation
  windows;
- ``prefix_matching``: [layer][head] prefix-matching score on BOS plus 25 random tokens repeated
  4 times (10 sequences, ids 256 to BOS − 1);
- ``repeated_loss_per_copy``: mean loss on each of the 4 copies of those tokens, each copy's first
  token left out;
- ``k_composition``: [layer-0 head][layer-1 head] raw K-composition scores (2+ layers only).

The probe data are fixed when the probe is built, so every evaluation measures the same inputs.
"""

from __future__ import annotations

import torch

from circuits.analysis.attention import (
    prefix_matching_scores,
    previous_token_scores,
    repeated_random_tokens,
    repeated_token_loss,
)
from circuits.analysis.composition import composition_scores
from circuits.analysis.icl import in_context_learning_score
from circuits.data import WindowSampler
from circuits.model import AttnOnlyTransformer
from circuits.tokenizer import Tokenizer

REPEAT_PERIOD = 25
REPEAT_COUNT = 4


def _rounded(values: torch.Tensor, digits: int = 5) -> list:
    return torch.round(values.double(), decimals=digits).tolist()


class TrainingProbe:
    """A metrics hook that measures induction-related quantities (see the module docstring)."""

    def __init__(
        self,
        validation_tokens,
        tokenizer: Tokenizer,
        n_ctx: int,
        icl_windows: int = 200,
        score_windows: int = 16,
        seed: int = 0,
    ) -> None:
        sampler = WindowSampler(validation_tokens, n_ctx, tokenizer.bos_token_id)
        windows = sampler.sequential_windows(max(icl_windows, score_windows))
        self.icl_windows = windows[:icl_windows]
        self.score_windows = windows[:score_windows]
        self.repeated = repeated_random_tokens(
            tokenizer, n_tokens=REPEAT_PERIOD, n_repeats=REPEAT_COUNT, n_sequences=10, seed=seed
        )

    @torch.no_grad()
    def __call__(self, model: AttnOnlyTransformer, step: int) -> dict:
        was_training = model.training
        model.eval()
        try:
            return self.measure(model)
        finally:
            model.train(was_training)

    def measure(self, model: AttnOnlyTransformer) -> dict:
        device = next(model.parameters()).device
        record = {}
        if model.cfg.n_layers > 0:
            record["previous_token"] = _rounded(
                previous_token_scores(model, self.score_windows.to(device))
            )
            record["prefix_matching"] = _rounded(
                prefix_matching_scores(model, self.repeated.to(device), REPEAT_PERIOD)
            )
        icl = in_context_learning_score(model, self.icl_windows.to(device))
        record["icl_score"] = round(icl.score, 5)
        record["icl_indices"] = [icl.late_index, icl.early_index]
        losses = repeated_token_loss(model, self.repeated.to(device), REPEAT_PERIOD)
        record["repeated_loss_per_copy"] = _rounded(losses.per_copy)
        if model.cfg.n_layers >= 2 and not model.cfg.smear_keys:
            record["k_composition"] = _rounded(composition_scores(model, 0, 1).k.float())
        return record
