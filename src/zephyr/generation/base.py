"""What every generation backend speaks: sampling parameters, completions, the `Generator` protocol.

A backend turns conversations (lists of `{"role", "content"}` messages) into completions of the assistant's
next turn. A request that fails comes back as a `Completion` whose `finish_reason` is "error" with the
reason in `error`; it never raises and never takes the rest of the batch down with it.

`zephyr.generation.make_generator(spec, **options)` picks the backend from a model spec (see `parse_spec`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

from zephyr.core.errors import ZephyrError
from zephyr.core.specs import DEFAULT_OPENAI_URL as DEFAULT_OPENAI_URL
from zephyr.core.specs import parse_model_spec

FinishReason = Literal["stop", "length", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "error")
Message = Mapping[str, Any]
Conversation = Sequence[Message]
# OpenAI's limit on top_logprobs; vLLM and zephyr serve follow it.
MAX_TOP_LOGPROBS = 20


class TopLogprob(TypedDict):
    token: str
    logprob: float


class TokenLogprob(TypedDict):
    """One generated token: its text, its log-probability, and the most likely alternatives at its place."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn. `temperature` 0 means greedy. `n` completions per conversation.

    `seed` makes sampling reproducible per request: the k-th of `n` samples uses seed + k, whatever else is in
    the batch. `stop` strings end the completion before the string (which is not returned).
    `logprobs` asks for the log-probability of every generated token, `top_logprobs` for that many alternatives.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        problems = _param_problems(self)
        if problems:
            raise ZephyrError("sampling parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


def _param_problems(p: SamplingParams) -> list[str]:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = []
    if not is_int(p.max_tokens) or p.max_tokens < 1:
        problems.append(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if not isinstance(p.temperature, int | float) or not 0 <= p.temperature <= 100:
        problems.append(f"temperature must be a number >= 0, got {p.temperature!r}")
    if not isinstance(p.top_p, int | float) or not 0 < p.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.seed is not None and not is_int(p.seed):
        problems.append(f"seed must be an integer or None, got {p.seed!r}")
    if not all(isinstance(s, str) and s for s in p.stop):
        problems.append(f"stop must be non-empty strings, got {list(p.stop)!r}")
    if not is_int(p.n) or p.n < 1:
        problems.append(f"n must be an integer >= 1, got {p.n!r}")
    if not is_int(p.top_logprobs) or not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        problems.append(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs!r}")
    elif p.top_logprobs and not p.logprobs:
        problems.append("top_logprobs needs logprobs=True")
    return problems


@dataclass
class Completion:
    """One generated assistant turn. Token counts include the end-of-turn token the model emitted."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    @classmethod
    def failed(cls, reason: str, prompt_tokens: int = 0) -> Completion:
        return cls(text="", finish_reason="error", prompt_tokens=prompt_tokens, error=reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Completion:
        if data.get("finish_reason") not in FINISH_REASONS or not isinstance(data.get("text"), str):
            raise ValueError(f"not a completion record: {dict(data)!r:.200}")
        return cls(
            text=data["text"],
            finish_reason=data["finish_reason"],
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            logprobs=data.get("logprobs"),
            error=data.get("error"),
        )


@dataclass
class Usage:
    """What a generator has done so far: requests, cache hits, retries, failures, tokens and cost (USD)."""

    requests: int = 0  # completions asked for by callers (n per conversation)
    sent: int = 0  # requests that reached the model (HTTP attempts, retries included)
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # only when prices are known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One conversation with its own parameters (the server batches requests whose parameters differ).

    `on_text(choice_index, delta)` receives the completion's text as it is generated (streaming); the
    concatenated deltas of a choice equal its final text.
    """

    messages: Conversation
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[int, str], None] | None = None


@runtime_checkable
class Generator(Protocol):
    """A model that writes the assistant's next turn.

    `generate` returns `len(conversations) * params.n` completions, conversation-major (the n samples of the
    first conversation, then those of the second, ...). It never raises for a failed request.
    """

    model_id: str

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]: ...


@runtime_checkable
class RequestGenerator(Generator, Protocol):
    """A generator that also runs requests with different parameters in one batch (the local backends)."""

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Completion]]: ...


@runtime_checkable
class LogprobScorer(Protocol):
    """A backend that reads the model's next-token distribution after a forced start of its answer (the
    transformers backend; an OpenAI-compatible API cannot continue a forced answer start, so the HTTP and
    vLLM backends give log-probabilities only with generated answers, `SamplingParams.logprobs`).

    Each distribution maps token text to log-probability for the `top_k` most likely tokens plus every
    string in `candidates` (each must be one token of the tokenizer, else `ZephyrError`).
    `next_token_logprobs`: one per conversation, after the generation prompt and `answer_prefix`.
    `prefix_logprobs`: one per (conversation, prefix), `[conversation][prefix]`, the shared prompt run once.
    A conversation too long for the model raises `ZephyrError`.
    """

    def next_token_logprobs(
        self,
        conversations: Sequence[Conversation],
        top_k: int = MAX_TOP_LOGPROBS,
        *,
        candidates: Sequence[str] = (),
        answer_prefix: str = "",
    ) -> list[dict[str, float]]: ...

    def prefix_logprobs(
        self,
        conversations: Sequence[Conversation],
        prefixes: Sequence[str],
        top_k: int = MAX_TOP_LOGPROBS,
        *,
        candidates: Sequence[str] = (),
    ) -> list[list[dict[str, float]]]: ...


@runtime_checkable
class Releasable(Protocol):
    """A generator that holds weights (the local backends): `close()` frees them and any GPU memory; the
    generator must not be used after. `zephyr.generation.schedule` keeps one such generator alive."""

    def close(self) -> None: ...


@runtime_checkable
class Metered(Protocol):
    """A generator that counts what it has done (every backend; a test double may not)."""

    usage: Usage


def group_by_conversation(completions: Sequence[Completion], n: int) -> list[list[Completion]]:
    """The flat, conversation-major output of `generate` as one list of n completions per conversation."""
    if n < 1 or len(completions) % n:
        raise ValueError(f"{len(completions)} completions cannot be grouped by n={n}")
    return [list(completions[i : i + n]) for i in range(0, len(completions), n)]


def run_requests(generator: Generator, requests: Sequence[Request]) -> list[list[Completion]]:
    """Requests with their own parameters through any generator: one call where the backend takes
    per-request parameters (`generate_requests`), else one `generate` call per distinct parameter set."""
    generate_requests = getattr(generator, "generate_requests", None)
    if callable(generate_requests):
        return generate_requests(requests)
    results: list[list[Completion]] = [[] for _ in requests]
    groups: dict[SamplingParams, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.params, []).append(i)
    for params, indices in groups.items():
        flat = generator.generate([requests[i].messages for i in indices], params)
        for i, choices in zip(indices, group_by_conversation(flat, params.n), strict=True):
            results[i] = choices
            on_text = requests[i].on_text
            for k, completion in enumerate(choices):
                if on_text is not None and completion.text:
                    on_text(k, completion.text)
    return results


# ---------------------------------------------------------------------------------------------------------
# Model specs: one grammar, `zephyr.core.specs`; `parse_spec` is its parser under the name backends know.

parse_spec = parse_model_spec
