"""Model-major scheduling (one local model resident), the stage answer cache, the client-side rate limit, and
the in-process vLLM backend through a fake engine (no GPU, no vllm package)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from zephyr.core.config import GeneratorConfig, build
from zephyr.core.errors import ZephyrError
from zephyr.generation import Completion, SamplingParams, Usage, make_generator
from zephyr.generation.cache import CachedGenerator, ResponseCache, request_cache_path
from zephyr.generation.ratelimit import RateLimit, estimate_tokens
from zephyr.generation.schedule import Resident, backend_options, load_key
from zephyr.stages.feedback.run import generation_order


class Fake:
    """A generator that says which config built it; `close()` is recorded."""

    def __init__(self, gcfg, log):
        self.model_id, self.log, self.usage = gcfg.model, log, Usage()
        log.append(("load", gcfg.model))

    def generate(self, conversations, params):
        self.log.append(("generate", self.model_id, len(conversations)))
        self.usage.requests += len(conversations)
        return [Completion(f"{self.model_id}:{c[-1]['content']}", "stop", 3, 2) for c in conversations]

    def close(self):
        self.log.append(("close", self.model_id))


def ask(text):
    return [{"role": "user", "content": text}]


def test_configs_of_one_model_share_it_and_another_local_model_releases_it():
    log: list = []
    resident = Resident(lambda gcfg: Fake(gcfg, log))
    hot, cold = GeneratorConfig(model="m1", temperature=1.0), GeneratorConfig(model="m1", temperature=0.0)
    other = GeneratorConfig(model="m2")
    remote = GeneratorConfig(model="openai:gpt@http://127.0.0.1:9/v1")
    assert resident.get(hot) is resident.get(cold)  # sampling is per request: one copy of the weights
    resident.get(remote)
    resident.get(other)
    assert resident.holds(other) and not resident.holds(hot)
    resident.get(remote)  # HTTP generators are kept: no weights to free
    resident.close()
    assert log == [("load", "m1"), ("load", remote.model), ("close", "m1"), ("load", "m2"), ("close", "m2"),
                   ("close", remote.model)]  # fmt: skip
    assert resident.loads == [load_key(hot), load_key(other)]


def test_local_generators_run_model_by_model_with_the_judges_model_last():
    pool = [GeneratorConfig(model=m, name=f"g{i}") for i, m in enumerate(["a", "judge", "b", "a", "judge"])]
    order = generation_order(range(5), pool, load_key, last=load_key(GeneratorConfig(model="judge")))
    assert order == [0, 3, 2, 1, 4]


def test_backend_options_come_from_the_config_and_http_answers_go_to_the_run_cache(tmp_path):
    vllm = build(
        GeneratorConfig,
        {"model": "vllm:/m", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 4096},
        "g",
    )
    assert backend_options(vllm) == {
        "dtype": "auto",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 4096,
    }
    assert backend_options(GeneratorConfig(model="/m", dtype="bfloat16", batch_size=4)) == {
        "batch_size": 4,
        "dtype": "bfloat16",
    }
    http = GeneratorConfig(model="openai:gpt@http://h/v1", requests_per_minute=60)
    run = tmp_path / "run"
    options = backend_options(http, run / "feedback")
    assert (
        options["cache"]
        == str(run / "cache" / "requests.sqlite")
        == str(request_cache_path(run / "feedback"))
    )
    assert options["requests_per_minute"] == 60 and options["tokens_per_minute"] is None
    assert "cache" not in backend_options(GeneratorConfig(model=http.model, cache=False), run / "feedback")


def test_stored_answers_load_no_model_and_only_reproducible_answers_are_stored(tmp_path):
    log: list = []
    resolved = []
    model = Fake(GeneratorConfig(model="m"), log)

    def resolve():  # as `Resident.get`: loads the model on its first call
        resolved.append(1)
        return model

    cache = ResponseCache(tmp_path / "answers.sqlite")
    seeded, greedy = SamplingParams(temperature=0.7, seed=3), SamplingParams()
    first = CachedGenerator(resolve, cache, "m")
    assert [c.text for c in first.generate([ask("x"), ask("y")], seeded)] == ["m:x", "m:y"]
    again = CachedGenerator(resolve, cache, "m")
    assert [c.text for c in again.generate([ask("x"), ask("y")], seeded)] == ["m:x", "m:y"]
    assert len(resolved) == 1 and again.usage.cache_hits == 2 and again.usage.sent == 0
    assert [c.text for c in again.generate([ask("x"), ask("z")], greedy)] == ["m:x", "m:z"]
    assert log[-1] == ("generate", "m", 2) and len(cache) == 4
    again.generate([ask("x")], SamplingParams(temperature=0.7))  # unseeded: a new sample every time
    again.generate([ask("x")], SamplingParams(temperature=0.7))
    assert len(cache) == 4 and log[-1] == ("generate", "m", 1) and log[-2] == ("generate", "m", 1)


def test_failed_answers_are_asked_again(tmp_path):
    calls = []

    class Flaky:
        model_id = "m"

        def generate(self, conversations, params):
            calls.append(len(calls))
            if len(calls) == 1:
                return [Completion.failed("HTTP 500") for _ in conversations]
            return [Completion("ok", "stop") for _ in conversations]

    cache = ResponseCache(tmp_path / "answers.sqlite")
    generator = CachedGenerator(Flaky, cache, "m")
    assert not generator.generate([ask("x")], SamplingParams())[0].ok
    assert generator.generate([ask("x")], SamplingParams())[0].text == "ok"
    assert generator.generate([ask("x")], SamplingParams())[0].text == "ok"
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------------
# Rate limit (times by hand: the window is 60 s)


def test_requests_per_minute():
    limit = RateLimit(requests_per_minute=2)
    limit.record(1, now=0.0)
    assert limit.delay(1, now=1.0) == 0.0
    limit.record(1, now=10.0)
    assert limit.delay(1, now=30.0) == 30.0  # the request of t=0 leaves the window at t=60
    assert limit.delay(1, now=60.0) == 0.0
    limit.record(1, now=60.0)
    assert limit.delay(1, now=61.0) == 9.0  # now the one of t=10 must leave


def test_tokens_per_minute_and_settling_to_the_real_usage():
    limit = RateLimit(tokens_per_minute=1000)
    first = limit.record(600, now=0.0)
    limit.record(300, now=20.0)
    assert limit.delay(100, now=25.0) == 0.0  # 600 + 300 + 100 = 1000
    assert limit.delay(200, now=25.0) == 35.0  # 1100: the 600 of t=0 must leave (t=60)
    limit.settle(first, 400)  # its answer used 400 tokens, not the 600 estimated
    assert limit.delay(200, now=25.0) == 0.0
    assert limit.delay(2500, now=25.0) == 55.0  # larger than the limit: alone, once the window is empty
    assert estimate_tokens(prompt_chars=10, max_tokens=100, n=2) == 3 + 200


def test_a_retry_after_pauses_every_request():
    limit = RateLimit()
    assert limit.delay(10**9, now=0.0) == 0.0  # no limits: never waits
    limit.pause(4.0, now=1.0)
    assert limit.delay(1, now=2.0) == 3.0
    limit.pause(1.0, now=2.0)  # a shorter one does not cut the longer short
    assert limit.delay(1, now=4.5) == 0.5
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimit(requests_per_minute=0)


# ---------------------------------------------------------------------------------------------------------
# vLLM in this process, through a fake engine


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model_dir):
    engines: list = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.shut = kwargs, False
            self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.shutdown))
            engines.append(self)

        def shutdown(self):
            self.shut = True

        def chat(self, conversations, params, **kwargs):
            return [
                SimpleNamespace(
                    prompt_token_ids=[1, 2],
                    outputs=[
                        SimpleNamespace(
                            index=0, text="hi", token_ids=[5], logprobs=None, finish_reason="stop"
                        )
                    ],
                )
                for _ in conversations
            ]

    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)
    return engines


def test_vllm_settings_reach_the_engine_and_one_engine_lives_at_a_time(fake_vllm, tiny_model_dir):
    gcfg = build(
        GeneratorConfig,
        {
            "model": f"vllm:{tiny_model_dir}",
            "dtype": "bfloat16",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.6,
            "max_model_len": 1024,
        },
        "feedback.generators[0]",
    )
    resident = Resident(lambda g: make_generator(g.model, **backend_options(g)))
    first = resident.get(gcfg)
    assert first.generate([ask("Hello")], SamplingParams())[0].text == "hi"
    settings = {
        k: fake_vllm[0].kwargs[k] for k in ("dtype", "tensor_parallel_size", "gpu_memory_utilization")
    }
    assert settings == {"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.6}
    assert fake_vllm[0].kwargs["max_model_len"] == 1024
    with pytest.raises(ZephyrError, match=r"still alive.*one vLLM engine at a time"):
        make_generator(f"vllm:{tiny_model_dir}")  # built behind the schedule's back
    second = GeneratorConfig(model=f"vllm:{tiny_model_dir}", max_model_len=512)
    resident.get(second)  # the schedule releases the first engine before the second is built
    assert fake_vllm[0].shut and len(fake_vllm) == 2
    assert "the engine was closed" in first.generate([ask("Hello")], SamplingParams())[0].error
    resident.close()
    assert fake_vllm[1].shut
