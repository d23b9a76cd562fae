"""dSFT: supervised fine-tuning on conversations, loss on assistant tokens (or on every token: `loss_on`).

Each conversation is rendered once with the chat template into token ids and a loss mask: the assistant's
answers and end-of-turn tokens (`loss_on: assistant`), or every token of the conversation (`loss_on: all`,
the language-modelling loss that SFTTrainer's packing trained Zephyr with). Conversations
longer than `max_length` are truncated, keeping their start (the first turns and the start of the first
answer are what the template's structure relies on); a conversation left without a trained token is
dropped. Both are counted and reported. The rendering, tokenizing and packing happen once, in worker
processes, into a cache entry that every process maps read-only and later runs reuse (`stages.sft.data`).

With `packing`, conversations are placed whole into bins of `max_length` tokens by best-fit-decreasing;
a micro-batch of `per_device_batch_size` bins runs as one row with per-document positions and attention
that never crosses a document boundary ("zephyr_packed"), so a packed run computes exactly the per-token
losses of an unpacked one. Without packing, micro-batches are right-padded.

Loss: the sum of −log p over trained tokens; the loop divides by the number of trained tokens in the
whole optimizer step (units = target tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zephyr.core.config import SFTConfig
from zephyr.data.packing import IGNORE_INDEX, PackedBatch, PaddedBatch, collate_packed, collate_padded
from zephyr.stages.sft.data import DocumentStats, Examples, load_sft_data, packing_efficiency
from zephyr.training.loop import TrainResult, train
from zephyr.training.task import StepOutput

if TYPE_CHECKING:
    from accelerate import Accelerator

SFTBatch = PackedBatch | PaddedBatch


def count_targets(batch: SFTBatch) -> int:
    return int((batch.labels != IGNORE_INDEX).sum())


class SFTTask:
    """A `TrainingTask`: examples are bins of documents (packing) or single documents (padded batches), read
    from the tokenized data that `stages.sft.data` caches and maps."""

    name = "sft"

    def __init__(self, cfg: SFTConfig, *, cache_dir: str | Path | None = None):
        from zephyr.models.load import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(
            cfg.tokenizer or cfg.model,
            chat_template=cfg.chat_template,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.data = load_sft_data(cfg, self.tokenizer, cache_dir=cache_dir)
        stats = self.data.stats
        self.bad_records: int = stats["bad_records"]
        self.stats, self.eval_stats = (
            DocumentStats(**{k: stats[split][k] for k in ("conversations", "truncated", "dropped")})
            for split in ("train", "eval")
        )
        self._train = Examples(self.data, "train", packed=cfg.packing)
        self._eval = Examples(self.data, "eval", packed=cfg.packing)
        self.attn_implementation: str | None = None
        if cfg.packing:
            from zephyr.scoring.attention import register_packed_attention

            self.attn_implementation = register_packed_attention()

    @property
    def batch_unit(self) -> str:
        """What one example of a batch is (the paper's "global batch 512" counts packed sequences)."""
        if self.cfg.packing:
            return f"packed sequences of ≤ {self.cfg.max_length} tokens"
        return "conversations"

    def summary(self) -> str:
        s = self.stats
        text = (
            f"{s.conversations} conversations ({self.bad_records} bad records skipped, {s.truncated} truncated "
            f"to {self.cfg.max_length} tokens, {s.dropped} dropped: no trained token)"
        )
        if self.cfg.packing:
            tokens = self.data.stats["train"]["tokens"]
            efficiency = packing_efficiency(tokens, len(self._train), self.cfg.max_length)
            text += (
                f", {len(self._train)} bins of {self.cfg.max_length} (packing efficiency {efficiency:.1%})"
            )
        if self._eval:
            text += f", {self.eval_stats.conversations - self.eval_stats.dropped} eval conversations"
        return text + (", loss on every token" if self.cfg.loss_on == "all" else ", loss on the answers")

    def train_examples(self) -> Examples:
        return self._train

    def eval_examples(self) -> Examples:
        return self._eval

    def collate(self, examples: list[Any]) -> SFTBatch:
        if self.cfg.packing:
            # several bins run as one row: attention stays inside each document, so this equals one row per bin
            return collate_packed([doc for group in examples for doc in group], pad_id=self.pad_id)
        return collate_padded(examples, pad_id=self.pad_id)

    def units(self, batch: SFTBatch) -> int:
        return count_targets(batch)

    def tokens(self, batch: SFTBatch) -> int:
        if isinstance(batch, PaddedBatch):
            return int(batch.attention_mask.sum())
        return int(batch.input_ids.numel())

    def prepare(self, model: torch.nn.Module, accelerator: Accelerator) -> None:
        return None

    def loss(self, model: torch.nn.Module, batch: SFTBatch) -> StepOutput:
        from zephyr.scoring.forward import token_logps

        return StepOutput(loss_sum=-token_logps(model, batch).sum())


def run_sft(cfg: SFTConfig, resume: bool = False) -> TrainResult:
    """`zephyr sft`: build the task from the recipe and train."""
    return train(SFTTask(cfg), cfg, resume=resume)
