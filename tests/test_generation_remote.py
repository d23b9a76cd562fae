"""The OpenAI-compatible HTTP backend against a misbehaving server on loopback.

The server answers each prompt by a script (keyed by the last user message): rate limits with Retry-After,
500s, a hang past the client's timeout, malformed JSON, missing fields, dropped connections, then success.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zephyr.core.errors import ZephyrError
from zephyr.generation import SamplingParams, make_generator
from zephyr.generation.remote import (
    MalformedResponse,
    RemoteGenerator,
    parse_response,
    parse_retry_after,
    request_body,
)

SECRET = "sk-test-DO-NOT-STORE-0123456789"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def completion_json(content: str, n: int = 1, logprobs: bool = False) -> dict:
    choices = []
    for k in range(n):
        choice = {
            "index": k,
            "message": {"role": "assistant", "content": f"{content}#{k}"},
            "finish_reason": "stop",
        }
        if logprobs:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": "a",
                        "logprob": -0.5,
                        "bytes": [97],
                        "top_logprobs": [{"token": "a", "logprob": -0.5}],
                    }
                ]
            }
        choices.append(choice)
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": choices,
        "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n},
    }


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.plans: dict[str, list[str]] = {}
        self.seen: dict[str, list[float]] = defaultdict(list)  # prompt -> arrival times
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        pass  # a hanging handler writes to a socket its client already gave up on

    def total(self) -> int:
        return sum(len(times) for times in self.seen.values())


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.headers.append({k.lower(): v for k, v in self.headers.items()})
            attempt = len(self.server.seen[prompt])
            self.server.seen[prompt].append(time.monotonic())
            plan = self.server.plans.get(prompt, [])
            action = plan[attempt] if attempt < len(plan) else "ok"
        kind, _, arg = action.partition(":")
        if kind == "ok":
            self.reply(200, completion_json(prompt, body.get("n", 1), body.get("logprobs", False)))
        elif kind == "429":
            self.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": arg})
        elif kind in ("500", "503", "400"):
            self.reply(int(kind), {"error": {"message": f"scripted {kind}", "type": "x"}})
        elif kind == "hang":
            time.sleep(float(arg))  # longer than the client's timeout; ends by itself
            self.reply(200, completion_json("too late"))
        elif kind == "garbage":
            self.reply_raw(200, b'{"choices": [{"message": ')
        elif kind == "missing":
            self.reply(200, {"choices": [{"index": 0, "finish_reason": "stop"}]})
        elif kind == "drop":
            self.close_connection = True  # no answer at all: the client sees the connection close
        else:
            raise AssertionError(action)

    def reply(self, status, payload, headers=None):
        self.reply_raw(status, json.dumps(payload).encode(), headers)

    def reply_raw(self, status, data, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fast_client(url: str, **options) -> RemoteGenerator:
    options = {"max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 0.5, **options}
    return RemoteGenerator("teacher", url, **options)


def test_every_transient_failure_is_retried_until_success(scripted):
    scripted.plans = {
        "rate": ["429:0.3", "ok"],
        "error": ["500", "503", "ok"],
        "hang": ["hang:1.5", "ok"],
        "garbage": ["garbage", "ok"],
        "missing": ["missing", "ok"],
        "drop": ["drop", "ok"],
        "fine": ["ok"],
    }
    prompts = list(scripted.plans)
    client = fast_client(scripted.url)
    out = client.generate([ask(p) for p in prompts], SamplingParams(max_tokens=5))
    assert [c.text for c in out] == [f"{p}#0" for p in prompts]
    assert all(c.finish_reason == "stop" and c.prompt_tokens == 7 and c.completion_tokens == 3 for c in out)
    assert {p: len(scripted.seen[p]) for p in prompts} == {p: len(plan) for p, plan in scripted.plans.items()}
    assert client.usage.retries == 7 and client.usage.sent == 14 and client.usage.failures == 0
    assert client.usage.prompt_tokens == 7 * len(prompts)
    first, second = scripted.seen["rate"]
    assert second - first >= 0.3  # Retry-After is waited out, though the backoff alone would be ~0.01 s


def test_a_retry_after_pauses_the_other_requests_too(scripted):
    """The limit is the client's: after a 429 asking for 1 s, no request of the generator goes sooner."""
    scripted.plans["a"] = ["429:1"]
    out = fast_client(scripted.url, max_concurrency=1).generate(
        [ask("a"), ask("b")], SamplingParams(max_tokens=2)
    )
    assert [c.ok for c in out] == [True, True]
    (a_first, a_again), (b_first,) = scripted.seen["a"], scripted.seen["b"]
    assert b_first - a_first >= 0.9 and a_again - a_first >= 0.9  # asyncio timers may fire a little early


def test_a_request_that_keeps_failing_is_recorded_and_the_batch_goes_on(scripted):
    scripted.plans = {"doomed": ["500"] * 10, "client-error": ["400"]}
    client = fast_client(scripted.url, max_retries=2)
    doomed, refused, fine = client.generate(
        [ask("doomed"), ask("client-error"), ask("fine")], SamplingParams()
    )
    assert doomed.finish_reason == "error" and doomed.text == ""
    assert doomed.error == "gave up after 3 attempts: HTTP 500: scripted 500"
    assert len(scripted.seen["doomed"]) == 3
    assert refused.finish_reason == "error" and refused.error == "HTTP 400: scripted 400"
    assert len(scripted.seen["client-error"]) == 1  # a 400 is not retried
    assert fine.ok and fine.text == "fine#0"
    assert client.usage.failures == 2


def test_timeouts_and_dropped_connections_become_errors_after_retries(scripted):
    scripted.plans = {"hang": ["hang:1.0"] * 5, "drop": ["drop"] * 5}
    client = fast_client(scripted.url, max_retries=1, timeout=0.3)
    hang, drop = client.generate([ask("hang"), ask("drop")], SamplingParams())
    assert (
        hang.finish_reason == "error" and "Timeout" in hang.error and hang.error.startswith("gave up after 2")
    )
    assert drop.finish_reason == "error" and drop.error.startswith(
        "gave up after 2 attempts: RemoteProtocolError"
    )


def test_rerun_is_served_from_the_cache_and_the_key_is_never_stored(scripted, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_TEST_TEACHER_KEY", SECRET)
    cache = tmp_path / "cache" / "teacher.sqlite"
    convs = [ask(f"prompt {i}") for i in range(5)]
    params = SamplingParams(max_tokens=9, temperature=0.7, seed=3, n=2)
    scripted.plans = {"prompt 4": ["500"] * 10}  # fails on the first run: not cached

    first = fast_client(scripted.url, api_key_env="ZEPHYR_TEST_TEACHER_KEY", cache=cache, max_retries=0)
    out1 = first.generate(convs, params)
    assert [c.ok for c in out1] == [True] * 8 + [False] * 2
    assert all(h.get("authorization") == f"Bearer {SECRET}" for h in scripted.headers)
    sent = scripted.total()

    scripted.plans = {}
    second = fast_client(scripted.url, api_key_env="ZEPHYR_TEST_TEACHER_KEY", cache=cache, max_retries=0)
    out2 = second.generate(convs, params)
    assert scripted.total() == sent + 1  # only the failed conversation is asked again
    assert [c.to_dict() for c in out2[:8]] == [c.to_dict() for c in out1[:8]]
    assert second.usage.cache_hits == 4 and second.usage.sent == 1
    assert [c.text for c in out2[8:]] == ["prompt 4#0", "prompt 4#1"]

    third = fast_client(scripted.url, api_key_env="ZEPHYR_TEST_TEACHER_KEY", cache=cache)
    third.generate(convs, params)
    assert scripted.total() == sent + 1 and third.usage.cache_hits == 5
    # Other parameters are another key.
    third.generate(convs[:1], SamplingParams(max_tokens=9, temperature=0.7, seed=4, n=2))
    assert scripted.total() == sent + 2

    stored = b"".join(p.read_bytes() for p in cache.parent.iterdir())
    assert b"prompt 0" in stored
    assert SECRET.encode() not in stored
    assert SECRET not in repr(third)


def test_the_cache_tells_endpoints_apart(scripted, tmp_path):
    """One request cache serves a whole run: a model of the same name behind another URL is another model."""
    cache, params = tmp_path / "requests.sqlite", SamplingParams(max_tokens=2)
    fast_client(scripted.url, cache=cache).generate([ask("x")], params)
    fast_client(scripted.url.replace("/v1", "/v2"), cache=cache).generate([ask("x")], params)
    fast_client(scripted.url, cache=cache).generate([ask("x")], params)
    assert len(scripted.seen["x"]) == 2


def test_request_body_carries_every_parameter_and_logprobs_come_back(scripted):
    params = SamplingParams(
        max_tokens=12, temperature=0.5, top_p=0.9, seed=11, stop=("\n",), logprobs=True, top_logprobs=2
    )
    [out] = fast_client(scripted.url).generate([ask("lp")], params)
    assert scripted.bodies[0] == {
        "model": "teacher",
        "messages": [{"role": "user", "content": "lp"}],
        "max_tokens": 12,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 1,
        "seed": 11,
        "stop": ["\n"],
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert out.logprobs == [
        {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]}
    ]


def test_bad_conversations_fail_alone(scripted):
    client = fast_client(scripted.url)
    bad, good = client.generate([[{"role": "user"}], ask("ok")], SamplingParams())
    assert bad.finish_reason == "error" and "content" in bad.error
    assert good.ok and scripted.total() == 1


def test_costs_are_counted_when_prices_are_given(scripted):
    client = fast_client(scripted.url, prices={"prompt": 2.0, "completion": 10.0})
    client.generate([ask("a"), ask("b")], SamplingParams())
    assert client.usage.prompt_tokens == 14 and client.usage.completion_tokens == 6
    assert client.usage.cost == pytest.approx((14 * 2.0 + 6 * 10.0) / 1e6)


def test_generate_works_inside_a_running_event_loop(scripted):
    client = fast_client(scripted.url)

    async def caller():
        return client.generate([ask("async")], SamplingParams())

    [out] = asyncio.run(caller())
    assert out.text == "async#0"


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("999999") == 600.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_parse_response_splits_tokens_over_choices_and_rejects_bad_shapes():
    completions, prompt, generated = parse_response(
        {
            "choices": [
                {"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
                {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 7},
        },
        n=2,
    )
    assert [(c.text, c.finish_reason, c.completion_tokens, c.prompt_tokens) for c in completions] == [
        ("a", "stop", 4, 4),
        ("b", "length", 3, 4),
    ]
    assert (prompt, generated) == (4, 7)
    for bad in ([], {"choices": []}, {"choices": [{"message": {"content": 3}}]}, {"choices": [{}]}):
        with pytest.raises(MalformedResponse):
            parse_response(bad, n=1)
    two = [{"index": None, "message": {"content": "a"}}, {"index": 0, "message": {"content": "b"}}]
    with pytest.raises(MalformedResponse, match="a choice's index is None, not a number"):
        parse_response({"choices": two}, n=2)  # several choices need their places
    [filtered], _, _ = parse_response(
        {"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]}, 1
    )
    assert filtered.finish_reason == "error"


def test_request_body_leaves_out_unset_options():
    body = request_body("m", ask("x"), SamplingParams())
    assert body == {
        "model": "m",
        "messages": ask("x"),
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "n": 1,
    }


def test_openai_specs(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    generator = make_generator("openai:gpt-4o-mini@http://127.0.0.1:9/v1/", max_concurrency=2)
    assert isinstance(generator, RemoteGenerator)
    assert (generator.model, generator.base_url, generator.max_concurrency) == (
        "gpt-4o-mini",
        "http://127.0.0.1:9/v1",
        2,
    )
    assert generator.model_id == "openai:gpt-4o-mini@http://127.0.0.1:9/v1"
    assert make_generator("openai:gpt-4").base_url == "https://api.openai.com/v1"
    assert make_generator("openai:org/model@name@https://host/v1").model == "org/model@name"
    with pytest.raises(ZephyrError, match="unknown generation option"):
        make_generator("openai:m@http://h/v1", batch_size=3)
    with pytest.raises(ZephyrError, match="NOT_SET_ANYWHERE"):
        make_generator("openai:m@http://h/v1", api_key_env="NOT_SET_ANYWHERE")
    with pytest.raises(ZephyrError, match="openai:MODEL@BASE_URL"):
        make_generator("openai:m@host:8000")
