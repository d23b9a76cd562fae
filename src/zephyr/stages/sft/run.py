"""dSFT: supervised fine-tuning on conversations, loss on assistant tokens (or on every token: `loss_on`).

Each conversation is rendered once with the chat template into token ids and a loss mask: the assistant's
answers and end-of-turn tokens (`loss_on: assistant`), or every token of the conversation (`loss_on: all`,
the language-modelling loss that SFTTrainer's packing trained Zephyr with). Conversations
longer than `max_length` are truncated, keeping their start (the first turns and the start of the first
answer are what the template's structure relies on); a conversation left without a trained token is
dropped. Both are counted and reported.

With `packing`, conversations are placed whole into bins of `max_length` tokens by best-fit-decreasing;
a micro-batch of `per_device_batch_size` bins runs as one row with per-document positions and attention
that never crosses a document boundary ("zephyr_packed"), so a packed run computes exactly the per-token
losses of an unpacked one. Without packing, micro-batches are right-padded.

Loss: the sum of −log p over trained tokens; the loop divides by the number of trained tokens in the
whole optimizer step (units = target tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from zephyr.core.config import SFTConfig
from zephyr.data.packing import (
    IGNORE_INDEX,
    Document,
    PackedBatch,
    PaddedBatch,
    collate_packed,
    collate_padded,
    pack_bfd,
)
from zephyr.training.loop import TrainResult, train
from zephyr.training.task import StepOutput

if TYPE_CHECKING:
    from accelerate import Accelerator

SFTBatch = PackedBatch | PaddedBatch

# ---------------------------------------------------------------------------------------------------------
# Documents (pure)


@dataclass
class DocumentStats:
    conversations: int = 0  # valid conversations rendered
    truncated: int = 0  # longer than max_length, cut to their first max_length tokens
    dropped: int = 0  # no trained token (left after truncation)


def trained_mask(assistant_mask: Sequence[int], loss_on: str) -> list[int]:
    """The loss mask of a rendered conversation: its assistant mask, or every token for `loss_on: all`."""
    if loss_on == "all":
        return [1] * len(assistant_mask)
    return [int(m) for m in assistant_mask]


def fit_document(input_ids: Sequence[int], loss_mask: Sequence[int], max_length: int) -> Document | None:
    """A rendered conversation cut to `max_length` tokens (its start kept); None if nothing is trained.

    A token is trained when it is a prediction target: its mask is set and a token precedes it.
    """
    ids, mask = list(input_ids[:max_length]), [int(m) for m in loss_mask[:max_length]]
    if not any(mask[1:]):
        return None
    return ids, mask


def fit_documents(rendered: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int):
    """Fit every rendered conversation; returns the documents kept and the counts."""
    stats = DocumentStats(conversations=len(rendered))
    docs: list[Document] = []
    for input_ids, loss_mask in rendered:
        if len(input_ids) > max_length:
            stats.truncated += 1
        doc = fit_document(input_ids, loss_mask, max_length)
        if doc is None:
            stats.dropped += 1
        else:
            docs.append(doc)
    return docs, stats


def pack_documents(docs: Sequence[Document], max_length: int) -> list[list[Document]]:
    """Bins of whole documents, each at most `max_length` tokens (best-fit-decreasing)."""
    return [[docs[i] for i in group] for group in pack_bfd([len(ids) for ids, _ in docs], max_length)]


def packing_efficiency(bins: Sequence[Sequence[Document]], max_length: int) -> float:
    """Share of the bins' capacity holding tokens."""
    tokens = sum(len(ids) for group in bins for ids, _ in group)
    return tokens / (len(bins) * max_length) if bins else 0.0


def count_targets(batch: SFTBatch) -> int:
    return int((batch.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------------
# The task


def _load_conversations(path: str, cfg: SFTConfig):
    from zephyr import io

    return io.read_records(path, "conversations", on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)


class SFTTask:
    """A `TrainingTask`: examples are bins of documents (packing) or single documents (padded batches)."""

    name = "sft"

    def __init__(self, cfg: SFTConfig):
        from zephyr import io
        from zephyr.data.chat import render_conversation
        from zephyr.models.load import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(
            cfg.tokenizer or cfg.model,
            chat_template=cfg.chat_template,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        read = _load_conversations(cfg.train_data, cfg)
        self.bad_records = len(read.bad)
        train_records, eval_records = read.records, []
        if cfg.eval_data:
            eval_read = _load_conversations(cfg.eval_data, cfg)
            self.bad_records += len(eval_read.bad)
            eval_records = eval_read.records
        elif cfg.eval_fraction > 0:
            train_records, eval_records = io.train_eval_split(train_records, cfg.eval_fraction, cfg.seed)

        def render(records: list[dict]) -> list[tuple[list[int], list[int]]]:
            out = []
            for record in records:
                rendered = render_conversation(self.tokenizer, record["messages"])
                out.append((list(rendered.input_ids), trained_mask(rendered.loss_mask, cfg.loss_on)))
            return out

        train_docs, self.stats = fit_documents(render(train_records), cfg.max_length)
        eval_docs, self.eval_stats = fit_documents(render(eval_records), cfg.max_length)
        if cfg.packing:
            from zephyr.scoring.attention import register_packed_attention

            self.attn_implementation: str | None = register_packed_attention()
            self._train: list[Any] = pack_documents(train_docs, cfg.max_length)
            self._eval: list[Any] = pack_documents(eval_docs, cfg.max_length)
        else:
            self.attn_implementation = None
            self._train, self._eval = train_docs, eval_docs

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
            text += (
                f", {len(self._train)} bins of {self.cfg.max_length} "
                f"(packing efficiency {packing_efficiency(self._train, self.cfg.max_length):.1%})"
            )
        if self._eval:
            text += f", {self.eval_stats.conversations - self.eval_stats.dropped} eval conversations"
        return text + (", loss on every token" if self.cfg.loss_on == "all" else ", loss on the answers")

    def train_examples(self) -> Sequence[Any]:
        return self._train

    def eval_examples(self) -> Sequence[Any]:
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
