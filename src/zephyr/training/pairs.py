"""Preference pairs as token ids: rendered with the chat template, truncated, and (for training and
`zephyr logps`) tokenized once into the cache of `zephyr.training.dataset` and mapped by every process.

A pair is rendered side by side with the chat template: prompt = every message but the last (shared by
chosen and rejected), answer = the last assistant message, each side as `chat.render_prompt_answer`
renders it (answer ids = the answer + the template's end-of-turn token), many pairs to one batch call of the
tokenizer.

Truncation (the recipe's rule, as the DPO trainer Zephyr was trained with): only when prompt + the longer
answer exceed `max_length`, the prompt keeps its last `max_prompt_length` tokens (the end holds the question
being answered and the generation prompt), then each answer keeps its first `max_length − len(prompt)`
tokens. A pair whose answer keeps no token is a bad record.

The cache entry holds every kept pair's prompt, chosen and rejected ids as flat int32 arrays with their
offsets, the pairs' prompt_ids (UTF-8), and per split the indices of its pairs (`train_pairs`,
`eval_pairs`). `PairSet` reads a split from the mapped arrays, one pair at a time.

This module imports no torch: the tokenizing workers import it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

from zephyr import io
from zephyr.core.errors import DataError, ZephyrError
from zephyr.data.chat import answer_after_prompt, encode_texts, end_of_turn, prompt_answer_texts
from zephyr.training import dataset
from zephyr.training.dataset import ArrayWriter, Chunk, Entry

logger = logging.getLogger(__name__)

PARTS = ("prompt", "chosen", "rejected")
Ids = Sequence[int] | npt.NDArray[np.int32]
S = TypeVar("S", list[int], npt.NDArray[np.int32])
Parts = tuple[str, Ids, Ids, Ids]  # (prompt_id, prompt ids, chosen ids, rejected ids) of a pair
# record flags: which parts of a kept pair were cut
CUT_PROMPT, CUT_CHOSEN, CUT_REJECTED = 1, 2, 4


# ---------------------------------------------------------------------------------------------------------
# Pairs into token ids (pure given a tokenizer)


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids: a shared prompt and two answers (each ends at end-of-turn unless
    truncated)."""

    prompt_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """Tokens the pair runs through the model: the prompt once per answer."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class Truncation:
    """Which parts of one pair were cut."""

    prompt: bool = False
    chosen: bool = False
    rejected: bool = False


def truncate_pair(
    prompt_ids: S,
    chosen_ids: S,
    rejected_ids: S,
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[S, S, S, Truncation]:
    """Cut a pair to `max_length` (see the module doc); answers may come back empty when nothing fits.

    Nothing is cut when prompt + the longer answer fit. Otherwise the prompt keeps its END (left-truncated
    to `max_prompt_length`, when it is longer), then the answers keep their START, each up to the room left.
    Lists come back as lists, arrays as arrays (slices).
    """
    prompt, chosen, rejected = prompt_ids, chosen_ids, rejected_ids
    if max_length is None or len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, Truncation()
    cut_prompt = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        cut_prompt, prompt = True, prompt[len(prompt) - max_prompt_length :]  # type: ignore[assignment]
    room = max(max_length - len(prompt), 0)
    return (
        prompt,
        chosen[:room],
        rejected[:room],
        Truncation(prompt=cut_prompt, chosen=len(chosen) > room, rejected=len(rejected) > room),
    )


@dataclass
class PairStats:
    """What tokenizing a set of pairs did: kept, bad (with reasons) and truncated counts."""

    pairs: int = 0  # pairs kept
    bad: list[str] = field(default_factory=list)  # one message per pair left out
    truncated_prompts: int = 0
    truncated_chosen: int = 0
    truncated_rejected: int = 0

    def add(self, other: PairStats) -> None:
        self.pairs += other.pairs
        self.bad += other.bad
        self.truncated_prompts += other.truncated_prompts
        self.truncated_chosen += other.truncated_chosen
        self.truncated_rejected += other.truncated_rejected

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs ({len(self.bad)} left out; truncated: {self.truncated_prompts} prompts, "
            f"{self.truncated_chosen} chosen, {self.truncated_rejected} rejected answers)"
        )


def split_pair(record: Mapping[str, Any]) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a pairs record that passed `schema.validate_pair`."""
    return (
        [dict(m) for m in record["chosen"][:-1]],
        record["chosen"][-1]["content"],
        record["rejected"][-1]["content"],
    )


def tokenize_pair(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[TokenizedPair, Truncation]:
    """Render and truncate one pair; raises DataError (or chat.TemplateError) when it cannot be trained on.
    (`pair_texts`, `encode_texts` and `finish_pair`: the workers run the same steps on a chunk at once.)"""
    eot = end_of_turn(tokenizer)
    ids = encode_texts(tokenizer, pair_texts(tokenizer, record, eot[0]))
    (prompt_ids, chosen_ids, rejected_ids), cut = finish_pair(
        tokenizer, record, ids, eot, max_length, max_prompt_length
    )
    pair = TokenizedPair(
        str(record["prompt_id"]),
        tuple(prompt_ids.tolist()),
        tuple(chosen_ids.tolist()),
        tuple(rejected_ids.tolist()),
    )
    return pair, cut


def pair_texts(tokenizer: Any, record: Mapping[str, Any], eot: str) -> list[str]:
    """The three texts a pair is tokenized from: the prompt with the generation prompt, then prompt +
    chosen and prompt + rejected up to their end-of-turn tokens (one prompt rendering for both)."""
    prompt, chosen, rejected = split_pair(record)
    prompt_text, answers = prompt_answer_texts(tokenizer, prompt, [chosen, rejected], eot)
    return [prompt_text, *answers]


def finish_pair(
    tokenizer: Any,
    record: Mapping[str, Any],
    ids: Sequence[npt.NDArray[np.int32]],
    eot: tuple[str, int],
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[tuple[npt.NDArray[np.int32], ...], Truncation]:
    """(prompt, chosen, rejected) ids of a pair from the ids of its `pair_texts`, truncated; DataError or
    TemplateError when it cannot be trained on."""
    prompt, chosen, rejected = split_pair(record)
    prompt_ids, *answers = ids
    chosen_ids, rejected_ids = (
        answer_after_prompt(
            tokenizer, prompt_ids, all_ids, *eot, [*prompt, {"role": "assistant", "content": a}]
        )
        for all_ids, a in zip(answers, (chosen, rejected), strict=True)
    )
    prompt_ids, chosen_ids, rejected_ids, cut = truncate_pair(
        prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length
    )
    if not len(chosen_ids) or not len(rejected_ids):
        raise DataError(
            f"prompt: {len(prompt_ids)} tokens after truncation leave no room for the answer within "
            f"max_length {max_length}"
        )
    return (prompt_ids, chosen_ids, rejected_ids), cut


def tokenize_pairs(
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_record: str = "error",
    source: str = "<pairs>",
) -> tuple[list[TokenizedPair], PairStats]:
    """Tokenize valid pairs records (from `io.read_records(..., "pairs")`) in order.

    A pair that cannot be trained on (no room for its answer, a template that cannot render it) raises
    DataError naming the source and prompt_id under `on_bad_record="error"`, and is counted in
    `stats.bad` and left out under "skip".
    """
    pairs: list[TokenizedPair] = []
    stats = PairStats()
    for record in records:
        try:
            pair, cut = tokenize_pair(tokenizer, record, max_length, max_prompt_length)
        except ZephyrError as exc:
            message = f"{source}: prompt_id {record.get('prompt_id')!r}: {exc}"
            if on_bad_record == "error":
                raise DataError(message) from exc
            stats.bad.append(message)
            continue
        pairs.append(pair)
        stats.truncated_prompts += cut.prompt
        stats.truncated_chosen += cut.chosen
        stats.truncated_rejected += cut.rejected
    stats.pairs = len(pairs)
    if stats.bad:
        logger.warning(
            "%s: left out %d pairs that cannot be trained on; first: %s", source, len(stats.bad), stats.bad[0]
        )
    return pairs, stats


# ---------------------------------------------------------------------------------------------------------
# Tokenizing, in worker processes

_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer: Any, max_length: int | None, max_prompt_length: int | None) -> None:
    _WORKER.update(
        tokenizer=tokenizer,
        eot=end_of_turn(tokenizer),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


def tokenize_pair_records(records: list[dict[str, Any]]) -> Chunk:
    """A chunk of valid pairs records into token ids (`_start_worker` set the tokenizer and lengths): every
    pair's texts rendered, all of them tokenized in one batch call, then each pair checked and truncated."""
    tokenizer, eot = _WORKER["tokenizer"], _WORKER["eot"]
    n = len(records)
    kept, flags = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.uint8)
    values: dict[str, list[npt.NDArray[np.int32]]] = {part: [] for part in PARTS}
    problems: list[tuple[int, str]] = []
    texts, rendered = [], []
    for i, record in enumerate(records):
        try:
            texts += pair_texts(tokenizer, record, eot[0])
            rendered.append(i)
        except ZephyrError as exc:  # a pair that cannot be trained on: the bad-record policy decides
            problems.append((i, str(exc)))
    ids = encode_texts(tokenizer, texts)
    for k, i in enumerate(rendered):
        try:
            parts, cut = finish_pair(
                tokenizer,
                records[i],
                ids[3 * k : 3 * k + 3],
                eot,
                _WORKER["max_length"],
                _WORKER["max_prompt_length"],
            )
        except ZephyrError as exc:
            problems.append((i, str(exc)))
            continue
        kept[i] = True
        flags[i] = CUT_PROMPT * cut.prompt + CUT_CHOSEN * cut.chosen + CUT_REJECTED * cut.rejected
        for part, part_ids in zip(PARTS, parts, strict=True):
            values[part].append(part_ids)
    problems.sort()
    return Chunk(
        values={part: _flat(v) for part, v in values.items()},
        lengths={part: np.array([len(ids) for ids in v], dtype=np.int64) for part, v in values.items()},
        kept=kept,
        flags=flags,
        problems=problems,
    )


def _flat(items: list[npt.NDArray[np.int32]]) -> npt.NDArray[np.int32]:
    return np.concatenate(items).astype(np.int32, copy=False) if items else np.zeros(0, np.int32)


def _build(
    folder: Path,
    paths: Sequence[str],
    tokenizer: Any,
    options: PairOptions,
    workers: int | None,
    chunk_records: int,
) -> dict[str, Any]:
    writer = ArrayWriter(folder)
    sources = [
        dataset.read_source(
            path,
            "pairs",
            writer,
            on_bad_record=options.on_bad_record,
            limit=options.limit,
            row=dict,
            work=tokenize_pair_records,
            initializer=_start_worker,
            tokenizer=tokenizer,
            initargs=(options.max_length, options.max_prompt_length),
            dtypes={part: np.int32 for part in PARTS},
            workers=workers,
            chunk_records=chunk_records,
        )
        for path in paths
    ]
    records = dataset.concatenated(sources)
    for part in PARTS:
        writer.write(f"{part}_offsets", dataset.offsets(records.lengths[part]), np.int64)
    keys = [str(k) for s in sources for k in s.keys]
    ids = [keys[i].encode() for i in np.flatnonzero(records.kept)]
    writer.write("prompt_id", np.frombuffer(b"".join(ids), dtype=np.uint8), np.uint8)
    writer.write("prompt_id_offsets", dataset.offsets([len(b) for b in ids]), np.int64)
    split = dataset.split_of_records([s.keys for s in sources], options.eval_fraction, options.seed)
    pair_of_record = np.cumsum(records.kept) - 1  # pairs are the kept records, in order
    stats: dict[str, Any] = {"tokens": int(sum(records.lengths[part].sum() for part in PARTS))}
    for s, name in enumerate(("train", "eval")):
        here = records.kept & (split == s)
        writer.write(f"{name}_pairs", pair_of_record[here], np.int64)
        cut = records.flags[here]
        stats[name] = {
            "pairs": int(here.sum()),
            "truncated_prompts": int((cut & CUT_PROMPT > 0).sum()),
            "truncated_chosen": int((cut & CUT_CHOSEN > 0).sum()),
            "truncated_rejected": int((cut & CUT_REJECTED > 0).sum()),
        }
    stats["bad"] = [message for s in sources for message in s.bad]
    if stats["bad"]:
        logger.warning(
            "%s: left out %d pairs; first: %s", ", ".join(paths), len(stats["bad"]), stats["bad"][0]
        )
    return {"arrays": writer.close(), "stats": stats}


@dataclass(frozen=True)
class PairOptions:
    """What shapes a set of tokenized pairs besides the data and the tokenizer."""

    max_length: int | None
    max_prompt_length: int | None
    on_bad_record: io.BadRecordPolicy = "error"
    limit: int | None = None  # valid records read per source
    eval_fraction: float = 0.0  # of the train source held out by prompt_id (without an eval source)
    seed: int = 0


class PairSet(Sequence[TokenizedPair]):
    """The pairs of one split, read from a mapped cache entry: `pairs[i]` is a `TokenizedPair`."""

    def __init__(self, entry: Entry, split: str):
        self._index = entry.array(f"{split}_pairs")
        self._parts = [(entry.array(part), entry.array(f"{part}_offsets")) for part in PARTS]
        self._ids, self._id_offsets = entry.array("prompt_id"), entry.array("prompt_id_offsets")

    def __len__(self) -> int:
        return len(self._index)

    def _arrays(
        self, i: int
    ) -> tuple[str, npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        k = int(self._index[i])
        a, b = int(self._id_offsets[k]), int(self._id_offsets[k + 1])
        prompt, chosen, rejected = (values[offsets[k] : offsets[k + 1]] for values, offsets in self._parts)
        return bytes(self._ids[a:b]).decode(), prompt, chosen, rejected

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedPair]: ...
    def __getitem__(self, i: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        prompt_id, *parts = self._arrays(i % len(self))
        prompt, chosen, rejected = (tuple(ids.tolist()) for ids in parts)
        return TokenizedPair(prompt_id, prompt, chosen, rejected)

    def token_parts(self) -> Iterator[Parts]:
        """(prompt_id, prompt ids, chosen ids, rejected ids) of every pair, as array views."""
        for i in range(len(self)):
            yield self._arrays(i)

    @property
    def prompt_ids(self) -> list[str]:
        return [self._arrays(i)[0] for i in range(len(self))]


def token_parts(pairs: Sequence[TokenizedPair]) -> Iterator[Parts]:
    """(prompt_id, prompt ids, chosen ids, rejected ids) of every pair: from a `PairSet`'s arrays without
    making its `TokenizedPair`s."""
    if isinstance(pairs, PairSet):
        yield from pairs.token_parts()
        return
    for pair in pairs:
        yield pair.prompt_id, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids


@dataclass
class PairData:
    """Tokenized pairs of a run: the cache entry, the train and eval splits, what tokenizing did."""

    entry: Entry
    train: PairSet
    eval: PairSet
    stats: PairStats


def pairs_key(paths: Sequence[str], tokenizer: Any, options: PairOptions, cache_dir: Path) -> dict[str, Any]:
    """Everything the entry's arrays depend on (the module doc of `zephyr.training.dataset`)."""
    memo = cache_dir / dataset.SOURCES_MEMO
    held_out = options.eval_fraction > 0 and len(paths) == 1
    return {
        "kind": "pairs",
        "sources": [[path, io.source_fingerprint(path, memo)] for path in paths],
        "eval_fraction": options.eval_fraction if held_out else 0.0,
        "seed": options.seed if held_out else None,
        "limit": options.limit,
        "on_bad_record": options.on_bad_record,
        "tokenizer": dataset.tokenizer_fingerprint(tokenizer),
        "max_length": options.max_length,
        "max_prompt_length": options.max_prompt_length,
        "code": dataset.code_fingerprint(["zephyr.io", "zephyr.data.schema", "zephyr.data.chat", __name__]),
    }


def load_pairs(
    tokenizer: Any,
    train_data: str,
    eval_data: str | None = None,
    *,
    options: PairOptions,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    chunk_records: int = dataset.CHUNK_RECORDS,
) -> PairData:
    """The tokenized pairs of `train_data` (and of `eval_data`, or the share of `train_data` that
    `options.eval_fraction` holds out), from the cache, built first if it is not there."""
    folder = Path(cache_dir) if cache_dir is not None else dataset.default_cache_dir()
    paths = [train_data, *([eval_data] if eval_data else [])]
    entry = dataset.load_or_build(
        "pairs",
        pairs_key(paths, tokenizer, options, folder),
        lambda tmp: _build(tmp, paths, tokenizer, options, workers, chunk_records),
        cache_dir=folder,
    )
    stats = PairStats(bad=list(entry.stats["bad"]))
    for split in ("train", "eval"):
        counts = entry.stats[split]
        stats.add(PairStats(**counts))
    return PairData(entry, PairSet(entry, "train"), PairSet(entry, "eval"), stats)


def read_pairs(
    tokenizer: Any,
    path: str,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_record: io.BadRecordPolicy,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[PairSet, PairStats]:
    """Read, validate and tokenize a pairs file (through the cache); record-level problems (schema) and
    pair-level ones (truncation, template) share the `on_bad_record` policy and the `stats.bad` count."""
    options = PairOptions(max_length, max_prompt_length, on_bad_record, limit)
    data = load_pairs(tokenizer, path, options=options, cache_dir=cache_dir)
    return data.train, data.stats
