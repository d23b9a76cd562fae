"""Timing, memory and the printed tables of the training benchmarks (benchmarks/dpo.py, sft.py).

Each engine's run is one `Result`: the optimizer steps after `warmup` are timed (CUDA synchronised before each
clock read), tokens are counted per step from the batches actually run, and peak memory is CUDA's peak
allocation of the process since the model was built. MFU counts 6·N FLOPs per token (N = all parameters)
against `peak_tflops` (the bf16 matrix-product ceiling measured on the H200: 783 TFLOP/s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

H200_BF16_TFLOPS = 783.0


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


@dataclass
class Result:
    """One engine's run on one workload."""

    engine: str  # e.g. "zephyr", "zephyr (checkpointing)", "trl"
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


def run_guarded(run, engine: str) -> Result:
    """`run()`'s result, or a Result that says why it failed (an engine out of memory is a finding, not a
    crash of the comparison)."""
    import traceback

    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        kind = "out of memory" if "out of memory" in str(exc).lower() else type(exc).__name__
        return Result(engine=engine, config="", parameters=0, error=f"failed: {kind}")


def run_isolated(script: str, engine: str, argv: list[str], timeout: float | None) -> Result:
    """One engine in a fresh process of `script` (clean CUDA memory and peak statistics; an engine that runs
    out of memory leaves the others' numbers standing)."""
    import tempfile

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
            f"Reference pass + one epoch ({base.total_units if base else '?'} {unit})",
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
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")


def header(args_line: str) -> str:
    """Where the numbers come from: device, torch, transformers and trl versions."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return f"{args_line}\n{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}"
