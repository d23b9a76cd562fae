"""Per-pair sequence log-probs of a model on preference pairs: the pass behind the precomputed DPO
reference and `zephyr logps`, and the batches the DPO step runs.

Pairs come tokenized from `zephyr.training.pairs`. A pair's log-prob of an answer is the sum of log p(token)
over its answer tokens, and its token count is the number of those tokens.

Batches: a pair is scored by `zephyr.scoring.continuations` as its prompt with two continuations. The
micro-batch's pairs become one packed row of documents [prompt; chosen], [prompt; rejected], ... (groups of
one continuation each) with targets on answer tokens only, positions restarting per document and attention
that never crosses a document ("zephyr_packed"): no padding. With prefix sharing the prompt runs once per
pair (one group of two continuations): the row holds [prompt; chosen] and [last prompt token; rejected], the
rejected side's queries attending to the prompt's keys of the chosen side; the log-probs are those of the
unshared row, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from zephyr.data.packing import Movable, PackedBatch, collate_shared_prefix
from zephyr.training.losses import PairLogps
from zephyr.training.pairs import TokenizedPair

# ---------------------------------------------------------------------------------------------------------
# Batches and log-probs


@dataclass(frozen=True)
class PairBatch(Movable):
    """A micro-batch of pairs: its row (document 2i is pair i's chosen side, 2i + 1 its rejected side), how
    many pairs it folds into, and the tokens of its unshared row (the prompt twice), so that tokens/s means
    the same with and without sharing; `reference`: the pairs' precomputed reference log-probs, when used."""

    rows: PackedBatch
    num_pairs: int
    num_tokens: int
    reference: PairLogps | None = None


def pack_pairs(pairs: Sequence[TokenizedPair], *, prefix_sharing: bool = False) -> PairBatch:
    """A micro-batch of pairs as one packed row: documents [prompt; chosen], [prompt; rejected] per pair
    (with `prefix_sharing`, [prompt; chosen] and [last prompt token; rejected] over the shared prompt);
    targets are the answer tokens."""
    groups = []
    for p in pairs:
        if prefix_sharing:
            groups.append((p.prompt_ids, [p.chosen_ids, p.rejected_ids]))
        else:
            groups += [(p.prompt_ids, [p.chosen_ids]), (p.prompt_ids, [p.rejected_ids])]
    rows = collate_shared_prefix(groups)
    return PairBatch(rows, num_pairs=len(pairs), num_tokens=sum(pair.num_tokens for pair in pairs))


def pair_logps(model: torch.nn.Module, batch: PairBatch) -> PairLogps:
    """Per-pair sums of answer-token log-probs (and token counts) of a `pack_pairs` batch under `model`."""
    from zephyr.scoring.continuations import score_batch

    n = batch.num_pairs
    scores = score_batch(model, batch.rows)
    sums, counts = scores.sums.view(n, 2), scores.counts.view(n, 2)
    return PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])


@dataclass
class LogpsTable:
    """Per-pair log-probs of a list of pairs, in the list's order (float64 on CPU: exact copies of the
    model's float32 sums)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, prompt_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The `zephyr logps` output lines."""
        return [
            {
                "prompt_id": pid,
                "chosen_logps": float(self.chosen[i]),
                "rejected_logps": float(self.rejected[i]),
                "chosen_tokens": int(self.chosen_tokens[i]),
                "rejected_tokens": int(self.rejected_tokens[i]),
            }
            for i, pid in enumerate(prompt_ids)
        ]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> LogpsTable:
        def column(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([row[key] for row in rows], dtype=dtype)

        return cls(
            column("chosen_logps", torch.float64),
            column("rejected_logps", torch.float64),
            column("chosen_tokens", torch.long),
            column("rejected_tokens", torch.long),
        )

    def select(self, indices: Sequence[int]) -> PairLogps:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PairLogps(
            self.chosen[index], self.rejected[index], self.chosen_tokens[index], self.rejected_tokens[index]
        )


def batches_of(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[int]]:
    """Consecutive index groups of at most `batch_size` pairs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]


def compute_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    progress: bool = False,
    prefix_sharing: bool = False,
) -> LogpsTable:
    """One no-grad pass of `model` over `pairs`, `batch_size` pairs per packed row, in order (each prompt
    run once per pair with `prefix_sharing`).

    `autocast` is a context-manager factory (the accelerator's): a reference computed here must see the
    precision the training step sees, or step 0 would not start at ln 2. The model runs in eval mode and its
    train/eval mode is restored afterwards.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    columns: list[list[torch.Tensor]] = [[], [], [], []]
    try:
        with torch.no_grad():
            for group in tqdm(
                batches_of(pairs, batch_size), desc="log-probs", unit="batch", disable=not progress
            ):
                batch = pack_pairs([pairs[i] for i in group], prefix_sharing=prefix_sharing).to(device)
                with autocast() if autocast is not None else nullcontext():
                    out = pair_logps(model, batch)
                for column, value in zip(
                    columns, (out.chosen, out.rejected, out.chosen_tokens, out.rejected_tokens), strict=True
                ):
                    column.append(value.detach().cpu())
    finally:
        model.train(was_training)
    if not pairs:
        empty = torch.zeros(0, dtype=torch.float64)
        return LogpsTable(
            empty, empty.clone(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        )
    c, r, ct, rt = (torch.cat(column) for column in columns)
    return LogpsTable(c.double(), r.double(), ct.long(), rt.long())
