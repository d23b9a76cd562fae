"""zephyr serve over real loopback sockets, called through the OpenAI-compatible backend.

A tiny random Llama with SmolLM2's tokenizer (ChatML template) keeps these fast; one slow test serves the
real SmolLM2-135M-Instruct, one runs the `zephyr serve` command and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from conftest import make_tiny_llama
from zephyr.generation import Completion, SamplingParams
from zephyr.generation.local import LocalGenerator
from zephyr.generation.remote import RemoteGenerator
from zephyr.serve import BatchWorker, RequestError, parse_chat_request, start_server

KEY_ENV = "ZEPHYR_TEST_SERVE_KEY"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    from zephyr.models import load as models

    return models.load_tokenizer("asset:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return LocalGenerator(make_tiny_llama(len(tokenizer), seed=1), tokenizer, model_id="tiny", batch_size=16)


@pytest.fixture(scope="module")
def server(tiny):
    srv, _, url = start_server(tiny, max_tokens_limit=64)
    yield srv, url
    srv.close()


@pytest.fixture(scope="module")
def keyed_server(tiny):
    srv, _, url = start_server(tiny, api_key="s3cret-key", max_tokens_limit=64)
    yield srv, url
    srv.close()


def test_completions_through_the_openai_backend_match_local_generation(server, tiny):
    _, url = server
    convs = [ask("What is the capital of France?"), ask("Hi"), ask("Tell me about the moon and the stars.")]
    params = SamplingParams(max_tokens=6)
    remote = RemoteGenerator("tiny", url, max_retries=0).generate(convs, params)
    local = tiny.generate(convs, params)
    for conv, r, loc in zip(convs, remote, local, strict=True):
        assert r.ok, r.error
        assert r.text == loc.text
        assert r.finish_reason == loc.finish_reason
        assert r.prompt_tokens == tiny.count_prompt_tokens(conv) > 0
        assert 1 <= r.completion_tokens == loc.completion_tokens <= 6


def test_models_and_health(server):
    _, url = server
    models = httpx.get(f"{url}/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/nothing").status_code == 404


def test_api_key_is_enforced(keyed_server, monkeypatch):
    _, url = keyed_server
    body = {"messages": ask("Hi"), "max_tokens": 2}
    missing = httpx.post(f"{url}/chat/completions", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200

    monkeypatch.setenv(KEY_ENV, "not-the-key")
    refused = RemoteGenerator("tiny", url, api_key_env=KEY_ENV, backoff_base=0)
    [failure] = refused.generate([ask("Hi")], SamplingParams(max_tokens=2))
    assert failure.finish_reason == "error" and "401" in failure.error
    assert refused.usage.sent == 1  # an auth failure is not retried

    monkeypatch.setenv(KEY_ENV, "s3cret-key")
    [ok] = RemoteGenerator("tiny", url, api_key_env=KEY_ENV).generate(
        [ask("Hi")], SamplingParams(max_tokens=2)
    )
    assert ok.ok and ok.completion_tokens >= 1


def test_body_over_one_mebibyte_is_refused_with_413(server):
    _, url = server
    big = {"messages": ask("x" * (2 << 20)), "max_tokens": 2}
    response = httpx.post(f"{url}/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    # A Content-Length far past the limit is refused before any byte of the body is read.
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": ask("Hi"), "max_tokens": 65}, 400, "max_tokens"),
        ({"messages": ask("Hi"), "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": ["user"], "content": "Hi"}]}, 400, "messages[0].role"),  # not a name at all
        ({"messages": ask("Hi"), "temperature": 3}, 400, "temperature"),
        ({"messages": ask("Hi"), "top_p": float("nan")}, 400, "top_p"),  # json.dumps writes NaN
        ({"messages": ask("Hi"), "top_logprobs": 2}, 400, "top_logprobs"),
        ({"messages": ask("Hi"), "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": ask("Hi"), "model": "gpt-4"}, 404, "model"),
        ([1, 2], 400, None),
    ],
)
def test_bad_requests_get_openai_style_errors(server, body, status, param):
    _, url = server
    headers = {"Content-Type": "application/json"}  # json.dumps, which httpx's json= is not: it writes NaN
    response = httpx.post(f"{url}/chat/completions", content=json.dumps(body), headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_malformed_json_is_a_400(server):
    _, url = server
    response = httpx.post(
        f"{url}/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_prompt_longer_than_the_context_is_a_400(tokenizer):
    short = LocalGenerator(
        make_tiny_llama(len(tokenizer), max_position_embeddings=32), tokenizer, model_id="short"
    )
    srv, _, url = start_server(short)
    try:
        response = httpx.post(
            f"{url}/chat/completions", json={"messages": ask("word " * 50), "max_tokens": 2}
        )
    finally:
        srv.close()
    assert response.status_code == 400
    assert "context is 32 tokens" in response.json()["error"]["message"]


def test_streaming_sends_sse_chunks_that_add_up_to_the_completion(server, tiny):
    _, url = server
    body = {
        "model": "tiny",
        "messages": ask("Write a poem."),
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) >= 2  # streamed piece by piece, not in one block
    [expected] = tiny.generate([body["messages"]], SamplingParams(max_tokens=8))
    assert text == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == expected.finish_reason
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == expected.completion_tokens


def test_logprobs_seeds_and_n_choices(server):
    _, url = server
    body = {"messages": ask("Hi"), "max_tokens": 5, "logprobs": True, "top_logprobs": 3, "temperature": 0}
    answer = httpx.post(f"{url}/chat/completions", json=body).json()
    content = answer["choices"][0]["logprobs"]["content"]
    stopped = answer["choices"][0]["finish_reason"] == "stop"  # the end-of-turn token has no entry
    assert len(content) == answer["usage"]["completion_tokens"] - stopped
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"]) for t in content)

    sampled = {"messages": ask("Hi"), "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    first = httpx.post(f"{url}/chat/completions", json=sampled).json()
    again = httpx.post(f"{url}/chat/completions", json=sampled).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) == 3  # seed + k per choice: three different samples
    assert first["usage"]["completion_tokens"] == 24  # a random model does not stop in 8 tokens


def test_concurrent_requests_are_batched(server, tiny):
    srv, url = server
    batches_before, requests_before = srv.worker.batches_run, srv.worker.requests_run
    convs = [ask(f"Question number {i}: what is {i} + {i}?") for i in range(64)]
    params = SamplingParams(max_tokens=4)
    remote = RemoteGenerator("tiny", url, max_concurrency=64, max_retries=0, timeout=120)
    answers = remote.generate(convs, params)
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok][:3]
    assert srv.worker.requests_run - requests_before == 64
    assert srv.worker.batches_run - batches_before < 64 / 4
    assert remote.usage.sent == 64 and remote.usage.completion_tokens == sum(
        a.completion_tokens for a in answers
    )
    # Each request was answered with its own completion.
    expected = tiny.generate(convs[:8], params)
    assert [a.text for a in answers[:8]] == [e.text for e in expected]


# ---------------------------------------------------------------------------------------------------------
# Pieces without sockets


def test_the_model_is_known_by_its_served_name_and_its_path_never_leaves_the_server(tmp_path):
    folder = tmp_path / "checkpoints" / "zephyr-dpo"
    folder.mkdir(parents=True)

    class Checkpoint:
        model_id = str(folder)

        def generate(self, conversations, params):
            text = conversations[-1][-1]["content"]
            if text == "fail":
                return [Completion.failed(f"OSError: cannot read {folder}/model.safetensors")]
            return [Completion(f"hello from {folder}", "stop", 3, 2)]

    srv, _, url = start_server(Checkpoint())
    try:
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == ["zephyr-dpo"]
        ok = httpx.post(f"{url}/chat/completions", json={"model": "zephyr-dpo", "messages": ask("hi")})
        failed = httpx.post(f"{url}/chat/completions", json={"messages": ask("fail")})
        other = httpx.post(f"{url}/chat/completions", json={"model": "gpt-4", "messages": ask("hi")})
        streamed = httpx.post(f"{url}/chat/completions", json={"messages": ask("hi"), "stream": True})
    finally:
        srv.close()
    assert ok.json()["model"] == "zephyr-dpo"
    assert ok.json()["choices"][0]["message"]["content"] == "hello from zephyr-dpo"
    assert failed.status_code == 500
    assert (
        failed.json()["error"]["message"]
        == "generation failed: OSError: cannot read zephyr-dpo/model.safetensors"
    )
    assert other.status_code == 404 and "this server serves 'zephyr-dpo'" in other.json()["error"]["message"]
    assert '"model": "zephyr-dpo"' in streamed.text
    for response in (ok, failed, other, streamed):
        assert str(tmp_path) not in response.text

    srv, _, url = start_server(Checkpoint(), served_model_name="zephyr-7b")
    try:
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == ["zephyr-7b"]
        named = httpx.post(f"{url}/chat/completions", json={"model": "zephyr-7b", "messages": ask("hi")})
    finally:
        srv.close()
    assert named.json()["model"] == "zephyr-7b" and str(tmp_path) not in named.text


def test_parse_chat_request_defaults_and_normalization():
    request = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "stop": "\n\n",
        },
        model_id="m",
        max_tokens_limit=100,
    )
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert request.params == SamplingParams(max_tokens=100, temperature=1.0, top_p=1.0, stop=("\n\n",))
    assert not request.stream


def test_parse_chat_request_refuses_stream_with_logprobs():
    with pytest.raises(RequestError) as info:
        parse_chat_request(
            {"messages": ask("x"), "stream": True, "logprobs": True}, model_id="m", max_tokens_limit=10
        )
    assert info.value.status == 400 and info.value.param == "logprobs"


class RecordingGenerator:
    """A generator without per-request batching: the worker must group requests by parameters."""

    model_id = "fake"

    def __init__(self):
        self.calls: list[tuple[int, SamplingParams]] = []
        self.release = threading.Event()

    def generate(self, conversations, params):
        self.release.wait(10)
        self.calls.append((len(conversations), params))
        return [
            Completion(c[-1]["content"].upper(), "stop", 1, 1) for c in conversations for _ in range(params.n)
        ]


def test_worker_groups_waiting_requests_by_parameters():
    from zephyr.generation import Request

    fake = RecordingGenerator()
    worker = BatchWorker(fake, max_batch_size=16, max_wait_s=0.5)
    a, b = SamplingParams(max_tokens=3), SamplingParams(max_tokens=5, n=2)
    jobs = [worker.submit(Request(ask(f"q{i}"), a if i % 2 else b)) for i in range(6)]
    fake.release.set()
    worker.start()
    try:
        assert all(job.done.wait(10) for job in jobs)
    finally:
        worker.stop()
    assert worker.batches_run == 1 and worker.requests_run == 6
    assert sorted(fake.calls, key=lambda call: call[1].max_tokens) == [(3, a), (3, b)]
    assert [c.text for c in jobs[1].result] == ["Q1"]
    assert [c.text for c in jobs[0].result] == ["Q0", "Q0"]


def test_stopped_worker_fails_waiting_requests():
    from zephyr.generation import Request

    worker = BatchWorker(RecordingGenerator())
    worker.stop()
    job = worker.submit(Request(ask("late"), SamplingParams()))
    assert job.done.is_set()
    assert job.result[0].finish_reason == "error" and "shutting down" in job.result[0].error


# ---------------------------------------------------------------------------------------------------------
# Slow: the real model, the command


@pytest.mark.slow
def test_smollm2_served_answers_paris():
    generator = LocalGenerator.from_spec("asset:smollm2-135m-instruct")
    srv, _, url = start_server(generator)
    try:
        remote = RemoteGenerator("smollm2-135m-instruct", url, timeout=300)  # the served name of the asset
        [answer] = remote.generate([ask("What is the capital of France?")], SamplingParams(max_tokens=20))
    finally:
        srv.close()
    assert answer.ok and answer.finish_reason == "stop"
    assert "Paris" in answer.text and "<|im_end|>" not in answer.text


@pytest.mark.slow
def test_zephyr_serve_command_serves_and_stops_on_sigterm(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "ZEPHYR_API_KEY": "k3y", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zephyr", "serve", str(model_dir), "--port", "0", "--max-tokens-limit", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # blocks until the server prints its URL (or exits)
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].strip()
        headers = {"Authorization": "Bearer k3y"}
        body = {"messages": ask("Hi"), "max_tokens": 3}
        answer = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60).json()
        assert answer["usage"]["completion_tokens"] >= 1
        assert httpx.post(f"{url}/chat/completions", json=body, timeout=60).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
