"""A client-side rate limit for HTTP generators: requests and tokens per minute, and Retry-After pauses.

Providers limit both requests and tokens per minute, and answer 429 with a Retry-After header when a
client goes over. `RateLimit` keeps the requests sent in the last 60 seconds (a sliding window) with their
tokens, and says how long the next request must wait so that neither limit is passed; a Retry-After pauses
every request of the client, not only the one that got it (the others would hit the same limit).

A request's tokens are not known before its answer: it is counted with an estimate (its prompt's
characters / 4, plus `max_tokens` for each of its `n` answers, as providers count it against the limit),
then corrected to the answer's usage. A single request larger than the token limit goes alone, once the
window is empty (it could never go otherwise).

The arithmetic is pure (`delay`, with the time passed in); `wait` sleeps in asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def estimate_tokens(prompt_chars: int, max_tokens: int, n: int = 1) -> int:
    """What a request counts against a tokens-per-minute limit before its usage is known."""
    return -(-prompt_chars // CHARS_PER_TOKEN) + max_tokens * n


@dataclass
class _Sent:
    at: float
    tokens: int


class RateLimit:
    """Requests and tokens per minute (None: no limit), over a sliding window of `WINDOW_S` seconds."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.clock = clock
        self._sent: deque[_Sent] = deque()
        self._paused_until = 0.0

    def delay(self, tokens: int, now: float) -> float:
        """Seconds from `now` until a request of `tokens` may be sent (0: at once)."""
        self._expire(now)
        wait = max(self._paused_until - now, 0.0)
        if self.requests_per_minute is not None and len(self._sent) >= self.requests_per_minute:
            oldest_to_leave = self._sent[len(self._sent) - self.requests_per_minute]
            wait = max(wait, oldest_to_leave.at + WINDOW_S - now)
        if self.tokens_per_minute is not None:
            wait = max(wait, self._token_delay(tokens, now))
        return wait

    def _token_delay(self, tokens: int, now: float) -> float:
        used = sum(s.tokens for s in self._sent)
        if used + tokens <= self.tokens_per_minute or not self._sent:  # type: ignore[operator]
            return 0.0
        # the oldest requests leave the window first: wait until enough tokens have left (or all of them,
        # for a request larger than the limit)
        for sent in self._sent:
            used -= sent.tokens
            if used + tokens <= self.tokens_per_minute:  # type: ignore[operator]
                return sent.at + WINDOW_S - now
        return self._sent[-1].at + WINDOW_S - now

    def record(self, tokens: int, now: float) -> _Sent:
        """A request sent at `now`, counted with `tokens` (correct it with `settle` once its usage is known)."""
        sent = _Sent(now, tokens)
        self._sent.append(sent)
        return sent

    @staticmethod
    def settle(sent: _Sent, tokens: int) -> None:
        """The request's real token count, from its answer's usage."""
        sent.tokens = tokens

    def pause(self, seconds: float, now: float) -> None:
        """A Retry-After: no request of this client goes before `now + seconds`."""
        self._paused_until = max(self._paused_until, now + seconds)

    async def wait(self, tokens: int) -> _Sent:
        """Sleep until a request of `tokens` may go, then count it as sent. The event loop runs one
        coroutine at a time, so checking and recording without an await between them is atomic."""
        while True:
            now = self.clock()
            delay = self.delay(tokens, now)
            if delay <= 0:
                return self.record(tokens, now)
            await asyncio.sleep(delay)

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0].at <= now - WINDOW_S:
            self._sent.popleft()
