"""Benchmark training, inference and analysis speed against TransformerLens's HookedTransformer.

TransformerLens is not a dependency of the package, so this script runs in a virtual environment
of its own, with the repository on ``sys.path``:

    python3 -m venv benchmarks/.venv-tl
    benchmarks/.venv-tl/bin/pip install -r benchmarks/requirements.txt
    benchmarks/.venv-tl/bin/python benchmarks/bench.py             # 1-2 minutes on 2 cores
    benchmarks/.venv-tl/bin/python benchmarks/bench.py --compile   # adds torch.compile
    benchmarks/.venv-tl/bin/python benchmarks/bench.py --book      # adds `make book` (minutes)

The script first checks that both implementations compute the same logits from the same weights.
It then times training steps and forward passes of the two models in alternating rounds on the
same batches, so a period of load from other processes slows both. It prints every figure and
rewrites the measured section of ``benchmarks/RESULTS.md``, between the two marker lines. The
hand-written sections of that file stay as they are. Stop other CPU-heavy work while it runs:
alternation protects the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from circuits.data import DataError  # noqa: E402
from circuits.model import AttnOnlyTransformer, ModelConfig  # noqa: E402
from circuits.train import (  # noqa: E402
    LossModule,
    RunConfig,
    TrainConfig,
    learning_rate,
    make_optimizer,
    make_train_sampler,
    use_autocast,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN_MARKER = "<!-- bench.py: measured section begins -->"
END_MARKER = "<!-- bench.py: measured section ends -->"

# Largest allowed |logit difference| between the two implementations on the same weights.
# float64: both compute the same formula, so only summation order differs.
FLOAT64_TOLERANCE = 1e-9
# float32: the fused attention kernel and a materialised softmax round differently.
FLOAT32_TOLERANCE = 1e-4

# Peak bf16 throughput of one core with AMX: one TDPBF16PS tile instruction performs
# 16 x 16 x 32 = 8192 multiply-adds and, on Sapphire Rapids, issues once per 16 cycles,
# so 512 multiply-adds = 1024 FLOP per cycle (Intel's published AMX figure for BF16).
AMX_BF16_FLOP_PER_CYCLE = 1024


# ---------------------------------------------------------------------------------------------
# Machine


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    clock_ghz: float | None
    amx: bool
    torch: str
    transformer_lens: str
    python: str
    date: str

    @property
    def peak_bf16_flops(self) -> float | None:
        """Estimated peak bf16 FLOP/s of all cores with AMX, or None without AMX or a clock."""
        if not self.amx or self.clock_ghz is None:
            return None
        return self.cores * AMX_BF16_FLOP_PER_CYCLE * self.clock_ghz * 1e9


def describe_machine(clock_ghz: float | None) -> Machine:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if clock_ghz is None and "cpu MHz" in fields:
        clock_ghz = float(fields["cpu MHz"]) / 1000
    return Machine(
        cpu=fields.get("model name", platform.processor() or "unknown"),
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        clock_ghz=clock_ghz,
        amx="amx_bf16" in fields.get("flags", "").split(),
        torch=torch.__version__,
        transformer_lens=importlib.metadata.version("transformer-lens"),
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Estimated FLOPs per token of a forward pass and of a training step (see RESULTS.md).

    Matrix products count 2 FLOPs per multiply-add. Each layer has W_Q and W_K together
    (2 * d_model * 2 * n_heads * d_head) and W_V and W_O (2 * d_model * n_heads * d_head each).
    It also has the scores and the weighted sum of values over the (n_ctx + 1) / 2 keys that a
    causal query attends to on average (2 * 2 * n_heads * d_head * (n_ctx + 1) / 2). Then comes
    the unembedding (2 * d_model * d_vocab). The backward pass costs twice the forward pass, so a
    training step is 3x. Layernorms, softmax, the embedding lookup and the optimiser are left out.
    """
    width = cfg.n_heads * cfg.d_head
    projections = 2 * cfg.d_model * 4 * width
    attention = 4 * width * (cfg.n_ctx + 1) / 2
    unembed = 2 * cfg.d_model * cfg.d_vocab
    forward = cfg.n_layers * (projections + attention) + unembed
    return {"forward": forward, "train": 3 * forward, "projections": projections,
            "attention": attention, "unembed": unembed}


def bf16_matmul_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """Measure square bf16 matrix products; return the best size's median FLOP/s."""
    rates = []
    for size in sizes:
        a = torch.randn(size, size, dtype=torch.bfloat16)
        b = torch.randn(size, size, dtype=torch.bfloat16)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates.append(2 * size**3 / statistics.median(times))
    return max(rates)


# ---------------------------------------------------------------------------------------------
# The two models


def transformer_lens_model(cfg: ModelConfig, dtype: torch.dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, attn_only=True, act_fn=None,
        positional_embedding_type="shortformer", normalization_type=cfg.normalization_type,
        eps=cfg.eps, device="cpu", dtype=dtype,
    )
    with warnings.catch_warnings():
        # TransformerLens 3.x announces HookedTransformer's replacement; it is still supported.
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(tl_cfg)


def copy_weights_to_transformer_lens(ours: AttnOnlyTransformer, tl_model) -> None:
    """Load our state dict into a HookedTransformer whose extra biases are set to zero.

    Both use TransformerLens's parameter names and shapes. HookedTransformer also has the biases
    b_Q, b_K, b_V, b_O and b_U, which our model does not have (they are zero here), and buffers
    (the causal mask and its fill value), which keep their own values.
    """
    ours_state = ours.state_dict()
    state = tl_model.state_dict()
    parameter_names = {name for name, _ in tl_model.named_parameters()}
    for name, value in state.items():
        if name in ours_state:
            state[name] = ours_state[name].to(value.dtype)
        elif name in parameter_names:
            if not name.rsplit(".", 1)[-1].startswith("b_"):
                raise ValueError(f"HookedTransformer parameter {name} has no counterpart")
            state[name] = torch.zeros_like(value)
    missing = set(ours_state) - set(state)
    if missing:
        raise ValueError(f"HookedTransformer lacks our parameters {sorted(missing)}")
    tl_model.load_state_dict(state)


def check_equivalence(cfg: ModelConfig) -> dict[str, float]:
    """Max |logit difference| between our model and HookedTransformer on the same weights."""
    torch.manual_seed(1)
    ours = AttnOnlyTransformer(cfg)
    with torch.no_grad():
        # Random layernorm gains and biases, so the comparison covers them too.
        for name, parameter in ours.named_parameters():
            if name.endswith(".w"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".b"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.d_vocab, (4, cfg.n_ctx), generator=generator)
    result = {}
    for dtype, label in ((torch.float64, "float64"), (torch.float32, "float32")):
        model = ours.to(dtype).eval()
        tl_model = transformer_lens_model(cfg, dtype).eval()
        copy_weights_to_transformer_lens(model, tl_model)
        with torch.no_grad():
            ours_logits = model(tokens)
            tl_logits = tl_model(tokens)
            ours_loss = model.loss(tokens).item()
            tl_loss = tl_model(tokens, return_type="loss").item()
        result[f"{label}_max_abs_diff"] = (ours_logits - tl_logits).abs().max().item()
        result[f"{label}_max_abs_logit"] = ours_logits.abs().max().item()
        result[f"{label}_loss_diff"] = abs(ours_loss - tl_loss)
    return result


# ---------------------------------------------------------------------------------------------
# Timing


def training_sampler(run: RunConfig):
    """Build the training loop's batch sampler; return None when the config's data is missing."""
    try:
        sampler, _ = make_train_sampler(run, progress=True)
    except DataError as error:
        print(f"training data unavailable: {error}")
        return None
    return sampler


def training_batches(run: RunConfig, sampler, count: int) -> tuple[list[torch.Tensor], str]:
    """Draw the first ``count`` batches of a training run, or random tokens without a sampler."""
    cfg = run.training
    if sampler is not None:
        batches = [sampler.random_batch(cfg.batch_size, cfg.seed, step) for step in range(count)]
        return batches, "the first batches that training with this config draws"
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, run.model.n_ctx)
    batches = [torch.randint(0, run.model.d_vocab, shape, generator=generator)
               for _ in range(count)]
    return batches, "uniformly random tokens (the config's training data was not found)"


def batch_build_time(run: RunConfig, sampler, repeats: int = 200) -> float | None:
    """Median seconds to draw one training batch from the memory-mapped token cache."""
    if sampler is None:
        return None
    times = []
    for step in range(repeats):
        start = time.perf_counter()
        sampler.random_batch(run.training.batch_size, run.training.seed, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


StepFunction = Callable[[torch.Tensor, int], float]


def training_step(model: torch.nn.Module, loss_fn: Callable, cfg: TrainConfig,
                  autocast: bool) -> StepFunction:
    """Build one optimiser step as circuits.train runs it: AdamW, schedule, clipping, autocast."""
    optimizer = make_optimizer(model, cfg)

    def step(batch: torch.Tensor, index: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(index, cfg)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss.item()

    return step


def forward_pass(model: torch.nn.Module, autocast: bool) -> StepFunction:
    def run(batch: torch.Tensor, index: int) -> float:
        with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16,
                                             enabled=autocast):
            return float(model(batch)[0, -1, 0])

    return run


def alternate(contenders: dict[str, StepFunction], batches: list[torch.Tensor], rounds: int,
              per_round: int, warmup: int) -> dict[str, list[float]]:
    """Time each contender in alternating rounds; return seconds per call, one figure per round.

    Round r gives every contender the same batches. The order of the contenders is reversed on
    every other round, so neither always runs right after the other.
    """
    names = list(contenders)
    for name in names:
        for index in range(warmup):
            contenders[name](batches[index], index)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        indices = range(warmup + round_index * per_round, warmup + (round_index + 1) * per_round)
        for name in order:
            start = time.perf_counter()
            for index in indices:
                contenders[name](batches[index], index)
            seconds[name].append((time.perf_counter() - start) / per_round)
    return seconds


def paired_ratios(seconds: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of (baseline time / contender time) for every other contender.

    Both times of a pair come from the same round, so load from other processes that lasts
    longer than a round slows both terms of the pair alike.
    """
    return {name: median([base / own for base, own in zip(seconds[baseline], values)])
            for name, values in seconds.items() if name != baseline}


def profile_table(step: StepFunction, batches: list[torch.Tensor], rows: int) -> str:
    """torch.profiler's table of the operators with the most self CPU time over ``batches``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for index, batch in enumerate(batches):
            step(batch, index)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                         max_name_column_width=60)


def time_call(function: Callable, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def analysis_times(run: RunConfig, repeats: int) -> tuple[dict[str, float], str]:
    """Median seconds of the weight-based analyses of the 2-layer model."""
    from circuits.analysis.circuits import copying_scores
    from circuits.analysis.composition import all_composition_scores, k_composition_positivity
    from circuits.analysis.skip_trigrams import skip_trigrams
    from circuits.checkpoints import SHIPPED_DIR, load_checkpoint

    shipped = SHIPPED_DIR / "attn-only-2l"
    if (shipped / "model.safetensors").exists():
        checkpoint = load_checkpoint(shipped)
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        source = f"checkpoint {shipped.name}"
    else:
        torch.manual_seed(0)
        model, tokenizer = AttnOnlyTransformer(run.model), run.tokenizer
        source = "a freshly initialised model of the same shape (no trained checkpoint found)"
    model.eval()
    previous_token = torch.ones(model.cfg.n_heads)
    timings = {
        "copying scores (every head)": time_call(lambda: copying_scores(model), repeats),
        "composition scores (Q, K, V; all layer pairs)":
            time_call(lambda: all_composition_scores(model), repeats),
        "K-composition positivity": time_call(
            lambda: k_composition_positivity(model, previous_token), repeats),
        "skip-trigram sweep (every head, every source token)":
            time_call(lambda: skip_trigrams(model, tokenizer), repeats),
    }
    return timings, source


def book_time() -> float:
    start = time.perf_counter()
    subprocess.run(["make", "book"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN_MARKER}\n{END_MARKER}\n"
    if BEGIN_MARKER not in text or END_MARKER not in text:
        raise SystemExit(f"error: {path} lacks the marker lines {BEGIN_MARKER!r} and "
                         f"{END_MARKER!r}; add them where the measured section belongs")
    head, rest = text.split(BEGIN_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    path.write_text(f"{head}{BEGIN_MARKER}\n{section.strip()}\n{END_MARKER}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "attn-only-2l.toml"),
                        help="training config whose model and batch size are benchmarked")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per training step (default: the config's batch_size)")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds per comparison")
    parser.add_argument("--steps", type=int, default=1, help="training steps per model per round")
    parser.add_argument("--compile", action="store_true",
                        help="also time our training step under torch.compile")
    parser.add_argument("--book", action="store_true", help="also time `make book` (minutes)")
    parser.add_argument("--clock-ghz", type=float, default=None,
                        help="core clock for the peak FLOP/s estimate (default: cpu MHz from "
                             "/proc/cpuinfo)")
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {RESULTS.name}")
    args = parser.parse_args(argv)

    # Data paths in the configs are relative to the repository root.
    os.chdir(REPO)
    run = RunConfig.from_toml(args.config)
    if args.batch_size is not None:
        run.raw["training"]["batch_size"] = args.batch_size
        run = RunConfig.from_dict(run.raw, source=args.config)
    cfg, train_cfg = run.model, run.training
    autocast = use_autocast(train_cfg.autocast, "cpu")
    machine = describe_machine(args.clock_ghz)
    tokens_per_step = train_cfg.batch_size * cfg.n_ctx
    print(f"{machine.cpu}, {machine.cores} cores, {machine.threads} torch threads, "
          f"torch {machine.torch}, TransformerLens {machine.transformer_lens}")

    equivalence = check_equivalence(cfg)
    print("logits, ours vs HookedTransformer on the same weights:", equivalence)
    for label, tolerance in (("float64", FLOAT64_TOLERANCE), ("float32", FLOAT32_TOLERANCE)):
        difference = equivalence[f"{label}_max_abs_diff"]
        if difference > tolerance:
            raise SystemExit(f"error: {label} logits differ by {difference:.3g} > {tolerance}; "
                             "the two models do not compute the same function")

    warmup = 2
    sampler = training_sampler(run)
    batches, batch_source = training_batches(run, sampler, warmup + args.rounds * args.steps)

    torch.manual_seed(train_cfg.seed)
    ours = AttnOnlyTransformer(cfg).train()
    tl_model = transformer_lens_model(cfg, torch.float32).train()
    copy_weights_to_transformer_lens(ours, tl_model)
    contenders: dict[str, StepFunction] = {
        "ours": training_step(ours, ours.loss, train_cfg, autocast),
        "TransformerLens": training_step(tl_model, lambda b: tl_model(b, return_type="loss"),
                                         train_cfg, autocast),
    }
    first_losses = {name: step(batches[0], 0) for name, step in contenders.items()}
    print("loss of the first step from the same weights:", first_losses)
    compile_seconds = None
    if args.compile:
        # An empty cache folder, so the first step's time includes the whole compilation.
        cache_folder = tempfile.mkdtemp(prefix="bench-inductor-")
        atexit.register(shutil.rmtree, cache_folder, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_folder
        torch.manual_seed(train_cfg.seed)
        compiled_model = AttnOnlyTransformer(cfg).train()
        compiled = torch.compile(LossModule(compiled_model))
        contenders["ours, torch.compile"] = training_step(compiled_model, compiled, train_cfg,
                                                          autocast)
        start = time.perf_counter()
        contenders["ours, torch.compile"](batches[0], 0)
        compile_seconds = time.perf_counter() - start
        print(f"torch.compile: first step took {compile_seconds:.1f} s")

    train_seconds = alternate(contenders, batches, args.rounds, args.steps, warmup)
    for name, values in train_seconds.items():
        print(f"train {name}: {tokens_per_step / median(values):,.0f} tokens/s "
              f"(median {median(values) * 1e3:.0f} ms/step, best round {min(values) * 1e3:.0f} ms)")
    train_ratio = paired_ratios(train_seconds, "TransformerLens")
    print(f"training speed ratio over TransformerLens, median of rounds: {train_ratio}")

    ours.eval()
    tl_model.eval()
    forward_seconds = alternate(
        {"ours": forward_pass(ours, autocast), "TransformerLens": forward_pass(tl_model, autocast)},
        batches, args.rounds, args.steps, warmup)
    for name, values in forward_seconds.items():
        print(f"forward {name}: {tokens_per_step / median(values):,.0f} tokens/s")
    forward_ratio = paired_ratios(forward_seconds, "TransformerLens")
    print(f"forward speed ratio over TransformerLens, median of rounds: {forward_ratio}")
    ours.train()
    tl_model.train()

    profile_ours = profile_table(contenders["ours"], batches[-3:], rows=20)
    profile_tl = profile_table(contenders["TransformerLens"], batches[-1:], rows=10)
    print(profile_ours)

    flops = flops_per_token(cfg)
    achieved = {name: (flops["train"] * tokens_per_step / median(values),
                       flops["train"] * tokens_per_step / min(values))
                for name, values in train_seconds.items()}
    gemm = bf16_matmul_flops()
    peak = machine.peak_bf16_flops
    print(f"FLOPs per token: forward {flops['forward'] / 1e6:.2f} M, "
          f"training {flops['train'] / 1e6:.2f} M;"
          f" achieved {achieved['ours'][0] / 1e12:.3f} TFLOP/s;"
          f" bf16 GEMM {gemm / 1e12:.2f} TFLOP/s;"
          f" estimated peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s")

    batch_seconds = batch_build_time(run, sampler)
    analysis, analysis_source = analysis_times(run, repeats=3)
    for name, seconds in analysis.items():
        print(f"{name}: {seconds:.2f} s")
    book_seconds = book_time() if args.book else None
    if book_seconds is not None:
        print(f"make book: {book_seconds:.0f} s")

    section = render(machine, run, args, equivalence, batch_source, first_losses, train_seconds,
                     forward_seconds, train_ratio, forward_ratio, compile_seconds, flops, achieved,
                     gemm, batch_seconds, analysis, analysis_source, book_seconds, profile_ours,
                     profile_tl, autocast)
    if not args.no_write:
        write_results(section, RESULTS)
        print(f"wrote {RESULTS}")
    return 0


def render(machine, run, args, equivalence, batch_source, first_losses, train_seconds,
           forward_seconds, train_ratio, forward_ratio, compile_seconds, flops, achieved, gemm,
           batch_seconds, analysis, analysis_source, book_seconds, profile_ours,
           profile_tl, autocast: bool) -> str:
    cfg, train_cfg = run.model, run.training
    tokens_per_step = train_cfg.batch_size * cfg.n_ctx
    peak = machine.peak_bf16_flops
    lines = [
        f"Measured {machine.date} by `benchmarks/bench.py` "
        f"(`--rounds {args.rounds} --steps {args.steps}"
        f"{f' --batch-size {args.batch_size}' if args.batch_size else ''}"
        f"{' --compile' if args.compile else ''}{' --book' if args.book else ''}`).",
        "",
        f"- CPU: {machine.cpu}, {machine.cores} cores ({machine.threads} torch threads), "
        f"AMX bf16 {'present' if machine.amx else 'absent'}, "
        f"clock {machine.clock_ghz:.2f} GHz (`cpu MHz` in /proc/cpuinfo)"
        if machine.clock_ghz else f"- CPU: {machine.cpu}, {machine.cores} cores",
        f"- torch {machine.torch}, TransformerLens {machine.transformer_lens}, "
        f"Python {machine.python}",
        f"- Config `{Path(args.config).resolve().relative_to(REPO)}`: {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, {cfg.n_heads} heads of "
        f"{cfg.d_head}, n_ctx {cfg.n_ctx}, d_vocab {cfg.d_vocab}; batch {train_cfg.batch_size} "
        f"x {cfg.n_ctx} = {tokens_per_step} tokens per step; AdamW, gradient clipping, "
        f"{'bf16 autocast' if autocast else 'float32'}; batches: {batch_source}",
        "",
        "### Same function",
        "",
        "Our weights loaded into HookedTransformer (its extra biases b_Q, b_K, b_V, b_O, b_U set to "
        "zero), 4 sequences of "
        f"{cfg.n_ctx} random tokens, random layernorm gains and biases:",
        "",
        "| precision | max abs logit difference | max abs logit | loss difference | tolerance |",
        "|---|---|---|---|---|",
        f"| float64 | {equivalence['float64_max_abs_diff']:.2e} | "
        f"{equivalence['float64_max_abs_logit']:.2f} | {equivalence['float64_loss_diff']:.2e} | "
        f"{FLOAT64_TOLERANCE:g} |",
        f"| float32 | {equivalence['float32_max_abs_diff']:.2e} | "
        f"{equivalence['float32_max_abs_logit']:.2f} | {equivalence['float32_loss_diff']:.2e} | "
        f"{FLOAT32_TOLERANCE:g} |",
        "",
        "Loss of the first training step from the same weights and batch: "
        + ", ".join(f"{name} {loss:.4f}" for name, loss in first_losses.items()) + ".",
        "",
        "### Speed",
        "",
        f"{args.rounds} alternating rounds of {args.steps} step(s) per model, after 2 warm-up "
        "steps per model. Other processes shared the CPU during the run, so some rounds ran "
        "slower. The medians include such rounds, and the best round is the closest to an idle "
        "machine.",
        "",
        "| | median ms per step | median tokens/s | best-round ms | best-round tokens/s |",
        "|---|---|---|---|---|",
    ]
    for kind, seconds in (("training", train_seconds), ("forward only", forward_seconds)):
        for name, values in seconds.items():
            lines.append(f"| {kind}, {name} | {median(values) * 1e3:.0f} | "
                         f"{tokens_per_step / median(values):,.0f} | {min(values) * 1e3:.0f} | "
                         f"{tokens_per_step / min(values):,.0f} |")
    lines += [
        "",
        "Speed over TransformerLens, the median over rounds of TransformerLens's time divided by "
        "the contender's time in the same round:",
        "",
    ]
    for kind, ratios, seconds in (("training", train_ratio, train_seconds),
                                  ("forward only", forward_ratio, forward_seconds)):
        for name, ratio in ratios.items():
            best = min(seconds["TransformerLens"]) / min(seconds[name])
            lines.append(f"- {kind}, {name}: **{ratio:.2f}x** (best rounds: {best:.2f}x)")
    if compile_seconds is not None:
        lines += ["", f"torch.compile: the first step, which compiles into an empty cache folder, "
                      f"took {compile_seconds:.0f} s."]
    if batch_seconds is not None:
        lines += ["", f"Drawing one training batch from the token cache takes "
                      f"{batch_seconds * 1e6:.0f} µs, "
                      f"{batch_seconds / median(train_seconds['ours']) * 100:.2f}% of our training "
                      "step, so the loop builds batches in line rather than in a prefetch thread."]
    peak_text = (f"{peak / 1e12:.2f} TFLOP/s ({machine.cores} cores x "
                 f"{AMX_BF16_FLOP_PER_CYCLE} FLOP/cycle x {machine.clock_ghz:.2f} GHz)"
                 if peak else "unknown (no AMX or no clock)")
    lines += [
        "",
        "### Model FLOPs utilisation",
        "",
        "FLOPs per token (2 per multiply-add; d = d_model, w = n_heads x d_head, "
        "L = n_layers, T = n_ctx, V = d_vocab):",
        "",
        "    forward = L x (2 x d x 4w  +  4 x w x (T + 1) / 2)  +  2 x d x V",
        "    training step = 3 x forward",
        "",
        "The first term is the W_Q, W_K, W_V and W_O products, the second the causal attention "
        "scores and weighted values (a query sees (T + 1) / 2 keys on average), the last the "
        "unembedding; layernorms, softmax, the embedding lookup and the optimiser are left out. "
        f"Here: {flops['projections'] / 1e6:.3f} M + {flops['attention'] / 1e6:.3f} M per layer, "
        f"{flops['unembed'] / 1e6:.3f} M for the unembedding, so {flops['forward'] / 1e6:.2f} M "
        f"per token forward and {flops['train'] / 1e6:.2f} M per token for training.",
        "",
        f"Peak bf16 throughput, an estimate: {peak_text}, assuming each core's AMX unit completes "
        "one 16 x 16 x 32 bf16 tile multiply-add every 16 cycles. The CPU reports no model "
        "number that pins down the exact part or its turbo clock. For comparison, square bf16 matrix "
        f"products (1024 and 2048, the faster) run at {gemm / 1e12:.2f} TFLOP/s here.",
        "",
        "| | TFLOP/s, median (best round) | MFU of the estimated peak | of the bf16 GEMM rate |",
        "|---|---|---|---|",
    ]
    for name, (typical, best) in achieved.items():
        mfu = (f"{typical / peak * 100:.1f}% ({best / peak * 100:.1f}%)" if peak else "n/a")
        lines.append(f"| {name} | {typical / 1e12:.3f} ({best / 1e12:.3f}) | {mfu} | "
                     f"{typical / gemm * 100:.1f}% ({best / gemm * 100:.1f}%) |")
    lines += [
        "",
        "### Analysis",
        "",
        f"Median of 3 runs, on {analysis_source}.",
        "",
        "| analysis | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in analysis.items()]
    lines += ["", f"`make book`: {book_seconds:.0f} s." if book_seconds is not None
              else "`make book` was not timed in this run (pass `--book`)."]
    lines += [
        "",
        "### Profile of the training step",
        "",
        "Ours, three consecutive steps (divide the times by 3), torch.profiler, sorted by self "
        "CPU time:",
        "",
        "```",
        profile_ours.strip(),
        "```",
        "",
        "TransformerLens, one step:",
        "",
        "```",
        profile_tl.strip(),
        "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
