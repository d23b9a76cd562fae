"""Per-pair sequence log-probs of a model on preference pairs: the pass behind the precomputed DPO
reference and `zephyr logps`, and the batches the DPO step runs.

A pair is rendered side by side with the chat template: prompt = every message but the last (shared by
chosen and rejected), answer = the last assistant message, each side through `chat.render_prompt_answer`
(answer ids = the answer + the template's end-of-turn token). A pair's log-prob of an answer is the sum of
log p(token) over its answer tokens, and its token count is the number of those tokens.

Truncation (the recipe's rule, as the DPO trainer Zephyr was trained with): only when prompt + the longer
answer exceed `max_length`, the prompt keeps its last `max_prompt_length` tokens (the end holds the question
being answered and the generation prompt), then each answer keeps its first `max_length − len(prompt)`
tokens. A pair whose answer keeps no token is a bad record.

Batches: a pair is scored by `zephyr.scoring.continuations` as its prompt with two continuations. The
micro-batch's pairs become one packed row of documents [prompt; chosen], [prompt; rejected], ... (groups of
one continuation each) with targets on answer tokens only, positions restarting per document and attention
that never crosses a document ("zephyr_packed"): no padding. With prefix sharing the prompt runs once per
pair (one group of two continuations): the row holds [prompt; chosen] and [last prompt token; rejected], the
rejected side's queries attending to the prompt's keys of the chosen side; the log-probs are those of the
unshared row, to float rounding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from zephyr.core.config import LogpsConfig
from zephyr.core.errors import DataError, ZephyrError
from zephyr.data.packing import Movable, PackedBatch, collate_shared_prefix
from zephyr.training.losses import PairLogps

logger = logging.getLogger(__name__)


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
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[list[int], list[int], list[int], Truncation]:
    """Cut a pair to `max_length` (see the module doc); answers may come back empty when nothing fits.

    Nothing is cut when prompt + the longer answer fit. Otherwise the prompt keeps its END (left-truncated
    to `max_prompt_length`, when it is longer), then the answers keep their START, each up to the room left.
    """
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_length is None or len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, Truncation()
    cut_prompt = max_prompt_length is not None and len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[len(prompt) - max_prompt_length :]
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
    """Render and truncate one pair; raises DataError (or chat.TemplateError) when it cannot be trained on."""
    from zephyr.data.chat import render_prompt_answer

    prompt, chosen, rejected = split_pair(record)
    prompt_ids, chosen_ids = render_prompt_answer(tokenizer, prompt, chosen)
    prompt_ids_r, rejected_ids = render_prompt_answer(tokenizer, prompt, rejected)
    if prompt_ids_r != prompt_ids:  # one prompt, one rendering: a template that varies here is unusable
        raise DataError("prompt: renders to different ids next to the chosen and the rejected answer")
    prompt_ids, chosen_ids, rejected_ids, cut = truncate_pair(
        prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length
    )
    if not chosen_ids or not rejected_ids:
        raise DataError(
            f"prompt: {len(prompt_ids)} tokens after truncation leave no room for the answer within "
            f"max_length {max_length}"
        )
    pair = TokenizedPair(str(record["prompt_id"]), tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids))
    return pair, cut


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


# ---------------------------------------------------------------------------------------------------------
# `zephyr logps`


def read_pairs(
    tokenizer: Any,
    path: str,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_record: str,
    limit: int | None = None,
) -> tuple[list[TokenizedPair], PairStats]:
    """Read, validate and tokenize a pairs file; record-level problems (schema) and pair-level ones
    (truncation, template) share the `on_bad_record` policy and the `stats.bad` count."""
    from zephyr import io

    read = io.read_records(path, "pairs", on_bad_record=on_bad_record, limit=limit)
    pairs, stats = tokenize_pairs(
        tokenizer,
        read.records,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_record=on_bad_record,
        source=read.source,
    )
    stats.bad = [f"{read.source}:{b.line}: {b.field}: {b.problem}" for b in read.bad] + stats.bad
    return pairs, stats


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_logps(cfg: LogpsConfig) -> LogpsTable:
    """`zephyr logps`: one JSON line per kept pair with `prompt_id`, `chosen_logps`, `rejected_logps`,
    `chosen_tokens`, `rejected_tokens`, in the input's order; the model's own chat template ("auto").

    Runs in float32 on CPU and in bf16 autocast on a GPU that has it (the precision `auto` of training).
    No truncation unless `cfg.max_length` is given.
    """
    from zephyr import io
    from zephyr.models.load import load_model, load_tokenizer
    from zephyr.scoring.attention import register_packed_attention

    tokenizer = load_tokenizer(cfg.model, chat_template=cfg.chat_template)
    pairs, stats = read_pairs(
        tokenizer,
        cfg.data,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        on_bad_record=cfg.on_bad_record,
    )
    if not pairs:
        raise DataError(f"{cfg.data}: no pairs left to score")
    io.check_output_dir(os.path.dirname(os.path.abspath(cfg.out)))  # before the model loads
    device = default_device()
    net = load_model(cfg.model, dtype=torch.float32, attn_implementation=register_packed_attention()).to(
        device
    )
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    table = compute_logps(
        net,
        pairs,
        batch_size=cfg.batch_size,
        device=device,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None,
        progress=True,
        prefix_sharing=cfg.prefix_sharing,
    )
    io.write_jsonl(cfg.out, table.rows([p.prompt_id for p in pairs]))
    print(f"{cfg.out}: {stats.describe()}")
    return table
