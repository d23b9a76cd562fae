"""An on-disk cache of model responses, so that rerunning a stage sends no request twice.

One sqlite3 file (standard library): several processes may read and write it at once, and a crash never
leaves a half-written entry. The key is a hash of (model, messages, sampling parameters); the entry holds the
request body and the completions. Credentials are never part of a key or an entry.

Two uses:
- HTTP answers (paid calls) go to the run's request cache, `request_cache_path(output_dir)`: beside the
  stage folders (`RUN/cache/requests.sqlite`), so a rerun, a resumed run or a redone stage (whose folder
  is cleared) asks nothing twice. `RemoteGenerator(cache=...)` reads and writes it.
- Local answers go to the stage's own folder through `CachedGenerator`: what a local model has answered
  survives a kill, and a rerun continues from it without loading a model whose answers are all there.
Only answers that can be reproduced are stored: greedy ones, or sampled with a seed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.generation.base import (
    Completion,
    Conversation,
    Generator,
    Request,
    SamplingParams,
    Usage,
    parse_spec,
    run_requests,
)

REQUEST_CACHE = Path("cache") / "requests.sqlite"


def request_cache_path(output_dir: str | Path) -> Path:
    """The run's request cache for a stage writing into `output_dir`: `cache/requests.sqlite` beside it."""
    return Path(output_dir).resolve().parent / REQUEST_CACHE


def request_cache_options(spec: str, output_dir: str | Path | None, cache: bool = True) -> dict[str, Any]:
    """The `make_generator` options that store a model's answers in the run's request cache: an HTTP model
    (paid calls) writing into `output_dir` gets `cache`; a local model, or `cache` off, gets none."""
    if cache and output_dir is not None and parse_spec(spec).backend == "openai":
        return {"cache": str(request_cache_path(output_dir))}
    return {}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what determines the answer."""
    payload = {"model": model, "messages": [dict(m) for m in messages], "params": dict(params)}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """get/put of JSON values by key in a sqlite file (created with its folder on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Another process holding the write lock makes us wait up to 60 s, not fail.
                db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
                db.execute(_SCHEMA)
                db.commit()
            except sqlite3.Error as exc:
                raise ZephyrError(f"response cache {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._connect().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, request: Mapping[str, Any], response: Any) -> None:
        self.put_many([(key, model, request, response)])

    def put_many(self, entries: Sequence[tuple[str, str, Mapping[str, Any], Any]]) -> None:
        """Store (key, model, request, response) entries in one transaction (one disk sync)."""
        now = time.time()
        rows = [
            (
                key,
                model,
                json.dumps(request, ensure_ascii=False),
                json.dumps(response, ensure_ascii=False),
                now,
            )
            for key, model, request, response in entries
        ]
        with self._lock:
            db = self._connect()
            db.executemany(
                "INSERT OR REPLACE INTO responses (key, model, request, response, created) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def reproducible(params: SamplingParams) -> bool:
    """Whether a request's answer can be stored and given again: greedy, or sampled with a seed."""
    return params.temperature == 0 or params.seed is not None


def completions_of(value: Any, n: int) -> list[Completion] | None:
    """The completions of a cache entry, or None when it is not n readable completions (a miss)."""
    try:
        completions = [Completion.from_dict(d) for d in value] if isinstance(value, list) else None
    except (ValueError, TypeError, AttributeError):
        return None
    return completions if completions is not None and len(completions) == n else None


class CachedGenerator:
    """A generator whose answers go through a `ResponseCache` (module docstring).

    `resolve()` returns the generator that answers the misses; it is called only when there is a miss, so
    a rerun whose answers are all stored loads no model. Failed completions are not stored (a rerun asks
    again). `usage` counts the requests asked and the cache hits; the tokens are those of the misses.
    """

    def __init__(self, resolve: Callable[[], Generator], cache: ResponseCache | None, model_id: str):
        self.resolve = resolve
        self.cache = cache
        self.model_id = model_id
        self.usage = Usage()

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]:
        grouped = self.generate_requests([Request(c, params) for c in conversations])
        return [c for choices in grouped for c in choices]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """One list of `params.n` completions per request, stored answers first, the rest in one call."""
        out: list[list[Completion] | None] = [None] * len(requests)
        keys = [self._key(r) for r in requests]
        if self.cache is not None:
            for i, key in enumerate(keys):
                if key is not None and (hit := completions_of(self.cache.get(key), requests[i].params.n)):
                    out[i] = hit
        misses = [i for i, got in enumerate(out) if got is None]
        self.usage.requests += sum(r.params.n for r in requests)
        self.usage.cache_hits += len(requests) - len(misses)
        if misses:
            answered = run_requests(self.resolve(), [requests[i] for i in misses])
            stored = []
            for i, choices in zip(misses, answered, strict=True):
                out[i] = choices
                self._account(choices)
                if (key := keys[i]) is not None and all(c.ok for c in choices):
                    stored.append(
                        (key, self.model_id, _request_record(requests[i]), [c.to_dict() for c in choices])
                    )
            if self.cache is not None and stored:
                self.cache.put_many(stored)
        return [choices or [] for choices in out]

    def _key(self, request: Request) -> str | None:
        if self.cache is None or not reproducible(request.params):
            return None
        return cache_key(self.model_id, request.messages, request.params.to_dict())

    def _account(self, choices: list[Completion]) -> None:
        usage = self.usage
        usage.sent += len(choices)
        usage.failures += sum(not c.ok for c in choices)
        usage.prompt_tokens += sum(c.prompt_tokens for c in choices)
        usage.completion_tokens += sum(c.completion_tokens for c in choices)


def _request_record(request: Request) -> dict[str, Any]:
    return {"messages": [dict(m) for m in request.messages], "params": request.params.to_dict()}
