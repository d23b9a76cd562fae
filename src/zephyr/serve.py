"""`zephyr serve`: an OpenAI-compatible chat completions server over a model checkpoint.

Endpoints: `POST /v1/chat/completions` (messages, max_tokens / max_completion_tokens, temperature, top_p,
seed, stop, n, logprobs, top_logprobs, stream with server-sent events), `GET /v1/models`, `GET /health`.

Requests arriving together are generated together: handler threads put requests on a queue, and one worker
thread takes whatever is waiting (up to `max_batch_size`) and runs a single batched generation over it, each
request keeping its own parameters. The server listens on 127.0.0.1 unless told otherwise; with an API key
every `/v1` request must carry `Authorization: Bearer KEY`. Bodies over 1 MiB are refused (413), as are
`max_tokens` over the server's limit and malformed requests (400); errors are OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}`.

The model is known to clients by its served name (`served_model_name`; by default the checkpoint folder's
name, or the asset's): `/v1/models`, the `model` of every response and every error name it, and a local path
of the model never leaves the server (an error that would show it shows the served name instead).

Standard library only (http.server): nothing else to install, and the server is small enough to read.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.generation import make_generator, parse_spec
from zephyr.generation.base import (
    MAX_TOP_LOGPROBS,
    Completion,
    Generator,
    Request,
    SamplingParams,
    run_requests,
)

MAX_BODY_BYTES = 1 << 20
# Bodies up to this many times the limit are read and dropped before the 413; larger ones are cut off.
_DRAIN_FACTOR = 16
MAX_N = 16
MAX_STOP = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------------------------------------------------
# Request parsing and response shapes (pure)


class RequestError(Exception):
    """A request the server refuses: HTTP status, message and OpenAI error type."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, *, model_id: str, max_tokens_limit: int) -> ChatRequest:
    """Validate a chat completions request body; RequestError (400, or 404 for another model) otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(
            404, f"model {model!r} is not served here; this server serves {model_id!r}", param="model"
        )
    _refuse_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = max_tokens_limit if max_tokens is None else _integer(max_tokens, "max_tokens", 1, None)
    if max_tokens > max_tokens_limit:
        raise RequestError(
            400,
            f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
            param="max_tokens",
        )
    logprobs = _boolean(body.get("logprobs", False), "logprobs")
    top_logprobs = body.get("top_logprobs")
    top_logprobs = 0 if top_logprobs is None else _integer(top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    stream = _boolean(body.get("stream", False), "stream")
    if stream and logprobs:
        raise RequestError(400, "logprobs are not available with stream: true", param="logprobs")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object", param="stream_options")
    seed = body.get("seed")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, open_low=True),
        seed=None if seed is None else _integer(seed, "seed", None, None),
        stop=_stops(body.get("stop")),
        n=_integer(body.get("n", 1), "n", 1, MAX_N),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    include_usage = _boolean(options.get("include_usage", False), "stream_options.include_usage")
    return ChatRequest(_messages(body.get("messages")), params, stream, include_usage)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    # Silently ignoring these would return something other than what the client asked for.
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise RequestError(400, f"{name} is not supported by this server", param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(400, f"{name} is not supported by this server", param=name)
    if body.get("logit_bias"):
        raise RequestError(400, "logit_bias is not supported by this server", param="logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError(400, "only response_format {'type': 'text'} is supported", param="response_format")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None  # a list or an object is no role either
        if role is None:
            raise RequestError(400, f"{where}.role must be one of {', '.join(_ROLES)}", param=f"{where}.role")
        messages.append({"role": role, "content": _content(message.get("content"), where)})
    return messages


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # The list form: [{"type": "text", "text": ...}, ...]; only text parts are understood.
    parts = value if isinstance(value, list) else None
    if parts and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
    ):
        return "".join(p["text"] for p in parts)
    raise RequestError(
        400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content"
    )


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if value is None:
        return ()
    if stops is None or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(
            400, f"stop must be a non-empty string or a list of at most {MAX_STOP}", param="stop"
        )
    return tuple(stops)


def _integer(value: Any, name: str, low: int | None, high: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"{name} must be an integer, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float, open_low: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RequestError(400, f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high or (open_low and value == low):  # NaN too (JSON parsers take it)
        bracket = "(" if open_low else "["
        raise RequestError(400, f"{name} must be in {bracket}{low}, {high}], got {value}", param=name)
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def completion_body(
    request_id: str, created: int, model: str, completions: Sequence[Completion]
) -> dict[str, Any]:
    """The `chat.completion` object for the completions of one request."""
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
        }
        for k, c in enumerate(completions)
    ]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_body(completions),
    }


def usage_body(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = completions[0].prompt_tokens if completions else 0  # the n choices share one prompt
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def chunk_body(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }


def served_name(spec: str) -> str:
    """The name clients know a model by: a local folder's name, an asset's name, else the spec's model id
    (a hub id) as it is."""
    model = parse_spec(spec).model
    if model.startswith("asset:"):
        return model.removeprefix("asset:")
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def private_paths(spec: str) -> list[str]:
    """The strings that would show where the model lies on this machine (longest first)."""
    model = parse_spec(spec).model
    path = Path(model).expanduser()
    if not path.exists():
        return []
    found = {model, str(path), str(path.resolve())}
    return sorted((p for p in found if p not in ("", ".")), key=len, reverse=True)


def redact(text: str, paths: Sequence[str], name: str) -> str:
    """`text` with every path of `paths` replaced by the served name."""
    for path in paths:
        text = text.replace(path, name)
    return text


# ---------------------------------------------------------------------------------------------------------
# The batching worker


@dataclass
class Job:
    request: Request
    on_done: Callable[[], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] = field(default_factory=list)

    def finish(self, completions: list[Completion]) -> None:
        self.result = completions
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class BatchWorker:
    """A thread that runs waiting requests together: up to `max_batch_size` per generation call.

    After taking a request it waits up to `max_wait_s` for more to arrive (requests that come while a batch
    runs are waiting already), so that a burst of concurrent requests is one batch, not many.
    """

    def __init__(self, generator: Generator, *, max_batch_size: int = 64, max_wait_s: float = 0.01):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batches_run = 0
        self.requests_run = 0
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zephyr-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, on_done: Callable[[], None] | None = None) -> Job:
        job = Job(request, on_done)
        self._queue.put(job)
        if self._stopped.is_set():
            self._fail_waiting("the server is shutting down")
        return job

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._fail_waiting("the server is shutting down")

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._run([first, *self._take_more()])

    def _take_more(self) -> list[Job]:
        jobs: list[Job] = []
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) + 1 < self.max_batch_size:
            try:
                jobs.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0.0)))
            except queue.Empty:
                break
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        try:
            results = run_requests(self.generator, [j.request for j in jobs])
        except Exception as exc:  # a backend bug must not kill the worker: these requests fail, others go on
            results = [[Completion.failed(f"{type(exc).__name__}: {exc}")] * j.request.params.n for j in jobs]
        self.batches_run += 1
        self.requests_run += len(jobs)
        for job, completions in zip(jobs, results, strict=True):
            job.finish(completions)

    def _fail_waiting(self, reason: str) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            job.finish([Completion.failed(reason)] * job.request.params.n)


# ---------------------------------------------------------------------------------------------------------
# HTTP


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; holds the generator, the worker and the limits the handlers enforce."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 resets bursts of concurrent clients

    def __init__(
        self,
        address: tuple[str, int],
        generator: Generator,
        worker: BatchWorker,
        *,
        api_key: str | None,
        max_tokens_limit: int,
        max_body_bytes: int,
        access_log: bool,
        model_name: str,
    ):
        self.generator = generator
        self.model_name = model_name
        self.private = private_paths(generator.model_id)
        self.worker = worker
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        super().__init__(address, ChatHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Stop accepting, let the worker finish its batch, fail what still waits, free the socket."""
        self.shutdown()
        self.worker.stop()
        self.server_close()


class _ChatServerV6(ChatServer):
    address_family = socket.AF_INET6


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "zephyr"
    sys_version = ""
    timeout = 60  # seconds a client may take to send its request (a stalled upload cannot hold a thread)

    # -- routing

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            if self._authorized():
                model = {
                    "id": self.server.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "zephyr",
                }
                self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(404, error_body(f"no route GET {path}", "not_found_error"))

    def do_POST(self) -> None:
        # The body is read first: closing a connection with unread input resets it, and the client would
        # lose the error answer.
        raw = self._read_body()
        if raw is None:
            return
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            self._send_json(404, error_body(f"no route POST {path}", "not_found_error"))
            return
        if not self._authorized():
            return
        try:
            request = self._parse(raw)
        except RequestError as exc:
            self._send_json(exc.status, exc.body())
            return
        if request.stream:
            self._stream(request)
        else:
            self._complete(request)

    def _unsupported(self) -> None:
        self._send_json(
            405, error_body(f"method {self.command} is not allowed", "invalid_request_error"), close=True
        )

    do_PUT = do_DELETE = do_PATCH = _unsupported

    # -- checks

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
        body = error_body("a valid API key is required (Authorization: Bearer KEY)", "authentication_error")
        self._send_json(401, body, close=True, headers={"WWW-Authenticate": "Bearer"})
        return False

    def _read_body(self) -> bytes | None:
        if (
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            or "Content-Length" not in self.headers
        ):
            self._send_json(
                411,
                error_body("send the body with a Content-Length header", "invalid_request_error"),
                close=True,
            )
            return None
        try:
            length = int(self.headers["Content-Length"])
            if length < 0:
                raise ValueError
        except ValueError:
            self._send_json(400, error_body("bad Content-Length", "invalid_request_error"), close=True)
            return None
        if length > self.server.max_body_bytes:
            if length <= _DRAIN_FACTOR * self.server.max_body_bytes:
                self._discard(length)  # so that the client reads the 413 instead of a reset connection
            message = f"the body has {length} bytes; the limit is {self.server.max_body_bytes}"
            self._send_json(413, error_body(message, "invalid_request_error"), close=True)
            return None
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            return None
        return raw

    def _discard(self, length: int) -> None:
        try:
            while length > 0:
                data = self.rfile.read(min(length, 1 << 16))
                if not data:
                    return
                length -= len(data)
        except OSError:
            return

    def _parse(self, raw: bytes) -> ChatRequest:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # `[[[[...`: the decoder recurses once per level
            raise RequestError(400, "the body is not valid JSON: nested too deeply") from exc
        request = parse_chat_request(
            body, model_id=self.server.model_name, max_tokens_limit=self.server.max_tokens_limit
        )
        check = getattr(self.server.generator, "check_request", None)
        problem = check(request.messages, request.params) if callable(check) else None
        if problem:
            raise RequestError(400, problem, param="messages")
        return request

    # -- answers

    def _complete(self, request: ChatRequest) -> None:
        job = self.server.worker.submit(Request(request.messages, request.params))
        job.done.wait()
        failed = [c for c in job.result if not c.ok]
        if failed:
            self._send_json(500, error_body(f"generation failed: {failed[0].error}", "server_error"))
            return
        body = completion_body(_request_id(), int(time.time()), self.server.model_name, job.result)
        self._send_json(200, body)

    def _stream(self, request: ChatRequest) -> None:
        events: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        job = self.server.worker.submit(
            Request(request.messages, request.params, on_text=lambda k, delta: events.put((k, delta))),
            on_done=lambda: events.put(None),
        )
        request_id, created, model = _request_id(), int(time.time()), self.server.model_name

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return chunk_body(request_id, created, model, choices, **extra)

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for k in range(request.params.n):
                self._event(
                    chunk(
                        [{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                    )
                )
            while (event := events.get()) is not None:
                k, delta = event
                self._event(chunk([{"index": k, "delta": {"content": delta}, "finish_reason": None}]))
            failed = [c for c in job.result if not c.ok]
            if failed:
                self._event(error_body(f"generation failed: {failed[0].error}", "server_error"))
            else:
                for k, c in enumerate(job.result):
                    self._event(chunk([{"index": k, "delta": {}, "finish_reason": c.finish_reason}]))
                if request.include_usage:
                    self._event(chunk([], usage=usage_body(job.result)))
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            return  # the client left; its generation still finishes inside the batch

    def _event(self, payload: dict[str, Any]) -> None:
        text = self._public(json.dumps(payload, ensure_ascii=False))
        self.wfile.write(b"data: " + text.encode("utf-8") + b"\n\n")

    def _public(self, text: str) -> str:
        """What leaves the server: the model's local paths (also JSON-escaped) shown as its served name."""
        paths = [*self.server.private, *(json.dumps(p)[1:-1] for p in self.server.private)]
        return redact(text, paths, self.server.model_name)

    def _send_json(
        self, status: int, payload: Any, *, close: bool = False, headers: Mapping[str, str] | None = None
    ) -> None:
        data = self._public(json.dumps(payload, ensure_ascii=False)).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if close:
                # The body (if any) was not read: the connection cannot carry another request.
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method) as JSON."""
        text = message or self.responses.get(code, ("error",))[0]
        self._send_json(code, error_body(text, "invalid_request_error"), close=True)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            super().log_message(format, *args)


def _request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------------
# Starting and stopping


def start_server(
    generator: Generator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = 2048,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch_size: int = 64,
    max_wait_s: float = 0.01,
    access_log: bool = False,
    served_model_name: str | None = None,
) -> tuple[ChatServer, threading.Thread, str]:
    """Serve `generator` from a background thread; returns the server, its thread and its base URL (…/v1).

    Port 0 picks a free port. Stop with `server.close()`. Clients know the model as `served_model_name`
    (default: `served_name(generator.model_id)`).
    """
    if max_tokens_limit < 1:
        raise ZephyrError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    worker = BatchWorker(generator, max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    server_class = _ChatServerV6 if ":" in host else ChatServer
    try:
        server = server_class(
            (host, port),
            generator,
            worker,
            api_key=api_key or None,
            max_tokens_limit=max_tokens_limit,
            max_body_bytes=max_body_bytes,
            access_log=access_log,
            model_name=served_model_name or served_name(generator.model_id),
        )
    except OSError as exc:
        raise ZephyrError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    worker.start()
    thread = threading.Thread(target=server.serve_forever, name="zephyr-serve-http", daemon=True)
    thread.start()
    return server, thread, server.url


def serve(
    model_spec: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    chat_template: str = "auto",
    max_tokens_limit: int = 2048,
    served_model_name: str | None = None,
) -> None:
    """Load a model and serve it until SIGINT or SIGTERM. api_key None: `ZEPHYR_API_KEY` when set."""
    if parse_spec(model_spec).backend == "openai":
        raise ZephyrError(
            f"{model_spec!r}: zephyr serve serves local weights (a path, asset:NAME, vllm:PATH)"
        )
    if api_key is None:
        api_key = os.environ.get("ZEPHYR_API_KEY") or None
    generator = make_generator(model_spec, chat_template=chat_template)
    server, thread, url = start_server(
        generator,
        host,
        port,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        access_log=True,
        served_model_name=served_model_name,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    if host not in _LOOPBACK and api_key is None:
        print(f"zephyr serve: warning: listening on {host} without an API key", file=sys.stderr)
    print(f"zephyr serve: {generator.model_id} as {server.model_name!r} listening on {url}", flush=True)
    try:
        while not stop.wait(0.5) and thread.is_alive():
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        print("zephyr serve: stopped", file=sys.stderr, flush=True)
