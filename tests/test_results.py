import json
import re
from pathlib import Path

import nbformat
import pytest

from circuits.analysis.copying import copying_summary
from circuits.checkpoints import load_checkpoint
from circuits.results import (
    COLUMNS,
    Result,
    dynamics_results,
    one_layer_results,
    results_frame,
    results_html,
    section_anchor,
    zero_layer_results,
)
from test_training_log import LOG, plain_record, probe_record

ROOT = Path(__file__).resolve().parent.parent


def chapter_headings(chapter: str) -> set[str]:
    notebook = nbformat.read(ROOT / "book" / f"{chapter}.ipynb", as_version=4)
    headings = set()
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            headings.update(line.lstrip("#").strip() for line in cell.source.splitlines()
                            if line.startswith("#"))
    return headings


def write_log(folder: Path, records: list[dict]) -> Path:
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.parametrize("heading, anchor", [
    ("Path expansion", "path-expansion"),
    ('Skip-trigram "bugs"', "skip-trigram-bugs"),
    ("Copying heads: OV eigenvalues", "copying-heads-ov-eigenvalues"),
    ("How close is the table to the corpus's bigrams?", "how-close-is-the-table-to-the-corpus-s-bigrams"),
    ("One layer, and one layer with smeared keys", "one-layer-and-one-layer-with-smeared-keys"),
])
def test_section_anchor_matches_heading_ids(heading, anchor):
    assert section_anchor(heading) == anchor


def test_results_html_links_sections_and_escapes_text():
    row = Result("One layer", "A <result>", "one_layer", "Path expansion", "x & y", "1 < 2")
    table = results_html([row])
    assert '<a href="one_layer.html#path-expansion">Path expansion</a>' in table
    assert "A &lt;result&gt;" in table
    assert "x &amp; y" in table
    assert "1 &lt; 2" in table
    assert table.count("<tr>") == 2  # header and one row


def test_results_frame_columns():
    row = Result("Zero layers", "r", "zero_layer", "S", "c", "m")
    frame = results_frame([row, row])
    assert list(frame.columns) == COLUMNS
    assert frame.loc[0, "where"] == "zero_layer § S"


def test_shipped_rows_point_at_real_sections():
    rows = zero_layer_results() + one_layer_results()
    assert len(rows) == 8
    for row in rows:
        assert row.section in chapter_headings(row.chapter), (row.chapter, row.section)
        assert row.claim and row.measured


def test_copying_row_counts_positive_scores():
    row = next(r for r in one_layer_results() if r.result == "Copying heads")
    model = load_checkpoint("attn-only-1l").model
    scores = copying_summary(model).scores["trained"]
    expected = int((scores > 0).sum())
    assert row.measured.startswith(f"{expected} of {model.cfg.n_heads} heads")


def test_dynamics_rows_from_logs(tmp_path):
    two = write_log(tmp_path / "two", LOG)
    # One layer of two heads; the probe never finds a head above the thresholds.
    one = write_log(tmp_path / "one", [
        probe_record(100, prefix=[[0.1, 0.2]], previous=[[0.3, 0.1]],
                     losses=[9.0, 8.1, 8.0, 8.0], icl=-0.05),
    ])
    plain = write_log(tmp_path / "plain", [plain_record(50)])
    phase, one_layer = dynamics_results(two, one_layer_runs=(one, plain, tmp_path / "missing"))
    for row in (phase, one_layer):
        assert row.section in chapter_headings(row.chapter)
    # Step 200 meets both criteria (prefix 0.7 > 0.5, copy 2 / copy 1 = 0.3 < 0.35); the best
    # prefix-matching score rose from 0.2 to 0.7 between the two evaluations.
    assert phase.measured.startswith("Both criteria first met at step 200")
    assert "between steps 100 and 200 (0.200 to 0.700)" in phase.measured
    assert "0.700 (L1H0), copy 2 at 30.0% of copy 1" in phase.measured
    assert f"{one} at step 100: best prefix-matching 0.200, copy 2 at 90.0% of copy 1" in (
        one_layer.measured)
    assert f"{plain}: no probe log shipped" in one_layer.measured
    assert f"{tmp_path / 'missing'}: no probe log shipped" in one_layer.measured


def test_dynamics_row_before_any_head_forms(tmp_path):
    early = write_log(tmp_path / "early", LOG[:2])
    phase, _ = dynamics_results(early, one_layer_runs=())
    assert re.match(r"Not formed by step 100: best prefix-matching 0\.200 \(L1H0\), copy 2 at "
                    r"90\.0% of copy 1\.", phase.measured)
