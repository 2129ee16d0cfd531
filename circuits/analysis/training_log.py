"""A training run's log and snapshots as tables, for the training-dynamics chapter.

``log.jsonl`` contains one JSON object per logged step (``step``, ``tokens``, ``lr``,
``train_loss``, ``elapsed_s``). Evaluation steps add ``val_loss`` and, when the run had
``probe = true``, the measurements of ``circuits.dynamics.TrainingProbe``: ``icl_score``,
``previous_token`` and ``prefix_matching`` [layer][head], ``repeated_loss_per_copy`` [copy] and
``k_composition`` [layer-0 head][layer-1 head]. ``snapshots/step-N.safetensors`` keep the weights
at chosen steps.

- ``loss_table`` returns one row per logged step;
- ``ProbeHistory`` stacks the probe fields of every evaluation into arrays, and
  ``ProbeHistory.head_table`` returns them as a long table, one row per (step, head);
- ``induction_progress`` applies, at every evaluation, the two criteria of
  ``scripts/check_induction.py``, and ``induction_verdict`` and ``phase_change`` summarise it;
- ``snapshot_measurements`` runs every snapshot on the probe's repeated random tokens.

A step logged twice keeps its last record, because a resumed run logs a step again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuits.analysis.attention import (
    prefix_matching_scores,
    repeated_random_tokens,
    repeated_token_loss,
)
from circuits.analysis.circuits import head_name
from circuits.checkpoints import list_snapshots, load_snapshot, read_log, resolve_checkpoint
from circuits.dynamics import REPEAT_COUNT, REPEAT_PERIOD
from circuits.tokenizer import Tokenizer

# The two criteria of scripts/check_induction.py: the second copy of repeated random tokens
# costs less than this fraction of the first copy's loss, and some head's prefix-matching
# score exceeds PREFIX_THRESHOLD.
RATIO_THRESHOLD = 0.35
PREFIX_THRESHOLD = 0.5

# TrainingProbe draws this many repeated-token sequences (circuits.dynamics).
PROBE_SEQUENCES = 10

LOSS_COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss", "icl_score", "elapsed_s")
HEAD_FIELDS = ("previous_token", "prefix_matching")


def tidy_records(records: list[dict]) -> list[dict]:
    """Sort log records by step, keeping the last record of a step that was logged twice."""
    by_step = {}
    for index, record in enumerate(records):
        if "step" not in record:
            raise ValueError(f"log record {index} has no 'step' field: {record!r}")
        by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def load_training_log(name_or_path: str | os.PathLike) -> list[dict]:
    """Read a checkpoint's ``log.jsonl`` (a folder or a shipped name) through ``tidy_records``.

    Returns an empty list when the folder has no log.
    """
    return tidy_records(read_log(resolve_checkpoint(name_or_path)))


def loss_table(records: list[dict]) -> pd.DataFrame:
    """Tabulate a log with one row per step and the columns of ``LOSS_COLUMNS``.

    A field absent from a record is NaN, so ``val_loss`` and ``icl_score`` are NaN except at
    evaluation steps.
    """
    rows = [
        {column: record.get(column, math.nan) for column in LOSS_COLUMNS}
        for record in tidy_records(records)
    ]
    table = pd.DataFrame(rows, columns=list(LOSS_COLUMNS)).astype(float)
    table["step"] = table["step"].astype(int)
    return table


def is_probe_record(record: dict) -> bool:
    """True for a record that a ``TrainingProbe`` measured: every probe writes ``icl_score``."""
    return "icl_score" in record


@dataclass
class ProbeHistory:
    """The probe fields of every evaluation of one run, stacked along a first axis of steps.

    ``previous_token`` and ``prefix_matching`` are [n_evaluations, n_layers, n_heads],
    ``repeated_loss_per_copy`` is [n_evaluations, n_copies] and ``k_composition`` is
    [n_evaluations, n_heads, n_heads] (layer-0 head, layer-1 head). A field the run did not
    measure (previous-token and prefix-matching scores without attention layers, K-composition
    below two layers or with smeared keys) is None.
    """

    steps: np.ndarray
    tokens: np.ndarray
    icl_score: np.ndarray
    repeated_loss_per_copy: np.ndarray
    previous_token: np.ndarray | None = None
    prefix_matching: np.ndarray | None = None
    k_composition: np.ndarray | None = None

    @classmethod
    def from_records(cls, records: list[dict]) -> "ProbeHistory":
        """Collect the probe records of a log; raise ValueError when there are none.

        Every probe record must contain the same fields, because one probe measures a whole run.
        """
        probed = [record for record in tidy_records(records) if is_probe_record(record)]
        if not probed:
            raise ValueError(
                "the log has no probe records (no 'icl_score' at any step); train with "
                "probe = true in the [training] table, or wait for the first evaluation"
            )
        values = {
            "steps": np.array([record["step"] for record in probed], dtype=np.int64),
            "tokens": np.array([record.get("tokens", math.nan) for record in probed], dtype=float),
        }
        optional = ("previous_token", "prefix_matching", "k_composition")
        for field in ("icl_score", "repeated_loss_per_copy", *optional):
            present = [field in record for record in probed]
            if not any(present) and field in optional:
                continue
            if not all(present):
                missing = [int(r["step"]) for r, has in zip(probed, present) if not has]
                raise ValueError(
                    f"probe field {field!r} is missing at steps {missing[:6]} but present at "
                    "other evaluations; the log mixes records of different runs"
                )
            values[field] = np.array([record[field] for record in probed], dtype=float)
        return cls(**values)

    @property
    def n_evaluations(self) -> int:
        return len(self.steps)

    def head_table(self, field: str) -> pd.DataFrame:
        """Return a per-head field as a long table: step, tokens, layer, head, name, ``score``."""
        scores = self._head_field(field)
        n_steps, n_layers, n_heads = scores.shape
        step_index, layer, head = np.meshgrid(
            np.arange(n_steps), np.arange(n_layers), np.arange(n_heads), indexing="ij"
        )
        return pd.DataFrame({
            "step": self.steps[step_index.ravel()],
            "tokens": self.tokens[step_index.ravel()],
            "layer": layer.ravel(),
            "head": head.ravel(),
            "name": [head_name(int(l), int(h)) for l, h in zip(layer.ravel(), head.ravel())],
            "score": scores.ravel(),
        })

    def top_heads(self, field: str, n: int = 3) -> list[tuple[int, int]]:
        """Pick the ``n`` heads (layer, head) with the highest ``field`` score at the last step.

        Ties keep the order layer by layer, head by head.
        """
        final = self._head_field(field)[-1]
        order = np.argsort(-final.ravel(), kind="stable")[:n]
        n_heads = final.shape[1]
        return [(int(index // n_heads), int(index % n_heads)) for index in order]

    def repeated_loss_table(self) -> pd.DataFrame:
        """Return the loss per copy of the repeated random tokens as a long table.

        Columns: step, tokens, copy and loss.

        Copies are numbered from 1.
        """
        n_steps, n_copies = self.repeated_loss_per_copy.shape
        return pd.DataFrame({
            "step": np.repeat(self.steps, n_copies),
            "tokens": np.repeat(self.tokens, n_copies),
            "copy": np.tile(np.arange(1, n_copies + 1), n_steps),
            "loss": self.repeated_loss_per_copy.ravel(),
        })

    def _head_field(self, field: str) -> np.ndarray:
        if field not in HEAD_FIELDS:
            raise ValueError(f"field must be one of {HEAD_FIELDS}, got {field!r}")
        scores = getattr(self, field)
        if scores is None:
            raise ValueError(f"this run's probe did not measure {field!r} (no attention layers)")
        return scores


def induction_progress(history: ProbeHistory) -> pd.DataFrame:
    """Apply the induction criteria at every evaluation, one row per step.

    Columns: ``step``, ``tokens``, ``icl_score``, ``best_head`` and ``best_prefix_matching``
    (the head with the highest prefix-matching score and that score), ``copy_1_loss``,
    ``copy_2_loss``, ``loss_ratio`` (copy 2 over copy 1), ``ratio_met`` (``loss_ratio`` below
    ``RATIO_THRESHOLD``), ``prefix_met`` (``best_prefix_matching`` above ``PREFIX_THRESHOLD``) and
    ``both_met``.

    The thresholds are those of ``scripts/check_induction.py``, but the probe's sequences differ
    from that script's: 25 tokens repeated 4 times with each copy's first token left out, against
    50 tokens repeated once, so the two ratios need not agree.
    """
    if history.prefix_matching is None:
        raise ValueError("this run's probe did not measure prefix-matching scores")
    n_heads = history.prefix_matching.shape[2]
    flat = history.prefix_matching.reshape(history.n_evaluations, -1)
    best = flat.argmax(1)
    losses = history.repeated_loss_per_copy
    table = pd.DataFrame({
        "step": history.steps,
        "tokens": history.tokens,
        "icl_score": history.icl_score,
        "best_head": [head_name(int(i // n_heads), int(i % n_heads)) for i in best],
        "best_prefix_matching": flat.max(1),
        "copy_1_loss": losses[:, 0],
        "copy_2_loss": losses[:, 1],
    })
    table["loss_ratio"] = table["copy_2_loss"] / table["copy_1_loss"]
    table["ratio_met"] = table["loss_ratio"] < RATIO_THRESHOLD
    table["prefix_met"] = table["best_prefix_matching"] > PREFIX_THRESHOLD
    table["both_met"] = table["ratio_met"] & table["prefix_met"]
    return table


@dataclass
class Transition:
    """The interval between two consecutive evaluations in which a score rose the most."""

    start_step: int
    end_step: int
    start_value: float
    end_value: float

    @property
    def rise(self) -> float:
        return self.end_value - self.start_value


def largest_rise(progress: pd.DataFrame, column: str = "best_prefix_matching") -> Transition | None:
    """Find the consecutive evaluations between which ``column`` rose most; None for one row."""
    if len(progress) < 2:
        return None
    values = progress[column].to_numpy(dtype=float)
    index = int(np.argmax(np.diff(values)))
    return Transition(
        start_step=int(progress["step"].iloc[index]),
        end_step=int(progress["step"].iloc[index + 1]),
        start_value=float(values[index]),
        end_value=float(values[index + 1]),
    )


def first_step_met(progress: pd.DataFrame, column: str = "both_met") -> int | None:
    """Return the first evaluation step at which the boolean ``column`` is true, or None."""
    met = progress.loc[progress[column].astype(bool), "step"]
    return None if met.empty else int(met.iloc[0])


def probe_seed(config: dict) -> int:
    """Return the seed of a run's probe data, which ``circuits.train`` sets to the training seed.

    A config without a recorded seed gives 0, the default of the training config.
    """
    training = config.get("training", {}).get("config", {}).get("training", {})
    return int(training.get("seed", 0))


def probe_sequences(tokenizer: Tokenizer, seed: int = 0) -> torch.Tensor:
    """Rebuild the repeated random tokens of ``TrainingProbe``: [10, 1 + 25 · 4] ids, BOS first."""
    return repeated_random_tokens(
        tokenizer, n_tokens=REPEAT_PERIOD, n_repeats=REPEAT_COUNT, n_sequences=PROBE_SEQUENCES,
        seed=seed,
    )


@dataclass
class SnapshotMeasurements:
    """Measurements of every snapshot of a run on one set of repeated random tokens.

    ``steps`` is [n_snapshots]. ``prefix_matching`` [n_snapshots, n_layers, n_heads] and
    ``repeated_loss_per_copy`` [n_snapshots, n_copies] average over all sequences. ``patterns``
    [n_snapshots, len(heads), n_pos, n_pos] is the attention of each head in ``heads`` on the first
    ``n_pos`` tokens of the first sequence, as float32 rounded to ``decimals`` places, and
    ``tokens`` [n_pos] are those tokens.
    """

    steps: np.ndarray
    heads: list[tuple[int, int]]
    tokens: np.ndarray
    patterns: np.ndarray
    prefix_matching: np.ndarray
    repeated_loss_per_copy: np.ndarray
    decimals: int

    def head_table(self) -> pd.DataFrame:
        """Return the scores as a long table: step, layer, head, name and prefix_matching."""
        n_steps, n_layers, n_heads = self.prefix_matching.shape
        step_index, layer, head = np.meshgrid(
            np.arange(n_steps), np.arange(n_layers), np.arange(n_heads), indexing="ij"
        )
        return pd.DataFrame({
            "step": self.steps[step_index.ravel()],
            "layer": layer.ravel(),
            "head": head.ravel(),
            "name": [head_name(int(l), int(h)) for l, h in zip(layer.ravel(), head.ravel())],
            "prefix_matching": self.prefix_matching.ravel(),
        })


@torch.no_grad()
def snapshot_measurements(
    name_or_path: str | os.PathLike,
    sequences: torch.Tensor,
    heads: list[tuple[int, int]],
    period: int = REPEAT_PERIOD,
    n_pos: int = 60,
    decimals: int = 3,
    steps: list[int] | None = None,
) -> SnapshotMeasurements:
    """Load each snapshot (all of them unless ``steps`` is given) and measure it on ``sequences``.

    ``sequences`` are repeated random tokens with period ``period`` (``probe_sequences``), so the
    scores at a snapshot step match the log's probe record at that step up to the float16
    rounding of shipped snapshots. Raises ValueError when the folder has no snapshots or ``n_pos``
    exceeds the sequence length.
    """
    steps = list_snapshots(name_or_path) if steps is None else list(steps)
    if not steps:
        raise ValueError(f"{name_or_path}: no snapshots to measure (snapshots/ is empty or absent)")
    if not 1 <= n_pos <= sequences.shape[1]:
        raise ValueError(f"n_pos must be in [1, {sequences.shape[1]}], got {n_pos}")

    patterns, prefix, losses = [], [], []
    for step in steps:
        model = load_snapshot(name_or_path, step)
        _, cache = model.run_with_cache(sequences[:1, :n_pos])
        chosen = [cache.patterns[layer][0, head] for layer, head in heads]
        patterns.append(torch.stack(chosen) if chosen else torch.zeros(0, n_pos, n_pos))
        prefix.append(prefix_matching_scores(model, sequences, period))
        losses.append(repeated_token_loss(model, sequences, period).per_copy)

    return SnapshotMeasurements(
        steps=np.array(steps, dtype=np.int64),
        heads=list(heads),
        tokens=sequences[0, :n_pos].numpy(),
        patterns=np.round(torch.stack(patterns).double().numpy(), decimals).astype(np.float32),
        prefix_matching=torch.stack(prefix).double().numpy(),
        repeated_loss_per_copy=torch.stack(losses).double().numpy(),
        decimals=decimals,
    )


def phase_change(progress: pd.DataFrame) -> Transition | None:
    """Find the interval in which the best prefix-matching score rose most, once heads formed.

    None until some evaluation meets both criteria of ``induction_progress``, and with a single
    evaluation. Evaluations are ``eval_every`` steps apart, so the interval is only as sharp as
    that spacing.
    """
    if first_step_met(progress, "both_met") is None:
        return None
    return largest_rise(progress)


def _millions(tokens: float) -> str:
    return f"{tokens / 1e6:,.1f}M tokens"


def induction_verdict(progress: pd.DataFrame) -> str:
    """Describe in Markdown whether induction heads have formed, with the numbers behind it.

    ``progress`` is an ``induction_progress`` table. The paragraph gives the last evaluation's
    best head, its prefix-matching score and the copy-2 / copy-1 loss ratio against their
    thresholds. Once both criteria are met, it also gives the interval in which they were first
    met and the interval of fastest growth (``phase_change``).
    """
    last = progress.iloc[-1]
    formed_at = first_step_met(progress, "both_met")
    if formed_at is None:
        peak = progress.loc[progress["best_prefix_matching"].idxmax()]
        text = (
            f"**Induction heads have not formed yet.** At the last evaluation, step "
            f"{int(last['step']):,} ({_millions(last['tokens'])}), the best prefix-matching "
            f"score is {last['best_prefix_matching']:.3f} ({last['best_head']}; criterion > "
            f"{PREFIX_THRESHOLD}), and the highest at any evaluation is "
            f"{peak['best_prefix_matching']:.3f}, at step {int(peak['step']):,}. The second copy "
            f"of the repeated random tokens costs {last['copy_2_loss']:.2f} nats against "
            f"{last['copy_1_loss']:.2f} for the first, {last['loss_ratio']:.1%} of it (criterion "
            f"< {RATIO_THRESHOLD:.0%}). The ICL score is {last['icl_score']:+.3f} nats."
        )
        if len(progress) > 1:
            text += (
                f" Across the {len(progress)} evaluations the best prefix-matching score has "
                f"stayed between {progress['best_prefix_matching'].min():.3f} and "
                f"{progress['best_prefix_matching'].max():.3f}."
            )
        return text

    row = int(np.flatnonzero(progress["step"].to_numpy() == formed_at)[0])
    after = progress.iloc[row]
    if row == 0:
        window = f"at the first evaluation, step {formed_at:,}"
    else:
        before = progress.iloc[row - 1]
        window = (
            f"between the evaluations at steps {int(before['step']):,} and {formed_at:,} "
            f"({_millions(before['tokens'])} to {_millions(after['tokens'])}): the best "
            f"prefix-matching score went from {before['best_prefix_matching']:.3f} to "
            f"{after['best_prefix_matching']:.3f}, the copy-2 / copy-1 loss ratio from "
            f"{before['loss_ratio']:.1%} to {after['loss_ratio']:.1%}, and the ICL score from "
            f"{before['icl_score']:+.3f} to {after['icl_score']:+.3f} nats"
        )
    text = (
        f"**Induction heads have formed.** Both criteria are first met {window}. At the last "
        f"evaluation, step {int(last['step']):,}, {last['best_head']} scores "
        f"{last['best_prefix_matching']:.3f}, the second copy costs {last['loss_ratio']:.1%} "
        f"of the first, and the ICL score is {last['icl_score']:+.3f} nats."
    )
    transition = phase_change(progress)
    if transition is not None:
        total_rise = last["best_prefix_matching"] - progress["best_prefix_matching"].iloc[0]
        share = ""
        if total_rise > 0:
            share = f", {transition.rise / total_rise:.0%} of its rise since the first evaluation"
        text += (
            f" The best prefix-matching score rose most between the evaluations at steps "
            f"{transition.start_step:,} and {transition.end_step:,}, from "
            f"{transition.start_value:.3f} to {transition.end_value:.3f}{share}."
        )
    return text


# Config keys that tell the models of a comparison apart rather than how they were trained.
MODEL_SHAPE_KEYS = ("n_layers", "smear_keys")


def recipe_differences(config: dict, other: dict) -> list[str]:
    """List the settings in which two runs' training recipes differ, as dotted keys.

    ``config`` and ``other`` are the run configs recorded in checkpoints (``config.json``'s
    ``training.config``: the TOML tables ``tokenizer``, ``model``, ``data`` and ``training``).
    The model keys in ``MODEL_SHAPE_KEYS`` are ignored, so a one-layer run trained like a
    two-layer run has no differences. A key present in only one of the two counts as a difference.
    """
    differences = []

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                path = f"{prefix}.{key}" if prefix else key
                if prefix == "model" and key in MODEL_SHAPE_KEYS:
                    continue
                if key not in a or key not in b:
                    differences.append(path)
                else:
                    walk(a[key], b[key], path)
        elif a != b:
            differences.append(prefix)

    walk(config, other, "")
    return differences
