"""The OpenAI-compatible HTTP backend: `/chat/completions` of OpenAI, vLLM, zephyr serve and the like.

Requests run concurrently (at most `max_concurrency` in flight). Rate limits (429), server errors (5xx),
timeouts, dropped connections and malformed answers are retried with exponential backoff and full jitter,
waiting at least what a Retry-After header asks (and every other request of the generator with it); a
request that still fails, or fails for a reason retrying cannot fix (400, 401, 404, ...), becomes a
Completion with finish_reason "error". With `cache` set, every successful answer is stored on disk under a
hash of (model, messages, parameters), so a rerun sends nothing. `requests_per_minute` and
`tokens_per_minute` keep the client under a provider's limits (`zephyr.generation.ratelimit`).

The API key is read from an environment variable (`OPENAI_API_KEY` unless `api_key_env` names another)
when the generator is built; it is sent in the Authorization header and kept nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.generation.base import (
    DEFAULT_OPENAI_URL,
    Completion,
    Conversation,
    FinishReason,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from zephyr.generation.cache import ResponseCache, cache_key, completions_of
from zephyr.generation.ratelimit import RateLimit, estimate_tokens

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
_RETRY_STATUS = frozenset({408, 409, 425, 429})
_MAX_RETRY_AFTER = 600.0


class MalformedResponse(ValueError):
    """A 200 answer without the fields of a chat completion."""


class RemoteGenerator:
    """A `Generator` over an OpenAI-compatible chat completions endpoint.

    Its log-probabilities are those of generated answers: with `SamplingParams.logprobs` each completion
    carries the endpoint's per-token `logprobs` and `top_logprobs` (when the endpoint returns them), which
    the feedback judge's logprobs mode and the weighted AlpacaEval annotators read. It is not a
    `LogprobScorer`: the chat completions API cannot continue a forced start of the answer.
    """

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_OPENAI_URL,
        *,
        api_key_env: str = DEFAULT_KEY_ENV,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        cache: str | Path | None = None,
        prices: Mapping[str, float] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ):
        problems = []
        if max_concurrency < 1:
            problems.append(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout <= 0:
            problems.append(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            problems.append(f"max_retries must be >= 0, got {max_retries}")
        if backoff_base < 0 or backoff_max < 0:
            problems.append("backoff_base and backoff_max must be >= 0")
        if prices is not None and (set(prices) - {"prompt", "completion"} or not prices):
            problems.append(
                f"prices must map 'prompt' and/or 'completion' to USD per million tokens, got {prices}"
            )
        for name, limit in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if limit is not None and limit < 1:
                problems.append(f"{name} must be >= 1, got {limit}")
        if problems:
            raise ZephyrError(f"openai:{model}@{base_url}: " + "; ".join(problems))
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.model_id = f"openai:{model}@{self.base_url}"
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.cache = ResponseCache(cache) if cache is not None else None
        self.prices = dict(prices) if prices is not None else None
        self.usage = Usage(cost=0.0 if prices is not None else None)
        self.rate_limit = RateLimit(requests_per_minute, tokens_per_minute)
        self._api_key = _read_key(api_key_env)
        self._random = random.Random()

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteGenerator(model={self.model!r}, base_url={self.base_url!r})"

    # -----------------------------------------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]:
        """Blocking wrapper of `agenerate`; also works when called from inside a running event loop."""
        coroutine = self.agenerate(conversations, params)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        # A loop already runs in this thread (a notebook, an async caller): run ours in a helper thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, coroutine).result()

    async def agenerate(
        self, conversations: Sequence[Conversation], params: SamplingParams
    ) -> list[Completion]:
        import httpx

        self.usage.requests += len(conversations) * params.n
        results: list[list[Completion] | None] = [None] * len(conversations)
        pending: list[tuple[int, list[dict[str, Any]], str]] = []
        for i, conversation in enumerate(conversations):
            try:
                messages = normalize_messages(conversation)
            except ValueError as exc:
                results[i] = [Completion.failed(str(exc)) for _ in range(params.n)]
                self.usage.failures += params.n
                continue
            # the endpoint is part of the key: two servers may serve models of one name
            key = cache_key(self.model_id, messages, params.to_dict())
            hit = self._cached(key, params.n)
            if hit is not None:
                results[i] = hit
                self.usage.cache_hits += 1
            else:
                pending.append((i, messages, key))
        if pending:
            semaphore = asyncio.Semaphore(self.max_concurrency)
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
                answers = await asyncio.gather(
                    *(
                        self._complete(client, semaphore, messages, params, key)
                        for _, messages, key in pending
                    )
                )
            for (i, _, _), answer in zip(pending, answers, strict=True):
                results[i] = answer
        return [c for choices in results if choices is not None for c in choices]

    # -----------------------------------------------------------------------------------------------------

    def _cached(self, key: str, n: int) -> list[Completion] | None:
        # an unreadable entry is a miss: the request is sent again and the entry replaced
        return None if self.cache is None else completions_of(self.cache.get(key), n)

    async def _complete(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        key: str,
    ) -> list[Completion]:
        body = request_body(self.model, messages, params)
        completions = await self._send_with_retries(client, semaphore, body, params.n)
        if all(c.ok for c in completions):
            if self.cache is not None:
                self.cache.put(key, self.model_id, body, [c.to_dict() for c in completions])
        else:
            self.usage.failures += len(completions)
        return completions

    async def _send_with_retries(
        self, client: Any, semaphore: asyncio.Semaphore, body: dict[str, Any], n: int
    ) -> list[Completion]:
        import httpx

        reason = "no attempt made"
        chars = sum(len(str(m.get("content", ""))) for m in body["messages"])
        estimate = estimate_tokens(chars, body["max_tokens"], n)
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                async with semaphore:
                    sent = await self.rate_limit.wait(estimate)
                    self.usage.sent += 1
                    response = await asyncio.wait_for(
                        client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers()),
                        timeout=self.timeout,
                    )
            except (httpx.RequestError, asyncio.TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if response.status_code == 200:
                    try:
                        completions = self._accept(response.json(), n)
                    except (ValueError, MalformedResponse) as exc:
                        reason = f"malformed response: {exc}"
                    else:
                        self.rate_limit.settle(sent, _tokens_of(completions))
                        return completions
                elif response.status_code in _RETRY_STATUS or response.status_code >= 500:
                    reason = f"HTTP {response.status_code}: {error_message(response)}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    if retry_after is not None:  # the limit is the client's: every request waits
                        self.rate_limit.pause(retry_after, self.rate_limit.clock())
                else:
                    message = f"HTTP {response.status_code}: {error_message(response)}"
                    return [Completion.failed(message) for _ in range(n)]
            if attempt == self.max_retries:
                break
            self.usage.retries += 1
            await asyncio.sleep(self._delay(attempt, retry_after))
        return [
            Completion.failed(f"gave up after {self.max_retries + 1} attempts: {reason}") for _ in range(n)
        ]

    def _accept(self, data: Any, n: int) -> list[Completion]:
        completions, prompt_tokens, completion_tokens = parse_response(data, n)
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        if self.prices is not None:
            cost = prompt_tokens * self.prices.get("prompt", 0.0) + completion_tokens * self.prices.get(
                "completion", 0.0
            )
            self.usage.cost = (self.usage.cost or 0.0) + cost / 1e6
        return completions

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        # Full jitter spreads the retries of many concurrent requests; Retry-After is a floor, not a hint.
        delay = self._random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
        return max(delay, retry_after) if retry_after is not None else delay

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: request and response formats


def _tokens_of(completions: list[Completion]) -> int:
    """The tokens an answer used: its prompt once, and every choice's completion."""
    prompt = completions[0].prompt_tokens if completions else 0
    return prompt + sum(c.completion_tokens for c in completions)


def _read_key(env: str) -> str | None:
    key = os.environ.get(env) or None
    if key is None and env != DEFAULT_KEY_ENV:
        raise ZephyrError(f"api_key_env names {env}, but that environment variable is not set")
    return key


def normalize_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The conversation as plain dicts; ValueError when it is not a list of {role, content} messages."""
    if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence) or not conversation:
        raise ValueError("a conversation must be a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i}: expected a mapping with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: 'content' must be a string")
        messages.append(dict(message))
    return messages


def request_body(model: str, messages: list[dict[str, Any]], params: SamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": params.n,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.logprobs:
        body["logprobs"] = True
        if params.top_logprobs:
            body["top_logprobs"] = params.top_logprobs
    return body


def parse_response(data: Any, n: int) -> tuple[list[Completion], int, int]:
    """Completions (one per choice, by index) and the response's prompt and completion token totals.

    Per-choice completion_tokens are exact for n = 1; for n > 1 the total is split evenly across choices
    (the API reports one total).
    """
    if not isinstance(data, Mapping):
        raise MalformedResponse(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise MalformedResponse(f"expected {n} choice(s), got {got}")
    usage = data.get("usage") or {}
    prompt_tokens = _count(usage, "prompt_tokens")
    completion_tokens = _count(usage, "completion_tokens")
    ordered = sorted(choices, key=_index) if n > 1 else choices
    completions = [_choice(c, prompt_tokens) for c in ordered]
    share, extra = divmod(completion_tokens, n)
    for k, completion in enumerate(completions):
        completion.completion_tokens = share + (1 if k < extra else 0)
    return completions, prompt_tokens, completion_tokens


def _index(choice: Any) -> int:
    """A choice's place among several (its `index`), by which they are put in order."""
    index = choice.get("index") if isinstance(choice, Mapping) else None
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedResponse(f"a choice's index is {index!r}, not a number")
    return index


def _count(usage: Any, name: str) -> int:
    value = usage.get(name, 0) if isinstance(usage, Mapping) else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedResponse(f"usage.{name} is {value!r}")
    return value


def _choice(choice: Any, prompt_tokens: int) -> Completion:
    if not isinstance(choice, Mapping) or not isinstance(choice.get("message"), Mapping):
        raise MalformedResponse("a choice without a message")
    content = choice["message"].get("content")
    if content is None:
        content = ""  # e.g. a refusal field instead of content
    if not isinstance(content, str):
        raise MalformedResponse(f"message.content is {type(content).__name__}, not text")
    reason = choice.get("finish_reason")
    if reason == "content_filter":
        return Completion(content, "error", prompt_tokens, error="finish_reason content_filter")
    finish: FinishReason = "length" if reason == "length" else "stop"
    return Completion(content, finish, prompt_tokens, logprobs=_logprobs(choice.get("logprobs")))


def _logprobs(value: Any) -> list[TokenLogprob] | None:
    content = value.get("content") if isinstance(value, Mapping) else None
    if not isinstance(content, list):
        return None
    try:
        return [
            {
                "token": str(item["token"]),
                "logprob": float(item["logprob"]),
                "top_logprobs": [
                    {"token": str(t["token"]), "logprob": float(t["logprob"])}
                    for t in item.get("top_logprobs") or []
                ],
            }
            for item in content
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedResponse(f"logprobs: {exc}") from exc


def error_message(response: Any) -> str:
    """The server's error message (OpenAI's {"error": {"message"}}) or the start of the body."""
    try:
        data = response.json()
        message = data["error"]["message"] if isinstance(data.get("error"), Mapping) else data["error"]
        return str(message)[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:500] if response.text else response.reason_phrase


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped at 10 minutes."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)
