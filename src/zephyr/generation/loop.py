"""The decoding loop: one left-padded batch of rows generated to their ends with a KV cache.

Each step: every live row takes its next token (`decoding.next_tokens`, its own sampler), records it with
its log-probs, checks its end (an end-of-turn or EOS token, a stop string, its token limit) and streams its
new text; rows that finished leave the batch once enough of them have (`decoding.worth_pruning`); the others
advance one position. The model calls are the adaptor's (`zephyr.generation.adaptor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zephyr.generation.adaptor import ModelAdaptor
from zephyr.generation.base import Completion, FinishReason, SamplingParams, TokenLogprob
from zephyr.generation.decoding import (
    Decode,
    Sampler,
    TokenScore,
    cut_at_stop,
    next_tokens,
    token_scores,
    worth_pruning,
)
from zephyr.generation.streaming import TextStream


@dataclass
class Row:
    """One completion being generated: its prompt, its parameters and the state of its decoding."""

    key: tuple[int, int]  # (request, choice): where the completion goes
    prompt: list[int]
    params: SamplingParams
    limit: int  # tokens it may generate: max_tokens, or less where the context ends first
    seed: int | None  # its sampler's seed (sampled rows always have one)
    stream: TextStream | None = None
    sampler: Sampler = field(default_factory=Sampler)  # seeded when its batch starts
    tokens: list[int] = field(default_factory=list)  # visible tokens (no end-of-turn)
    generated: int = 0  # tokens produced, the end-of-turn token included
    logprobs: list[TokenLogprob] | None = None
    finish: FinishReason | None = None
    text: str | None = None  # set once a stop string cut the text

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def top_k(self) -> int | None:
        """Alternatives to report with each token's log-prob; None: no log-probs asked for."""
        return self.params.top_logprobs if self.params.logprobs else None

    def seed_sampler(self, device: torch.device) -> None:
        if self.params.temperature == 0:
            return
        assert self.seed is not None, "a sampled row has a seed (drawn when the request did not give one)"
        rng = torch.Generator(device=device).manual_seed(self.seed)
        self.sampler = Sampler(self.params.temperature, self.params.top_p, rng)

    def final_text(self, decode: Decode) -> str:
        if self.text is None:
            self.text = decode(self.tokens)
        return self.text

    def completion(self, decode: Decode) -> Completion:
        return Completion(
            text=self.final_text(decode),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.prompt),
            completion_tokens=self.generated,
            logprobs=self.logprobs,
        )


def decode_batch(model: ModelAdaptor, rows: list[Row]) -> None:
    """Generate every row to its end, in one batch (the caller holds `model.lock` and inference mode)."""
    for row in rows:
        row.seed_sampler(model.device)
    state = model.prefill([row.prompt for row in rows])
    live = list(rows)  # the rows in the tensors, in tensor order (finished ones until pruned)
    while True:
        tokens = next_tokens(state.logits, [None if r.done else r.sampler for r in live], model.pad_id)
        scores = token_scores(state.logits, tokens, [None if r.done else r.top_k for r in live])
        for row, token, score in zip(live, tokens, scores, strict=True):
            if not row.done:
                accept(model, row, token, score)
        keep = [j for j, row in enumerate(live) if not row.done]
        if not keep:
            return
        pruned = model.keep_rows(state, keep) if worth_pruning(len(keep), len(live)) else None
        if pruned is not None:
            state, live, tokens = pruned, [live[j] for j in keep], [tokens[j] for j in keep]
        state = model.step(state, tokens)


def accept(model: ModelAdaptor, row: Row, token: int, score: TokenScore | None) -> None:
    """Record a row's next token and check whether the row ends with it."""
    row.generated += 1
    if token in model.stop_token_ids:
        row.finish = "stop"
    else:
        row.tokens.append(token)
        if score is not None and row.logprobs is not None:
            row.logprobs.append(_entry(model, token, score))
        cut = cut_at_stop(row.tokens, row.params.stop, model.decode) if row.params.stop else None
        if cut is not None:
            row.text, keep = cut
            row.finish = "stop"
            # Keep the tokens (and log-probs) whose text lies wholly before the stop string.
            row.tokens = row.tokens[:keep]
            if row.logprobs is not None:
                row.logprobs = row.logprobs[:keep]
    if not row.done and row.generated >= row.limit:
        row.finish = "length"
    if row.stream is not None:
        text = row.final_text(model.decode) if row.done else model.decode(row.tokens)
        row.stream.update(text, final=row.done)


def _entry(model: ModelAdaptor, token: int, score: TokenScore) -> TokenLogprob:
    return {
        "token": model.token_text(token),
        "logprob": score.logprob,
        "top_logprobs": [{"token": model.token_text(i), "logprob": v} for i, v in score.top],
    }
