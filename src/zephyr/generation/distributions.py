"""Next-token distributions after forced answer starts: the transformers backend's `LogprobScorer`.

A judge asks for the rating of answer 1, 2, ... of one long prompt: each conversation is a group of
`zephyr.scoring.continuations`, the tokens its prompts share (the prompt) as the prefix, run once, and the
rest of each prompt as a continuation, whose next-token distribution is read. Same numbers as one forward
per prompt, up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from zephyr.core.errors import ZephyrError
from zephyr.data.packing import Group
from zephyr.generation.adaptor import ModelAdaptor
from zephyr.generation.base import Conversation
from zephyr.scoring.continuations import score_groups


def prefix_logprobs(
    model: ModelAdaptor,
    conversations: Sequence[Conversation],
    prefixes: Sequence[str],
    top_k: int,
    candidates: Sequence[str],
    batch_size: int,
) -> list[list[dict[str, float]]]:
    """Per conversation and prefix, token text → log-probability of the next token after the generation
    prompt and the prefix: the `top_k` most likely tokens and every candidate (one token each), most likely
    first, tokens that decode alike merged (their probabilities added)."""
    if not prefixes:
        return [[] for _ in conversations]
    candidate_ids = {text: model.single_token_id(text) for text in candidates}
    groups = []
    for i, conversation in enumerate(conversations):
        rows = [model.prompt_ids(conversation, prefix) for prefix in prefixes]
        _check_lengths(i, rows, model.max_context)
        groups += branch_groups(rows)
    with model.lock:
        after = score_groups(model.model, groups, batch_size=batch_size, next_token=True).next_logps
    assert after is not None  # next_token=True
    k = min(top_k, after.shape[-1])
    top_v, top_i = after.topk(k, dim=-1) if k > 0 else (after[:, :0], after[:, :0].to(torch.long))
    tops = [
        merge_by_text(
            [*zip(top_i[j].tolist(), top_v[j].tolist(), strict=True), *_candidates(after[j], candidate_ids)],
            model.token_text,
        )
        for j in range(len(after))
    ]
    return [tops[i * len(prefixes) : (i + 1) * len(prefixes)] for i in range(len(conversations))]


def _check_lengths(conversation: int, rows: Sequence[Sequence[int]], max_context: int | None) -> None:
    longest, shortest = max(len(r) for r in rows), min(len(r) for r in rows)
    if max_context is not None and longest > max_context:
        raise ZephyrError(
            f"conversation {conversation}: {longest} tokens exceed the context of {max_context}"
        )
    if shortest < 2:
        raise ZephyrError(
            f"conversation {conversation}: a prompt of {shortest} token has no token before its last"
        )


def _candidates(logp_row: torch.Tensor, candidate_ids: dict[str, int]) -> list[tuple[int, float]]:
    return [(i, float(logp_row[i])) for i in candidate_ids.values()]


def merge_by_text(pairs: Iterable[tuple[int, float]], text_of: Callable[[int], str]) -> dict[str, float]:
    """(token id, log-prob) pairs as token text → log-prob, most likely first: a token seen twice counts once,
    tokens whose text is the same are one entry (their probabilities added)."""
    merged: dict[str, float] = {}
    seen: set[int] = set()
    for token, value in pairs:
        if token in seen:
            continue
        seen.add(token)
        text = text_of(token)
        merged[text] = logaddexp(merged[text], value) if text in merged else value
    return dict(sorted(merged.items(), key=lambda kv: -kv[1]))


def logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow."""
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi)) if lo != -math.inf else hi


def shared_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    shared = min(len(r) for r in rows) - 1
    for n in range(shared):
        if any(r[n] != rows[0][n] for r in rows):
            return n
    return shared


def branch_groups(rows: Sequence[Sequence[int]]) -> list[Group]:
    """Prompt rows as groups of the scoring primitive: the tokens they share as one prefix (each row keeping
    at least its last token), or, sharing none, each row alone; the continuations come out in row order."""
    shared = shared_length(rows)
    if shared:
        return [(rows[0][:shared], [r[shared:] for r in rows])]
    return [(r[:-1], [r[-1:]]) for r in rows]
