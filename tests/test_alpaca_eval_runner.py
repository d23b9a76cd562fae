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
from zephyr.evaluation import alpaca_eval as ae
from zephyr.evaluation.alpaca_eval import is_switched
from zephyr.evaluation.alpaca_eval_runner import read_instructions, run_alpaca_eval
from zephyr.generation import Completion
from zephyr.judging import JUDGE_CALL_FAILED

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
    with pytest.raises(DataError) as exc:
        read_instructions(path)
    assert str(exc.value) == f"{path}:2: not valid JSON: Expecting ',' delimiter at column 20"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\xff{}\n')
    with pytest.raises(DataError) as exc:
        read_instructions(path)
    assert str(exc.value) == f"{path}:2: not valid UTF-8: byte 0xff at column 1"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'output'"):
        read_instructions(path)
    listed = tmp_path / "listed.json"  # a JSON list, alpaca_eval's own format: lines as written
    listed.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"listed\.json:3: field 'output'"):
        read_instructions(listed)


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


# ---------------------------------------------------------------------------------------------------------
# Logprobs judge mode: the preference from the judge's probability of ranking each shown output first


class FakeLogprobJudge:
    """A local judge's scorer: after the forced ranking start, P("1") = 0.8 when the output shown first is
    the longer one, else 0.3 (P("2") the rest); `low` instructions get (almost) no mass on "1" and "2"."""

    model_id = "fake-logprob-judge"

    def __init__(self, low=()):
        self.low = low
        self.calls = []

    def generate(self, conversations, params):
        raise AssertionError("a logprobs judge writes no answer")

    def next_token_logprobs(self, conversations, top_k=20, *, candidates=(), answer_prefix=""):
        return [{c: -30.0 for c in candidates} for _ in conversations]  # the client's candidate probe

    def prefix_logprobs(self, conversations, prefixes, top_k=20, *, candidates=()):
        self.calls.append((list(conversations), tuple(prefixes), tuple(candidates)))
        out = []
        for messages in conversations:
            if any(f'"""{i}"""' in messages[-1]["content"] for i in self.low):
                out.append([{"name": 0.0, "1": math.log(3e-4), "2": math.log(3e-4)}] * len(prefixes))
                continue
            first, second = _ANSWERS.findall(messages[-1]["content"])
            p = 0.8 if len(first) > len(second) else 0.3
            out.append([{"1": math.log(p), "2": math.log(1 - p), "A": math.log(1e-3)}] * len(prefixes))
        return out


def test_logprobs_mode_gives_fractional_preferences_with_switches_undone(tmp_path):
    judge = FakeLogprobJudge()
    results, _, _ = run(tmp_path, judge, judge_mode="logprobs")
    instructions = list(MODEL_ANSWERS)
    assert [is_switched(i) for i in instructions] == [False, True, True, False, False, True, True, True]
    # longer model answer: shown second P(second ranked first) = .7 -> 1.7; shown first (switched)
    # 1 + .2 = 1.2 -> 3 - 1.2 = 1.8. Shorter: shown second 1.2; shown first 1.7 -> 1.3. Identical: 1.5.
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [a["preference"] for a in annotations] == pytest.approx([1.7, 1.3, 1.8, 1.2, 1.7, 1.5, 1.8, 1.3])
    assert all(a["judge_mode"] == "logprobs" for a in annotations)
    prefix = "[\n    {'model': 'model_"
    for i in LONGER + SHORTER:
        assert annotations[i]["answer_prefix"] == prefix and annotations[i]["judge_answer"] is None
        assert set(annotations[i]["top_logprobs"]) == {"1", "2", "A"}
        assert annotations[i]["evidence"]["mass"] == pytest.approx(1.0)
    assert annotations[2]["evidence"]["ranked_first"] == {"1": pytest.approx(0.8), "2": pytest.approx(0.2)}

    # the prompts are text mode's, byte for byte; one forced start, the digits always scored
    text_dir = tmp_path / "text"
    _, _, text_judge = run(text_dir)
    assert [c[0][0] for c in judge.calls] == text_judge.prompts
    assert {(c[1], c[2]) for c in judge.calls} == {((prefix,), ("1", "2"))}
    audit = read_jsonl(tmp_path / "judge_audit.jsonl")
    assert len(audit) == 7 and all(a["answer_prefixes"] == [prefix] for a in audit)
    assert audit[0]["judge"] == "fake-judge|alpaca_eval_gpt4|logprobs"

    # values .7 .3 .8 .2 .7 .5 .8 .3: mean .5375; squared deviations sum to .41875
    assert results["judge_mode"] == "logprobs"
    assert results["win_rate"] == pytest.approx(53.75)
    assert results["standard_error"] == pytest.approx(100 * math.sqrt(0.41875 / 7 / 8))
    assert results["discrete_win_rate"] == pytest.approx(56.25)  # rounded: 4 wins, 3 losses, the draw
    assert (results["n_wins"], results["n_wins_base"], results["n_draws"]) == (4, 3, 1)
    assert results["n_failed"] == 0 and results["length_controlled_winrate"] is not None


def test_logprobs_mode_counts_too_little_mass_as_a_failure(tmp_path):
    low = ["Red.", "Joyful."]  # the reference outputs of items 0 and 2
    results, _, _ = run(tmp_path, FakeLogprobJudge(low=low), judge_mode="logprobs")
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [annotations[i]["preference"] for i in (0, 2)] == [None, None]
    assert annotations[0]["reason"] == ae.LOW_MASS
    assert annotations[0]["evidence"]["mass"] == pytest.approx(6e-4)
    assert results["n_failed"] == 2 and results["judge_usage"]["parse_failures"] == {ae.LOW_MASS: 2}
    # the others as before: .3 .2 .7 .5 .8 .3
    assert results["win_rate"] == pytest.approx(100 * 2.8 / 6)


def test_logprobs_mode_needs_a_local_judge_and_a_ranking_annotator(tmp_path):
    with pytest.raises(ConfigError, match=r"judge_mode logprobs.*'fake-judge'"):
        run(tmp_path, FakeJudge(), judge_mode="logprobs")
    assert not (tmp_path / "outputs.jsonl").exists()  # refused before the model answers
    with pytest.raises(ConfigError, match="judge_mode: 'logits'"):
        run(tmp_path, FakeLogprobJudge(), judge_mode="logits")


@pytest.mark.slow
def test_smollm2_logprobs_judge_prefers_fractionally_through_the_cli(tmp_path):
    out = tmp_path / "ae"
    spec = "asset:smollm2-135m-instruct"
    argv = ["eval", "alpaca-eval", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "2"]
    assert (
        main([*argv, "--instructions", str(DATA), "--max-new-tokens", "8", "--judge-mode", "logprobs"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["judge_mode"] == "logprobs" and results["n_failed"] == 0
    for annotation in read_jsonl(out / "annotations.jsonl"):
        assert 1.0 < annotation["preference"] < 2.0  # a probability, not a parsed rank
        assert annotation["evidence"]["mass"] >= 1e-3 and {"1", "2"} <= set(annotation["top_logprobs"])
