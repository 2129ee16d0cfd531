"""``python -m circuits.report CHECKPOINT [--json]``: a summary of every head of a checkpoint.

For each head: the copying score of its OV circuit, the previous-token score and the preferred
relative offset (keys after BOS) on validation windows, the prefix-matching score on repeated
random tokens, and its strongest composition partner. Also every Q-, K- and V-composition
score between heads in different layers, with the random baseline.

Validation windows come from ``--data`` when given, and otherwise from the validation data recorded
in the checkpoint (``config["training"]["config"]["data"]["validation"]``). Its relative paths
are tried from the current folder first and then from the repository root. When neither is
readable the command exits with an error that suggests ``--data``, or ``--skip-data`` to leave
the data-based columns empty. A model without layers needs no data.

Exit status: 0 on success, 1 when the checkpoint or the data cannot be read (one ``error:`` line
on stderr), 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis.attention import (
    preferred_offsets,
    prefix_matching_scores,
    previous_token_scores,
    repeated_random_tokens,
)
from circuits.analysis.circuits import copying_scores, head_name
from circuits.analysis.composition import (
    COMPOSITION_KINDS,
    CompositionBaseline,
    all_composition_scores,
    model_composition_baseline,
)
from circuits.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from circuits.data import DataError, WindowSampler, load_tokens, resolve_data_spec

DEFAULT_WINDOWS = 64
# Repeated random tokens for the prefix-matching score: at most this period and repeat count.
MAX_PERIOD = 25
MAX_REPEATS = 4
N_REPEATED_SEQUENCES = 16


class ReportError(Exception):
    """An input the report cannot use; the message names it and the fix."""


@dataclass
class ValidationData:
    """The validation windows a report uses and where they came from."""

    windows: torch.Tensor
    source: str


def recorded_validation_spec(checkpoint: Checkpoint) -> str | list[str] | None:
    """Return the validation data recorded by training, or None when the config has none."""
    try:
        spec = checkpoint.config["training"]["config"]["data"]["validation"]
    except (KeyError, TypeError):
        return None
    if isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(s, str) for s in spec)):
        return spec
    return None


def load_validation_windows(
    checkpoint: Checkpoint, data: str | None, n_windows: int
) -> ValidationData:
    """Load validation windows from ``data`` or the recorded data; ReportError if unreadable."""
    spec = data if data is not None else recorded_validation_spec(checkpoint)
    if spec is None:
        raise ReportError(
            f"{checkpoint.path}: the checkpoint records no validation data; pass --data PATH "
            "(JSON lines or text files) or --skip-data"
        )
    items = [spec] if isinstance(spec, str) else list(spec)
    resolved = resolve_data_spec(items)
    try:
        tokens = load_tokens(resolved, checkpoint.tokenizer, progress=False)
        windows = WindowSampler(
            tokens, checkpoint.model.cfg.n_ctx, checkpoint.tokenizer.bos_token_id
        ).sequential_windows(n_windows)
    except DataError as error:
        if data is not None:
            advice = "check the --data path, or pass --skip-data"
            origin = "--data"
        else:
            advice = "pass --data PATH or --skip-data"
            origin = "the checkpoint's validation data"
        raise ReportError(f"{origin} is not readable: {error}; {advice}") from error
    return ValidationData(windows=windows, source=", ".join(resolved))


def repeated_sequences(checkpoint: Checkpoint, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Repeated random tokens that fit the context: (sequences, period)."""
    n_ctx = checkpoint.model.cfg.n_ctx
    period = min(MAX_PERIOD, (n_ctx - 1) // 2)
    if period < 1:
        raise ReportError(f"n_ctx={n_ctx} is too short for two repeats of one token after BOS")
    n_repeats = min(MAX_REPEATS, (n_ctx - 1) // period)
    sequences = repeated_random_tokens(
        checkpoint.tokenizer, n_tokens=period, n_repeats=n_repeats,
        n_sequences=N_REPEATED_SEQUENCES, seed=seed,
    )
    return sequences, period


def _number(value) -> float | None:
    """Convert to a float for JSON, with NaN and infinities as None (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _strongest_partners(
    composition: list[dict], baseline: CompositionBaseline
) -> dict[tuple[int, int], dict]:
    """For each head, the pair and kind with the largest score minus that kind's baseline."""
    best: dict[tuple[int, int], dict] = {}
    for record in composition:
        source, target = tuple(record["source"]), tuple(record["target"])
        for kind in COMPOSITION_KINDS:
            score = record[kind]
            if score is None:
                continue
            excess = score - getattr(baseline, kind)
            for head, partner in ((source, target), (target, source)):
                if head not in best or excess > best[head]["excess"]:
                    best[head] = {"partner": head_name(*partner), "composition": kind,
                                  "score": score, "excess": excess}
    return best


@torch.no_grad()
def build_report(
    checkpoint: Checkpoint,
    validation: ValidationData | None,
    baseline_samples: int = 200,
    seed: int = 0,
) -> dict:
    """Compute every head's scores and every composition score of a checkpoint as a JSON-ready dict.

    Keys: ``checkpoint``, ``validation_data`` (source and window count, or None), ``heads`` (one
    record per head), ``composition`` (one record per pair of heads in different layers, source
    layer first, raw scores), ``composition_baseline`` (random expectation of q, k, v; None
    below two layers).
    """
    model = checkpoint.model
    cfg = model.cfg
    report = {
        "checkpoint": str(checkpoint.path),
        "validation_data": None,
        "heads": [],
        "composition": [],
        "composition_baseline": None,
    }
    if cfg.n_layers == 0:
        return report

    copying = copying_scores(model).set_index(["layer", "head"])["copying_score"]
    sequences, period = repeated_sequences(checkpoint, seed=seed)
    prefix = prefix_matching_scores(model, sequences, period)
    previous = offsets = None
    if validation is not None:
        report["validation_data"] = {"source": validation.source,
                                     "n_windows": int(validation.windows.shape[0])}
        previous = previous_token_scores(model, validation.windows)
        # The BOS key is left out: a head that parks on BOS would otherwise seem to prefer the
        # offset of the last query, whose only key at that offset is BOS.
        offsets = preferred_offsets(model, validation.windows, skip_bos=True).argmax(-1)

    # Composition needs heads in two layers, so a one-layer model has no scores and no baseline.
    baseline = None
    if cfg.n_layers > 1:
        baseline = model_composition_baseline(model, n_samples=baseline_samples, seed=seed)
        report["composition_baseline"] = {**baseline.as_dict(), "n_samples": baseline.n_samples,
                                          "seed": baseline.seed}
    for (source_layer, target_layer), scores in all_composition_scores(model).items():
        for source_head in range(cfg.n_heads):
            for target_head in range(cfg.n_heads):
                report["composition"].append({
                    "source": [source_layer, source_head],
                    "target": [target_layer, target_head],
                    **{kind: _number(getattr(scores, kind)[source_head, target_head])
                       for kind in COMPOSITION_KINDS},
                })
    partners = {} if baseline is None else _strongest_partners(report["composition"], baseline)

    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            report["heads"].append({
                "layer": layer,
                "head": head,
                "name": head_name(layer, head),
                "copying_score": _number(copying[(layer, head)]),
                "previous_token_score": None if previous is None
                else _number(previous[layer, head]),
                "prefix_matching_score": _number(prefix[layer, head]),
                "preferred_offset": None if offsets is None else int(offsets[layer, head]),
                "strongest_partner": partners.get((layer, head)),
            })
    return report


def format_table(report: dict) -> str:
    """Format the report as plain text: one row per head, then any composition baseline."""
    lines = [f"checkpoint: {report['checkpoint']}"]
    data = report["validation_data"]
    if data is not None:
        lines.append(f"validation data: {data['source']} ({data['n_windows']} windows)")
    if not report["heads"]:
        lines.append("the model has no attention heads")
        return "\n".join(lines)

    def show(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = []
    for record in report["heads"]:
        partner = record["strongest_partner"]
        rows.append({
            "head": record["name"],
            "copying": show(record["copying_score"]),
            "prev_token": show(record["previous_token_score"]),
            "prefix_match": show(record["prefix_matching_score"]),
            "offset": "-" if record["preferred_offset"] is None else record["preferred_offset"],
            "partner": "-" if partner is None else
            f"{partner['partner']} {partner['composition'].upper()} {partner['score']:.3f}",
        })
    lines.append(pd.DataFrame(rows).to_string(index=False))
    lines.append("offset: the relative offset i - j with the most mean attention, keys after BOS")
    baseline = report["composition_baseline"]
    if baseline is not None:
        lines.append(
            f"composition baseline (random factors, {baseline['n_samples']} draws): "
            f"Q {baseline['q']:.3f}  K {baseline['k']:.3f}  V {baseline['v']:.3f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m circuits.report",
        description="Summarise every attention head of a checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or shipped checkpoint name")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of a table")
    parser.add_argument("--data", help="validation data (file, folder or glob pattern); "
                        "default: the data recorded in the checkpoint")
    parser.add_argument("--skip-data", action="store_true",
                        help="leave out the previous-token score and preferred offset")
    parser.add_argument("--n-windows", type=int, default=DEFAULT_WINDOWS,
                        help=f"validation windows for the attention scores (default "
                        f"{DEFAULT_WINDOWS})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the repeated random tokens and the composition baseline")
    args = parser.parse_args(argv)
    if args.n_windows < 1:
        parser.error(f"--n-windows must be at least 1, got {args.n_windows}")
    if args.skip_data and args.data is not None:
        parser.error("--data and --skip-data exclude each other")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # datasets draws progress bars on stderr while it reads the data files; a report has no use
    # for them.
    import datasets

    datasets.disable_progress_bars()
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        validation = None
        if checkpoint.model.cfg.n_layers > 0 and not args.skip_data:
            validation = load_validation_windows(checkpoint, args.data, args.n_windows)
        report = build_report(checkpoint, validation, seed=args.seed)
    except (CheckpointError, ReportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(report) if args.json else format_table(report), flush=True)
    except BrokenPipeError:
        # The reader closed the pipe early (as ``| head`` does): not an error of the report.
        # Point stdout at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
