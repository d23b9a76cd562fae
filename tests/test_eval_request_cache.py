"""MT-Bench and AlpacaEval with HTTP models: the model's answers and the judge's go to the run's request
cache (`RUN/.../cache/requests.sqlite`, beside the eval folders), so an eval redone from scratch pays for no
call twice; local models are never given the cache."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zephyr.core.config import AlpacaEvalEvalConfig, MtBenchEvalConfig
from zephyr.generation.cache import request_cache_options
from zephyr.stages.alpaca_eval.run import run_alpaca_eval
from zephyr.stages.mt_bench.run import run_mt_bench

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CountingServer(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint answering every chat request with "Rating: [[7]]", counting calls by
    model name."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), CountingHandler)
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class CountingHandler(BaseHTTPRequestHandler):
    server: CountingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.calls[body["model"]] = self.server.calls.get(body["model"], 0) + 1
        choices = [
            {
                "index": k,
                "message": {"role": "assistant", "content": "Rating: [[7]]"},
                "finish_reason": "stop",
            }
            for k in range(body.get("n", 1))
        ]
        data = json.dumps(
            {"choices": choices, "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = CountingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_only_http_models_get_the_request_cache(tmp_path):
    out = tmp_path / "run" / "eval" / "sft" / "mt_bench"
    assert request_cache_options("openai:gpt-4@http://h/v1", out) == {
        "cache": str((tmp_path / "run" / "eval" / "sft" / "cache" / "requests.sqlite").resolve())
    }
    assert request_cache_options("asset:smollm2-135m-instruct", out) == {}
    assert request_cache_options("openai:gpt-4@http://h/v1", out, cache=False) == {}
    assert request_cache_options("openai:gpt-4@http://h/v1", None) == {}


def test_mt_bench_redone_from_scratch_asks_nothing_again(tmp_path, server):
    cfg = MtBenchEvalConfig(judge=f"openai:judge@{server.url}", limit=2, max_new_tokens=8, judge_max_tokens=8)
    model = f"openai:student@{server.url}"
    first = run_mt_bench(cfg, model, tmp_path / "eval" / "mt_bench")
    calls = dict(server.calls)
    assert calls == {"student": 2 * 2, "judge": 2 * 2}  # two questions, two turns each
    assert first["n_scored"] == 4 and first["score"] == 7.0

    again = run_mt_bench(
        cfg, model, tmp_path / "eval" / "mt_bench-again"
    )  # a fresh folder: nothing to resume
    assert server.calls == calls
    assert again["score"] == first["score"] and again["n_scored"] == 4
    assert (tmp_path / "eval" / "cache" / "requests.sqlite").is_file()


def test_alpaca_eval_redone_from_scratch_asks_nothing_again(tmp_path, server):
    instructions = tmp_path / "instructions.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w}!", "generator": "ref"} for w in ("a", "b", "c")]
    instructions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AlpacaEvalEvalConfig(
        judge=f"openai:judge@{server.url}", instructions=str(instructions), max_new_tokens=8
    )
    model = f"openai:student@{server.url}"
    run_alpaca_eval(cfg, model, tmp_path / "eval" / "alpaca_eval")
    calls = dict(server.calls)
    assert calls["student"] == 3 and calls["judge"] >= 3
    first = (tmp_path / "eval" / "alpaca_eval" / "annotations.jsonl").read_text()

    run_alpaca_eval(cfg, model, tmp_path / "eval" / "alpaca_eval-again")
    assert server.calls == calls
    assert (tmp_path / "eval" / "alpaca_eval-again" / "annotations.jsonl").read_text() == first
