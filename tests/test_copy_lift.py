"""The copy-lift script: its sequences, its decomposition of the logits, and its command line."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from circuits.checkpoints import save_checkpoint
from circuits.tokenizer import Tokenizer
from conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "copy_lift.py"
spec = importlib.util.spec_from_file_location("copy_lift", SCRIPT)
copy_lift = importlib.util.module_from_spec(spec)
# Registered before it runs: its dataclass looks its own module up.
sys.modules["copy_lift"] = copy_lift
spec.loader.exec_module(copy_lift)


def test_sequences_repeat_distinct_tokens():
    tokens = copy_lift.repeated_sequences(n_ranks=300, bos=300)
    assert tokens.shape == (20, 101)
    assert (tokens[:, 0] == 300).all()
    first, second = tokens[:, 1:51], tokens[:, 51:]
    assert torch.equal(first, second)
    assert all(len(set(row.tolist())) == 50 for row in first)
    assert first.min() >= 100
    assert first.max() < 300
    assert torch.equal(tokens, copy_lift.repeated_sequences(n_ranks=300, bos=300))


def test_ids_below_8000_in_large_vocabulary():
    tokens = copy_lift.repeated_sequences(n_ranks=50257, bos=50257)
    assert tokens[:, 1:].max() < 8000


def test_too_small_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="fewer than 50 ids"):
        copy_lift.repeated_sequences(n_ranks=140, bos=140)


def _parts_at_queries(model, tokens):
    """Logit margin of the correct token split into the last layer, the rest and the bias."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    queries = torch.arange(51, 100)
    targets = tokens[:, queries + 1]
    ln = model.ln_final
    resid = cache.resid_pre[-1][:, queries]
    last = cache.head_outputs[-1][:, queries].sum(2)
    scale = ln.scale(resid)

    def margin(part_logits):
        return part_logits.gather(-1, targets[..., None])[..., 0] - part_logits.mean(-1)

    def through_ln(part):
        return ((part - part.mean(-1, keepdim=True)) / scale * ln.w) @ model.unembed.W_U

    full = margin(logits[:, queries])
    rest = margin(through_ln(resid - last))
    bias = margin((ln.b @ model.unembed.W_U).expand_as(logits[:, queries]))
    return full, margin(through_ln(last)), rest, bias


@pytest.mark.parametrize("n_layers", [1, 2])
def test_lift_splits_logit_margin(n_layers):
    model = tiny_model(n_layers=n_layers, d_vocab=301, n_ctx=110).double()
    tokens = copy_lift.repeated_sequences(n_ranks=300, bos=300)
    full, last, rest, bias = _parts_at_queries(model, tokens)
    # The three parts add up to the real logits' margin, so the split loses nothing.
    torch.testing.assert_close(last + rest + bias, full)
    result = copy_lift.copy_lift(model, tokens)
    assert result.lift == pytest.approx(last.mean().item(), abs=1e-9)


def test_lift_without_layernorm():
    model = tiny_model(n_layers=2, d_vocab=301, n_ctx=110, normalization_type=None).double()
    tokens = copy_lift.repeated_sequences(n_ranks=300, bos=300)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    queries = torch.arange(51, 100)
    # Without a final layernorm the logits are the residual stream times W_U, term by term.
    part_logits = cache.head_outputs[1][:, queries].sum(2) @ model.unembed.W_U
    targets = tokens[:, queries + 1]
    margin = part_logits.gather(-1, targets[..., None])[..., 0] - part_logits.mean(-1)
    result = copy_lift.copy_lift(model, tokens)
    assert result.lift == pytest.approx(margin.mean().item(), abs=1e-9)


def test_silent_last_layer_lifts_nothing():
    model = tiny_model(n_layers=2, d_vocab=301, n_ctx=110).double()
    with torch.no_grad():
        model.blocks[1].attn.W_O.zero_()
    result = copy_lift.copy_lift(model, copy_lift.repeated_sequences(300, 300))
    assert result.lift == 0.0
    assert result.gap >= 0.0


def test_losses_and_attention_match_loops():
    model = tiny_model(n_layers=2, d_vocab=301, n_ctx=110).double()
    tokens = copy_lift.repeated_sequences(n_ranks=300, bos=300)
    result = copy_lift.copy_lift(model, tokens)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    copy1, copy2, attention = [], [], torch.zeros(model.cfg.n_heads, dtype=torch.float64)
    for s in range(tokens.shape[0]):
        for p in range(100):
            loss = -logits[s, p].log_softmax(-1)[tokens[s, p + 1]].item()
            (copy1 if p < 50 else copy2).append(loss)
        for p in range(51, 100):
            attention += cache.patterns[1][s, :, p, p - 49] / (tokens.shape[0] * 49)
    assert result.copy1_loss == pytest.approx(sum(copy1) / len(copy1), rel=1e-9)
    assert result.copy2_loss == pytest.approx(sum(copy2) / len(copy2), rel=1e-9)
    assert result.ratio == pytest.approx(result.copy2_loss / result.copy1_loss)
    assert result.induction_attention == pytest.approx(attention.max().item(), rel=1e-9)
    assert result.induction_head == f"L1H{int(attention.argmax())}"


def test_command_line_json_output(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=301, n_ctx=110), Tokenizer(300), tmp_path / "c")
    assert copy_lift.main([str(folder), "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out).values()
    assert set(only) == {"copy1_loss", "copy2_loss", "ratio", "induction_attention",
                         "induction_head", "lift", "gap"}


def test_command_line_rejects_zero_layers(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(n_layers=0, d_vocab=301, n_ctx=110), Tokenizer(300),
                             tmp_path / "c")
    assert copy_lift.main([str(folder)]) == 2
    assert "no heads" in capsys.readouterr().err


def test_command_line_missing_snapshot(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=301, n_ctx=110), Tokenizer(300), tmp_path / "c")
    assert copy_lift.main([str(folder), "--steps", "500"]) == 2
    assert "no snapshot for step 500" in capsys.readouterr().err


def test_command_line_without_step_count(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=301, n_ctx=110), Tokenizer(300), tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config.pop("training", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert copy_lift.main([str(folder), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["final"]
    assert copy_lift.main([str(folder)]) == 0
    assert "final weights: copy 1" in capsys.readouterr().out


def test_command_line_all_snapshots_needs_some(tmp_path, capsys):
    folder = save_checkpoint(tiny_model(d_vocab=301, n_ctx=110), Tokenizer(300), tmp_path / "c")
    assert copy_lift.main([str(folder), "--all-snapshots"]) == 2
    assert "has no snapshots" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [
    ["--steps", "-1"], ["--steps", "abc"], ["--steps", "5", "--all-snapshots"],
])
def test_command_line_rejects_invalid_options(tmp_path, arguments):
    folder = save_checkpoint(tiny_model(d_vocab=301, n_ctx=110), Tokenizer(300), tmp_path / "c")
    with pytest.raises(SystemExit) as exit_info:
        copy_lift.main([str(folder), *arguments])
    assert exit_info.value.code == 2
