"""Packing of whole documents into fixed-capacity rows, and collation into model inputs.

Label convention (used by every collator here and by `zephyr.scoring.forward`): position t of a row
carries the target of the prediction made there, `labels[t] = input_ids[t + 1]` when token t + 1 belongs to
the same document and its loss mask is set, else −100. So the log-prob of `labels[t]` is read from the
logits at t directly, with no shift later; the last token of a document never predicts the first token of
the next one, and a document's first token is never a target (nothing before it predicts it).

Shared prefixes (`collate_shared_prefix`): several answers to one prefix (a DPO pair's chosen and rejected
answers to its prompt) run the prefix once. The first answer forms an ordinary causal segment
[prefix; answer₀]; every further answer j forms a segment [prefix[-1]; answerⱼ] (positions continuing from
the prefix) whose keys are [prefix; answerⱼ]: the prefix's keys and values but its last are gathered from the
first segment, in every layer, by the index `kv_index`. The prefix's last token is repeated so that the
prediction of answerⱼ's first token sits in answerⱼ's own segment and the label convention stays as above;
its keys and values are the first segment's to the last bit of the computation (same token, position and
context).

Batches are typed: a `PackedBatch` (one row; `shared` keys when prefixes are shared) or a `PaddedBatch` (one
document per row), each moved between devices whole by `.to(device)` (as accelerate moves what a data
loader yields).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

IGNORE_INDEX = -100

# (input_ids, loss_mask), equal lengths: lists, or numpy arrays (views of a memory-mapped token file)
Document = tuple[Sequence[int] | npt.NDArray[Any], Sequence[int] | npt.NDArray[Any]]
Index = npt.NDArray[np.int64]


def pack_bfd(lengths: Sequence[int] | npt.NDArray[Any], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing as lists: bin b lists its document indices (`pack_bfd_arrays`)."""
    order, bounds = pack_bfd_arrays(lengths, max_length)
    return [order[a:b].tolist() for a, b in itertools.pairwise(bounds.tolist())]


def pack_bfd_arrays(lengths: Sequence[int] | npt.NDArray[Any], max_length: int) -> tuple[Index, Index]:
    """Best-fit-decreasing over lengths held in an array: document indices grouped into bins whose lengths
    sum to at most `max_length`, as (documents in bin order, bin boundaries): bin b holds
    `order[bounds[b]:bounds[b + 1]]`.

    Documents are placed longest first (equal lengths: lower index first), each into the open bin with the
    least room that still fits it (equal room: the bin opened first), else into a new bin. Bins come out
    in opening order, each listing its documents in placement order. A document longer than `max_length`
    raises ValueError: the caller truncates or drops it first.

    Cost O(n log n + n·C) with C ≤ max_length distinct room values, not O(n · bins); no Python object per
    document survives the call.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((sizes < 1) | (sizes > max_length))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"document {i} has {sizes[i]} tokens; packing needs 1..{max_length} (truncate or drop it first)"
        )
    placement = np.argsort(-sizes, kind="stable")  # longest first, ties by index
    bin_of = np.empty(len(sizes), dtype=np.int64)  # bin of each document, in placement order
    opened = 0
    rooms: list[int] = []  # sorted distinct room values that some open bin has (room > 0)
    bins_by_room: dict[int, list[int]] = {}  # room -> min-heap of bin indices with exactly that room
    for k_doc, n in enumerate(sizes[placement].tolist()):
        k = bisect_left(rooms, n)
        if k == len(rooms):
            b, room = opened, max_length
            opened += 1
        else:
            room = rooms[k]
            heap = bins_by_room[room]
            b = heapq.heappop(heap)
            if not heap:
                del rooms[k], bins_by_room[room]
        bin_of[k_doc] = b
        room -= n
        if room > 0:
            if room in bins_by_room:
                heapq.heappush(bins_by_room[room], b)
            else:
                insort(rooms, room)
                bins_by_room[room] = [b]
    order = placement[np.argsort(bin_of, kind="stable")]  # grouped by bin, placement order inside
    bounds = np.zeros(opened + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=opened), out=bounds[1:])
    return order, bounds


_Moved = TypeVar("_Moved", bound="Movable")


class Movable:
    """A dataclass of tensors (and of such dataclasses) that moves to a device whole."""

    def to(self: _Moved, device: torch.device | str, non_blocking: bool = False) -> _Moved:
        moved: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor | Movable):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]


@dataclass(frozen=True)
class SharedKeys(Movable):
    """Where each segment of a shared-prefix row finds its keys (module docstring)."""

    cu_seqlens_k: torch.Tensor  # int32 [segments + 1]: the segments' keys within `kv_index`
    max_seqlen_k: int
    kv_index: torch.Tensor  # long [keys]: row position of each key, segment by segment


@dataclass(frozen=True)
class PackedBatch(Movable):
    """One row holding several documents; tensors are [1, T] unless noted."""

    input_ids: torch.Tensor  # long
    position_ids: torch.Tensor  # long, restarting at 0 for each document (continuing a shared prefix)
    labels: torch.Tensor  # long, next-token targets or −100 (module docstring)
    doc_ids: torch.Tensor  # long, index of each token's document, −1 on padding
    cu_seqlens: torch.Tensor  # int32 [segments + 1]: segment boundaries (documents, then padding if any)
    max_seqlen: int  # longest segment
    num_docs: int
    shared: SharedKeys | None = None  # shared prefixes: segment d is document d, its keys gathered


@dataclass(frozen=True)
class PaddedBatch(Movable):
    """One document per row, right-padded; tensors are [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 on tokens, 0 on padding
    position_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor  # row index on tokens, −1 on padding
    num_docs: int


def next_token_labels(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Targets of one document under the module's label convention."""
    labels: list[int] = _labels(np.asarray(input_ids, dtype=np.int64), np.asarray(loss_mask)).tolist()
    return labels


def _labels(input_ids: npt.NDArray[np.int64], loss_mask: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"{len(input_ids)} input ids but {len(loss_mask)} loss-mask values")
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(loss_mask[1:].astype(bool), input_ids[1:], IGNORE_INDEX)
    return labels


def _check_documents(docs: Sequence[Document]) -> None:
    if not docs:
        raise ValueError("no documents to collate")
    for d, (input_ids, loss_mask) in enumerate(docs):
        if len(input_ids) == 0:
            raise ValueError(f"document {d} is empty")
        if len(input_ids) != len(loss_mask):
            raise ValueError(
                f"document {d}: {len(input_ids)} input ids but {len(loss_mask)} loss-mask values"
            )


def _row(values: list[int] | npt.NDArray[np.int64]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).reshape(1, -1)


def collate_packed(docs: Sequence[Document], pad_to: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Concatenate documents into one row with per-document positions and boundary-safe labels.

    `pad_to` right-pads the row to a fixed length (static shapes); the padding forms one extra segment in
    `cu_seqlens`, with its own positions and no targets, so attention kernels see a well-formed sequence
    and no document attends to it.
    """
    _check_documents(docs)
    arrays = [(np.asarray(ids, dtype=np.int64), np.asarray(mask)) for ids, mask in docs]
    segments = [len(ids) for ids, _ in arrays]
    ids = np.concatenate([ids for ids, _ in arrays])
    labels = np.concatenate([_labels(ids, mask) for ids, mask in arrays])
    doc_ids = np.repeat(np.arange(len(arrays), dtype=np.int64), segments)
    if pad_to is not None:
        pad = pad_to - len(ids)
        if pad < 0:
            raise ValueError(f"documents hold {len(ids)} tokens, more than pad_to={pad_to}")
        if pad:
            ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
            doc_ids = np.concatenate([doc_ids, np.full(pad, -1, dtype=np.int64)])
            segments.append(pad)
    bounds = np.concatenate([[0], np.cumsum(segments)])
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(bounds[:-1], segments)
    return PackedBatch(
        input_ids=_row(ids),
        position_ids=_row(positions),
        labels=_row(labels),
        doc_ids=_row(doc_ids),
        cu_seqlens=torch.tensor(bounds.tolist(), dtype=torch.int32),
        max_seqlen=max(segments),
        num_docs=len(docs),
    )


def collate_padded(docs: Sequence[Document], pad_to: int | None = None, pad_id: int = 0) -> PaddedBatch:
    """One document per row, right-padded to the longest document (or to `pad_to`)."""
    _check_documents(docs)
    width = max(len(ids) for ids, _ in docs)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"a document holds {width} tokens, more than pad_to={pad_to}")
        width = pad_to
    batch = PaddedBatch(
        input_ids=torch.full((len(docs), width), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(len(docs), width, dtype=torch.long),
        position_ids=torch.arange(width).repeat(len(docs), 1),
        labels=torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long),
        doc_ids=torch.full((len(docs), width), -1, dtype=torch.long),
        num_docs=len(docs),
    )
    for d, (input_ids, loss_mask) in enumerate(docs):
        n = len(input_ids)
        ids = np.asarray(input_ids, dtype=np.int64)
        batch.input_ids[d, :n] = torch.from_numpy(ids)
        batch.attention_mask[d, :n] = 1
        batch.labels[d, :n] = torch.from_numpy(_labels(ids, np.asarray(loss_mask)))
        batch.doc_ids[d, :n] = d
    return batch


Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (prefix ids, [continuation ids, ...])


def collate_shared_prefix(groups: Sequence[Group], *, feed_last: bool = True) -> PackedBatch:
    """Groups (prefix ids, [answer ids, ...]) into one row that runs each prefix once (module docstring).

    Documents are the answers in order (group 0's answers, then group 1's, ...); every answer token is a
    target, no prefix token is. A document's log-probs equal those of [prefix; answer] run alone. Without
    a group of several answers nothing is shared: the row is `collate_packed`'s of the [prefix; answer]
    documents, and has no `shared` keys.

    `feed_last=False` leaves each answer's last token out of the row (a token nothing after it reads: it is
    only predicted, by the token before it, whose label it stays); True feeds it, so that the row's last
    position of each document holds what comes after the answer.
    """
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    doc_ids: list[int] = []
    kv_index: list[int] = []
    bounds_q, bounds_k = [0], [0]
    doc = 0
    for g, (prefix, answers) in enumerate(groups):
        if not prefix:
            raise ValueError(f"group {g} has an empty prefix (a first answer token needs a token before it)")
        if not answers or any(not a for a in answers):
            raise ValueError(f"group {g} has no answer or an empty one")
        p = len(prefix)
        first = len(ids)  # row position of the group's first segment, [prefix; answer 0]
        for j, answer in enumerate(answers):
            start = len(ids)
            if j == 0:
                segment, mask, offset = [*prefix, *answer], [0] * p + [1] * len(answer), 0
            else:
                segment, mask, offset = [prefix[-1], *answer], [0] + [1] * len(answer), p - 1
            targets = next_token_labels(segment, mask)
            if not feed_last:  # (its own label is −100: nothing follows it)
                segment, targets = segment[:-1], targets[:-1]
            if j > 0:
                kv_index.extend(range(first, first + p - 1))  # the prefix but its last, from segment 0
            kv_index.extend(range(start, start + len(segment)))
            ids.extend(segment)
            positions.extend(range(offset, offset + len(segment)))
            labels.extend(targets)
            doc_ids.extend([doc] * len(segment))
            bounds_q.append(bounds_q[-1] + len(segment))
            bounds_k.append(bounds_k[-1] + offset + len(segment))
            doc += 1
    if not ids:
        raise ValueError("no groups to collate")
    shared = None
    if doc > len(groups):  # some group runs its prefix for several answers
        shared = SharedKeys(
            cu_seqlens_k=torch.tensor(bounds_k, dtype=torch.int32),
            max_seqlen_k=max(b - a for a, b in itertools.pairwise(bounds_k)),
            kv_index=torch.tensor(kv_index, dtype=torch.long),
        )
    return PackedBatch(
        input_ids=_row(ids),
        position_ids=_row(positions),
        labels=_row(labels),
        doc_ids=_row(doc_ids),
        cu_seqlens=torch.tensor(bounds_q, dtype=torch.int32),
        max_seqlen=max(b - a for a, b in itertools.pairwise(bounds_q)),
        num_docs=doc,
        shared=shared,
    )
