"""One decoding step and the text rules around it, as pure functions: tensors and strings in, results out.

No model and no tokenizer here: the decoding loop (`zephyr.generation.loop`) gets each step's logits from the
model adaptor and asks these functions which token every row takes, what the model's log-probabilities of
it were, where a stop string ends the answer and how much of an unfinished answer may be streamed yet.
Text is produced by a `decode` function the caller passes (token ids to text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Sampler:
    """How one row picks its tokens: greedy (temperature 0), or drawn from softmax(logits / temperature)
    restricted to the top-p nucleus with the row's own generator (so its draws do not depend on the batch)."""

    temperature: float = 0.0
    top_p: float = 1.0
    rng: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenScore:
    """The model's log-probability of a chosen token and its `k` most likely alternatives (id, log-prob)."""

    logprob: float
    top: list[tuple[int, float]]


def next_tokens(logits: torch.Tensor, samplers: Sequence[Sampler | None], pad_id: int) -> list[int]:
    """The next token of each row of `logits` [rows, vocabulary]: the argmax for a greedy row, a draw for a
    sampled one, `pad_id` for a finished row (None), which keeps its place in the batch until it is pruned."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    for j, sampler in enumerate(samplers):
        if sampler is None:
            tokens[j] = pad_id
        elif not sampler.greedy:
            tokens[j] = sample_token(logits[j], sampler.temperature, sampler.top_p, sampler.rng)
    return tokens


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    """Draw a token id from softmax(logits / temperature) restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng))
    sorted_probs, order = probs.sort(descending=True)
    # A token is in the nucleus when the mass before it is below top_p (the most likely one always is).
    in_nucleus = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * in_nucleus, 1, generator=rng)
    return int(order[choice])


def token_scores(
    logits: torch.Tensor, tokens: Sequence[int], top_k: Sequence[int | None]
) -> list[TokenScore | None]:
    """Per row, the model's own log-probability of its token (before temperature and top-p, as vLLM reports
    it) and its `top_k[row]` most likely tokens; None for rows that ask for none (`top_k` None)."""
    wanted = [k for k in top_k if k is not None]
    if not wanted:
        return [None] * len(tokens)
    logp = torch.log_softmax(logits, dim=-1)
    k_max = max(wanted)
    # One topk for the batch, each row reading its first k (the batch's largest k, cut per row).
    top = logp.topk(k_max, dim=-1) if k_max else None
    scores: list[TokenScore | None] = []
    for j, (token, k) in enumerate(zip(tokens, top_k, strict=True)):
        if k is None:
            scores.append(None)
            continue
        alternatives: list[tuple[int, float]] = []
        if top is not None and k:
            ids, values = top.indices[j, :k].tolist(), top.values[j, :k].tolist()
            alternatives = list(zip(ids, values, strict=True))
        scores.append(TokenScore(float(logp[j, token]), alternatives))
    return scores


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(tokens: Sequence[int], stops: Sequence[str], decode: Decode) -> tuple[str, int] | None:
    """Where a stop string ends an answer: (its text before the stop string, how many of its tokens have
    their text wholly before the stop string, whose log-probs are kept), or None without one."""
    text = decode(tokens)
    cut = first_stop(text, stops)
    if cut is None:
        return None
    keep = len(tokens)
    while keep and len(decode(tokens[:keep])) > cut:
        keep -= 1
    return text[:cut], keep


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string (not streamed yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def streamable(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer that may be shown: without an end that could grow into a stop string
    and without half-decoded characters (U+FFFD, a multi-byte character whose bytes have not all come)."""
    return text[: len(text) - held_back(text, stops)].rstrip("\ufffd")


def worth_pruning(alive: int, in_batch: int) -> bool:
    """Whether to drop finished rows from the batch now. Dropping rows copies the whole KV cache: do it once
    a quarter of the batch has finished, not every step."""
    return alive < in_batch and in_batch - alive >= max(1, in_batch // 4)
