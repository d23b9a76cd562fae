"""Safety: no pickled weights, no remote code unless a recipe asks, API keys never written, and `zephyr serve`
under load and against malformed traffic (the limits already pinned in tests/test_serve.py are not repeated).
"""

from __future__ import annotations

import ast
import inspect
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import make_tiny_llama
from zephyr.generation import SamplingParams
from zephyr.generation.local import LocalGenerator
from zephyr.serve import start_server

SRC = Path(__file__).parents[1] / "src" / "zephyr"
SECRET = "sk-zephyr-test-NEVER-WRITE-4242"


def _calls(name: str):
    """(file, call node) of every call of `*.NAME(...)` or `NAME(...)` in zephyr's sources."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path.relative_to(SRC), node


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


# ---------------------------------------------------------------------------------------------------------
# Weights: safetensors, weights_only


def test_sources_never_unpickle():
    """torch.load only with weights_only=True; no pickle.load at all (pickles run code on load)."""
    for path, call in _calls("load"):
        func = call.func
        owner = (
            func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        )
        assert owner not in ("pickle", "dill", "joblib"), f"{path}:{call.lineno}: {owner}.load"
        if owner == "torch":
            flag = _keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}"
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "weights_only=False" not in text, path
        assert "use_safetensors=False" not in text, path


def test_resume_restores_the_training_state_with_weights_only(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    """accelerate restores optimizer, scheduler and RNG state through torch.load: every call is weights_only."""
    import torch

    from zephyr.core.config import SFTConfig
    from zephyr.stages.sft.run import run_sft

    data = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"
    cfg = SFTConfig(
        model=str(tiny_model_dir),
        train_data=str(data),
        max_samples=8,
        max_length=64,
        per_device_batch_size=2,
        max_steps=2,
        save_steps=1,
        precision="fp32",
        output_dir=str(tmp_path / "run"),
    )
    run_sft(cfg)
    (tmp_path / "run" / "final" / "config.json").unlink()  # as if killed after checkpoint-1
    real_load = torch.load
    seen: list[object] = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    run_sft(cfg, resume=True)
    assert seen and all(flag is True for flag in seen), seen


# ---------------------------------------------------------------------------------------------------------
# Remote code


def test_every_model_load_passes_trust_remote_code_explicitly():
    """All model and tokenizer loading goes through zephyr.models.load, which forwards the recipe's flag (default
    false). The one other call converts the sha256-verified GGUF asset and loads no code."""
    from zephyr.models import load as models

    for path, call in _calls("from_pretrained"):
        if str(path) == "models/assets.py":
            assert _keyword(call, "gguf_file") is not None
            continue
        flag = _keyword(call, "trust_remote_code")
        assert isinstance(flag, ast.Name) and flag.id == "trust_remote_code", f"{path}:{call.lineno}"
    for function in (models.load_tokenizer, models.load_model, LocalGenerator.from_spec):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function


def test_trust_remote_code_is_false_unless_the_recipe_sets_it(tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    from zephyr.core.config import load_recipe
    from zephyr.stages.sft.run import SFTTask

    recipe = tmp_path / "recipe.yaml"
    data = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"
    recipe.write_text(f"sft:\n  model: {tiny_model_dir}\n  train_data: {data}\n  max_samples: 2\n")
    seen: list[object] = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    default = load_recipe(recipe, []).sft
    assert default.trust_remote_code is False
    SFTTask(default)
    SFTTask(load_recipe(recipe, ["sft.trust_remote_code=true"]).sft)
    assert seen == [False, True]


# ---------------------------------------------------------------------------------------------------------
# API keys are never written


def test_an_api_key_reaches_the_server_but_no_file_of_a_feedback_run(tmp_path, monkeypatch):
    """Generators and judge over HTTP with a key: every request carries it; no output, audit log or cache
    file of the run holds it."""
    from test_feedback_runner import QUALITY, FeedbackHandler, FeedbackServer, config, write_prompts
    from zephyr.core.config import GeneratorConfig, JudgeConfig
    from zephyr.stages.feedback.run import run_feedback

    headers: list[str | None] = []

    class KeyedHandler(FeedbackHandler):
        def do_POST(self):
            headers.append(self.headers.get("Authorization"))
            super().do_POST()

    server = FeedbackServer()
    server.RequestHandlerClass = KeyedHandler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ZEPHYR_TEST_FEEDBACK_KEY", SECRET)
        home = tmp_path / "home"
        monkeypatch.setenv("ZEPHYR_HOME", str(home))

        def gen(model: str, name: str, **extra) -> GeneratorConfig:
            url = f"openai:{model}@{server.url}"
            return GeneratorConfig(model=url, name=name, api_key_env="ZEPHYR_TEST_FEEDBACK_KEY", **extra)

        cfg = config(
            tmp_path,
            write_prompts(tmp_path / "prompts.jsonl", 3),
            generators=[gen(name, name, max_retries=0) for name in QUALITY],
            completions_per_prompt=2,
            judge=JudgeConfig(model=gen("judge", "judge", temperature=0.0)),
        )
        result = run_feedback(cfg)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.newly_rated == 3
    assert headers and set(headers) == {f"Bearer {SECRET}"}
    written = [p for p in [*tmp_path.rglob("*")] if p.is_file()]
    names = {p.name for p in written}
    assert {"judge_audit.jsonl", "requests.sqlite", "rated.jsonl", "pairs.jsonl"} <= names, names
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------------
# zephyr serve


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny():
    from zephyr.models import load as models

    tokenizer = models.load_tokenizer("asset:smollm2-135m-instruct")
    return LocalGenerator(make_tiny_llama(len(tokenizer), seed=3), tokenizer, model_id="tiny", batch_size=32)


@pytest.fixture(scope="module")
def keyed(tiny):
    srv, _, url = start_server(tiny, api_key=SECRET, max_tokens_limit=8, access_log=True)
    yield srv, url
    srv.close()


def test_loopback_is_the_default_address():
    from zephyr import serve
    from zephyr.cli import build_parser

    assert inspect.signature(serve.start_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve.serve).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"


@pytest.mark.slow
def test_one_hundred_concurrent_requests_are_each_answered_correctly(keyed, tiny, one_thread):
    srv, url = keyed
    n = 100
    prompts = [f"Request {i}: name the number after {i}." for i in range(n)]
    expected = tiny.generate([ask(p) for p in prompts], SamplingParams(max_tokens=4, temperature=0.0))
    start = threading.Barrier(n)
    requests_before = srv.worker.requests_run

    def one(i: int) -> httpx.Response:
        body = {"messages": ask(prompts[i]), "max_tokens": 4, "temperature": 0}
        start.wait(timeout=60)  # all 100 in flight together
        return httpx.post(
            f"{url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=300,
        )

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    assert [a.status_code for a in answers] == [200] * n
    texts = [a.json()["choices"][0]["message"]["content"] for a in answers]
    assert texts == [e.text for e in expected]
    assert srv.worker.requests_run - requests_before == n


def test_the_key_is_never_logged_or_echoed(keyed, capfd):
    _, url = keyed
    body = {"messages": ask("Hi"), "max_tokens": 2}
    ok = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"})
    near = SECRET[:-1] + "X"  # one character off
    refused = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {near}"})
    assert (ok.status_code, refused.status_code) == (200, 401)
    assert near not in refused.text and SECRET not in refused.text
    logged = capfd.readouterr()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in logged.err  # the access log is on
    assert SECRET not in logged.err + logged.out and near not in logged.err + logged.out


def _raw(url: str, data: bytes) -> tuple[str, dict]:
    """Send raw bytes; return the status line and the JSON body of the answer."""
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/models extra HTTP/1.1\r\nHost: x\r\n\r\n", "400"),  # a malformed request line
        (b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "501"),  # a method the server does not have
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", "431"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "411",
        ),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", "400"),
    ],
    ids=["request-line", "method", "header-too-long", "chunked", "negative-length"],
)
def test_malformed_http_gets_a_json_error(keyed, request_bytes, status):
    _, url = keyed
    status_line, body = _raw(url, request_bytes)
    assert status_line.split()[1] == status, status_line
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_json_nested_too_deeply_is_a_400_not_a_dropped_connection(keyed):
    _, url = keyed
    nested = b"[" * 100_000 + b"]" * 100_000  # 200 kB: under the body limit, over the decoder's recursion
    response = httpx.post(
        f"{url}/chat/completions",
        content=nested,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
    )
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["error"]["message"]


def test_max_tokens_over_the_cap_is_refused_and_absent_means_the_cap(keyed):
    _, url = keyed
    auth = {"Authorization": f"Bearer {SECRET}"}
    over = httpx.post(f"{url}/chat/completions", json={"messages": ask("Hi"), "max_tokens": 9}, headers=auth)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    assert "limit of 8" in over.json()["error"]["message"]
    capped = httpx.post(
        f"{url}/chat/completions", json={"messages": ask("Hi"), "temperature": 0}, headers=auth
    ).json()
    assert 1 <= capped["usage"]["completion_tokens"] <= 8
