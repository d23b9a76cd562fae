"""`zephyr generate`: both strategies end to end, batching per step, failures, resume after a crash.

Most tests drive the runner with a fake generator that answers deterministically from the conversation it
is given; the local-backend tests use a tiny random Llama saved with SmolLM2's tokenizer, and one slow test
the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zephyr import io
from zephyr.core.config import GenerateConfig, GeneratorConfig, load_recipe
from zephyr.core.errors import ConfigError, DataError
from zephyr.data.schema import validate_conversation
from zephyr.generation import Completion, SamplingParams
from zephyr.stages.generate.run import DIALOGUES, FAILURES, SUMMARY, read_seeds, run_generate, select_seeds
from zephyr.stages.generate.strategies import SIMULATOR_KICKOFF, dialogue_id, draw_turns, sampling_seed

REPO = Path(__file__).parents[1]

SEEDS = [
    {"id": "w1", "sector": "world", "text": "Why is the sky blue?"},
    {"id": "w2", "sector": "world", "text": "How do tides work?"},
    {"id": "c1", "sector": "writing", "text": "Write a poem about snow."},
    {"id": "c2", "sector": "writing", "text": "Write a fable about a tortoise."},
    {"id": "m1", "sector": "material", "text": "Summarise this text.", "material": "Bees live in colonies."},
]


class FakeGenerator:
    """Answers from the conversation alone: the user simulator (recognised by its system prompt) asks a
    numbered follow-up with a role prefix; a refinement request gets "New instruction: X (harder)"; anything
    else is answered "Answer to: LAST USER MESSAGE". `fail` picks conversations that fail instead."""

    model_id = "fake"

    def __init__(self, fail=None, refine=None, interrupt_after: int | None = None):
        self.fail = fail or (lambda conv: None)
        self.refine = refine or (lambda instruction: f"New instruction: {instruction} (harder)")
        self.interrupt_after = interrupt_after
        self.calls: list[list[list[dict]]] = []
        self.params: list[SamplingParams] = []

    def generate(self, conversations, params):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt  # a crash in the middle of a chunk
        self.calls.append([list(c) for c in conversations])
        self.params.append(params)
        return [self._one(list(c)) for c in conversations]

    def _one(self, conv):
        failure = self.fail(conv)
        if failure == "error":
            return Completion.failed("boom")
        if failure == "empty":
            return Completion("  ", "stop", prompt_tokens=5, completion_tokens=1)
        last = conv[-1]["content"]
        if conv[0]["role"] == "system" and "curious human user" in conv[0]["content"]:
            asked = sum(m["role"] == "assistant" for m in conv)
            text = f"User: Follow-up {asked}?"
        elif last.startswith("Below is an instruction"):
            text = self.refine(re.search(r"Instruction:\n(.*?)\n\nAnswer:", last, re.S)[1].split("\n\n")[0])
        else:
            text = f"Answer to: {last}"
        return Completion(text, "stop", prompt_tokens=10, completion_tokens=3)


class FakeRequestGenerator(FakeGenerator):
    """Also takes per-request parameters (as the local backends do); its answers show the sampling seed."""

    def generate_requests(self, requests):
        self.calls.append([list(r.messages) for r in requests])
        self.params.append([r.params for r in requests])
        out = []
        for r in requests:
            c = self._one(list(r.messages))
            if c.ok:
                c.text += f" [seed {r.params.seed}]"
            out.append([c])
        return out


def write_seeds(path: Path, seeds=SEEDS) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in seeds), encoding="utf-8")
    return path


def make_cfg(tmp_path: Path, **overrides) -> GenerateConfig:
    teacher = overrides.pop("teacher", GeneratorConfig(model="fake-teacher", batch_size=2, name="fake"))
    values = dict(
        strategy="ultrachat",
        seeds=str(write_seeds(tmp_path / "seeds.jsonl")),
        output_dir=str(tmp_path / "out"),
        teacher=teacher,
        min_turns=2,
        max_turns=4,
        seed=7,
    )
    values.update(overrides)
    return GenerateConfig(**values)


def read_out(cfg: GenerateConfig) -> list[dict]:
    path = Path(cfg.output_dir) / DIALOGUES
    if not path.exists():
        return []
    records = io.read_records(path, "conversations").records  # validates every record, ids unique
    return records


def by_seed(records):
    return {r["seed_id"]: r for r in records}


# ---------------------------------------------------------------------------------------------------------
# ultrachat


def test_ultrachat_dialogues(tmp_path, capsys):
    cfg = make_cfg(
        tmp_path, teacher=GeneratorConfig(model="t", batch_size=2, name="fake", system_prompt="Be kind.")
    )
    fake = FakeGenerator()
    summary = run_generate(cfg, teacher=fake)
    records = read_out(cfg)
    assert sorted(r["seed_id"] for r in records) == sorted(s["id"] for s in SEEDS)
    seeds = {s.id: s for s in read_seeds(cfg.seeds)}
    for r in records:
        seed = seeds[r["seed_id"]]
        assert r["prompt_id"] == dialogue_id(seed, "ultrachat")
        turns = draw_turns(r["prompt_id"], 7, 2, 4)
        opening = seed.text if seed.material is None else f"{seed.text}\n\n{seed.material}"
        expected = [
            {"role": "user", "content": opening},
            {"role": "assistant", "content": f"Answer to: {opening}"},
        ]
        for k in range(1, turns):
            expected += [
                {"role": "user", "content": f"Follow-up {k}?"},  # "User:" prefix stripped
                {"role": "assistant", "content": f"Answer to: Follow-up {k}?"},
            ]
        assert r["messages"] == expected  # no system message: the teacher's prompt is not dSFT data
        assert r["prompt"] == opening
        assert (r["turns"], r["target_turns"], r["stopped"]) == (turns, turns, None)
        assert r["finish_reasons"] == ["stop"] * turns
        assert (r["strategy"], r["sector"], r["teacher"], r["user_simulator"]) == (
            "ultrachat",
            seed.sector,
            "fake",
            "fake",
        )
    assert (summary.written, summary.records, summary.failed, summary.skipped) == (5, 5, 0, 0)
    assert summary.complete

    # One call per step for all dialogues of a chunk (chunk = teacher.batch_size = 2): a chunk whose longest
    # dialogue has T turns takes T teacher calls and T - 1 simulator calls.
    order = [pid for pid, _ in select_seeds(list(seeds.values()), cfg)]
    longest = {r["prompt_id"]: r["turns"] for r in records}
    chunks = [order[i : i + 2] for i in range(0, 5, 2)]
    assert len(fake.calls) == sum(2 * max(longest[p] for p in chunk) - 1 for chunk in chunks)
    assert [len(c) for c in fake.calls[:2]] == [2, 2]
    teacher_calls = [c for c in fake.calls if c[0][0]["content"] == "Be kind."]
    simulator_calls = [c for c in fake.calls if "curious human user" in c[0][0]["content"]]
    assert len(teacher_calls) == sum(max(longest[p] for p in chunk) for chunk in chunks)
    assert len(simulator_calls) == len(fake.calls) - len(teacher_calls)
    assert all(conv[0]["content"] == "Be kind." for call in teacher_calls for conv in call)
    # The simulator sees its system prompt (with the sector's hint), the kickoff, and the dialogue swapped.
    view = simulator_calls[0][0]
    assert "curious human user" in view[0]["content"]
    assert view[1] == {"role": "user", "content": SIMULATOR_KICKOFF}
    assert [m["role"] for m in view[2:]] == ["assistant", "user"]
    assert fake.params[1].stop == ("\nAssistant:", "\nAI:")

    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        r"throughput: [\d.]+ dialogues/s, [\d.]+ tokens/s generated \(\d+ tokens in [\d.]+ s\)", out[-1]
    )
    saved = json.loads((Path(cfg.output_dir) / SUMMARY).read_text())
    assert saved["written"] == 5 and saved["complete"] is True
    assert saved["completion_tokens"] == 3 * saved["completions"]
    assert (Path(cfg.output_dir) / "resolved_config.yaml").is_file()


def test_failing_generator_is_counted_and_retried_on_rerun(tmp_path):
    cfg = make_cfg(tmp_path)
    summary = run_generate(cfg, teacher=FakeGenerator(fail=lambda conv: "error"))
    assert (summary.written, summary.failed) == (0, 5)
    assert not summary.complete
    assert read_out(cfg) == []
    failures = io.read_jsonl_resumable(Path(cfg.output_dir) / FAILURES)
    assert len(failures) == 5
    assert {f["reason"] for f in failures} == {"assistant turn 1: error: boom"}
    assert {f["seed_id"] for f in failures} == {s["id"] for s in SEEDS}

    again = run_generate(cfg, teacher=FakeGenerator())
    assert (again.skipped, again.written, again.failed) == (0, 5, 0)


def test_a_failed_or_empty_turn_ends_the_dialogue_early(tmp_path):
    def fail(conv):
        simulator = conv[0]["role"] == "system"
        exchanges = sum(m["role"] == "assistant" for m in conv)
        if simulator and exchanges >= 2 and "tides" in conv[2]["content"]:
            return "error"  # the simulator's second question fails
        if not simulator and exchanges == 1 and "snow" in conv[0]["content"]:
            return "empty"  # the second answer comes back empty
        return None

    cfg = make_cfg(tmp_path, min_turns=4, max_turns=4)
    summary = run_generate(cfg, teacher=FakeGenerator(fail=fail))
    records = by_seed(read_out(cfg))
    assert len(records) == 5
    assert records["w2"]["turns"] == 2 and records["w2"]["stopped"] == "user turn 3: error: boom"
    # The question left without an answer is dropped: the dialogue still ends with the assistant.
    assert records["c1"]["turns"] == 1 and records["c1"]["stopped"] == "assistant turn 2: empty (stop)"
    assert [m["role"] for m in records["c1"]["messages"]] == ["user", "assistant"]
    assert records["w1"]["turns"] == 4 and records["w1"]["stopped"] is None
    assert (summary.written, summary.stopped_early, summary.failed) == (5, 2, 0)


# ---------------------------------------------------------------------------------------------------------
# self_instruct


def test_self_instruct_refines_for_j_rounds(tmp_path):
    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=2)
    fake = FakeGenerator()
    summary = run_generate(cfg, teacher=fake)
    records = by_seed(read_out(cfg))
    w1 = records["w1"]
    final = "Why is the sky blue? (harder) (harder)"
    assert w1["messages"] == [
        {"role": "user", "content": final},
        {"role": "assistant", "content": f"Answer to: {final}"},
    ]
    assert (w1["prompt"], w1["round"], w1["final"], w1["seed_prompt"]) == (
        final,
        2,
        True,
        "Why is the sky blue?",
    )
    assert w1["prompt_id"] == dialogue_id(read_seeds(cfg.seeds)[0], "self_instruct")
    # Material: the instruction is refined, the material is given again after it.
    m1 = records["m1"]
    assert m1["prompt"] == "Summarise this text. (harder) (harder)\n\nBees live in colonies."
    # Per chunk: answer, then (refine, answer) per round.
    assert len(fake.calls) == 3 * (1 + 2 * 2)
    assert (summary.written, summary.records, summary.refine_fallbacks) == (5, 5, 0)


def test_keep_all_rounds_writes_every_pair_final_last(tmp_path):
    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=2, keep_all_rounds=True)
    run_generate(cfg, teacher=FakeGenerator())
    records = read_out(cfg)
    assert len(records) == 15
    pid = dialogue_id(read_seeds(cfg.seeds)[0], "self_instruct")
    mine = [r for r in records if r["seed_id"] == "w1"]
    assert [r["prompt_id"] for r in mine] == [f"{pid}-r0", f"{pid}-r1", pid]
    assert [r["prompt"] for r in mine] == [
        "Why is the sky blue?",
        "Why is the sky blue? (harder)",
        "Why is the sky blue? (harder) (harder)",
    ]
    assert [r["final"] for r in mine] == [False, False, True]


def test_unparseable_refinement_keeps_the_instruction(tmp_path):
    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=2)
    fake = FakeGenerator(refine=lambda x: "I would rather not.\n\nSorry about that.")
    summary = run_generate(cfg, teacher=fake)
    records = by_seed(read_out(cfg))
    assert records["w1"]["prompt"] == "Why is the sky blue?"
    assert records["w1"]["refine_fallbacks"] == 2
    assert summary.refine_fallbacks == 10
    assert len(fake.calls) == 3 * 5  # the instruction is answered again each round


def test_self_instruct_answer_failure(tmp_path):
    def fail(conv):
        text = conv[-1]["content"]
        if "tides" in text and "(harder)" in text:
            return "error"  # the refined instruction's answer fails: keep the last good pair
        if "snow" in text and not text.startswith("Below"):
            return "error"  # the seed's own answer fails: nothing to keep
        return None

    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=2)
    summary = run_generate(cfg, teacher=FakeGenerator(fail=fail))
    records = by_seed(read_out(cfg))
    assert set(records) == {"w1", "c2", "m1", "w2"}
    assert records["w2"]["prompt"] == "How do tides work?" and records["w2"]["round"] == 0
    assert records["w2"]["stopped"] == "answer 1: error: boom"
    failures = io.read_jsonl_resumable(Path(cfg.output_dir) / FAILURES)
    assert [(f["seed_id"], f["reason"]) for f in failures] == [("c1", "answer 0: error: boom")]
    assert (summary.written, summary.failed, summary.stopped_early) == (4, 1, 1)


def test_self_instruct_chunk_that_fails_at_once_asks_nothing_more(tmp_path):
    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=3)
    fake = FakeGenerator(fail=lambda conv: "error")
    summary = run_generate(cfg, teacher=fake)
    assert (summary.failed, summary.calls) == (5, 3)  # one answer step per chunk, no refinements


# ---------------------------------------------------------------------------------------------------------
# Resume


def test_resume_extends_and_skips_done(tmp_path):
    cfg = make_cfg(tmp_path, num_prompts=2)
    first = run_generate(cfg, teacher=FakeGenerator())
    kept = {r["prompt_id"] for r in read_out(cfg)}
    cfg.num_prompts = 5
    fake = FakeGenerator()
    second = run_generate(cfg, teacher=fake)
    records = read_out(cfg)
    assert (first.written, second.skipped, second.written) == (2, 2, 3)
    assert kept <= {r["prompt_id"] for r in records} and len(records) == 5
    done_again = run_generate(cfg, teacher=FakeGenerator())
    assert (done_again.skipped, done_again.written, done_again.calls) == (5, 0, 0)


def test_resume_after_a_crash_writes_every_prompt_id_once(tmp_path):
    cfg = make_cfg(tmp_path, strategy="self_instruct", rounds=2, keep_all_rounds=True)
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg, teacher=FakeGenerator(interrupt_after=7))  # in the second chunk
    path = Path(cfg.output_dir) / DIALOGUES
    before = io.read_jsonl_resumable(path)
    assert len(before) == 6  # the first chunk: 2 dialogues x 3 rounds
    # Simulate a crash inside a dialogue's writes (rounds 0 and 1 of w2 out, the final pair not) and inside
    # a line (a cut-off record that the next run repairs).
    seeds = {s.id: s for s in read_seeds(cfg.seeds)}
    order = [s.id for _, s in select_seeds(list(seeds.values()), cfg)]
    third = order[2]
    (tmp_path / "ref").mkdir()
    reference = make_cfg(tmp_path / "ref", strategy="self_instruct", rounds=2, keep_all_rounds=True)
    reference.seeds = cfg.seeds
    run_generate(reference, teacher=FakeGenerator())
    partial = [r for r in read_out(reference) if r["seed_id"] == third][:2]
    with path.open("a", encoding="utf-8") as f:
        for r in partial:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(read_out(reference)[-1])[:40])
    summary = run_generate(cfg, teacher=FakeGenerator())
    records = read_out(cfg)  # raises on a repeated prompt_id or an invalid record
    assert len(records) == 15
    assert sorted(json.dumps(r, sort_keys=True) for r in records) == sorted(
        json.dumps(r, sort_keys=True) for r in read_out(reference)
    )
    assert (summary.skipped, summary.written) == (2, 3)


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, num_prompts=2)
    run_generate(cfg, teacher=FakeGenerator())
    cfg.teacher.temperature = 0.2
    cfg.max_turns = 5
    with pytest.raises(ConfigError, match=r"max_turns \(4 -> 5\).*teacher.temperature \(0.7 -> 0.2\)"):
        run_generate(cfg, teacher=FakeGenerator())
    cfg.teacher.temperature, cfg.max_turns = 0.7, 4
    cfg.teacher.batch_size = 1  # how it runs, not what it writes: allowed
    assert run_generate(cfg, teacher=FakeGenerator()).skipped == 2


# ---------------------------------------------------------------------------------------------------------
# Seeds


def test_seed_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "sector": "world", "text": "Q?"}\n\n{"id": "b", "sector": "world"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: record: invalid JSON"):
        read_seeds(bad)
    bad.write_text('{"id": "a", "sector": "material", "text": "Summarise."}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: material: sector 'material' needs a non-empty string"):
        read_seeds(bad)
    bad.write_text(
        '{"id": "a", "sector": "world", "text": "Q?"}\n{"id": "a", "sector": "world", "text": "R?"}\n'
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: id: 'a' is also the id of .*bad.jsonl:1"):
        read_seeds(bad)
    bad.write_text(
        '{"id": "a", "sector": "world", "text": "Q?"}\n{"id": "b", "sector": "world", "text": " Q?"}\n'
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: text: the same seed as .*bad.jsonl:1"):
        read_seeds(bad)
    bad.write_text("\n")
    with pytest.raises(DataError, match="no seeds"):
        read_seeds(bad)
    with pytest.raises(DataError, match="no such seed file"):
        read_seeds(tmp_path / "missing.jsonl")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"no \*.jsonl seed files"):
        read_seeds(empty_dir)


def test_seed_folder_and_num_prompts_subsets(tmp_path):
    folder = tmp_path / "seeds"
    folder.mkdir()
    write_seeds(folder / "b.jsonl", SEEDS[2:])
    write_seeds(folder / "a.jsonl", SEEDS[:2])
    seeds = read_seeds(folder)
    assert [s.id for s in seeds] == ["w1", "w2", "c1", "c2", "m1"]  # files in name order
    cfg = make_cfg(tmp_path, seeds=str(folder))
    picks = [
        [pid for pid, _ in select_seeds(seeds, GenerateConfig(**{**vars(cfg), "num_prompts": n}))]
        for n in (2, 4)
    ]
    assert picks[0] == picks[1][:2]  # a larger num_prompts keeps the smaller one's dialogues


def test_cli_reports_a_bad_seed_file_with_exit_code_2(tmp_path, capsys):
    from zephyr.cli import main

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        '{"id": "a", "sector": "world", "text": "Q?"}\n{"id": "b", "sector": "poetry", "text": "R"}\n'
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"generate:\n  seeds: {seeds}\n  output_dir: {tmp_path / 'out'}\n")
    assert main(["generate", str(recipe)]) == 2
    assert f"{seeds}:2: sector: unknown sector 'poetry'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded


def test_shipped_seeds_and_recipes():
    seeds = read_seeds(REPO / "recipes" / "data" / "seeds")
    counts = {sector: sum(s.sector == sector for s in seeds) for sector in ("world", "writing", "material")}
    assert min(counts.values()) >= 24, counts
    ultrachat = load_recipe(REPO / "recipes" / "smollm2" / "generate.yaml").generate
    assert ultrachat.strategy == "ultrachat" and ultrachat.teacher.model == "asset:smollm2-135m-instruct"
    assert read_seeds(REPO / ultrachat.seeds)
    self_instruct = load_recipe(REPO / "recipes" / "smollm2" / "generate-self-instruct.yaml").generate
    assert self_instruct.strategy == "self_instruct" and self_instruct.rounds >= 1
    assert read_seeds(REPO / self_instruct.seeds)
    default = GenerateConfig()
    assert read_seeds(REPO / default.seeds)  # the config's default seed file exists


class Swapped(FakeRequestGenerator):
    """A local model of the schedule: built on load, `close()`d on release; counts the models alive."""

    def __init__(self, name, tracker, crash_on_load=None):
        super().__init__()
        self.name, self.tracker = name, tracker
        tracker["loads"].append(name)
        if crash_on_load is not None and len(tracker["loads"]) == crash_on_load:
            raise KeyboardInterrupt  # killed while this model loads
        tracker["alive"] += 1
        tracker["peak"] = max(tracker["peak"], tracker["alive"])
        self.model_id, self.closed = name, False

    def generate_requests(self, requests):
        assert not self.closed, f"{self.name} used after close()"
        self.tracker["answered"][self.name] += len(requests)
        return super().generate_requests(requests)

    def close(self):
        self.tracker["alive"] -= 1
        self.closed = True


def test_two_local_models_take_turns_one_resident_at_a_time(tmp_path, monkeypatch):
    """Teacher and user simulator are two local models: every dialogue advances a turn with one model, which
    is then released before the other loads; a run killed between turns replays the answered turns."""
    import zephyr.stages.generate.run as generate_run

    def schedule(crash_on_load=None):
        tracker = {
            "loads": [],
            "alive": 0,
            "peak": 0,
            "answered": {"teacher": 0, "simulator": 0},
        }
        build = lambda gcfg: Swapped(gcfg.model, tracker, crash_on_load)  # noqa: E731
        monkeypatch.setattr(generate_run, "builder", lambda out: build)
        return tracker

    two = {
        "teacher": GeneratorConfig(model="teacher", batch_size=2),
        "user_simulator": GeneratorConfig(model="simulator"),
    }
    tracker = schedule()
    cfg = make_cfg(tmp_path, **two)
    run_generate(cfg)
    turns = max(r["target_turns"] for r in read_out(cfg))
    assert tracker["peak"] == 1
    assert tracker["loads"] == ["teacher", "simulator"] * (turns - 1) + ["teacher"]  # once per turn each
    # the same dialogues as one model on both sides in chunks of 2 (sampling seeds are per dialogue and step)
    one = make_cfg(tmp_path, output_dir=str(tmp_path / "one"))
    run_generate(one, teacher=FakeRequestGenerator())
    dialogues = {r["prompt_id"]: r["messages"] for r in read_out(one)}
    assert {r["prompt_id"]: r["messages"] for r in read_out(cfg)} == dialogues

    killed = make_cfg(tmp_path, output_dir=str(tmp_path / "killed"), **two)
    schedule(crash_on_load=4)  # teacher, simulator, teacher, then killed as the simulator loads again
    with pytest.raises(KeyboardInterrupt):
        run_generate(killed)
    tracker = schedule()
    run_generate(killed)
    # the first two turns of every dialogue come from the stored answers: no model call for them
    assert tracker["answered"]["teacher"] == sum(max(r["target_turns"] - 2, 0) for r in read_out(killed))
    assert {r["prompt_id"]: r["messages"] for r in read_out(killed)} == dialogues


def test_per_request_backends_get_a_sampling_seed_per_dialogue_and_step(tmp_path):
    cfg = make_cfg(tmp_path, output_dir=str(tmp_path / "chunks-of-2"))
    fake = FakeRequestGenerator()
    run_generate(cfg, teacher=fake)
    records = read_out(cfg)
    w1 = by_seed(records)["w1"]
    pid = w1["prompt_id"]
    # The first answer and the first user turn carry the seeds of their dialogue and step.
    assert w1["messages"][1]["content"].endswith(f" [seed {sampling_seed(7, pid, 'assistant-1')}]")
    assert w1["messages"][2]["content"].endswith(f" [seed {sampling_seed(7, pid, 'user-2')}]")
    assert all(p.temperature == 0.7 and p.max_tokens == 256 for call in fake.params for p in call)
    # Chunks of one dialogue write the same dialogues as chunks of two.
    alone = make_cfg(tmp_path, output_dir=str(tmp_path / "chunks-of-1"))
    alone.teacher.batch_size = 1
    run_generate(alone, teacher=FakeRequestGenerator())
    assert sorted(map(json.dumps, records)) == sorted(map(json.dumps, read_out(alone)))


def test_plain_backends_get_one_seed_per_step(tmp_path):
    cfg = make_cfg(tmp_path)
    fake = FakeGenerator()
    run_generate(cfg, teacher=fake)
    assert fake.params[0].seed == sampling_seed(7, "", "assistant-1")
    assert fake.params[1].seed == sampling_seed(7, "", "user-2")


# ---------------------------------------------------------------------------------------------------------
# The local backend: a tiny random Llama with SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_tiny_llama
    from zephyr.models import load as models

    tokenizer = models.load_tokenizer("asset:smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer), seed=5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def local_cfg(tmp_path, model_dir, name):
    gen = GeneratorConfig(model=str(model_dir), max_tokens=4, temperature=0.8, batch_size=3)
    return make_cfg(
        tmp_path, output_dir=str(tmp_path / name), teacher=gen, min_turns=1, max_turns=2, num_prompts=3
    )


@pytest.mark.slow
def test_local_backend_dialogues_do_not_depend_on_their_chunk(tmp_path, tiny_model_dir, one_thread):
    from zephyr.stages.generate.run import build_generator

    cfg = local_cfg(tmp_path, tiny_model_dir, "batched")
    generator = build_generator(cfg.teacher)
    summary = run_generate(cfg, teacher=generator)
    assert summary.written + summary.failed == 3
    alone = local_cfg(tmp_path, tiny_model_dir, "alone")
    alone.teacher.batch_size = 1
    generator.batch_size = 1
    run_generate(alone, teacher=generator)
    # Sampling seeds are keyed by dialogue and step, so chunking changes nothing.
    assert {r["prompt_id"]: r["messages"] for r in read_out(cfg)} == {
        r["prompt_id"]: r["messages"] for r in read_out(alone)
    }
    for record in read_out(cfg):
        assert validate_conversation(record) == []


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, tiny_model_dir, one_thread):
    seeds = [{"id": f"s{i}", "sector": "world", "text": f"Question number {i}?"} for i in range(40)]
    seed_file = write_seeds(tmp_path / "seeds.jsonl", seeds)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"generate:\n  strategy: ultrachat\n  seeds: {seed_file}\n  output_dir: {out}\n"
        f"  min_turns: 1\n  max_turns: 3\n"
        f"  teacher: {{model: {tiny_model_dir}, max_tokens: 8, temperature: 0.0, batch_size: 1}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zephyr", "generate", str(recipe), "generate.num_prompts=40"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    path = out / DIALOGUES
    while proc.poll() is None and not (path.exists() and path.stat().st_size > 0):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written_before = len(io.read_jsonl_resumable(path))
    assert 0 < written_before < 40  # killed mid-run

    cfg = load_recipe(recipe, ["generate.num_prompts=40"]).generate
    summary = run_generate(cfg)
    records = io.read_records(path, "conversations").records  # valid, every prompt_id once
    assert summary.skipped == written_before
    assert len(records) + summary.failed == 40
    assert {r["prompt_id"] for r in records} | {
        f["prompt_id"] for f in io.read_jsonl_resumable(out / FAILURES)
    } == {pid for pid, _ in select_seeds(read_seeds(seed_file), cfg)}


@pytest.mark.slow
def test_smollm2_writes_real_dialogues(tmp_path, one_thread):
    gen = GeneratorConfig(model="asset:smollm2-135m-instruct", max_tokens=24, temperature=0.0, batch_size=2)
    cfg = make_cfg(tmp_path, teacher=gen, min_turns=3, max_turns=3, num_prompts=2)
    summary = run_generate(cfg)
    records = read_out(cfg)
    assert summary.written == 2 and len(records) == 2
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 3 or r["stopped"]
        assert all(m["content"].strip() for m in r["messages"])
        # The simulator's turns read as a user's: no role prefix left.
        assert not any(m["content"].lower().startswith(("user:", "assistant:")) for m in r["messages"][1:])
    assert summary.completion_tokens > 0
