"""What every generation backend speaks: sampling parameters, completions, the `Generator` protocol.

A backend turns conversations (lists of `{"role", "content"}` messages) into completions of the assistant's
next turn. A request that fails comes back as a `Completion` whose `finish_reason` is "error" with the
reason in `error`; it never raises and never takes the rest of the batch down with it.

`make_generator(spec, **options)` picks the backend from a model spec (see `parse_spec`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

from zephyr.core.errors import ZephyrError

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


def group_by_conversation(completions: Sequence[Completion], n: int) -> list[list[Completion]]:
    """The flat, conversation-major output of `generate` as one list of n completions per conversation."""
    if n < 1 or len(completions) % n:
        raise ValueError(f"{len(completions)} completions cannot be grouped by n={n}")
    return [list(completions[i : i + n]) for i in range(0, len(completions), n)]


# ---------------------------------------------------------------------------------------------------------
# Model specs


@dataclass(frozen=True)
class BackendSpec:
    backend: Literal["transformers", "openai", "vllm"]
    model: str  # a local spec (path, asset:NAME, hub id) or the remote model name
    base_url: str | None = None


DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
_OPENAI = re.compile(r"^(?P<model>.+)@(?P<url>https?://\S+)$")
_PREFIX = re.compile(r"^(?P<prefix>[A-Za-z][\w-]*):(?!//)")
_KNOWN_PREFIXES = ("transformers", "asset", "openai", "vllm")


def parse_spec(spec: str) -> BackendSpec:
    """The backend a model spec names.

    `openai:MODEL@BASE_URL` (BASE_URL defaults to OpenAI's), `vllm:PATH_OR_HUB_ID`, and for the local
    transformers backend `transformers:PATH_OR_HUB_ID`, `asset:NAME` or a bare path.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ZephyrError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("openai:"):
        rest = spec.removeprefix("openai:")
        match = _OPENAI.match(rest)
        model, url = (match["model"], match["url"]) if match else (rest, DEFAULT_OPENAI_URL)
        if not model or ("@" in model and not match):
            raise ZephyrError(
                f"model spec {spec!r}: expected openai:MODEL@BASE_URL (BASE_URL starts with http)"
            )
        return BackendSpec("openai", model, url.rstrip("/"))
    if spec.startswith("vllm:"):
        path = spec.removeprefix("vllm:")
        if not path:
            raise ZephyrError(f"model spec {spec!r} names no model")
        return BackendSpec("vllm", path)
    prefix = _PREFIX.match(spec)
    if prefix and prefix["prefix"] not in _KNOWN_PREFIXES and not Path(spec).exists():
        raise ZephyrError(
            f"model spec {spec!r}: unknown backend {prefix['prefix']!r}; use transformers:PATH_OR_HUB_ID, "
            "asset:NAME, openai:MODEL@BASE_URL, vllm:PATH_OR_HUB_ID or a path"
        )
    return BackendSpec("transformers", spec)


def make_generator(spec: str, **options: Any) -> Generator:
    """A generator for a model spec; `options` go to the backend (unknown ones are an error naming them).

    transformers: chat_template, dtype, device, batch_size, trust_remote_code, attn_implementation.
    openai: api_key_env, max_concurrency, timeout, max_retries, backoff_base, backoff_max, cache, prices.
    vllm: chat_template, dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len, trust_remote_code.
    """
    parsed = parse_spec(spec)
    if parsed.backend == "openai":
        from zephyr.generation.remote import RemoteGenerator

        _check_options(RemoteGenerator, options, spec, skip=("model", "base_url"))
        return RemoteGenerator(parsed.model, parsed.base_url or DEFAULT_OPENAI_URL, **options)
    if parsed.backend == "vllm":
        from zephyr.generation.vllm_backend import VLLMGenerator

        _check_options(VLLMGenerator, options, spec, skip=("model",))
        return VLLMGenerator(parsed.model, **options)
    from zephyr.generation.local import LocalGenerator

    _check_options(LocalGenerator.from_spec, options, spec, skip=("spec",))
    return LocalGenerator.from_spec(parsed.model, **options)


def _check_options(
    factory: Callable[..., Any], options: Mapping[str, Any], spec: str, skip: Sequence[str]
) -> None:
    accepted = [
        name
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in (*skip, "self", "cls")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ZephyrError(
            f"model {spec!r}: unknown generation option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
