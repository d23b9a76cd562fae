"""The optimizer step on its own: zephyr's StochasticAdamW against torch's fused AdamW (what TRL runs), over the
parameters of a named shape in bf16, with random gradients.

Engines, each over fresh tensors of the shape (weights, gradients and both moments in bf16):
- `torch-fused`: `torch.optim.AdamW(fused=True)` on CUDA (foreach on the CPU), rounding to nearest.
- `zephyr`: `StochasticAdamW`, one compiled kernel per tensor on CUDA (eager in chunks on the CPU), each
  store stochastically rounded.
- `zephyr-eager`: `StochasticAdamW(fused=False)`, the eager path (not run by default on CUDA).

Printed: milliseconds per step (median of the timed steps, after warm-up steps that include compilation),
the memory traffic it implies in GB/s at the minimum of 14 bytes a parameter (read weight, gradient and two
moments, write weight and two moments), and the ratio to `torch-fused`.

    python benchmarks/optimizer.py --shape tiny                    # CPU smoke test (seconds)
    python benchmarks/optimizer.py --shape mistral-7b              # one H200 (in benchmarks/gpu.sh)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))  # runs from a checkout without installing zephyr

import measure  # noqa: E402
import shapes  # noqa: E402

ENGINES = ("torch-fused", "zephyr", "zephyr-eager")
BYTES_PER_PARAMETER = 14  # the least a bf16 AdamW step moves: reads 2 + 2 + 2 + 2, writes 2 + 2 + 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(shapes.SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation included)")
    p.add_argument("--engines", default=None, help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--table-out", default=None, help="also write the table (Markdown) to this file")
    return p.parse_args(argv)


def parameter_shapes(shape: str) -> list[tuple[int, ...]]:
    """The shapes of the model's parameters, read from a model built on the meta device (no memory)."""
    import torch

    model = shapes.build_model(shape, device="meta", dtype=torch.bfloat16, attn_implementation="sdpa")
    return [tuple(p.shape) for p in model.parameters()]


def make_optimizer(engine: str, params: list):
    import torch

    from zephyr.training.optim import StochasticAdamW

    if engine == "torch-fused":
        cuda = params[0].is_cuda
        return torch.optim.AdamW(params, lr=5e-7, weight_decay=0.0, fused=cuda or None, foreach=not cuda)
    return StochasticAdamW(
        params, lr=5e-7, weight_decay=0.0, fused=False if engine == "zephyr-eager" else None
    )


def time_engine(
    engine: str, sizes: list[tuple[int, ...]], args: argparse.Namespace
) -> tuple[list[float], str]:
    """Seconds of each timed step of `engine` over fresh bf16 tensors of `sizes`, and a note for the table
    (a compiled step that fell back to the eager one). Its tensors are freed before it returns: at 7B they
    are 58 GB, as much as the next engine allocates."""
    import gc

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.empty(size, dtype=torch.bfloat16, device=device).normal_(0, 0.02))
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=generator)
        params.append(p)
    optimizer = make_optimizer(engine, params)
    seconds = []
    for step in range(args.warmup + args.steps):
        started = measure.now()
        optimizer.step()
        if step >= args.warmup:
            seconds.append(measure.now() - started)
    fallback = getattr(optimizer, "fallback", None)
    note = f"eager: compiling failed ({fallback[:80]})" if fallback else ""
    del optimizer, params, p
    gc.collect()  # an optimizer in a reference cycle (hooks, schedulers) would keep every tensor alive
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds, note


def table(results: dict[str, tuple[list[float], str]], parameters: int) -> str:
    base = statistics.median(results["torch-fused"][0]) if "torch-fused" in results else None
    lines = [
        "| engine | ms/step | GB/s at 14 B/parameter | time vs torch-fused | note |",
        "|---|---:|---:|---:|---|",
    ]
    for engine, (seconds, note) in results.items():
        median = statistics.median(seconds)
        rate = parameters * BYTES_PER_PARAMETER / median / 1e9
        ratio = f"{median / base:.2f}×" if base else "–"
        lines.append(f"| {engine} | {median * 1e3:,.1f} | {rate:,.1f} | {ratio} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = "torch-fused,zephyr" if torch.cuda.is_available() else ",".join(ENGINES)
    chosen = [e.strip() for e in (args.engines or default).split(",") if e.strip()]
    unknown = [e for e in chosen if e not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    sizes = parameter_shapes(args.shape)
    parameters = sum(torch.Size(s).numel() for s in sizes)
    results = {}
    for engine in chosen:
        results[engine] = time_engine(engine, sizes, args)
        measure.write_table(table(results, parameters), args.table_out)  # each row as it finishes
    text = measure.header(
        f"AdamW step, shape {args.shape} ({parameters / 1e9:.3g}B parameters, {len(sizes)} tensors, bf16), "
        f"{args.warmup} warm-up + {args.steps} timed steps"
    )
    measure.report(text + "\n\n" + table(results, parameters), args.table_out)


if __name__ == "__main__":
    main()
