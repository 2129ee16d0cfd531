"""Copying heads: OV eigenvalues and copying scores of a trained model beside a random control.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", call a head a copying
head when its OV circuit raises the logits of the tokens it attends to. A matrix that maps most
tokens to themselves has eigenvalues with mostly positive real parts, so the score
Σ Re(λ) / Σ |λ| over the OV circuit's eigenvalues (``circuits.analysis.circuits.copying_score``)
is near +1 for a copying head and near 0 for a random matrix. The paper reports that 10 of the 12
heads of its one-layer model have a positive score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from circuits.analysis.circuits import (
    copying_scores,
    direct_path_copying_score,
    head_name,
    ov_eigenvalues,
    random_control,
)
from circuits.model import AttnOnlyTransformer


@dataclass
class CopyingSummary:
    """OV eigenvalues of every head and copying scores beside a random-initialisation control.

    ``eigenvalues`` maps a head name (``L{layer}H{head}``) to its complex eigenvalues [d_head].
    ``scores`` has one row per head with ``name``, ``trained`` (the model's copying score),
    ``random init`` (the same head of a freshly initialised model with the same config) and
    ``copying`` (True when the trained score is positive). ``direct_path`` is the copying score
    of the direct path LN_final(W_E) W_U.
    """

    eigenvalues: dict[str, np.ndarray]
    scores: pd.DataFrame
    direct_path: float

    @property
    def n_copying(self) -> int:
        """Number of heads with a positive copying score."""
        return int(self.scores["copying"].sum())


def copying_summary(model: AttnOnlyTransformer, seed: int = 0) -> CopyingSummary:
    """Compute every head's OV eigenvalues and copying score, and the random control's scores.

    ``seed`` seeds the control model (see ``random_control``).
    """
    trained = copying_scores(model)
    control = random_control(model.cfg, seed=seed)
    eigenvalues = {}
    for layer, head in zip(trained["layer"], trained["head"]):
        eigenvalues[head_name(layer, head)] = ov_eigenvalues(model, int(layer), int(head)).numpy()
    scores = pd.DataFrame({
        "name": trained["name"],
        "trained": trained["copying_score"],
        "random init": control["copying_score"],
    })
    scores["copying"] = scores["trained"] > 0
    return CopyingSummary(eigenvalues, scores, direct_path_copying_score(model))
