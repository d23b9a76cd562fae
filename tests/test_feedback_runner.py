"""`zephyr feedback` end to end: prompts in, rated records, pairs and statistics out.

Fake generators (each writes answers of a fixed quality `q=N`) and a scripted judge (rates by that marker)
make the expected pairs known in advance. One test runs the HTTP backend against a loopback server whose
judge answers garbage 30% of the time; the slow one runs SmolLM2-135M-Instruct as generators and judge.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rounding import step_zero_tolerance
from test_judge import ScriptedJudge, formatted_answer, quality
from zephyr import io
from zephyr.core.config import FeedbackConfig, GeneratorConfig, JudgeConfig, Price, build, load_recipe
from zephyr.core.errors import ConfigError, DataError
from zephyr.generation import Completion, Usage
from zephyr.judge import parsing
from zephyr.stages.feedback.run import draw_generators, read_prompts, run_feedback

ROOT = Path(__file__).parents[1]
QUALITY = {"gen-a": 2, "gen-b": 4, "gen-c": 6, "gen-d": 8}


class FakeGenerator:
    """Answers every conversation with `NAME says <last user message> q=QUALITY`; records what it was sent."""

    def __init__(self, name: str, fail_on: tuple[str, ...] = (), empty_on: tuple[str, ...] = ()):
        self.name, self.fail_on, self.empty_on = name, fail_on, empty_on
        self.model_id = f"fake:{name}"
        self.seen: list[list[dict]] = []
        self.usage = Usage()

    def generate(self, conversations, params):
        out = []
        for conversation in conversations:
            self.seen.append(list(conversation))
            user = conversation[-1]["content"]
            if any(word in user for word in self.fail_on):
                out.append(Completion.failed("HTTP 400: refused"))
            elif any(word in user for word in self.empty_on):
                out.append(Completion("  ", "stop", 10, 1))
            else:
                out.append(Completion(f"{self.name} says {user} q={QUALITY[self.name]}", "stop", 10, 5))
        self.usage.requests += len(out)
        return out


class Crash(Exception):
    pass


def fakes(**options):
    gens = {name: FakeGenerator(name, **options) for name in QUALITY}
    judge = ScriptedJudge(
        lambda messages, params: formatted_answer(messages, lambda text, aspect: quality(text))
    )
    return gens, judge, lambda gcfg: judge if gcfg.label == "judge" else gens[gcfg.label]


def config(tmp_path, prompts, **changes) -> FeedbackConfig:
    values = dict(
        prompts=str(prompts),
        output_dir=str(tmp_path / "out"),
        generators=[
            GeneratorConfig(
                model="fake-model", name=name, system_prompt="Be brief." if name == "gen-d" else None
            )
            for name in QUALITY
        ],
        completions_per_prompt=3,
        judge=JudgeConfig(model=GeneratorConfig(model="fake-judge", name="judge", temperature=0.0)),
        eval_fraction=0.0,
    )
    return FeedbackConfig(**(values | changes))


def write_prompts(path: Path, n: int) -> Path:
    records = [{"prompt_id": f"p{i}", "prompt": f"question {i}?"} for i in range(n)]
    io.write_jsonl(path, records)
    return path


# ---------------------------------------------------------------------------------------------------------


def test_prompts_of_every_input_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [
        {"prompt_id": "plain", "prompt": "Hello?"},
        {
            "prompt_id": "chat",
            "prompt": "Hi",
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "Now this."},
            ],
        },
        {"prompt_id": "open", "prompt": "Q", "messages": [{"role": "user", "content": "Q"}]},
        {
            "prompt_id": "pair",
            "prompt": "Which?",
            "chosen": [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "This."}],
            "rejected": [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "That."}],
        },
    ]
    io.write_jsonl(path, records)
    got = {p.prompt_id: p.messages for p in read_prompts(str(path))}
    assert got == {
        "plain": [{"role": "user", "content": "Hello?"}],
        "chat": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"},
        ],
        "open": [{"role": "user", "content": "Q"}],
        "pair": [{"role": "user", "content": "Which?"}],
    }
    assert [p.prompt_id for p in read_prompts(str(path), limit=2)] == ["plain", "chat"]


def test_bad_prompt_records_stop_the_run_or_are_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt_id": "a", "prompt": "ok"}\n'
        '{"prompt_id": "b", "prompt": ""}\n'
        '{"prompt_id": "a", "prompt": "again"}\n'
        '{"prompt_id": "c", "messages": [{"role": "assistant", "content": "x"}], "prompt": "x"}\n'
        "not json\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: prompt: must be a non-empty string"):
        read_prompts(str(path))
    assert [p.prompt_id for p in read_prompts(str(path), on_bad_record="skip")] == ["a"]


def test_a_run_writes_rated_records_pairs_stats_and_the_audit(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 7)
    with open(prompts, "a") as f:  # a multi-turn prompt with its own system message
        messages = [
            {"role": "system", "content": "Rhyme."},
            {"role": "user", "content": "first turn"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second turn"},
        ]
        f.write(json.dumps({"prompt_id": "multi", "prompt": "first turn", "messages": messages}) + "\n")
    gens, judge, factory = fakes()
    cfg = config(tmp_path, prompts, eval_fraction=0.25, chunk_prompts=3)
    result = run_feedback(cfg, generator_factory=factory)
    out = Path(cfg.output_dir)

    rated = io.read_records(out / "rated.jsonl", "rated").records
    assert [r["prompt_id"] for r in rated] == [f"p{i}" for i in range(7)] + ["multi"]
    names = list(QUALITY)
    for record in rated:
        drawn = [names[g] for g in draw_generators(record["prompt_id"], 4, 3, cfg.seed)]
        assert [c["model"] for c in record["completions"]] == drawn
        for c in record["completions"]:
            q = QUALITY[c["model"]]
            assert c["ratings"] == dict.fromkeys(cfg.judge.aspects, q) and c["mean_rating"] == q
            assert len(c["judgments"]) == 4 and {j["value"] for j in c["judgments"]} == {q}
        assert record["judge"].startswith("judge|") and record["generation_failures"] == []
    multi = rated[-1]
    assert multi["prompt_messages"] == messages and "prompt_messages" not in rated[0]
    # A generator's system prompt goes in front of the conversation, joined with the prompt's own one.
    for name, generator in gens.items():
        for conversation in generator.seen:
            own = "Rhyme." if conversation[-1]["content"] == "second turn" else None
            system = "\n\n".join(s for s in ("Be brief." if name == "gen-d" else None, own) if s)
            assert (
                (conversation[0] == {"role": "system", "content": system})
                if system
                else conversation[0]["role"] == "user"
            )
    assert any(c[-1]["content"] == "second turn" for c in gens["gen-d"].seen)  # the merge is exercised

    train = io.read_records(out / "pairs.jsonl", "pairs").records
    test = io.read_records(out / "pairs_test.jsonl", "pairs").records
    pairs = train + test
    assert sorted(p["prompt_id"] for p in pairs) == sorted(r["prompt_id"] for r in rated)
    assert test and not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in test}
    for pair in pairs:
        record = next(r for r in rated if r["prompt_id"] == pair["prompt_id"])
        best = max(record["completions"], key=lambda c: c["mean_rating"])
        assert pair["chosen_model"] == best["model"] and pair["score_chosen"] == QUALITY[best["model"]]
        assert pair["chosen"][-1]["content"] == best["response"]
    multi_pair = next(p for p in pairs if p["prompt_id"] == "multi")
    assert multi_pair["chosen"][:-1] == messages

    stats = json.loads((out / "feedback_stats.json").read_text())
    assert stats["parse_failures"]["total"] == 8 * 3 * 4 and stats["parse_failures"]["parsed"] == 96
    assert stats["binarization"] == {
        "total": 8,
        "kept": 8,
        "dropped": dict.fromkeys(stats["binarization"]["dropped"], 0),
    }
    assert stats["split"] == {"train": len(train), "test": len(test), "eval_fraction": 0.25}
    assert stats["this_run"]["judge"]["calls"] == 8 and stats["this_run"]["prompts_without_completions"] == 0
    assert "Judge parse failures" in (out / "feedback_stats.md").read_text()
    assert (out / "ratings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "resolved_config.yaml").is_file()
    audit = [json.loads(line) for line in (out / "judge_audit.jsonl").read_text().splitlines()]
    assert len(audit) == 8 and {a["key"] for a in audit} == {r["prompt_id"] for r in rated}
    assert (result.prompts, result.newly_rated, result.pairs, result.test_pairs) == (
        8,
        8,
        len(train),
        len(test),
    )
    assert len(judge.calls) == 3  # one batched judge call per chunk


def test_a_rerun_resumes_and_never_regenerates_finished_prompts(tmp_path):
    """Killed while a generator works: the completions of its finished calls are kept, nothing is rated yet.
    Killed while the judge works: the rated records of its finished chunks are kept. Each rerun asks only
    what is missing, and a rerun of a finished run asks nothing."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    gens, judge, factory = fakes()
    calls = {"n": 0}

    def crashing(gcfg):
        generator = factory(gcfg)
        if gcfg.label != "gen-c":
            return generator

        class Dies:
            model_id = "fake:gen-c"

            def generate(self, conversations, params):
                calls["n"] += 1
                if calls["n"] == 3:  # the third call of gen-c (its chunks of 2 prompts)
                    raise Crash("killed")
                return generator.generate(conversations, params)

        return Dies()

    # every generator answers every prompt; chunks of 2
    cfg = config(tmp_path, prompts, completions_per_prompt=4, chunk_prompts=2)
    with pytest.raises(Crash):
        run_feedback(cfg, generator_factory=crashing)
    rated_path = Path(cfg.output_dir) / "rated.jsonl"
    assert io.read_jsonl_resumable(rated_path) == [] and not judge.calls  # the judge runs after
    # model-major: gen-a and gen-b answered all 6, gen-c 4 before it died, gen-d nothing yet
    assert [len(gens[n].seen) for n in QUALITY] == [6, 6, 4, 0]

    gens, judge, factory = fakes()
    judged = {"n": 0}

    def judge_dies(gcfg):
        if gcfg.label != "judge":
            return factory(gcfg)
        inner = factory(gcfg)

        class Dies:
            model_id = inner.model_id

            def generate(self, conversations, params):
                judged["n"] += 1
                if judged["n"] == 2:  # the judge's second chunk (one call per chunk: one repeat)
                    raise Crash("killed")
                return inner.generate(conversations, params)

        return Dies()

    with pytest.raises(Crash):
        run_feedback(cfg, generator_factory=judge_dies)
    # only what was missing was generated: gen-c's last 2 prompts and all of gen-d's
    assert [len(gens[n].seen) for n in QUALITY] == [0, 0, 2, 6]
    assert sorted(conv[-1]["content"] for conv in gens["gen-c"].seen) == ["question 4?", "question 5?"]
    assert [r["prompt_id"] for r in io.read_jsonl_resumable(rated_path)] == ["p0", "p1"]

    gens, judge, factory = fakes()
    result = run_feedback(cfg, generator_factory=factory)
    assert all(not g.seen for g in gens.values())  # every completion came from the stage's answers
    assert (result.already_rated, result.newly_rated) == (2, 4)
    assert [r["prompt_id"] for r in io.read_jsonl_resumable(rated_path)] == [f"p{i}" for i in range(6)]
    assert len(io.read_records(Path(cfg.output_dir) / "pairs.jsonl", "pairs").records) == 6

    gens, judge, factory = fakes()
    result = run_feedback(cfg, generator_factory=factory)
    assert all(not g.seen for g in gens.values()) and not judge.calls
    assert (result.already_rated, result.newly_rated, result.pairs) == (6, 0, 6)


def test_a_rerun_with_another_judge_is_refused(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    _, _, factory = fakes()
    cfg = config(tmp_path, prompts)
    run_feedback(cfg, generator_factory=factory)
    other = config(tmp_path, prompts, judge=JudgeConfig(model=cfg.judge.model, scale=5))
    with pytest.raises(ConfigError, match=r"rated.jsonl:1: rated by judge"):
        run_feedback(other, generator_factory=factory)


def test_generation_failures_are_recorded_and_unanswered_prompts_retried(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    gens, _, factory = fakes()
    gens["gen-a"].fail_on = ("question 1?",)
    gens["gen-b"].empty_on = ("question 1?",)
    for name in ("gen-a", "gen-b", "gen-c", "gen-d"):
        gens[name].fail_on += ("question 3?",)
    cfg = config(tmp_path, prompts, completions_per_prompt=4)
    result = run_feedback(cfg, generator_factory=factory)

    rated = {
        r["prompt_id"]: r for r in io.read_records(Path(cfg.output_dir) / "rated.jsonl", "rated").records
    }
    assert sorted(rated) == ["p0", "p1", "p2"]  # p3: no completion, no record
    assert [c["model"] for c in rated["p1"]["completions"]] == [
        n
        for n in (list(QUALITY)[g] for g in draw_generators("p1", 4, 4, cfg.seed))
        if n in ("gen-c", "gen-d")
    ]
    assert sorted(rated["p1"]["generation_failures"], key=lambda f: f["model"]) == [
        {"model": "gen-a", "error": "HTTP 400: refused"},
        {"model": "gen-b", "error": "empty response"},
    ]
    assert result.failed_prompts == 1 and result.stats["generation_failures"]["total"] == 2

    for name in QUALITY:
        gens[name].fail_on = ()
    result = run_feedback(cfg, generator_factory=factory)
    assert (result.newly_rated, result.failed_prompts) == (1, 0)


class Resident:
    """Counts the local models alive at once: `load` on build, `close` on release (as the local backends)."""

    def __init__(self):
        self.alive: set[str] = set()
        self.peak = 0
        self.events: list[tuple[str, str]] = []

    def loaded(self, name: str) -> None:
        self.alive.add(name)
        self.peak = max(self.peak, len(self.alive))
        self.events.append(("load", name))

    def closed(self, name: str) -> None:
        self.alive.discard(name)
        self.events.append(("close", name))


def test_a_pool_of_four_local_generators_keeps_one_model_resident(tmp_path):
    """Model-major: each local model loads once, answers all of its prompts, and is released before the next
    loads; the judge loads after the last one is released. Peak: one model."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    gens, judge, _ = fakes()
    resident = Resident()

    class Local:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner
            self.model_id = inner.model_id
            self.usage = inner.usage
            resident.loaded(name)

        def generate(self, conversations, params):
            assert self.name in resident.alive, f"{self.name} used after close()"
            return self.inner.generate(conversations, params)

        def close(self):
            resident.closed(self.name)

    def factory(gcfg):
        return Local(gcfg.label, judge if gcfg.label == "judge" else gens[gcfg.label])

    generators = [GeneratorConfig(model=f"model-{name}", name=name) for name in QUALITY]
    cfg = config(tmp_path, prompts, generators=generators, completions_per_prompt=3, chunk_prompts=2)
    result = run_feedback(cfg, generator_factory=factory)
    assert resident.peak == 1
    names = [*QUALITY, "judge"]
    assert resident.events == [(event, n) for n in names for event in ("load", "close")]
    # every generator answered all of its prompts while loaded: 6 prompts x 3 draws = 18 completions
    assert sum(len(g.seen) for g in gens.values()) == 18 and result.newly_rated == 6


def test_http_generators_run_at_the_same_time(tmp_path):
    """HTTP generators hold no weights: they all run at once (each waits here until the other has started)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    gens, judge, _ = fakes()
    both = threading.Barrier(2, timeout=20)

    class Remote:
        def __init__(self, inner):
            self.inner, self.model_id, self.usage = inner, inner.model_id, inner.usage

        def generate(self, conversations, params):
            both.wait()  # a BrokenBarrierError here: the other HTTP generator was not running
            return self.inner.generate(conversations, params)

    def factory(gcfg):
        if gcfg.label == "judge":
            return judge
        return Remote(gens[gcfg.label]) if gcfg.model.startswith("openai:") else gens[gcfg.label]

    generators = [
        GeneratorConfig(model="openai:a@http://127.0.0.1:9/v1", name="gen-a"),
        GeneratorConfig(model="openai:b@http://127.0.0.1:9/v1", name="gen-b"),
        GeneratorConfig(model="model-c", name="gen-c"),
        GeneratorConfig(model="model-d", name="gen-d"),
    ]
    cfg = config(tmp_path, prompts, generators=generators, completions_per_prompt=4)
    assert run_feedback(cfg, generator_factory=factory).newly_rated == 2
    assert [len(gens[n].seen) for n in QUALITY] == [2, 2, 2, 2]


def test_config_mistakes_fail_before_anything_runs(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    with pytest.raises(ConfigError, match="pool of generators is empty"):
        run_feedback(config(tmp_path, prompts, generators=[]))
    same = [GeneratorConfig(model="m"), GeneratorConfig(model="m"), GeneratorConfig(model="n")]
    with pytest.raises(ConfigError, match="label 'm' names several generators"):
        run_feedback(config(tmp_path, prompts, generators=same, completions_per_prompt=2))
    with pytest.raises(ConfigError, match="scale"):
        run_feedback(config(tmp_path, prompts, judge=JudgeConfig(scale=7)))
    assert not (tmp_path / "out").exists()


def test_the_shipped_recipe_and_prompts():
    cfg = load_recipe(ROOT / "recipes" / "smollm2" / "feedback.yaml").feedback
    prompts = read_prompts(str(ROOT / cfg.prompts))
    assert len(prompts) >= 24 and cfg.num_prompts <= len(prompts)
    assert len(cfg.generators) >= 4 and len({g.label for g in cfg.generators}) == len(cfg.generators)
    assert cfg.judge.mode == "logprobs" and cfg.judge.scale == 5


# ---------------------------------------------------------------------------------------------------------
# Over HTTP, with a judge that answers garbage 30% of the time


class FeedbackServer(ThreadingHTTPServer):
    """OpenAI chat completions on loopback: generators answer with their quality marker; the judge's
    answers 2, 5 and 8 of every ten are garbage (no rating, ratings out of range, empty)."""

    daemon_threads = True
    # HTTP generators run at once, each with up to max_concurrency requests: socketserver's backlog of 5
    # would reset the connections of such a burst
    request_queue_size = 128

    def __init__(self, lifetime: float = 120.0):
        super().__init__(("127.0.0.1", 0), FeedbackHandler)
        self.lock = threading.Lock()
        self.judge_calls = 0
        self.generator_calls = 0
        self.garbage: dict[str, int] = {"chatter": 0, "range": 0, "empty": 0}
        # Bounded: stops by itself even if the test never shuts it down.
        self.watchdog = threading.Timer(lifetime, self.shutdown)
        self.watchdog.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def judge_answer(self, messages) -> str:
        with self.lock:
            index = self.judge_calls
            self.judge_calls += 1
        kind = {2: "chatter", 5: "range", 8: "empty"}.get(index % 10)
        if kind is not None:
            with self.lock:
                self.garbage[kind] += 1
        if kind == "chatter":
            return "These answers are all fine, honestly. I would not want to rank them."
        if kind == "empty":
            return ""
        rating = (lambda text, aspect: 11) if kind == "range" else (lambda text, aspect: quality(text))
        return formatted_answer(messages, rating)


class FeedbackHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        if messages[0]["role"] == "system" and messages[0]["content"].startswith(
            "You are an impartial evaluator"
        ):
            content = self.server.judge_answer(messages)
        else:
            with self.server.lock:
                self.server.generator_calls += 1
            content = f"{body['model']} says {messages[-1]['content']} q={QUALITY[body['model']]}"
        reply = {
            "id": hashlib.sha256(content.encode()).hexdigest()[:8],
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = FeedbackServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.watchdog.start()
    yield srv
    srv.watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def test_an_http_judge_that_answers_garbage_30_percent_of_the_time(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    generators = [
        GeneratorConfig(model=f"openai:{name}@{server.url}", name=name, max_retries=1) for name in QUALITY
    ]
    judge = JudgeConfig(
        model=GeneratorConfig(model=f"openai:judge@{server.url}", name="judge", temperature=0.0)
    )
    cfg = config(tmp_path, prompts, generators=generators, completions_per_prompt=2, judge=judge)
    result = run_feedback(cfg)  # the real backends

    assert server.judge_calls == 10 and server.garbage == {"chatter": 1, "range": 1, "empty": 1}
    slots = 2 * 4  # completions x aspects per judge call
    failures = result.stats["parse_failures"]
    assert failures["total"] == 10 * slots and failures["parsed"] == 7 * slots
    assert failures["failed"][parsing.NO_RATING] == 2 * slots
    assert failures["failed"][parsing.OUT_OF_RANGE] == slots
    rated = io.read_records(Path(cfg.output_dir) / "rated.jsonl", "rated").records
    unrated = [r for r in rated if all(c["mean_rating"] is None for c in r["completions"])]
    assert len(unrated) == 3
    assert all(
        set(c["rating_reasons"].values()) <= {parsing.NO_RATING, parsing.OUT_OF_RANGE}
        for r in unrated
        for c in r["completions"]
    )
    assert result.stats["binarization"]["dropped"]["fewer than two rated completions"] == 3
    assert (
        result.pairs == 7 and len(io.read_records(Path(cfg.output_dir) / "pairs.jsonl", "pairs").records) == 7
    )
    assert result.stats["this_run"]["judge"]["parse_failures"] == {
        parsing.NO_RATING: 16,
        parsing.OUT_OF_RANGE: 8,
    }
    assert result.stats["this_run"]["judge"]["backend"]["prompt_tokens"] == 10 * 100
    audit = (Path(cfg.output_dir) / "judge_audit.jsonl").read_text().splitlines()
    assert len(audit) == 10 and sum(json.loads(line)["raw"] == "" for line in audit) == 1

    # A rerun sends nothing: every prompt is rated.
    before = server.judge_calls
    assert run_feedback(cfg).newly_rated == 0 and server.judge_calls == before


def test_paid_calls_are_never_repeated(tmp_path, server, monkeypatch):
    """HTTP answers go to the run's request cache (beside the stage folders): a stage redone from scratch
    (its folder cleared, as `zephyr run --from feedback` does) or a changed downstream setting asks the
    server nothing again; `cache: false` asks again."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    generators = [GeneratorConfig(model=f"openai:{name}@{server.url}", name=name) for name in QUALITY]
    judge = JudgeConfig(
        model=GeneratorConfig(model=f"openai:judge@{server.url}", name="judge", temperature=0.0), repeats=2
    )
    run = tmp_path / "run"
    cfg = config(tmp_path, prompts, generators=generators, judge=judge, output_dir=str(run / "feedback"))
    first = run_feedback(cfg)
    calls = (server.generator_calls, server.judge_calls)
    assert calls == (6 * 3, 6 * 2)  # 3 completions per prompt; one judge call per repeat
    rated = (run / "feedback" / "rated.jsonl").read_text()

    shutil.rmtree(run / "feedback")
    again = run_feedback(cfg)
    assert (server.generator_calls, server.judge_calls) == calls
    assert (run / "feedback" / "rated.jsonl").read_text() == rated
    assert again.stats["this_run"]["judge"]["backend"]["cache_hits"] == 12
    assert again.stats["this_run"]["judge"]["backend"]["prompt_tokens"] == 0  # nothing paid this time
    assert again.stats["usage"] == first.stats["usage"]  # what the data cost, cached answers included

    lowest = config(
        tmp_path,
        prompts,
        generators=generators,
        judge=judge,
        output_dir=str(run / "feedback-lowest"),
        rejected="lowest",
    )
    run_feedback(lowest)
    assert (server.generator_calls, server.judge_calls) == calls

    uncached = [GeneratorConfig(model=g.model, name=g.name, cache=False) for g in generators]
    fresh = config(
        tmp_path, prompts, generators=uncached, judge=judge, output_dir=str(run / "feedback-fresh")
    )
    run_feedback(fresh)
    assert (server.generator_calls, server.judge_calls) == (calls[0] * 2, calls[1])


def test_token_usage_and_cost_per_model(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    generators = [GeneratorConfig(model=f"openai:{name}@{server.url}", name=name) for name in QUALITY]
    judge = JudgeConfig(
        model=GeneratorConfig(model=f"openai:judge@{server.url}", name="judge", temperature=0.0)
    )
    prices = {"gen-a": Price(prompt=2.0, completion=8.0), f"openai:judge@{server.url}": Price(prompt=1.0)}
    cfg = config(
        tmp_path, prompts, generators=generators, judge=judge, completions_per_prompt=4, prices=prices
    )
    usage = run_feedback(cfg).stats["usage"]
    # every answer of the server: 100 prompt tokens, 10 completion tokens
    assert usage["generators"]["gen-a"] == {"completions": 2, "prompt_tokens": 200, "completion_tokens": 20,
                                            "cost": (200 * 2.0 + 20 * 8.0) / 1e6}  # fmt: skip
    assert usage["generators"]["gen-b"]["cost"] is None
    assert usage["judge"] == {
        "judge": {"calls": 2, "prompt_tokens": 200, "completion_tokens": 20, "cost": 200 / 1e6}
    }
    assert usage["total_cost"] == (200 * 2.0 + 20 * 8.0) / 1e6 + 200 / 1e6
    text = (Path(cfg.output_dir) / "feedback_stats.md").read_text()
    assert "| gen-a | generator | 2 | 200 | 20 | 0.001 |" in text
    section = {
        "generators": [{"model": "m", "name": "gen-a"}, {"model": "n"}],
        "completions_per_prompt": 2,
        "prices": {"gen-z": {"prompt": 1.0}},
    }
    with pytest.raises(ConfigError, match=r"feedback.prices.gen-z: names no generator"):
        build(FeedbackConfig, section, "feedback")


# ---------------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_generators_and_logprobs_judge_make_pairs_dpo_can_read(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    questions = [
        "What is the capital of France?",
        "Name a primary color.",
        "What is 3 + 4?",
        "Say hello in Spanish.",
    ]
    io.write_jsonl(prompts, [{"prompt_id": f"q{i}", "prompt": q} for i, q in enumerate(questions)])
    model = "asset:smollm2-135m-instruct"
    pool = [
        GeneratorConfig(model=model, name="t0.7", temperature=0.7, max_tokens=32),
        GeneratorConfig(model=model, name="t1.0", temperature=1.0, top_p=0.9, max_tokens=32),
        GeneratorConfig(
            model=model, name="pirate", system_prompt="Talk like a pirate.", temperature=0.7, max_tokens=32
        ),
        GeneratorConfig(
            model=model,
            name="greedy-terse",
            system_prompt="Answer in three words.",
            temperature=0.0,
            max_tokens=32,
        ),
    ]
    judge = JudgeConfig(
        model=GeneratorConfig(model=model, name="smollm2-judge", temperature=0.0),
        mode="logprobs",
        scale=5,
        layout="per_aspect",
        aspects=["helpfulness", "honesty"],
    )
    cfg = FeedbackConfig(
        prompts=str(prompts),
        output_dir=str(tmp_path / "out"),
        generators=pool,
        completions_per_prompt=2,
        judge=judge,
    )
    result = run_feedback(cfg)
    out = Path(cfg.output_dir)

    rated = io.read_records(out / "rated.jsonl", "rated").records
    assert len(rated) == 4
    for record in rated:
        for c in record["completions"]:
            assert all(1 <= v <= 5 for v in c["ratings"].values())  # logprobs mode rates every completion
    assert result.stats["parse_failures"]["parsed"] == result.stats["parse_failures"]["total"] == 4 * 2 * 2
    pairs = io.read_records(out / "pairs.jsonl", "pairs").records  # what the DPO stage reads
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert len((out / "judge_audit.jsonl").read_text().splitlines()) == 4 * 2  # prompts x aspects
    assert len(result.stats["this_run"]["generators"]) == 1  # four configs, one model loaded once

    again = run_feedback(cfg)  # nothing left to do: no model is even loaded
    assert (again.already_rated, again.newly_rated, again.pairs) == (4, 0, result.pairs)

    # and the DPO stage trains on them: one step from the same model, which is its own reference
    from zephyr.stages.dpo.run import run_dpo

    dpo = load_recipe(
        None,
        [
            f"dpo.model={model}",
            f"dpo.train_data={out / 'pairs.jsonl'}",
            f"dpo.output_dir={tmp_path / 'dpo'}",
            "dpo.max_steps=1",
            f"dpo.per_device_batch_size={len(pairs)}",
            "dpo.max_length=256",
            "dpo.max_prompt_length=128",
        ],
    ).dpo
    trained = run_dpo(dpo)
    assert trained.steps == 1
    allowed = step_zero_tolerance(dpo.beta, trained.metrics)
    assert trained.metrics["loss"] == pytest.approx(0.6931472, abs=allowed)  # step 0: policy == reference
    assert (trained.final_dir / "model.safetensors").exists()
