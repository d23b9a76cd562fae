"""The contract between the one training loop and a stage (SFT, DPO).

The loop owns devices, distribution, the optimizer, the schedule, accumulation, logging and checkpoints.
A task owns data, collation and the loss. The loop normalises every loss by the number of loss units in the
whole optimizer step (target tokens for SFT, pairs for DPO) summed over micro-batches and processes, so a
run with accumulation or several processes matches a single large batch.

Optional attributes the loop reads when present: `attn_implementation` (the attention the model loads with),
`summary()` (a line printed before training) and `batch_unit` (what one example of a batch is, e.g. "pairs":
printed with the global batch and written at the head of the resolved config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class StepOutput:
    """What a task's `loss` returns for one micro-batch.

    `loss_sum` is the sum of per-unit losses (the loop divides by the step's global unit count), and
    `metric_sums` holds metric values summed over units (the loop reports them divided by the same count).
    """

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingTask(Protocol):
    name: str  # "sft" | "dpo": names the metrics and the output files
    tokenizer: Any  # saved into every checkpoint, with the chat template the data was rendered with

    def train_examples(self) -> Sequence[Any]:
        """Tokenized training examples (SFT: packed bins or conversations; DPO: pairs)."""
        ...

    def eval_examples(self) -> Sequence[Any]:
        """Tokenized held-out examples (may be empty)."""
        ...

    def collate(self, examples: list[Any]) -> dict[str, Any]:
        """A micro-batch of examples into tensors (on CPU; the loop moves them)."""
        ...

    def units(self, batch: dict[str, Any]) -> int:
        """How many loss units a micro-batch holds (SFT: target tokens; DPO: pairs)."""
        ...

    def tokens(self, batch: dict[str, Any]) -> int:
        """How many tokens the micro-batch runs through the model (for tokens/s)."""
        ...

    def prepare(self, model: torch.nn.Module, accelerator: Any) -> None:
        """Work before the first step once the model is placed (DPO: reference log-probs)."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Forward one micro-batch; sums over its units."""
        ...
