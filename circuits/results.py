"""The book's table of results: each result of Elhage et al. (2021), where the book shows it,
the paper's claim and the number measured on the shipped checkpoints.

Every number is computed when the functions run, with the same data and settings as the chapter
that shows it, so the introduction's table and the chapters agree. The settings are repeated here
as constants named after the chapters' variables. ``all_results`` takes about as
long as executing the chapters' analyses once, well under a minute on two cores.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import pandas as pd
import torch

from circuits.analysis import attention, composition, paths
from circuits.analysis.bigram_tables import direct_path_log_probs, frequent_tokens, bigram_fit
from circuits.analysis.bigrams import load_bigram_counts
from circuits.analysis.circuits import head_name
from circuits.analysis.copying import copying_summary
from circuits.analysis.icl_spread import icl_score_spread
from circuits.analysis.induction_heads import head_scores, identify_heads, induction_plane
from circuits.analysis.positional import offset_profile, validation_windows
from circuits.analysis.skip_trigram_bugs import (
    crossed_to_paired_ratio,
    find_skip_trigram_bugs,
    skip_trigram_bug_effects,
    word_tokens,
)
from circuits.analysis.token_circuits import circuit_blocks
from circuits.analysis.training_log import (
    ProbeHistory,
    first_step_met,
    induction_progress,
    is_probe_record,
    load_training_log,
    phase_change,
)
from circuits.analysis.trigram_tables import skip_trigram_tables
from circuits.analysis.validation_data import validation_windows_for
from circuits.analysis.value_weighted import value_weighted_attention
from circuits.checkpoints import SHIPPED_DIR, CheckpointError, load_checkpoint

# Settings shared with the chapters (book/*.ipynb), under the chapters' own names.
ONE_LAYER_PASSAGE = (
    "Mara kept the lantern in her hand and kept the promise in mind. When "
    "the storm came, she kept the dogs at bay and the children in the "
    "house, and in the morning she kept her word."
)
TWO_LAYER_PASSAGE = (
    "Nell Brannock ran the ferry across the Wyre. Every morning Tobias Quince waited on the "
    "bank with eggs, and Nell Brannock charged him a copper. One foggy day Tobias Quince had "
    "no copper, so Nell Brannock took two eggs instead. By winter the village knew that "
    "Tobias Quince paid in eggs."
)
PERIOD, N_REPEATS, N_SEQUENCES = 25, 4, 32

COLUMNS = ["part", "result", "where", "claim", "measured"]


@dataclass(frozen=True)
class Result:
    """One row of the table: ``chapter`` is a notebook name without suffix, ``section`` the
    heading in it that shows the result, ``claim`` the paper's claim in this project's words
    and ``measured`` what the shipped checkpoints give."""

    part: str
    result: str
    chapter: str
    section: str
    claim: str
    measured: str

    @property
    def anchor(self) -> str:
        return section_anchor(self.section)


def section_anchor(heading: str) -> str:
    """Return the HTML id that the book gives a heading: lower case, other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def _fit_text(fit) -> str:
    return f"KL {fit.mean_kl:.3f} nats, top-1 agreement {fit.top1_agreement:.1%}"


def zero_layer_results(
    zero_layer="attn-only-0l", one_layer="attn-only-1l", two_layer="attn-only-2l"
) -> list[Result]:
    """Measure the zero-layer bigram table and the direct paths of the deeper models.

    KL is the count-weighted mean over source tokens of KL(corpus bigrams ‖ table row), and top-1
    agreement the count-weighted share of pairs whose most likely next token is the corpus's, both
    against the bigram counts shipped with ``zero_layer`` (``circuits.analysis.bigram_tables``).
    """
    checkpoint = load_checkpoint(zero_layer)
    counts = load_bigram_counts(checkpoint.path / "bigram_counts.npz")
    zero_fit = bigram_fit(direct_path_log_probs(checkpoint.model), counts)
    direct = [
        f"{name} {_fit_text(bigram_fit(direct_path_log_probs(load_checkpoint(name).model), counts))}"
        for name in (one_layer, two_layer)
    ]
    return [
        Result(
            "Zero layers", "Bigram table", "zero_layer", "How close is the table to the corpus's bigrams?",
            "A zero-layer model's logits depend on the current token only (W_E W_U), so the best "
            "it can learn is the corpus's bigram statistics.",
            f"{zero_layer}: {_fit_text(zero_fit)}; the best possible bigram table scores KL 0 "
            f"({zero_fit.corpus_entropy:.3f} nats of corpus bigram entropy).",
        ),
        Result(
            "Zero layers", "Direct path as a residual bigram table", "zero_layer",
            "The direct path of the one-layer model",
            "In deeper models the direct path still approximates bigram statistics, while heads "
            "take over what depends on earlier tokens.",
            f"Direct path alone: {'; '.join(direct)} (zero-layer model: KL "
            f"{zero_fit.mean_kl:.3f} nats).",
        ),
    ]


def one_layer_results(name="attn-only-1l") -> list[Result]:
    """Measure path expansion, QK/OV circuits, skip-trigrams, copying, positional heads and bugs."""
    checkpoint = load_checkpoint(name)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    bos = tokenizer.bos_token_id
    counts = load_bigram_counts(SHIPPED_DIR / "attn-only-0l" / "bigram_counts.npz")
    windows = validation_windows(checkpoint, n_windows=32, n_pos=128)
    n_heads = model.cfg.n_heads

    tokens = torch.tensor([tokenizer.encode_for_model(ONE_LAYER_PASSAGE, model.cfg.n_ctx)])
    expansion = paths.path_expansion(model, tokens)
    with torch.no_grad():
        logits = model(tokens).double()
    largest = float((expansion.total() - logits).abs().max())
    importance = paths.term_importance(model, windows.tokens)

    top_tokens = frequent_tokens(counts, 200, exclude=[bos])
    copy_rate = circuit_blocks(model, 0, top_tokens).copy_rate().numpy()
    best_copier = int(copy_rate.argmax())

    tables = skip_trigram_tables(
        model, tokenizer, layer=0, k=12, source_tokens=frequent_tokens(counts, 1000, exclude=[bos])
    )
    top = pd.concat([table.head(1) for table in tables.values()]).nlargest(1, "ov_score").iloc[0]

    copying = copying_summary(model)
    control = copying.scores["random init"]

    heads = offset_profile(model, windows.tokens, max_offset=16).head_table(min_lift=4.0)
    positional = heads[heads["positional"]]
    positional_text = (
        "; ".join(f"{row.name} attends {row.peak_offset} back ({row.lift:.1f}x the even spread)"
                  for row in positional.itertuples())
        or "none at 4x the even spread"
    )

    frequent = frequent_tokens(counts, model.cfg.d_vocab, exclude=[bos])
    words = word_tokens(tokenizer, frequent)
    bugs = find_skip_trigram_bugs(model, counts, tokenizer, sources=words[:300],
                                  candidates=words, per_head=1)
    if bugs.empty:
        bug_text = "The search found no admissible example."
    else:
        ratios = crossed_to_paired_ratio(skip_trigram_bug_effects(model, bugs, counts, tokenizer))
        first = bugs.iloc[0]
        bug_text = (
            f"{len(bugs)} examples, one per head that has one; the crossed continuations get "
            f"{ratios.min():.2f} to {ratios.max():.2f} times the paired ones' logit change. "
            f"Strongest, {first['name']}: {first['source_str']!r} … {first['destination_1_str']!r}"
            f" → {first['output_1_str']!r} and {first['destination_2_str']!r} → "
            f"{first['output_2_str']!r}."
        )
    return [
        Result(
            "One layer", "Path expansion", "one_layer", "Path expansion",
            "With attention patterns frozen, the logits are exactly the direct path plus one "
            "term per head.",
            f"Identity holds on {tokens.shape[1]} positions to {largest:.1e}; the head terms lower "
            f"the loss from {importance.loss_order0:.3f} (direct path) to "
            f"{importance.loss_upto_order1:.3f} nats.",
        ),
        Result(
            "One layer", "QK and OV circuits per head", "one_layer", "QK and OV circuits per head",
            "Each head is a QK circuit (where to attend) and an OV circuit (what attending to a "
            "token does to the logits), both vocabulary-by-vocabulary matrices.",
            f"Share of the 200 most frequent tokens whose largest OV entry is the token itself: "
            f"{copy_rate.min():.2f} to {copy_rate.max():.2f} over the {n_heads} heads "
            f"(highest {head_name(0, best_copier)}; chance {1 / len(top_tokens):.3f}).",
        ),
        Result(
            "One layer", "Skip-trigrams", "one_layer", "Skip-trigrams",
            "A one-layer model is a sum of skip-trigrams: source … destination → output.",
            f"Strongest entry of the whole-vocabulary sweep (sources among the 1,000 most frequent "
            f"tokens): {top['name']} {top['source_str']!r} … {top['destination_str']!r} → "
            f"{top['output_str']!r} (OV {top['ov_score']:.2f} logits).",
        ),
        Result(
            "One layer", "Copying heads", "one_layer", "Copying heads: OV eigenvalues",
            "Most heads copy: their OV circuits have mostly positive eigenvalues (10 of 12 heads "
            "in the paper's model).",
            f"{copying.n_copying} of {n_heads} heads have a positive copying score "
            f"(random initialisation: {control.min():.3f} to {control.max():.3f}).",
        ),
        Result(
            "One layer", "Positional heads", "one_layer", "Positional heads",
            "Some heads attend by relative position, most often to the previous token.",
            positional_text + ".",
        ),
        Result(
            "One layer", "Skip-trigram bugs", "one_layer", 'Skip-trigram "bugs"',
            "Because QK and OV are factored, a head that raises two continuations of one source "
            "also raises their cross terms (\"keep … in mind\", \"keep … at bay\" also give "
            "\"keep … in bay\").",
            bug_text,
        ),
    ]


def two_layer_results(name="attn-only-2l") -> list[Result]:
    """Measure composition, induction heads, the QK/OV plane, value-weighted attention, term
    importance, the ICL score and head ablation, with the two-layer chapter's settings."""
    checkpoint = load_checkpoint(name)
    model, tokenizer, cfg = checkpoint.model, checkpoint.tokenizer, checkpoint.model.cfg
    validation = validation_windows_for(checkpoint, n_windows=512, fallback_text=TWO_LAYER_PASSAGE)
    sequences = attention.repeated_random_tokens(
        tokenizer, n_tokens=PERIOD, n_repeats=N_REPEATS, n_sequences=N_SEQUENCES, seed=0
    )
    passage_tokens = torch.tensor([tokenizer.encode_for_model(TWO_LAYER_PASSAGE, cfg.n_ctx)])

    baseline = composition.model_composition_baseline(model)
    pairs = composition.composition_table(model, baseline)
    pairs = pairs.assign(excess=pairs.score - pairs.baseline)
    strongest = []
    for kind in ("q", "k", "v"):
        row = pairs[pairs.composition == kind].nlargest(1, "excess").iloc[0]
        strongest.append(f"{kind.upper()} {row.source}→{row.target} {row.excess:+.3f}")

    scores = head_scores(model, validation.windows[:32], sequences, PERIOD)
    roles = identify_heads(scores)
    repeated = attention.repeated_token_loss(model, sequences, PERIOD)
    induction_text = (
        f"Previous-token head {roles.previous_token_name} (score "
        f"{roles.previous_token_score:.3f}); top prefix-matching head {roles.top_induction_name} "
        f"({roles.top_prefix_matching_score:.3f}); heads at or above {roles.threshold}: "
        f"{', '.join(roles.induction_names) or 'none'}. Repeated random tokens: "
        f"{repeated.per_copy[0]:.2f} nats on copy 1, {repeated.per_copy[1]:.2f} on copy 2."
    )

    plane = induction_plane(model, scores).set_index("name")
    point = plane.loc[roles.top_induction_name] if roles.top_induction_head[0] == 1 else None
    plane_text = (
        f"{roles.top_induction_name}: K-composition positivity "
        f"{point.k_composition_positivity:.3f}, OV copying score {point.copying_score:.3f}."
        if point is not None else
        f"The top prefix-matching head, {roles.top_induction_name}, is in layer 0."
    )

    shares = value_weighted_attention(model, passage_tokens).first_key_share().set_index("name")
    share = shares.loc[roles.top_induction_name]
    weighted_text = (
        f"On the passage, {roles.top_induction_name} puts {share.attention_share:.1%} of its "
        f"attention on BOS but {share.weighted_share:.1%} of its value-weighted attention."
    )

    importance = paths.term_importance(model, validation.windows[:16])
    terms_text = (
        f"Loss {importance.loss_order0:.3f} nats from the direct path, "
        + ", ".join(f"{loss:.3f} with layer {layer}'s heads"
                    for layer, loss in enumerate(importance.loss_order0_plus_layer))
        + f", {importance.loss_upto_order1:.3f} with all heads, "
        f"{importance.loss_upto_order2:.3f} with the virtual heads too (the model: "
        f"{importance.loss_full:.3f})."
    )

    icl = icl_score_spread(model, validation.windows)
    # The chapter ablates on the first 32 windows only, whose own score is noisier.
    ablation = paths.head_ablation_icl(model, validation.windows[:32])
    subset = icl_score_spread(model, validation.windows[:32])
    weakest = ablation.nlargest(1, "change").iloc[0]
    within = "within" if abs(weakest["change"]) < subset.standard_error else "beyond"
    icl_text = (
        f"ICL score (loss at token {icl.late_index} minus token {icl.early_index}) "
        f"{icl.score:.3f} ± {icl.standard_error:.3f} nats (mean ± standard error over "
        f"{icl.n_windows} windows). On the "
        f"{subset.n_windows} windows of the ablation ({subset.score:.3f} ± "
        f"{subset.standard_error:.3f}), ablating {weakest['name']} raises the score most, by "
        f"{weakest['change']:.3f} nats, {within} one standard error."
    )
    where = "two_layer"
    return [
        Result(
            "Two layers", "Q-, K- and V-composition", where,
            "Composition: which layer-0 heads each layer-1 head reads",
            "Layer-1 heads read layer-0 outputs through their queries, keys or values; "
            "composition scores above a random baseline show which.",
            "Largest excess over the random baseline: " + "; ".join(strongest) + ".",
        ),
        Result(
            "Two layers", "Previous-token and induction heads", where,
            "Previous-token heads and induction heads, by their scores",
            "A previous-token head in layer 0 and induction heads in layer 1 that attend to the "
            "token after an earlier copy of the current one and predict it.",
            induction_text,
        ),
        Result(
            "Two layers", "The QK/OV plane of induction", where,
            "Both halves of an induction head: QK and OV",
            "An induction head's QK circuit K-composes positively with the previous-token head "
            "and its OV circuit copies: both scores near 1.",
            plane_text,
        ),
        Result(
            "Two layers", "Value-weighted attention", where, "Value-weighted attention",
            "Weighting attention by the norm of what each position writes separates real reads "
            "from attention parked on the first token.",
            weighted_text,
        ),
        Result(
            "Two layers", "Term importance", where, "Which paths carry the loss",
            "Most of the loss reduction comes from the direct path and individual heads; "
            "virtual heads (order 2) matter less, except for induction.",
            terms_text,
        ),
        Result(
            "Two layers", "In-context learning and head ablation", where,
            "In-context learning and which heads it needs",
            "Loss falls with position in the context; in models with induction heads, ablating "
            "them removes most of that gain.",
            icl_text,
        ),
    ]


def dynamics_results(name="attn-only-2l",
                     one_layer_runs=("attn-only-1l", "attn-only-1l-smeared")) -> list[Result]:
    """Read the phase change from the two-layer run's probe log and the one-layer runs' logs."""
    progress = induction_progress(ProbeHistory.from_records(load_training_log(name)))
    last = progress.iloc[-1]
    formed_at = first_step_met(progress, "both_met")
    transition = phase_change(progress)
    if formed_at is None:
        phase_text = (
            f"Not formed by step {int(last['step']):,}: best prefix-matching "
            f"{last['best_prefix_matching']:.3f} ({last['best_head']}), copy 2 at "
            f"{last['loss_ratio']:.1%} of copy 1."
        )
    else:
        phase_text = (
            f"Both criteria first met at step {formed_at:,}; fastest rise of the best "
            f"prefix-matching score between steps {transition.start_step:,} and "
            f"{transition.end_step:,} ({transition.start_value:.3f} to "
            f"{transition.end_value:.3f}); at step {int(last['step']):,}: "
            f"{last['best_prefix_matching']:.3f} ({last['best_head']}), copy 2 at "
            f"{last['loss_ratio']:.1%} of copy 1."
        )
    runs = []
    for run in one_layer_runs:
        try:
            records = load_training_log(run)
        except CheckpointError:
            records = []
        if not any(is_probe_record(record) for record in records):
            runs.append(f"{run}: no probe log shipped")
            continue
        row = induction_progress(ProbeHistory.from_records(records)).iloc[-1]
        runs.append(
            f"{run} at step {int(row['step']):,}: best prefix-matching "
            f"{row['best_prefix_matching']:.3f}, copy 2 at {row['loss_ratio']:.1%} of copy 1"
        )
    where = "training_dynamics"
    return [
        Result(
            "Training dynamics", "The induction-head phase change", where, "Where the run stands",
            "Induction heads form abruptly, in a phase change visible as a bump in the loss.",
            phase_text,
        ),
        Result(
            "Training dynamics", "One layer and smeared keys", where,
            "One layer, and one layer with smeared keys",
            "A one-layer model cannot form induction heads; with smeared keys (each key mixed "
            "with the previous position's) one layer can.",
            "; ".join(runs) + "." if runs else "No one-layer run given.",
        ),
    ]


def all_results() -> list[Result]:
    """Compute every row of the introduction's table, chapter by chapter."""
    return zero_layer_results() + one_layer_results() + two_layer_results() + dynamics_results()


def results_frame(results: list[Result]) -> pd.DataFrame:
    """Tabulate results as a DataFrame with ``COLUMNS``, where ``where`` is "chapter § section"."""
    return pd.DataFrame(
        [[r.part, r.result, f"{r.chapter} § {r.section}", r.claim, r.measured] for r in results],
        columns=COLUMNS,
    )


def results_html(results: list[Result]) -> str:
    """Render results as an HTML table whose "where" cells link to the chapter sections."""
    rows = []
    for r in results:
        link = f'<a href="{r.chapter}.html#{r.anchor}">{html.escape(r.section)}</a>'
        cells = [r.part, r.result]
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
            + f"<td>{link}</td><td>{html.escape(r.claim)}</td>"
            + f"<td>{html.escape(r.measured)}</td></tr>"
        )
    header = "".join(f"<th>{name}</th>" for name in
                     ["Part", "Result", "Where", "Elhage et al. (2021)", "Measured here"])
    return (f'<table class="results-table"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")
