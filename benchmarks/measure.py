"""What the training benchmarks (benchmarks/dpo.py, sft.py) share: the command line, the driver that runs each
engine (in a process of its own on CUDA), the timing of zephyr's steps and of a TRL trainer, and the tables.

Each engine's run is one `Result`: the optimizer steps after `warmup` are timed (CUDA synchronised before each
clock read), tokens are counted per step from the batches actually run, and peak memory is CUDA's peak
allocation of the training steps. MFU counts 6·N FLOPs per token (N = all parameters) against `peak_tflops`
(the bf16 matrix-product ceiling measured on the H200: 783 TFLOP/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import shapes

H200_BF16_TFLOPS = 783.0
DEFAULT_ENGINES = "zephyr,zephyr-ckpt,trl"
MIN_ENGINE_SECONDS = 20.0  # less than an engine needs to start: not worth a process


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """A clock read after the device finished its queued work."""
    sync()
    return time.perf_counter()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak_statistics() -> None:
    """Restart the peak statistic at what is allocated now (the model): the peak then is the training steps',
    not that of the checks or the reference pass before them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_and_dtype():
    """Where and in what both engines train: bf16 weights and AdamW states on CUDA (the configuration in which
    TRL fits 7B on one H200; zephyr's is `master_weights: bf16`, with stochastic rounding), fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class Engine:
    """How a zephyr engine trains: what the recipe options `gradient_checkpointing(_ratio)`, `compile` and
    `prefix_sharing` set."""

    checkpointing: float = 0.0  # share of decoder layers checkpointed; 0: none
    compile: bool = False
    prefix_sharing: bool = True  # DPO only

    def describe(self) -> str:
        ckpt = {0.0: "no checkpointing", 1.0: "checkpointing"}.get(
            self.checkpointing, f"checkpointing {self.checkpointing:g} of layers"
        )
        return ckpt + (", compiled layers" if self.compile else "")


ENGINES = {
    "zephyr": Engine(),
    "zephyr-ckpt": Engine(checkpointing=1.0),
    "zephyr-ckpt75": Engine(
        checkpointing=0.75
    ),  # a quarter of the layers keep their activations: 80 GB cards
    "zephyr-half": Engine(checkpointing=0.5),
    "zephyr-compile": Engine(compile=True),
}


class BenchmarkError(Exception):
    """A run that produced numbers which would not mean what the table says (its message goes in the row)."""


def attention_problem(paths: list[tuple[str, str]], cuda: bool) -> str | None:
    """Why a zephyr engine's attention is not the one it claims (None when it is): on CUDA every packed
    forward must reach the varlen kernel; a dense fallback is O(T²) and would be timed as zephyr's speed."""
    if not cuda:
        return None
    off = [f"{path} ({why})" for path, why in paths if path != "varlen"]
    return f"attention fell back: {'; '.join(off)}" if off else None


def kernel_note(model) -> str:
    """`Result.check`'s note of how the engine's attention ran: the kernel and how KV heads reach it."""
    from zephyr.scoring.attention import attention_paths, gqa_mode

    taken = ", ".join(sorted({path for path, _ in attention_paths()})) or "none"
    if "varlen" not in taken:
        return f"; attention: {taken}"
    return f"; attention: {taken}, KV heads {gqa_mode(model.device)}"


def require_varlen() -> None:
    """Raise BenchmarkError if the packed forwards so far left the varlen kernel (on CUDA)."""
    import torch

    from zephyr.scoring.attention import attention_paths

    problem = attention_problem(attention_paths(), torch.cuda.is_available())
    if problem:
        raise BenchmarkError(problem)


@dataclass
class Result:
    """One engine's run on one workload."""

    engine: str  # e.g. "zephyr", "zephyr-ckpt", "trl"
    config: str  # what the engine ran with, in words
    parameters: int
    step_seconds: list[float] = field(default_factory=list)  # every step, warm-up included
    step_tokens: list[int] = field(default_factory=list)
    units_per_step: int = 0  # pairs (DPO) or bins (SFT) per optimizer step
    warmup: int = 1
    peak_gib: float | None = None
    first_loss: float | None = None  # the loss of step 0
    reference_seconds: float | None = None  # DPO: the reference log-prob pass over all pairs
    total_units: int = 0  # DPO: pairs in the data (one epoch)
    check: str = ""  # a correctness figure, in words
    error: str = ""  # why the engine produced no numbers (e.g. out of memory)

    @property
    def timed_seconds(self) -> float:
        return sum(self.step_seconds[self.warmup :])

    @property
    def timed_tokens(self) -> int:
        return sum(self.step_tokens[self.warmup :])

    @property
    def timed_steps(self) -> int:
        return max(len(self.step_seconds) - self.warmup, 0)

    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def units_per_s(self) -> float:
        return self.timed_steps * self.units_per_step / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def mfu(self, peak_tflops: float | None) -> float | None:
        if not peak_tflops:
            return None
        return self.tokens_per_s() * 6 * self.parameters / (peak_tflops * 1e12)

    def epoch_units_per_s(self) -> float | None:
        """Pairs/s over the reference pass plus one epoch of steady-state steps."""
        if self.reference_seconds is None or not self.timed_steps or not self.units_per_step:
            return None
        steps = -(-self.total_units // self.units_per_step)
        epoch = steps * self.timed_seconds / self.timed_steps
        return self.total_units / (self.reference_seconds + epoch)


def save(result: Result, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(result)) + "\n", encoding="utf-8")


def load(path: str | Path) -> Result:
    return Result(**json.loads(Path(path).read_text(encoding="utf-8")))


def start_run(
    args,
    engine: str,
    config: str,
    *,
    checkpointing: str,
    attn_implementation: str,
    units_per_step: int,
    total_units: int = 0,
):
    """A fresh random model of `args.shape` on `device_and_dtype()` (the peak memory statistics reset before
    it), and its engine's empty `Result`, described as `config` plus `checkpointing` (in words) and dtype."""
    device, dtype = device_and_dtype()
    reset_peak_memory()
    model = shapes.build_model(
        args.shape, device=device, dtype=dtype, attn_implementation=attn_implementation
    )
    result = Result(
        engine=engine,
        config=f"{config}, {checkpointing}, {str(dtype).removeprefix('torch.')}",
        parameters=shapes.count_parameters(model),
        units_per_step=units_per_step,
        warmup=args.warmup,
        total_units=total_units,
    )
    return model, result


def start_trl(args, config: str, *, units_per_step: int, total_units: int = 0):
    """`start_run` for TRL: SDPA attention, gradient checkpointing as --trl-checkpointing says."""
    return start_run(
        args,
        "trl",
        config,
        checkpointing="checkpointing" if trl_checkpointing(args) else "no checkpointing",
        attn_implementation="sdpa",
        units_per_step=units_per_step,
        total_units=total_units,
    )


def sdpa_check(what: str, model, ours: Callable, theirs: Callable) -> str:
    """`Result.check`: the largest relative difference between `ours(model)`, through the model's own
    attention, and `theirs(model)`, through SDPA (both in eval mode without gradients, tensors of one shape),
    with the limit a correct kernel stays within in the model's dtype."""
    import torch

    implementation = model.config._attn_implementation
    was_training = model.training
    model.eval()
    with torch.no_grad():
        fast = ours(model)
        model.set_attn_implementation("sdpa")
        try:
            slow = theirs(model)
        finally:
            model.set_attn_implementation(implementation)
    model.train(was_training)
    fast, slow = fast.double().cpu(), slow.double().cpu()
    worst = float(((fast - slow).abs() / slow.abs().clamp_min(1e-12)).max())
    tolerance = 1e-2 if model.dtype == torch.bfloat16 else 1e-5
    return f"{what} vs padded SDPA, max rel diff {worst:.1e} (limit {tolerance:g})"


def time_zephyr(model, task, groups: list, *, engine: Engine, learning_rate: float, result: Result) -> None:
    """Train `model` one optimizer step per group of examples through zephyr's `loop.train_step` (the
    `StochasticAdamW` of `master_weights: bf16`, clipping at 1.0), each step timed from collating its group to
    the optimizer's update. Compiled layers compile in the warm-up steps."""
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    from zephyr.training.loop import train_step
    from zephyr.training.optim import StochasticAdamW
    from zephyr.training.prepare import compile_layers, enable_checkpointing

    device = model.device
    if engine.checkpointing:
        enable_checkpointing(model, engine.checkpointing)
    if engine.compile:
        compile_layers(model)
    model.train()
    optimizer = StochasticAdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    accelerator = Accelerator(cpu=device.type == "cpu")
    _reset_peak_statistics()
    for step, group in enumerate(groups):
        started = now()
        batch = send_to_device(task.collate(group), device)
        stats = train_step(accelerator, model, optimizer, task, [batch], step=step, max_grad_norm=1.0)
        result.step_seconds.append(now() - started)
        result.step_tokens.append(int(stats.tokens))
        if step == 0:
            result.first_loss = stats.loss_sum / stats.units
    result.peak_gib = peak_memory_gib()
    require_varlen()
    if optimizer.fallback:  # timed, but not as the compiled step it claims to be: the table says so
        result.config += f", optimizer step eager (compiling failed: {optimizer.fallback[:80]})"


def step_clock(marks: list[float]):
    """A trainer callback that appends to `marks` the start of the first optimizer step and the end of every
    step: consecutive marks bound the steps."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(now())

    return Clock()


def sequential_trainer(trainer_class, result: Result, count_tokens: Callable):
    """`trainer_class` visiting the data in order (zephyr's order) and adding `count_tokens(inputs)` of each
    batch it trains on to `result.step_tokens`."""
    from torch.utils.data import SequentialSampler

    class Sequential(trainer_class):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *a, **k):
            result.step_tokens.append(count_tokens(inputs))
            return super().training_step(model, inputs, *a, **k)

    return Sequential


def time_trl(trainer_class, config_class, args, model, data, result: Result, **settings) -> None:
    """Train `model` on `data` with a TRL trainer for `args.warmup + args.steps` optimizer steps of
    `result.units_per_step` examples, into `result`: the seconds of each step, the loss logged at step 0 and
    the peak memory of the steps. `settings`: the trainer's own (learning rate, lengths, ...) on top of those
    both benchmarks share."""
    import torch
    from transformers import PrinterCallback

    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = config_class(
            output_dir=tmp,
            per_device_train_batch_size=result.units_per_step,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            lr_scheduler_type="constant",
            bf16=model.dtype == torch.bfloat16,
            use_cpu=model.device.type == "cpu",
            optim="adamw_torch_fused" if model.device.type == "cuda" else "adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            gradient_checkpointing=trl_checkpointing(args),
            seed=args.seed,
            **settings,
        )
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=shapes.word_tokenizer(shapes.SHAPES[args.shape][0]),
            callbacks=[step_clock(marks)],
        )
        trainer.remove_callback(PrinterCallback)  # its log lines would bury the table
        _reset_peak_statistics()
        trainer.train()
    result.step_seconds = [b - a for a, b in itertools.pairwise(marks)]
    result.first_loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    result.peak_gib = peak_memory_gib()


def trl_checkpointing(args) -> bool:
    """TRL's gradient checkpointing: `auto` turns it on at 7B (the padded step runs out of memory without)."""
    return args.trl_checkpointing == "on" or (args.trl_checkpointing == "auto" and args.shape == "mistral-7b")


# ---------------------------------------------------------------------------------------------------------
# The command line and the driver


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes first (the shape and the steps); its workload's follow, then
    `add_run_arguments`'s."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(shapes.SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    return p


def add_run_arguments(p: argparse.ArgumentParser, engines: tuple[str, ...]) -> None:
    """The engines, how they run and where the tables go."""
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of {', '.join(engines)}")
    p.add_argument(
        "--trl-checkpointing", choices=("auto", "on", "off"), default="auto", help="auto: on for mistral-7b"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU's denominator (CUDA default: 783)")
    p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto", help="one process per engine")
    p.add_argument("--timeout", type=float, default=None, help="seconds per isolated engine")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all isolated engines (the last get what is left)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-out", default=None, help="also write the tables (Markdown) to this file")
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # an isolated engine's answer


@dataclass(frozen=True)
class Table:
    """How a benchmark prints its results: `describe(args, parameters)` says the workload in the header."""

    title: str  # e.g. "DPO training"
    unit: str  # what an optimizer step trains on: "pairs", "bins"
    describe: Callable
    epoch: bool = False  # the reference pass + one epoch table (DPO)


def main(
    argv: list[str] | None,
    script: str,
    parse_args: Callable,
    engines: tuple[str, ...],
    run_zephyr: Callable,
    run_trl: Callable,
    table: Table,
) -> None:
    """Run the chosen engines of `script` (each in a process of its own where CUDA is, or with --isolate on;
    with --result-json, the one engine of such a process) and print the tables, speed-ups against TRL."""
    # offline, quiet: set before transformers, datasets or trl are first imported (nothing here imports them)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in engines]
    if unknown:
        sys.exit(f"unknown engine(s) {unknown}; known: {', '.join(engines)}")

    def run(engine: str) -> Result:
        return run_trl(args) if engine == "trl" else run_zephyr(args, engine)

    if args.result_json:  # one engine, in a process of its own
        save(run_guarded(lambda: run(chosen[0]), chosen[0]), args.result_json)
        return
    isolate = args.isolate == "on" or (args.isolate == "auto" and torch.cuda.is_available())
    passed = list(argv if argv is not None else sys.argv[1:])
    peak = args.peak_tflops or (H200_BF16_TFLOPS if torch.cuda.is_available() else None)
    started = time.monotonic()
    results = []
    for n, engine in enumerate(chosen, 1):
        if isolate:
            left = None if args.budget is None else args.budget - (time.monotonic() - started)
            limit = min((t for t in (args.timeout, left) if t is not None), default=None)
            if limit is not None and limit < MIN_ENGINE_SECONDS:
                results.append(
                    Result(engine=engine, config="", parameters=0, error="not run: time budget spent")
                )
            else:
                results.append(run_isolated(script, engine, _without_engines(passed), limit))
        else:
            results.append(run(engine))
            _reset_accelerate()
        # every finished engine's row is written at once: a slow or stuck engine later loses only its own
        text = header(table.describe(args, max(r.parameters for r in results)))
        text += "\n\n" + format_tables(
            table.title, results, baseline="trl", unit=table.unit, peak_tflops=peak, epoch=table.epoch
        )
        if n < len(chosen):
            text += f"\n({n} of {len(chosen)} engines done; still to run: {', '.join(chosen[n:])})\n"
            write_table(text, args.table_out)
    report(text, args.table_out)


def run_guarded(run, engine: str) -> Result:
    """`run()`'s result, or a Result that says why it failed (an engine out of memory is a finding, not a
    crash of the comparison)."""
    import traceback

    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        if "out of memory" in str(exc).lower():
            kind = "out of memory"
        elif isinstance(exc, BenchmarkError):
            kind = str(exc).replace("|", "/")  # inside a table cell
        else:
            kind = type(exc).__name__
        return Result(engine=engine, config="", parameters=0, error=f"failed: {kind}")


def run_isolated(script: str, engine: str, argv: list[str], timeout: float | None) -> Result:
    """One engine in a fresh process of `script` (clean CUDA memory and peak statistics; an engine that runs
    out of memory leaves the others' numbers standing)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, script, *argv, "--engines", engine, "--result-json", str(out)]
        print(f"$ {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(
                cmd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if out.is_file():
            return load(out)
        return Result(engine=engine, config="", parameters=0, error=f"no result (exit {code})")


def _without_engines(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--engines":
            skip = True
            continue
        if a.startswith("--engines="):
            continue
        out.append(a)
    return out


def _reset_accelerate() -> None:
    """Engines in one process: each trainer starts from a fresh accelerate state (it is a singleton)."""
    import gc

    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# The tables


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "–"
    return f"{ours / theirs:.2f}×"


def format_tables(
    title: str, results: list[Result], *, baseline: str, unit: str, peak_tflops: float | None, epoch: bool
) -> str:
    """The comparison table (and, for DPO, the reference pass + one epoch table), speed-ups against `baseline`."""
    base = next((r for r in results if r.engine == baseline and not r.error), None)
    lines = [
        title,
        "",
        f"| engine | configuration | tokens/s | {unit}/s | MFU (6N) | peak GiB | step-0 loss | speed-up vs {baseline} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.engine} | {r.config} | {r.error} | | | | | |")
            continue
        mfu = r.mfu(peak_tflops)
        lines.append(
            f"| {r.engine} | {r.config} | {r.tokens_per_s():,.0f} | {r.units_per_s():.2f} | "
            f"{_fmt(None if mfu is None else 100 * mfu, '.1f', '%')} | {_fmt(r.peak_gib, '.1f')} | "
            f"{_fmt(r.first_loss, '.5f')} | {ratio(r.tokens_per_s(), base.tokens_per_s() if base else None)} |"
        )
    checks = [f"{r.engine}: {r.check}" for r in results if r.check and not r.error]
    if checks:
        lines += ["", "; ".join(checks)]
    if epoch:
        lines += [
            "",
            f"Reference pass + one epoch ({max(r.total_units for r in results)} {unit})",
            "",
            f"| engine | reference pass s | {unit}/s (reference + epoch) | speed-up vs {baseline} |",
            "|---|---:|---:|---:|",
        ]
        base_epoch = base.epoch_units_per_s() if base else None
        for r in results:
            if not r.error:
                value = r.epoch_units_per_s()
                lines.append(
                    f"| {r.engine} | {_fmt(r.reference_seconds, '.2f')} | {_fmt(value, '.2f')} | "
                    f"{ratio(value, base_epoch)} |"
                )
    return "\n".join(lines) + "\n"


def report(text: str, path: str | None) -> None:
    """Print the tables, and write them to `path` when given."""
    print("\n" + text, flush=True)
    write_table(text, path)


def write_table(text: str, path: str | None) -> None:
    """Replace `path`'s tables with `text` (through a temporary file: a reader never sees half a table)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.partial")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(path)


def header(args_line: str) -> str:
    """Where the numbers come from: device, torch, transformers and trl versions."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return f"{args_line}\n{device_line()}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}"


def device_line() -> str:
    """The card and its memory (what decides which engines fit), or the CPU's threads."""
    import torch

    if not torch.cuda.is_available():
        return f"CPU ({torch.get_num_threads()} threads)"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
