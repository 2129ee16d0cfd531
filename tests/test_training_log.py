"""Training logs and snapshots as tables, checked on hand-built logs with known results."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.analysis import training_log
from circuits.analysis.attention import (
    prefix_matching_scores,
    repeated_random_tokens,
    repeated_token_loss,
)
from circuits.checkpoints import SNAPSHOT_DIR, atomic_save_tensors, save_checkpoint
from circuits.dynamics import TrainingProbe
from circuits.tokenizer import Tokenizer
from conftest import tiny_model


def probe_record(step, prefix, previous, losses, icl, k_composition=None, **extra):
    record = {
        "step": step, "tokens": step * 100, "lr": 1e-3, "train_loss": 5.0 - step / 1000,
        "elapsed_s": step / 10, "val_loss": 6.0 - step / 1000, "icl_score": icl,
        "icl_indices": [500, 50], "prefix_matching": prefix, "previous_token": previous,
        "repeated_loss_per_copy": losses,
    }
    if k_composition is not None:
        record["k_composition"] = k_composition
    record.update(extra)
    return record


def plain_record(step):
    return {"step": step, "tokens": step * 100, "lr": 1e-3, "train_loss": 5.0 - step / 1000,
            "elapsed_s": step / 10}


# Two layers of two heads, evaluated at steps 100 and 200 (logged every 50 steps).
LOG = [
    plain_record(50),
    probe_record(100, prefix=[[0.1, 0.05], [0.2, 0.15]], previous=[[0.6, 0.1], [0.0, 0.05]],
                 losses=[10.0, 9.0, 8.5, 8.0], icl=-0.1,
                 k_composition=[[0.10, 0.20], [0.30, 0.40]]),
    plain_record(150),
    probe_record(200, prefix=[[0.1, 0.05], [0.7, 0.15]], previous=[[0.9, 0.1], [0.0, 0.3]],
                 losses=[10.0, 3.0, 2.0, 1.5], icl=-0.8,
                 k_composition=[[0.10, 0.60], [0.30, 0.40]]),
]


def test_tidy_records_sorts_and_keeps_last():
    first = plain_record(100)
    repeated = dict(plain_record(100), train_loss=1.25)
    records = training_log.tidy_records([first, plain_record(50), repeated])

    assert [record["step"] for record in records] == [50, 100]
    assert records[1]["train_loss"] == 1.25


def test_tidy_records_rejects_missing_step():
    with pytest.raises(ValueError, match="record 1 has no 'step'"):
        training_log.tidy_records([plain_record(50), {"train_loss": 3.0}])


def test_load_training_log_from_folder(tmp_path):
    (tmp_path / "log.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in [plain_record(100), plain_record(50)])
    )
    assert [record["step"] for record in training_log.load_training_log(tmp_path)] == [50, 100]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert training_log.load_training_log(empty) == []


def test_loss_table_marks_missing_fields():
    table = training_log.loss_table(LOG)

    assert list(table.columns) == list(training_log.LOSS_COLUMNS)
    assert table["step"].tolist() == [50, 100, 150, 200]
    assert table["step"].dtype.kind == "i"
    assert table["tokens"].tolist() == [5000, 10000, 15000, 20000]
    assert math.isnan(table["val_loss"].iloc[0])
    assert table["val_loss"].iloc[1] == pytest.approx(5.9)
    assert table["icl_score"].iloc[3] == pytest.approx(-0.8)
    assert math.isnan(table["icl_score"].iloc[2])


def test_probe_history_stacks_evaluations():
    history = training_log.ProbeHistory.from_records(LOG)

    assert history.steps.tolist() == [100, 200]
    assert history.tokens.tolist() == [10000, 20000]
    assert history.icl_score.tolist() == [-0.1, -0.8]
    assert history.prefix_matching.shape == (2, 2, 2)
    assert history.prefix_matching[1, 1, 0] == 0.7
    assert history.previous_token[0, 0, 0] == 0.6
    assert history.repeated_loss_per_copy.tolist()[1] == [10.0, 3.0, 2.0, 1.5]
    assert history.k_composition[1, 0, 1] == 0.6
    assert history.n_evaluations == 2


def test_probe_history_optional_fields_absent():
    # A one-layer run with smeared keys logs no K-composition.
    records = [probe_record(100, [[0.1]], [[0.2]], [9.0, 8.0], icl=-0.1)]
    history = training_log.ProbeHistory.from_records(records)

    assert history.k_composition is None
    assert history.prefix_matching.shape == (1, 1, 1)


def test_probe_history_without_probe_records():
    with pytest.raises(ValueError, match="no probe records"):
        training_log.ProbeHistory.from_records([plain_record(50), plain_record(100)])


def test_probe_history_rejects_mixed_fields():
    records = [
        probe_record(100, [[0.1]], [[0.2]], [9.0, 8.0], icl=-0.1, k_composition=[[0.1]]),
        probe_record(200, [[0.1]], [[0.2]], [9.0, 8.0], icl=-0.1),
    ]
    with pytest.raises(ValueError, match=r"'k_composition' is missing at steps \[200\]"):
        training_log.ProbeHistory.from_records(records)


def test_head_table_long_format():
    table = training_log.ProbeHistory.from_records(LOG).head_table("prefix_matching")

    assert len(table) == 2 * 2 * 2
    row = table[(table["step"] == 200) & (table["name"] == "L1H0")]
    assert len(row) == 1
    assert row["score"].item() == 0.7
    assert row["layer"].item() == 1
    assert row["head"].item() == 0
    assert row["tokens"].item() == 20000


def test_head_table_rejects_unknown_field():
    history = training_log.ProbeHistory.from_records(LOG)
    with pytest.raises(ValueError, match="field must be one of"):
        history.head_table("k_composition")


def test_top_heads_by_final_score():
    history = training_log.ProbeHistory.from_records(LOG)

    # Final prefix-matching: L0H0 0.1, L0H1 0.05, L1H0 0.7, L1H1 0.15.
    assert history.top_heads("prefix_matching", 2) == [(1, 0), (1, 1)]
    # Final previous-token: L0H0 0.9, L1H1 0.3, then L0H1 0.1.
    assert history.top_heads("previous_token", 3) == [(0, 0), (1, 1), (0, 1)]


def test_top_heads_ties_keep_head_order():
    records = [probe_record(100, [[0.2, 0.5, 0.5]], [[0.0, 0.0, 0.0]], [9.0, 8.0], icl=0.0)]
    history = training_log.ProbeHistory.from_records(records)
    assert history.top_heads("prefix_matching", 2) == [(0, 1), (0, 2)]


def test_repeated_loss_table_numbers_copies_from_one():
    table = training_log.ProbeHistory.from_records(LOG).repeated_loss_table()

    assert len(table) == 8
    assert table["copy"].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert table.loc[(table["step"] == 200) & (table["copy"] == 2), "loss"].item() == 3.0


def test_induction_progress_criteria():
    progress = training_log.induction_progress(training_log.ProbeHistory.from_records(LOG))

    assert progress["best_head"].tolist() == ["L1H0", "L1H0"]
    assert progress["best_prefix_matching"].tolist() == [0.2, 0.7]
    assert progress["loss_ratio"].tolist() == pytest.approx([0.9, 0.3])
    assert progress["ratio_met"].tolist() == [False, True]
    assert progress["prefix_met"].tolist() == [False, True]
    assert progress["both_met"].tolist() == [False, True]
    assert progress["icl_score"].tolist() == [-0.1, -0.8]


def test_induction_progress_thresholds_are_strict():
    # Exactly at both thresholds: neither criterion is met.
    records = [probe_record(100, [[0.5]], [[0.0]], [10.0, 3.5], icl=0.0)]
    progress = training_log.induction_progress(training_log.ProbeHistory.from_records(records))

    assert progress["loss_ratio"].item() == pytest.approx(0.35)
    assert not progress["ratio_met"].item()
    assert not progress["prefix_met"].item()


def test_first_step_met():
    progress = training_log.induction_progress(training_log.ProbeHistory.from_records(LOG))

    assert training_log.first_step_met(progress) == 200
    assert training_log.first_step_met(progress.iloc[:1]) is None


def test_largest_rise_between_evaluations():
    records = [
        probe_record(step, [[value]], [[0.0]], [10.0, 9.0], icl=0.0)
        for step, value in [(100, 0.1), (200, 0.15), (300, 0.7), (400, 0.75)]
    ]
    progress = training_log.induction_progress(training_log.ProbeHistory.from_records(records))
    transition = training_log.largest_rise(progress)

    assert (transition.start_step, transition.end_step) == (200, 300)
    assert transition.start_value == 0.15
    assert transition.end_value == 0.7
    assert transition.rise == pytest.approx(0.55)
    assert training_log.largest_rise(progress.iloc[:1]) is None


def test_thresholds_match_check_script():
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_induction.py"
    spec = importlib.util.spec_from_file_location("check_induction", script)
    check_induction = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_induction)

    assert training_log.RATIO_THRESHOLD == check_induction.RATIO_THRESHOLD
    assert training_log.PREFIX_THRESHOLD == check_induction.PREFIX_THRESHOLD


def test_probe_seed_from_training_config():
    assert training_log.probe_seed({"training": {"config": {"training": {"seed": 7}}}}) == 7
    assert training_log.probe_seed({"training": {}}) == 0


def test_probe_sequences_match_training_probe():
    tokenizer = Tokenizer(256)
    validation = np.arange(2000) % 256
    probe = TrainingProbe(validation, tokenizer, n_ctx=64, icl_windows=4, score_windows=2, seed=5)

    sequences = training_log.probe_sequences(tokenizer, seed=5)

    assert sequences.shape == (10, 101)
    assert torch.equal(sequences, probe.repeated)


# Snapshots


def write_run(tmp_path, models: dict[int, torch.nn.Module]):
    """A checkpoint folder with float16 snapshots of ``models`` at their steps."""
    folder = save_checkpoint(models[max(models)], Tokenizer(256), tmp_path / "run")
    (folder / SNAPSHOT_DIR).mkdir()
    for step, model in models.items():
        state = {key: value.half() for key, value in model.state_dict().items()}
        atomic_save_tensors(state, folder / SNAPSHOT_DIR / f"step-{step:06d}.safetensors")
    return folder


def test_snapshot_measurements_match_models(tmp_path):
    models = {0: tiny_model(seed=0, d_vocab=257), 30: tiny_model(seed=1, d_vocab=257)}
    folder = write_run(tmp_path, models)
    sequences = repeated_random_tokens(257, n_tokens=5, n_repeats=4, n_sequences=3, seed=2)
    heads = [(1, 2), (0, 1)]

    measured = training_log.snapshot_measurements(folder, sequences, heads, period=5, n_pos=12)

    assert measured.steps.tolist() == [0, 30]
    assert measured.patterns.shape == (2, 2, 12, 12)
    assert measured.patterns.dtype == np.float32
    assert measured.tokens.tolist() == sequences[0, :12].tolist()
    for index, model in enumerate(models.values()):
        # Snapshots hold float16 weights, so compare with the model after the same rounding.
        rounded = tiny_model(d_vocab=257)
        rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        with torch.no_grad():
            _, cache = rounded.run_with_cache(sequences[:1, :12])
            expected_prefix = prefix_matching_scores(rounded, sequences, 5)
            expected_loss = repeated_token_loss(rounded, sequences, 5).per_copy
        for column, (layer, head) in enumerate(heads):
            np.testing.assert_allclose(measured.patterns[index, column],
                                       cache.patterns[layer][0, head].numpy(), atol=5e-4)
        np.testing.assert_allclose(measured.prefix_matching[index], expected_prefix.numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(measured.repeated_loss_per_copy[index],
                                   expected_loss.numpy(), atol=1e-5)


def test_snapshot_patterns_rounded(tmp_path):
    folder = write_run(tmp_path, {10: tiny_model(d_vocab=257)})
    sequences = repeated_random_tokens(257, n_tokens=5, n_repeats=2, n_sequences=1)

    measured = training_log.snapshot_measurements(folder, sequences, [(0, 0)], period=5,
                                                  n_pos=11, decimals=2)

    values = measured.patterns.astype(np.float64)
    np.testing.assert_allclose(values, np.round(values, 2), atol=1e-6)
    assert measured.decimals == 2


def test_snapshot_measurements_chosen_steps(tmp_path):
    folder = write_run(tmp_path, {0: tiny_model(seed=0, d_vocab=257),
                                  5: tiny_model(seed=1, d_vocab=257),
                                  9: tiny_model(seed=2, d_vocab=257)})
    sequences = repeated_random_tokens(257, n_tokens=5, n_repeats=2, n_sequences=1)

    measured = training_log.snapshot_measurements(folder, sequences, [(0, 0)], period=5,
                                                  n_pos=6, steps=[9, 0])

    assert measured.steps.tolist() == [9, 0]
    table = measured.head_table()
    assert len(table) == 2 * 2 * 4
    value = table[(table["step"] == 9) & (table["name"] == "L1H3")]["prefix_matching"].item()
    assert value == measured.prefix_matching[0, 1, 3]


def test_snapshot_measurements_input_errors(tmp_path):
    folder = save_checkpoint(tiny_model(d_vocab=257), Tokenizer(256), tmp_path / "bare")
    sequences = repeated_random_tokens(257, n_tokens=5, n_repeats=2, n_sequences=1)
    with pytest.raises(ValueError, match="no snapshots"):
        training_log.snapshot_measurements(folder, sequences, [(0, 0)], period=5, n_pos=6)

    folder = write_run(tmp_path, {0: tiny_model(d_vocab=257)})
    with pytest.raises(ValueError, match=r"n_pos must be in \[1, 11\]"):
        training_log.snapshot_measurements(folder, sequences, [(0, 0)], period=5, n_pos=12)


# Verdict


def progress_of(values):
    """Progress of a one-head run: (step, prefix-matching, copy-2 loss) with copy 1 at 10 nats."""
    records = [probe_record(step, [[prefix]], [[0.0]], [10.0, copy_2], icl=-step / 1000)
               for step, prefix, copy_2 in values]
    return training_log.induction_progress(training_log.ProbeHistory.from_records(records))


def test_phase_change_needs_both_criteria():
    # The prefix-matching score jumps, but the copy-2 loss never falls below 35% of copy 1.
    assert training_log.phase_change(progress_of([(100, 0.1, 9.0), (200, 0.8, 5.0)])) is None

    transition = training_log.phase_change(
        progress_of([(100, 0.1, 9.0), (200, 0.2, 8.0), (300, 0.8, 2.0), (400, 0.9, 1.5)]))
    assert (transition.start_step, transition.end_step) == (200, 300)


def test_verdict_before_induction():
    text = training_log.induction_verdict(progress_of([(100, 0.04, 9.5), (200, 0.03, 9.0)]))

    assert text.startswith("**Induction heads have not formed yet.**")
    assert "step 200 (0.0M tokens)" in text
    assert "best prefix-matching score is 0.030 (L0H0; criterion > 0.5)" in text
    assert "highest at any evaluation is 0.040, at step 100" in text
    assert "costs 9.00 nats against 10.00 for the first, 90.0% of it (criterion < 35%)" in text
    assert "ICL score is -0.200 nats" in text
    assert "Across the 2 evaluations the best prefix-matching score has stayed between 0.030 " \
           "and 0.040." in text


def test_verdict_one_evaluation_has_no_range():
    text = training_log.induction_verdict(progress_of([(100, 0.04, 9.5)]))
    assert "Across the" not in text


def test_verdict_after_induction():
    text = training_log.induction_verdict(
        progress_of([(100, 0.1, 9.0), (200, 0.2, 8.0), (300, 0.8, 2.0), (400, 0.9, 1.5)]))

    assert text.startswith("**Induction heads have formed.**")
    assert "first met between the evaluations at steps 200 and 300" in text
    assert "went from 0.200 to 0.800" in text
    assert "loss ratio from 80.0% to 20.0%" in text
    assert "ICL score from -0.200 to -0.300 nats" in text
    assert "step 400, L0H0 scores 0.900, the second copy costs 15.0% of the first" in text
    # Rise 0.6 of a total 0.8 since the first evaluation.
    assert "rose most between the evaluations at steps 200 and 300, from 0.200 to 0.800, 75% " \
           "of its rise since the first evaluation." in text


def test_verdict_met_at_first_evaluation():
    text = training_log.induction_verdict(progress_of([(100, 0.9, 1.0)]))
    assert "first met at the first evaluation, step 100." in text
    assert "rose most" not in text


def test_recipe_differences_ignore_model_shape():
    from circuits.analysis.training_log import recipe_differences

    two = {"model": {"n_layers": 2, "d_model": 8}, "training": {"lr": 1e-3, "steps": 10},
           "data": {"train": [{"source": "a", "weight": 0.5}]}}
    one = {"model": {"n_layers": 1, "d_model": 8, "smear_keys": True},
           "training": {"lr": 1e-3, "steps": 10}, "data": {"train": [{"source": "a", "weight": 0.5}]}}
    assert recipe_differences(two, one) == []
    other = {"model": {"n_layers": 1, "d_model": 16}, "training": {"lr": 3e-3, "steps": 10},
             "data": {"train": [{"source": "b", "weight": 0.5}]}, "tokenizer": {"n_ranks": 8}}
    assert recipe_differences(two, other) == [
        "data.train", "model.d_model", "tokenizer", "training.lr"]
