"""The report command on tiny checkpoints written in a temporary folder."""

import json
import subprocess
import sys

import pytest

from circuits.analysis.attention import previous_token_scores, prefix_matching_scores
from circuits.analysis.circuits import copying_scores
from circuits.analysis.composition import composition_scores, model_composition_baseline
from circuits.checkpoints import load_checkpoint, save_checkpoint
from circuits.data import WindowSampler, load_tokens
from circuits.report import main, repeated_sequences
from circuits.tokenizer import Tokenizer
from conftest import SAMPLE_TEXT, tiny_model

N_CTX = 32


def write_text(path, repeats):
    path.write_text(json.dumps({"text": SAMPLE_TEXT * repeats}) + "\n")
    return path


def make_checkpoint(folder, validation="validation.jsonl", n_layers=2):
    model = tiny_model(n_layers=n_layers, d_vocab=257, n_ctx=N_CTX)
    training = {} if validation is None else {"config": {"data": {"validation": validation}}}
    return save_checkpoint(model, Tokenizer(256), folder, training=training)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with validation text and a checkpoint that names it by a relative path."""
    monkeypatch.chdir(tmp_path)
    write_text(tmp_path / "validation.jsonl", 4)
    make_checkpoint(tmp_path / "model")
    return tmp_path


def run_json(capsys, *args):
    assert main([*args, "--json"]) == 0
    output = capsys.readouterr().out
    assert output.count("\n") == 1  # one JSON object on one line
    return json.loads(output)


def naive_preferred_offsets(model, windows):
    """Per head, the offset o with the largest mean A[i, i - o] over queries i > o (no BOS key)."""
    _, cache = model.run_with_cache(windows)
    n_pos = windows.shape[1]
    result = []
    for pattern in cache.patterns:
        layer = []
        for head in range(pattern.shape[1]):
            means = []
            for offset in range(n_pos - 1):
                values = [pattern[w, head, i, i - offset].item()
                          for w in range(windows.shape[0]) for i in range(offset + 1, n_pos)]
                means.append(sum(values) / len(values))
            layer.append(max(range(len(means)), key=means.__getitem__))
        result.append(layer)
    return result


def test_json_report_values(workspace, capsys):
    report = run_json(capsys, "model")
    checkpoint = load_checkpoint("model")
    model = checkpoint.model

    assert report["validation_data"]["source"] == "validation.jsonl"
    tokens = load_tokens("validation.jsonl", checkpoint.tokenizer, progress=False)
    windows = WindowSampler(tokens, N_CTX, 256).sequential_windows(64)
    assert report["validation_data"]["n_windows"] == windows.shape[0]
    previous = previous_token_scores(model, windows)
    sequences, period = repeated_sequences(checkpoint)
    prefix = prefix_matching_scores(model, sequences, period)
    copying = copying_scores(model)
    naive_offsets = naive_preferred_offsets(model, windows)

    assert [(h["layer"], h["head"]) for h in report["heads"]] == [(l, h) for l in range(2)
                                                                  for h in range(4)]
    for record in report["heads"]:
        layer, head = record["layer"], record["head"]
        assert record["name"] == f"L{layer}H{head}"
        assert record["previous_token_score"] == pytest.approx(previous[layer, head].item())
        assert record["prefix_matching_score"] == pytest.approx(prefix[layer, head].item())
        expected_copying = copying[(copying["layer"] == layer) & (copying["head"] == head)]
        assert record["copying_score"] == pytest.approx(expected_copying.copying_score.item())
        assert record["preferred_offset"] == naive_offsets[layer][head]


def test_json_composition_records(workspace, capsys):
    report = run_json(capsys, "model")
    model = load_checkpoint("model").model
    scores = composition_scores(model, 0, 1)
    baseline = model_composition_baseline(model)

    assert len(report["composition"]) == 16
    for record in report["composition"]:
        (source_layer, h1), (target_layer, h2) = record["source"], record["target"]
        assert (source_layer, target_layer) == (0, 1)
        assert record["q"] == pytest.approx(scores.q[h1, h2].item(), abs=1e-12)
        assert record["k"] == pytest.approx(scores.k[h1, h2].item(), abs=1e-12)
        assert record["v"] == pytest.approx(scores.v[h1, h2].item(), abs=1e-12)
    for kind in ("q", "k", "v"):
        assert report["composition_baseline"][kind] == pytest.approx(getattr(baseline, kind))

    # L0H2's strongest partner: the largest score minus its kind's baseline over its pairs.
    excess = {(h2, kind): getattr(scores, kind)[2, h2].item() - getattr(baseline, kind)
              for h2 in range(4) for kind in ("q", "k", "v")}
    (best_head, best_kind) = max(excess, key=excess.get)
    partner = report["heads"][2]["strongest_partner"]
    assert partner["partner"] == f"L1H{best_head}"
    assert partner["composition"] == best_kind


def test_table_output(workspace, capsys):
    assert main(["model"]) == 0
    output = capsys.readouterr().out
    for name in ("L0H0", "L1H3", "copying", "prev_token", "prefix_match", "partner"):
        assert name in output
    assert "composition baseline" in output
    assert "offset: the relative offset" in output


def test_unreadable_data_option_names_the_option(workspace, capsys):
    assert main(["model", "--data", str(workspace / "missing.jsonl")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --data is not readable")
    assert "check the --data path" in error


def test_data_option_overrides_recorded_data(workspace, capsys):
    other = write_text(workspace / "other.jsonl", 2)
    report = run_json(capsys, "model", "--data", str(other), "--n-windows", "3")
    assert report["validation_data"] == {"source": str(other), "n_windows": 3}


def test_skip_data_leaves_data_scores_empty(workspace, capsys):
    report = run_json(capsys, "model", "--skip-data")
    assert report["validation_data"] is None
    assert all(h["previous_token_score"] is None for h in report["heads"])
    assert all(h["preferred_offset"] is None for h in report["heads"])
    assert all(h["prefix_matching_score"] is not None for h in report["heads"])


def test_missing_recorded_data_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "no-data", validation=None)
    make_checkpoint(tmp_path / "gone", validation="deleted.jsonl")

    assert main(["no-data", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error:")
    assert "records no validation data" in captured.err

    assert main(["gone", "--json"]) == 1
    captured = capsys.readouterr()
    assert "deleted.jsonl" in captured.err
    assert "--data" in captured.err


def test_zero_layer_checkpoint_needs_no_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "bigram", validation=None, n_layers=0)
    report = run_json(capsys, "bigram")
    assert report["heads"] == []
    assert report["composition"] == []


def test_one_layer_report_omits_composition(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "one", validation=None, n_layers=1)
    report = run_json(capsys, "one", "--skip-data")
    assert len(report["heads"]) == 4
    assert report["composition"] == []
    assert report["composition_baseline"] is None
    assert all(head["strongest_partner"] is None for head in report["heads"])
    assert main(["one", "--skip-data"]) == 0
    table = capsys.readouterr().out
    assert "L0H3" in table
    assert "composition baseline" not in table


def test_invalid_arguments_exit_2(workspace):
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "--n-windows", "0"])
    assert exit_info.value.code == 2


def test_folder_without_config_is_an_error(tmp_path, capsys):
    (tmp_path / "empty-folder").mkdir()
    assert main([str(tmp_path / "empty-folder"), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error:")
    assert "config.json" in captured.err


def test_closed_pipe_is_not_an_error(workspace):
    # The reader is gone before the report is written, as with `| head -c 0`.
    process = subprocess.Popen(
        [sys.executable, "-m", "circuits.report", "model", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "BrokenPipeError" not in stderr
    assert "Traceback" not in stderr


def test_missing_path_gives_one_line_error_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "circuits.report", str(tmp_path / "missing-folder"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: checkpoint not found")
