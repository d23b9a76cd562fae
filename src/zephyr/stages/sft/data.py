"""The dSFT data: conversations rendered once into documents, cut to `max_length`, packed into bins, all of
it tokenized once into the cache of `zephyr.training.dataset` and mapped read-only by every process.

A document is a rendered conversation's token ids and its loss mask: the assistant's answers and end-of-turn
tokens (`loss_on: assistant`), or every token (`loss_on: all`). A conversation longer than `max_length` is
cut to its first `max_length` tokens; one left without a trained token is dropped; a record the template
cannot render follows the bad-record policy. Each is counted.

The cache entry holds the documents of the train and eval splits as flat arrays (`input_ids` int32,
`loss_mask` uint8, `doc_offsets`), and per split its examples: with packing, bins of whole documents
(best-fit-decreasing, the plan computed once), else single documents (`SPLIT_docs` in example order,
`SPLIT_bounds` where each example starts).

This module imports no torch: the tokenizing workers import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from zephyr import io
from zephyr.core.config import SFTConfig
from zephyr.core.errors import ZephyrError
from zephyr.data.chat import (
    assistant_spans,
    conversation_text,
    encode_conversations,
    encode_texts,
    end_of_turn,
)
from zephyr.training import dataset
from zephyr.training.dataset import ArrayWriter, Chunk, Entry

TRUNCATED, DROPPED = 1, 2  # record flags: cut to max_length; no trained token left (not kept)
SPLITS = ("train", "eval")
BAD_EXAMPLES = 20  # bad records named in the cache's statistics (all are counted)

Doc = tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]


@dataclass
class DocumentStats:
    conversations: int = 0  # valid conversations rendered
    truncated: int = 0  # longer than max_length, cut to their first max_length tokens
    dropped: int = 0  # no trained token (left after truncation)


# ---------------------------------------------------------------------------------------------------------
# Documents (pure)


def trained_mask(assistant_mask: Sequence[int] | npt.NDArray[Any], loss_on: str) -> npt.NDArray[np.uint8]:
    """The loss mask of a rendered conversation: its assistant mask, or every token for `loss_on: all`."""
    if loss_on == "all":
        return np.ones(len(assistant_mask), dtype=np.uint8)
    return np.asarray(assistant_mask, dtype=np.uint8)


def fit_document(
    input_ids: Sequence[int] | npt.NDArray[Any], loss_mask: Sequence[int] | npt.NDArray[Any], max_length: int
) -> Doc | None:
    """A rendered conversation cut to `max_length` tokens (its start kept); None if nothing is trained.

    A token is trained when it is a prediction target: its mask is set and a token precedes it.
    """
    ids = np.asarray(input_ids, dtype=np.int32)[:max_length]
    mask = np.asarray(loss_mask, dtype=np.uint8)[:max_length]
    if not mask[1:].any():
        return None
    return ids, mask


def fit_documents(
    rendered: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int
) -> tuple[list[Doc], DocumentStats]:
    """Fit every rendered conversation; returns the documents kept and the counts."""
    stats = DocumentStats(conversations=len(rendered))
    docs: list[Doc] = []
    for input_ids, loss_mask in rendered:
        if len(input_ids) > max_length:
            stats.truncated += 1
        doc = fit_document(input_ids, loss_mask, max_length)
        if doc is None:
            stats.dropped += 1
        else:
            docs.append(doc)
    return docs, stats


def pack_documents(docs: Sequence[Doc], max_length: int) -> list[list[Doc]]:
    """Bins of whole documents, each at most `max_length` tokens (best-fit-decreasing), as lists."""
    from zephyr.data.packing import pack_bfd  # (imports torch: the workers do not pack)

    return [[docs[i] for i in group] for group in pack_bfd([len(ids) for ids, _ in docs], max_length)]


def packing_efficiency(tokens: int, bins: int, max_length: int) -> float:
    """Share of the bins' capacity holding tokens."""
    return tokens / (bins * max_length) if bins else 0.0


# ---------------------------------------------------------------------------------------------------------
# Tokenizing, in worker processes

_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer: Any, max_length: int, loss_on: str) -> None:
    _WORKER.update(tokenizer=tokenizer, eot=end_of_turn(tokenizer)[0], max_length=max_length, loss_on=loss_on)


def tokenize_conversations(conversations: list[list[dict[str, Any]]]) -> Chunk:
    """A chunk of conversations (message lists) into documents (`_start_worker` set the options).

    `loss_on: all` needs no assistant spans: each conversation is rendered once and tokenized without
    character offsets (the ids `render_conversation` gives, every mask bit set)."""
    tokenizer, eot, every_token = _WORKER["tokenizer"], _WORKER["eot"], _WORKER["loss_on"] == "all"
    n = len(conversations)
    rendered: list[Any] = []
    rendered_at, problems = [], []
    for i, messages in enumerate(conversations):
        try:
            if every_token:
                rendered.append(conversation_text(tokenizer, messages, eot))
            else:
                rendered.append(assistant_spans(tokenizer, messages, eot))
            rendered_at.append(i)
        except ZephyrError as exc:  # a record the template cannot render: the bad-record policy decides
            problems.append((i, str(exc)))
    encoded: list[tuple[npt.NDArray[np.int32], npt.NDArray[Any]]]
    if every_token:
        encoded = [(ids, ids) for ids in encode_texts(tokenizer, rendered)]  # (the mask: all set, below)
    else:
        encoded = encode_conversations(tokenizer, rendered)
    kept, flags = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.uint8)
    ids_parts, mask_parts, lengths = [], [], []
    for i, (ids, assistant) in zip(rendered_at, encoded, strict=True):
        if len(ids) > _WORKER["max_length"]:
            flags[i] |= TRUNCATED
        doc = fit_document(ids, trained_mask(assistant, _WORKER["loss_on"]), _WORKER["max_length"])
        if doc is None:
            flags[i] |= DROPPED
            continue
        kept[i] = True
        ids_parts.append(doc[0])
        mask_parts.append(doc[1])
        lengths.append(len(doc[0]))
    sizes = np.asarray(lengths, dtype=np.int64)
    return Chunk(
        values={
            "input_ids": np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
            "loss_mask": np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8),
        },
        lengths={"input_ids": sizes, "loss_mask": sizes},
        kept=kept,
        flags=flags,
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------------------
# The cache entry


def _build(
    folder: Path, cfg: SFTConfig, tokenizer: Any, workers: int | None, chunk_records: int
) -> dict[str, Any]:
    writer = ArrayWriter(folder)
    paths = [cfg.train_data, *([cfg.eval_data] if cfg.eval_data else [])]
    sources = [
        dataset.read_source(
            path,
            "conversations",
            writer,
            on_bad_record=cfg.on_bad_record,
            limit=cfg.max_samples,
            row=lambda record: record["messages"],
            work=tokenize_conversations,
            initializer=_start_worker,
            tokenizer=tokenizer,
            initargs=(cfg.max_length, cfg.loss_on),
            dtypes={"input_ids": np.int32, "loss_mask": np.uint8},
            workers=workers,
            chunk_records=chunk_records,
        )
        for path in paths
    ]
    records = dataset.concatenated(sources)
    kept, flags = records.kept, records.flags
    usable = np.ones(len(kept), dtype=bool)
    usable[list(records.problems)] = False
    lengths = records.lengths["input_ids"]
    writer.write("doc_offsets", dataset.offsets(lengths), np.int64)
    split = dataset.split_of_records([s.keys for s in sources], cfg.eval_fraction, cfg.seed)
    doc_of_record = np.cumsum(kept) - 1  # documents are the kept records, in order
    stats: dict[str, Any] = {"tokens": int(lengths.sum()), "documents": len(lengths)}
    for s, name in enumerate(SPLITS):
        here = usable & (split == s)
        docs = doc_of_record[here & kept]
        if cfg.packing:
            order, bounds = _pack(lengths[docs], cfg.max_length)
            docs = docs[order]
        else:
            bounds = np.arange(len(docs) + 1, dtype=np.int64)
        writer.write(f"{name}_docs", docs, np.int64)
        writer.write(f"{name}_bounds", bounds, np.int64)
        stats[name] = {
            "conversations": int(here.sum()),
            "truncated": int((here & (flags & TRUNCATED > 0)).sum()),
            "dropped": int((here & (flags & DROPPED > 0)).sum()),
            "examples": len(bounds) - 1,
            "tokens": int(lengths[docs].sum()),
        }
    bad = [message for s in sources for message in s.bad]
    stats.update(bad_records=len(bad), bad_examples=bad[:BAD_EXAMPLES])
    return {"arrays": writer.close(), "stats": stats}


def _pack(
    lengths: npt.NDArray[np.int64], max_length: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    from zephyr.data.packing import pack_bfd_arrays  # (imports torch: the build needs it, the workers not)

    return pack_bfd_arrays(lengths, max_length)


def data_key(cfg: SFTConfig, tokenizer: Any, cache_dir: Path) -> dict[str, Any]:
    """Everything the entry's arrays depend on (the module doc of `zephyr.training.dataset`)."""
    memo = cache_dir / dataset.SOURCES_MEMO
    held_out = cfg.eval_fraction > 0 and not cfg.eval_data
    return {
        "kind": "conversations",
        "train_data": [cfg.train_data, io.source_fingerprint(cfg.train_data, memo)],
        "eval_data": [cfg.eval_data, io.source_fingerprint(cfg.eval_data, memo)] if cfg.eval_data else None,
        "eval_fraction": cfg.eval_fraction if held_out else 0.0,
        "seed": cfg.seed if held_out else None,
        "max_samples": cfg.max_samples,
        "on_bad_record": cfg.on_bad_record,
        "tokenizer": dataset.tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "loss_on": cfg.loss_on,
        "code": dataset.code_fingerprint(
            ["zephyr.io", "zephyr.data.schema", "zephyr.data.chat", "zephyr.data.packing", __name__]
        ),
    }


def load_sft_data(
    cfg: SFTConfig,
    tokenizer: Any,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    chunk_records: int = dataset.CHUNK_RECORDS,
) -> Entry:
    """The tokenized train and eval data of `cfg`, from the cache (built first if it is not there)."""
    folder = Path(cache_dir) if cache_dir is not None else dataset.default_cache_dir()
    return dataset.load_or_build(
        "sft",
        data_key(cfg, tokenizer, folder),
        lambda tmp: _build(tmp, cfg, tokenizer, workers, chunk_records),
        cache_dir=folder,
    )


# ---------------------------------------------------------------------------------------------------------
# Examples, read from the mapped arrays


class Examples(Sequence[Any]):
    """The training (or eval) examples of a split: bins of documents (packing) or single documents, each
    document a pair of array views (ids, loss mask) into the mapped entry. Nothing is read until used."""

    def __init__(self, entry: Entry, split: str, packed: bool):
        self.packed = packed
        self._ids = entry.array("input_ids")
        self._mask = entry.array("loss_mask")
        self._offsets = entry.array("doc_offsets")
        self._docs = entry.array(f"{split}_docs")
        self._bounds = entry.array(f"{split}_bounds")

    def __len__(self) -> int:
        return max(len(self._bounds) - 1, 0)

    def document(self, d: int) -> Doc:
        a, b = int(self._offsets[d]), int(self._offsets[d + 1])
        return self._ids[a:b], self._mask[a:b]

    def group(self, i: int) -> list[Doc]:
        """The documents of example i."""
        return [self.document(int(d)) for d in self._docs[self._bounds[i] : self._bounds[i + 1]]]

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        group = self.group(i % len(self))
        return group if self.packed else group[0]
