"""The learning-rate schedule and the data order of a training run (pure: numbers in, numbers out)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Schedule:
    kind: Literal["cosine", "linear", "constant"]
    peak_lr: float
    total_steps: int
    warmup_steps: int


def count_total_steps(steps_per_epoch: int, num_epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the run: `max_steps`, else the (possibly fractional) epochs rounded up."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(num_epochs * steps_per_epoch))


def make_schedule(kind: str, peak_lr: float, total_steps: int, warmup_ratio: float) -> Schedule:
    """Warmup is a ratio of the true number of optimizer steps, rounded up (as transformers does)."""
    return Schedule(kind, peak_lr, total_steps, math.ceil(total_steps * warmup_ratio))  # type: ignore[arg-type]


def lr_at(schedule: Schedule, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): transformers' schedules with warmup, exactly.

    Warmup rises linearly from 0 at step 0; then cosine decays to 0 at `total_steps` (half a cycle), linear
    decays to 0 at `total_steps`, constant stays at the peak.
    """
    s = schedule
    if step < s.warmup_steps:
        return s.peak_lr * step / max(1, s.warmup_steps)
    if s.kind == "constant":
        return s.peak_lr
    progress = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
    if s.kind == "linear":
        return s.peak_lr * max(0.0, 1.0 - progress)
    return s.peak_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits `n` examples: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()
