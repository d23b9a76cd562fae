"""`zephyr eval alpaca-eval` end to end with a scripted model and a scripted judge (no model, no hub).

The judge reads the two answers out of the real alpaca_eval_gpt4 prompt in the order shown and ranks the
longer one first. The model therefore wins exactly where its output is longer than the reference, whichever
side it was shown on: a wrong switch bookkeeping would flip the switched items.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from zephyr import assets
from zephyr.cli import main
from zephyr.errors import ConfigError, DataError
from zephyr.evaluation.alpaca_eval import is_switched
from zephyr.evaluation.alpaca_eval_runner import read_instructions, run_alpaca_eval
from zephyr.feedback.judge import JUDGE_CALL_FAILED
from zephyr.generation import Completion

DATA = Path(__file__).parent / "data" / "alpaca" / "instructions.jsonl"

# instruction -> the model's answer; L longer than the reference, S shorter, = identical
MODEL_ANSWERS = {
    "Name a primary colour.": "Red is a primary colour.",  # L
    "What is 2 + 2?": "4.",  # S
    "Give a synonym for happy.": "Cheerful, or joyful.",  # L
    "Translate 'bonjour' to English.": "Hello.",  # S
    "Name a planet in the solar system.": "Jupiter is the largest planet in the solar system.",  # L
    "What is the capital of France?": "Paris.",  # =
    "Suggest a name for a cat.": "Whiskers is a classic name for a cat, or Luna.",  # L
    "Write a haiku about rain.": "Rain falls.",  # S
}
LONGER = [0, 2, 4, 6]
SHORTER = [1, 3, 7]
IDENTICAL = 5

_ANSWERS = re.compile(r'"answer": """(.*?)"""', re.S)
LEFT_FIRST = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
RIGHT_FIRST = "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeModel:
    model_id = "fake-model"

    def __init__(self):
        self.calls = []

    def generate(self, conversations, params):
        self.calls.append((list(conversations), params))
        return [Completion(MODEL_ANSWERS[c[-1]["content"]], "stop", 10, 5) for c in conversations]


class FakeJudge:
    """Answers `answer(first, second)` given the two outputs in the order the prompt shows them."""

    model_id = "fake-judge"

    def __init__(self, answer=None):
        self.answer = answer or (
            lambda first, second: LEFT_FIRST if len(first) > len(second) else RIGHT_FIRST
        )
        self.prompts = []

    def generate(self, conversations, params):
        out = []
        for messages in conversations:
            self.prompts.append(messages)
            first, second = _ANSWERS.findall(messages[-1]["content"])
            value = self.answer(first, second)
            out.append(value if isinstance(value, Completion) else Completion(value, "stop", 300, 30))
        return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(tmp_path, judge=None, **kwargs):
    model, judge = FakeModel(), judge or FakeJudge()
    results = run_alpaca_eval(
        model="fake-model",
        judge="fake-judge",
        out=tmp_path,
        instructions=DATA,
        model_generator=model,
        judge_generator=judge,
        **kwargs,
    )
    return results, model, judge


def test_longer_answer_judge_gives_the_hand_computed_win_rate_with_switches_undone(tmp_path):
    results, model, judge = run(tmp_path)
    instructions = list(MODEL_ANSWERS)
    switched = [is_switched(i) for i in instructions]
    assert {switched[i] for i in LONGER} == {True, False}  # wins on both sides of the switch
    assert {switched[i] for i in SHORTER} == {True, False}

    # the model: one batched greedy call, the instruction as the only user turn
    [(conversations, params)] = model.calls
    assert conversations == [[{"role": "user", "content": i}] for i in instructions]
    assert params.temperature == 0.0 and params.max_tokens == 2048

    outputs = read_jsonl(tmp_path / "outputs.jsonl")
    references = [r["output"] for r in read_jsonl(DATA)]
    assert [o["instruction"] for o in outputs] == instructions
    assert [o["output"] for o in outputs] == list(MODEL_ANSWERS.values())
    assert [o["reference_output"] for o in outputs] == references
    assert {o["generator"] for o in outputs} == {"fake-model"}

    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    preferences = [a["preference"] for a in annotations]
    assert preferences == [2.0, 1.0, 2.0, 1.0, 2.0, 1.5, 2.0, 1.0]
    assert [a["switched"] for a in annotations] == switched
    assert annotations[IDENTICAL]["judge_answer"] is None
    for i in LONGER + SHORTER:
        shown = _ANSWERS.findall(
            judge.prompts[[p for p in range(8) if p != IDENTICAL].index(i)][-1]["content"]
        )
        model_first = shown[0] == MODEL_ANSWERS[instructions[i]]
        assert model_first == switched[i]  # the recorded side is the side the judge saw
        assert annotations[i]["judge_answer"] in (LEFT_FIRST, RIGHT_FIRST)

    # 4 wins, 3 losses, 1 draw: values 1,0,1,0,1,.5,1,0 -> mean 4.5/8; sum of squared deviations 1.71875
    assert results["win_rate"] == pytest.approx(56.25)
    assert results["discrete_win_rate"] == pytest.approx(56.25)
    assert results["standard_error"] == pytest.approx(100 * math.sqrt(1.71875 / 7 / 8))
    assert (results["n_wins"], results["n_wins_base"], results["n_draws"]) == (4, 3, 1)
    assert results["n_failed"] == 0 and results["n_annotations"] == 8
    assert results["avg_length"] == sum(map(len, MODEL_ANSWERS.values())) // 8
    assert results["length_controlled_glm"] == "length_controlled_minimal"
    assert results["length_controlled_winrate"] is not None
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "56.25" in (tmp_path / "results.md").read_text()

    audit = read_jsonl(tmp_path / "judge_audit.jsonl")
    assert len(audit) == 7 and len(judge.prompts) == 7  # no call for the identical pair
    assert [a["raw"] for a in audit] == [annotations[i]["judge_answer"] for i in range(8) if i != IDENTICAL]


def test_garbage_and_failed_judge_answers_are_counted_not_dropped(tmp_path):
    answers = iter(["I like both of them.", Completion.failed("HTTP 500")] * 4)
    results, _, _ = run(tmp_path, FakeJudge(lambda first, second: next(answers)))
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    judged = [a for i, a in enumerate(annotations) if i != IDENTICAL]
    assert [a["preference"] for a in judged] == [None] * 7
    assert [a["reason"] for a in judged] == [
        "no valid ranking in the judge's answer",
        JUDGE_CALL_FAILED,
    ] * 3 + ["no valid ranking in the judge's answer"]
    assert judged[1]["judge_error"] == "HTTP 500"
    assert annotations[IDENTICAL]["preference"] == 1.5
    assert results["n_failed"] == 7 and results["n_annotations"] == 8
    assert results["win_rate"] == pytest.approx(50.0)  # only the draw is a valid preference
    assert results["standard_error"] is None and results["length_controlled_winrate"] is None
    assert results["judge_usage"]["failed_calls"] == 3


def test_limit_takes_the_first_items(tmp_path):
    results, model, judge = run(tmp_path, limit=3)
    assert len(model.calls[0][0]) == 3 and len(judge.prompts) == 3
    assert [a["preference"] for a in read_jsonl(tmp_path / "annotations.jsonl")] == [2.0, 1.0, 2.0]
    assert results["n_annotations"] == 3 and results["win_rate"] == pytest.approx(100 * 2 / 3)


def test_function_calling_annotator_is_refused_before_any_generation(tmp_path):
    with pytest.raises(ConfigError, match="function call"):
        run(tmp_path, annotator="alpaca_eval_gpt4_turbo_fn")
    assert not (tmp_path / "outputs.jsonl").exists()


def test_bad_instruction_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_instructions(path)
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'output'"):
        read_instructions(path)


def test_cli_runs_with_the_generators_it_makes(tmp_path, monkeypatch):
    import zephyr.generation

    made = {"m": FakeModel(), "j": FakeJudge()}
    monkeypatch.setattr(zephyr.generation, "make_generator", lambda spec, **kw: made[spec])
    argv = ["eval", "alpaca-eval", "--model", "m", "--judge", "j", "--out", str(tmp_path)]
    assert main([*argv, "--instructions", str(DATA), "--limit", "5"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["annotator"] == "alpaca_eval_gpt4" and results["model"] == "m"
    assert results["n_annotations"] == 5 and results["win_rate"] == pytest.approx(100 * 3 / 5)
    assert (tmp_path / "results.md").exists()


def test_cli_hub_unreachable_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import datasets

    import zephyr.generation

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    def no_model(spec, **kwargs):
        raise AssertionError("no model should load before the instructions are read")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(zephyr.generation, "make_generator", no_model)
    assets.fetch("alpaca-eval-templates")
    code = main(["eval", "alpaca-eval", "--model", "m", "--judge", "j", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "hf:tatsu-lab/alpaca_eval:eval" in err and "hub" in err and "--instructions" in err
