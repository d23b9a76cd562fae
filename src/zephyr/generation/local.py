"""The transformers backend: batched generation with a model in this process (CPU or one GPU).

Each conversation is rendered once with the tokenizer's chat template (with the generation prompt). Requests
are sorted by prompt length and cut into static left-padded batches; a decoding loop of our own runs each
batch with a KV cache, so that every row keeps its own parameters (greedy or sampled, its own seed, stop
strings, token limit) and rows that finish early leave the batch. A row stops at the chat template's
end-of-turn token or the tokenizer's EOS (neither is part of the returned text), at a stop string, or after
`max_tokens` tokens (finish_reason "length").

Log-probabilities are those of the model itself (before temperature and top-p), as vLLM reports them.

The parts: `decoding` (the pure step: next tokens, log-probs, stop strings, what may be streamed),
`adaptor` (the model and tokenizer calls: prompts, prefill, one step with the KV cache, pruning, release),
`loop` (the decoding loop over one batch), `streaming` (the text callback), `distributions` (the judge's
next-token distributions through `zephyr.scoring`). `LocalGenerator` composes them: requests into rows
and batches, results and usage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch

from zephyr.core.errors import ZephyrError
from zephyr.generation import distributions
from zephyr.generation.adaptor import ModelAdaptor
from zephyr.generation.base import Completion, Conversation, Request, SamplingParams, Usage
from zephyr.generation.decoding import first_stop, held_back, sample_token
from zephyr.generation.loop import Row, decode_batch
from zephyr.generation.streaming import TextStream
from zephyr.models import load as models

# The pure decoding functions live in `decoding`; importable from here as before.
__all__ = ["LocalGenerator", "first_stop", "held_back", "sample_token"]

_DTYPES = ("float32", "bfloat16", "float16")
Key = tuple[int, int]  # (request, choice)


class LocalGenerator:
    """A `Generator` over a transformers causal LM and its tokenizer (with the chat template to use).

    `close()` (or leaving a `with` block) releases the model; the generator must not be used after.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str = "local", batch_size: int = 16):
        if batch_size < 1:
            raise ZephyrError(f"batch_size must be >= 1, got {batch_size}")
        self._adaptor = ModelAdaptor(model, tokenizer)
        self.model_id = model_id
        self.batch_size = batch_size
        self.usage = Usage()

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        chat_template: str = "auto",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> LocalGenerator:
        """Load `asset:NAME`, `transformers:PATH_OR_HUB_ID` or a path. dtype: float32 on CPU, bfloat16 on CUDA."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is not None and dtype not in _DTYPES:
            raise ZephyrError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
        torch_dtype = getattr(torch, dtype or ("float32" if device == "cpu" else "bfloat16"))
        tokenizer = models.load_tokenizer(
            spec, chat_template=chat_template, trust_remote_code=trust_remote_code
        )
        model = models.load_model(
            spec,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        return cls(model.to(device), tokenizer, model_id=spec, batch_size=batch_size)

    @property
    def model(self) -> Any:
        return self._adaptor.model

    @property
    def tokenizer(self) -> Any:
        return self._adaptor.tokenizer

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._adaptor.stop_token_ids

    # -----------------------------------------------------------------------------------------------------
    # Release

    def close(self) -> None:
        """Release the model and tokenizer (and the CUDA cache on a GPU), after a batch that is running."""
        self._adaptor.close()

    def __enter__(self) -> LocalGenerator:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------------
    # Generation

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]:
        grouped = self.generate_requests([Request(c, params) for c in conversations])
        return [c for choices in grouped for c in choices]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """One list of `params.n` completions per request; requests may carry different parameters."""
        if self._adaptor.closed:
            raise ZephyrError(f"generator {self.model_id!r} was closed: its model is released")
        rows, failed = _rows(requests, self._adaptor)
        with self._adaptor.lock, torch.inference_mode():
            for batch in _batches(rows, self.batch_size):
                failed.update(_decode_or_fail(self._adaptor, batch))
        results = _results(requests, rows, failed, self._adaptor)
        _account(self.usage, [c for choices in results for c in choices])
        return results

    def count_prompt_tokens(self, messages: Conversation) -> int:
        return len(self._adaptor.prompt_ids(messages))

    def check_request(self, messages: Conversation, params: SamplingParams) -> str | None:
        """Why this request cannot be served (a template error, a prompt longer than the context), or None."""
        try:
            n = self.count_prompt_tokens(messages)
        except ZephyrError as exc:
            return str(exc)
        return _context_problem(n, self._adaptor.max_context)

    # -----------------------------------------------------------------------------------------------------
    # Log-prob scoring (`LogprobScorer`)

    def next_token_logprobs(
        self,
        conversations: Sequence[Conversation],
        top_k: int = 20,
        *,
        candidates: Sequence[str] = (),
        answer_prefix: str = "",
    ) -> list[dict[str, float]]:
        """Log-probabilities of the next token after the generation prompt (and `answer_prefix`).

        Each dict maps token text to log-probability for the `top_k` most likely tokens plus every string in
        `candidates` (each must be one token, e.g. rating digits), most likely first. Tokens that decode to
        the same text are merged (their probabilities added).
        """
        found = self.prefix_logprobs(conversations, [answer_prefix], top_k, candidates=candidates)
        return [tops[0] for tops in found]

    def prefix_logprobs(
        self,
        conversations: Sequence[Conversation],
        prefixes: Sequence[str],
        top_k: int = 20,
        *,
        candidates: Sequence[str] = (),
    ) -> list[list[dict[str, float]]]:
        """`next_token_logprobs` after each of `prefixes`, for every conversation: [conversation][prefix];
        the prompt the prefixes share runs once (`zephyr.generation.distributions`)."""
        return distributions.prefix_logprobs(
            self._adaptor, conversations, prefixes, top_k, candidates, self.batch_size
        )


# ---------------------------------------------------------------------------------------------------------
# Requests into rows and batches, rows into results


def _rows(requests: Sequence[Request], model: ModelAdaptor) -> tuple[list[Row], dict[Key, Completion]]:
    """One row per completion asked for; requests that cannot run fail here, each with its reason."""
    rows: list[Row] = []
    failed: dict[Key, Completion] = {}
    for i, request in enumerate(requests):
        params = request.params
        try:
            prompt = model.prompt_ids(request.messages)
        except ZephyrError as exc:
            failed.update({(i, k): Completion.failed(str(exc)) for k in range(params.n)})
            continue
        problem = _context_problem(len(prompt), model.max_context)
        if problem:
            failed.update({(i, k): Completion.failed(problem, len(prompt)) for k in range(params.n)})
            continue
        room = model.max_context - len(prompt) if model.max_context is not None else params.max_tokens
        base_seed = params.seed if params.seed is not None or params.temperature == 0 else _fresh_seed()
        for k in range(params.n):
            on_text = _bind_choice(request.on_text, k)
            rows.append(
                Row(
                    key=(i, k),
                    prompt=prompt,
                    params=params,
                    limit=min(params.max_tokens, room),
                    seed=None if base_seed is None else base_seed + k,
                    stream=TextStream(on_text, params.stop) if on_text else None,
                    logprobs=[] if params.logprobs else None,
                )
            )
    return rows, failed


def _context_problem(prompt_tokens: int, max_context: int | None) -> str | None:
    if max_context is not None and prompt_tokens >= max_context:
        return f"the prompt has {prompt_tokens} tokens; the model's context is {max_context} tokens"
    return None


def _batches(rows: list[Row], size: int) -> list[list[Row]]:
    # Longest first: similar lengths share a batch (little padding), and memory trouble shows at once.
    ordered = sorted(rows, key=lambda r: -len(r.prompt))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _decode_or_fail(model: ModelAdaptor, batch: list[Row]) -> dict[Key, Completion]:
    """Run one batch; if it fails (e.g. out of memory), its unfinished rows fail and the other batches go on."""
    try:
        decode_batch(model, batch)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return {r.key: Completion.failed(reason, len(r.prompt)) for r in batch if r.finish is None}
    return {}


def _results(
    requests: Sequence[Request], rows: list[Row], failed: dict[Key, Completion], model: ModelAdaptor
) -> list[list[Completion]]:
    out: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
    for (i, k), completion in failed.items():
        out[i][k] = completion
    for row in rows:
        if row.key not in failed:
            out[row.key[0]][row.key[1]] = row.completion(model.decode)
    return [[c for c in choices if c is not None] for choices in out]


def _account(usage: Usage, completions: list[Completion]) -> None:
    usage.requests += len(completions)
    usage.sent += len(completions)
    usage.failures += sum(not c.ok for c in completions)
    usage.prompt_tokens += sum(c.prompt_tokens for c in completions)
    usage.completion_tokens += sum(c.completion_tokens for c in completions)


def _fresh_seed() -> int:
    # Drawn from torch's global generator, so torch.manual_seed makes unseeded sampling reproducible too.
    return int(torch.randint(0, 2**62, (1,)))


def _bind_choice(on_text: Callable[[int, str], None] | None, choice: int) -> Callable[[str], None] | None:
    if on_text is None:
        return None
    return lambda delta: on_text(choice, delta)
