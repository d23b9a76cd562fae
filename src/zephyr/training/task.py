"""The contract between the one training loop and a stage (SFT, DPO).

The loop owns devices, distribution, the optimizer, the schedule, accumulation, logging and checkpoints.
A task owns data, collation and the loss. The loop normalises every loss by the number of loss units in the
whole optimizer step (target tokens for SFT, pairs for DPO) summed over micro-batches and processes, so a
run with accumulation or several processes matches a single large batch.

A task is generic in its examples and its batches: a batch is what `collate` makes of a micro-batch of
examples, on the CPU; the loop moves it to its device whole (`Batch.to`, as accelerate's data loader moves
what it yields) and hands it back to `units`, `tokens` and `loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class StepOutput:
    """What a task's `loss` returns for one micro-batch.

    `loss_sum` is the sum of per-unit losses (the loop divides by the step's global unit count), and
    `metric_sums` holds metric values summed over units (the loop reports them divided by the same count).
    """

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


_Self = TypeVar("_Self", bound="Batch")


class Batch(Protocol):
    """A micro-batch as tensors (`zephyr.data.packing.PackedBatch`, `PaddedBatch`, DPO's `PairBatch`)."""

    def to(self: _Self, device: torch.device | str, non_blocking: bool = False) -> _Self: ...


Example = TypeVar("Example")
BatchT = TypeVar("BatchT", bound=Batch)


class TrainingTask(Protocol[Example, BatchT]):
    @property
    def name(self) -> str:
        """The stage: "sft" or "dpo". It names the metrics, the output files and the progress bar."""
        ...

    @property
    def tokenizer(self) -> Any:
        """Saved into every checkpoint, with the chat template the data was rendered with."""
        ...

    @property
    def attn_implementation(self) -> str | None:
        """The attention the model loads with ("zephyr_packed" for packed rows; None: transformers' default)."""
        ...

    @property
    def batch_unit(self) -> str:
        """What one example of a batch is ("pairs"): printed with the global batch and written at the head
        of the resolved config."""
        ...

    def summary(self) -> str:
        """The data in one line, printed before training."""
        ...

    def train_examples(self) -> Sequence[Example]:
        """Tokenized training examples (SFT: packed bins or conversations; DPO: pairs)."""
        ...

    def eval_examples(self) -> Sequence[Example]:
        """Tokenized held-out examples (may be empty)."""
        ...

    def collate(self, examples: list[Example]) -> BatchT:
        """A micro-batch of examples into tensors (on CPU; the loop moves them)."""
        ...

    def units(self, batch: BatchT) -> int:
        """How many loss units a micro-batch holds (SFT: target tokens; DPO: pairs)."""
        ...

    def tokens(self, batch: BatchT) -> int:
        """How many tokens the micro-batch runs through the model (for tokens/s)."""
        ...

    def prepare(self, model: torch.nn.Module, accelerator: Accelerator) -> None:
        """Work before the first step once the model is placed (DPO: reference log-probs)."""
        ...

    def loss(self, model: torch.nn.Module, batch: BatchT) -> StepOutput:
        """Forward one micro-batch; sums over its units."""
        ...
