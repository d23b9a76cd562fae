"""Log-probs of continuations of shared prefixes: the primitive every scorer in zephyr calls.

A group is (prefix ids, [continuation ids, ...]): a DPO pair's prompt with its chosen and rejected answers
(or, unshared, a prompt with one answer), a multiple-choice context with its choices, a judge prompt with its
forced answer prefixes. Groups become one packed row (`zephyr.data.packing.collate_shared_prefix`) in which
each prefix runs once and each continuation attends to its prefix and to itself only; `score_batch` runs it
through the model ("zephyr_packed" attention: the varlen kernel on CUDA, the exact dense mask elsewhere)
and applies the LM head only where a continuation token is predicted, in chunks. It returns, per
continuation, the sum of log p(token | prefix, earlier tokens) over its tokens and their count, and, when
asked, the log-softmax over the whole vocabulary of the token after it (a judge's next-token distribution).

`score_batch` runs under the caller's grad mode (the DPO step back-propagates through it); `score_groups`
is the inference pass over many groups: longest first, in batches that hold at most `batch_size` groups
and no more tokens than `batch_size` requests of the batch's longest (a prefix with one of its
continuations, as lm-evaluation-harness batches them), without grad, on a model switched to "zephyr_packed"
for the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from zephyr.data.packing import Group, PackedBatch, collate_shared_prefix
from zephyr.scoring.attention import packed_attention
from zephyr.scoring.forward import (
    decoder_hidden_states,
    sequence_logps,
    target_doc_ids,
    token_logps,
    unwrap_model,
    vocabulary_logps,
)


@dataclass
class Scores:
    """Per continuation, in the groups' order (group 0's continuations, then group 1's, ...)."""

    sums: torch.Tensor  # float32 [continuations]: summed log-probs of the continuation's tokens
    counts: torch.Tensor  # long [continuations]: its tokens
    next_logps: torch.Tensor | None = None  # float32 [continuations, vocabulary]: the token after it

    def cpu(self) -> Scores:
        after = None if self.next_logps is None else self.next_logps.cpu()
        return Scores(self.sums.cpu(), self.counts.cpu(), after)


def score_batch(
    model: torch.nn.Module, batch: PackedBatch, *, next_token: bool = False, chunk_size: int = 1024
) -> Scores:
    """One forward of a `collate_shared_prefix` row (on the model's device): each document's scores, and with
    `next_token` the distribution after its last token (the row must feed it: `feed_last`, the default)."""
    hidden = decoder_hidden_states(model, batch)
    logps = token_logps(model, batch, hidden=hidden, chunk_size=chunk_size)
    sums, counts = sequence_logps(logps, target_doc_ids(batch), batch.num_docs)
    after = None
    if next_token:  # document d is segment d: its last token ends the segment
        ends = batch.cu_seqlens[1 : batch.num_docs + 1].to(hidden.device).long() - 1
        after = vocabulary_logps(unwrap_model(model), hidden[0, ends])
    return Scores(sums, counts, after)


def group_tokens(group: Group) -> int:
    """Tokens a group adds to a row that scores it: its prefix and first continuation, then each further
    continuation with the prefix's last token repeated before it, every continuation's last token left out
    (only predicted). Reading what comes after each continuation feeds those too."""
    prefix, continuations = group
    return len(prefix) + sum(len(c) for c in continuations) - 1


def longest_request(group: Group) -> int:
    """Tokens the longest of its continuations would feed alone: prefix + continuation − 1 (the last token
    is only predicted)."""
    prefix, continuations = group
    return len(prefix) + max(len(c) for c in continuations) - 1


def plan_batches(groups: Sequence[Group], batch_size: int) -> list[list[int]]:
    """Group indices in batches, longest group first (memory peaks at once), each at most `batch_size`
    groups and at most `batch_size` × its longest request tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(groups)), key=lambda i: -group_tokens(groups[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = longest = 0
    for i in order:
        size, request = group_tokens(groups[i]), longest_request(groups[i])
        if current and (len(current) + 1 > batch_size or tokens + size > batch_size * max(longest, request)):
            batches.append(current)
            current, tokens, longest = [], 0, 0
        current.append(i)
        tokens += size
        longest = max(longest, request)
    if current:
        batches.append(current)
    return batches


def score_groups(
    model: torch.nn.Module,
    groups: Sequence[Group],
    *,
    batch_size: int,
    next_token: bool = False,
    on_batch: Callable[[list[int]], None] | None = None,
) -> Scores:
    """Every continuation's scores (on the CPU, in the groups' order): a no-grad pass of `model` in eval
    mode over `plan_batches`, its attention "zephyr_packed" meanwhile. `on_batch(indices)` follows progress."""
    causal_lm = unwrap_model(model)
    device = causal_lm.get_input_embeddings().weight.device
    starts = [0]  # each group's first continuation among all of them
    for _, continuations in groups:
        starts.append(starts[-1] + len(continuations))
    sums = torch.zeros(starts[-1])
    counts = torch.zeros(starts[-1], dtype=torch.long)
    after: torch.Tensor | None = None  # [continuations, vocabulary], made at the first batch
    was_training = model.training
    model.eval()
    try:
        with packed_attention(causal_lm), torch.inference_mode():
            for indices in plan_batches(groups, batch_size):
                chosen = [groups[i] for i in indices]
                batch = collate_shared_prefix(chosen, feed_last=next_token).to(device)
                scores = score_batch(model, batch, next_token=next_token).cpu()
                # the batch's continuations, group by group, go back to their places
                places = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in indices])
                sums[places], counts[places] = scores.sums, scores.counts
                if scores.next_logps is not None:
                    if after is None:
                        after = scores.next_logps.new_zeros(starts[-1], scores.next_logps.shape[-1])
                    after[places] = scores.next_logps
                if on_batch is not None:
                    on_batch(indices)
    finally:
        model.train(was_training)
    if next_token and after is None:
        after = torch.zeros(0, 0)  # no group
    return Scores(sums, counts, after)
