"""`zephyr eval mt-bench` end to end: a fake model and a scripted judge on real MT-Bench questions (writing
81-84, math 111, stem 141), checked against hand-computed results; the slow one runs SmolLM2-135M-Instruct
as model and judge through the CLI.
"""

from __future__ import annotations

import json

import pytest

from zephyr import assets
from zephyr.evaluation import mt_bench
from zephyr.evaluation.mt_bench_runner import ANSWER_FAILED, run_mt_bench
from zephyr.generation import Completion, Usage

QUESTION_IDS = [81, 82, 83, 84, 111, 141]
# What the judge answers per (question, turn): 83/1 and 111/2 hold no score; 82/2 only the backup `[x]`.
JUDGE_ANSWERS = {
    (81, 1): "Fine. Rating: [[8]]",
    (81, 2): "Rating: [[6]]",
    (82, 1): "[[7]]",
    (82, 2): "Rating: [5]",
    (83, 1): "no idea",
    (83, 2): "[[9]]",
    (84, 1): "[[4]]",
    (84, 2): "[[10]]",
    (111, 1): "[[3]]",
    (111, 2): "It is all wrong!",
    (141, 1): "[[6]]",
    (141, 2): "[[6]]",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeModel:
    """Answers `answer-QID-tTURN`, recognising the question by its text; records every call."""

    def __init__(self, questions, fail=()):
        self.turn_of = {t: (q.question_id, k) for q in questions for k, t in enumerate(q.turns, start=1)}
        self.fail = fail
        self.model_id = "fake-model"
        self.calls = []
        self.usage = Usage()

    def generate(self, conversations, params):
        self.calls.append(([list(c) for c in conversations], params))
        out = []
        for conversation in conversations:
            qid, turn = self.turn_of[conversation[-1]["content"]]
            if (qid, turn) in self.fail:
                out.append(Completion.failed("HTTP 500: boom", prompt_tokens=3))
            else:
                out.append(Completion(f"  answer-{qid}-t{turn}\n", "stop", 10 * turn, 4))
        return out


class FakeJudge:
    """Grades by the answers a judge prompt shows (the latest answer named in it decides the key)."""

    model_id = "fake-judge"

    def __init__(self):
        self.calls = []
        self.usage = Usage()

    def generate(self, conversations, params):
        self.calls.append((list(conversations), params))
        out = []
        for messages in conversations:
            text = messages[-1]["content"]
            key = next(
                (qid, turn) for qid, turn in reversed(JUDGE_ANSWERS) if f"answer-{qid}-t{turn}" in text
            )
            out.append(Completion(JUDGE_ANSWERS[key], "stop", 100, 7))
        return out


@pytest.fixture
def setup(tmp_path):
    folder = assets.fetch("mt-bench")
    lines = {
        json.loads(line)["question_id"]: line for line in (folder / "question.jsonl").read_text().splitlines()
    }
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(lines[qid] + "\n" for qid in QUESTION_IDS))
    questions = mt_bench.load_questions(path)
    prompts = mt_bench.load_judge_prompts(folder / "judge_prompts.jsonl")
    references = mt_bench.load_references(folder / "reference_answer" / "gpt-4.jsonl")
    return path, questions, prompts, references


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_judgments_and_results_follow_the_protocol(tmp_path, setup):
    path, questions, prompts, references = setup
    model, judge = FakeModel(questions), FakeJudge()
    out = tmp_path / "out"
    results = run_mt_bench(
        "fake-model", "fake-judge", out, questions=path, max_new_tokens=77, judge_max_tokens=99,
        model_generator=model, judge_generator=judge,
    )  # fmt: skip

    # answers: both turns, stripped; token counts and finish reasons kept
    answers = read_jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == QUESTION_IDS
    for a in answers:
        qid = a["question_id"]
        assert a["turns"] == [f"answer-{qid}-t1", f"answer-{qid}-t2"]
        assert a["finish_reasons"] == ["stop", "stop"] and a["prompt_tokens"] == [10, 20]
        assert a["completion_tokens"] == [4, 4] and a["model"] == "fake-model"

    # turn 1 for all, then turn 2; one call per temperature group: writing 0.7, math greedy, stem 0.1
    temps = [(params.temperature, params.seed, len(convs)) for convs, params in model.calls]
    assert temps == [(0.7, 0, 4), (0.0, None, 1), (0.1, 0, 1)] * 2
    assert all(params.max_tokens == 77 for _, params in model.calls)
    assert all(len(c) == 1 for c in model.calls[0][0])
    for convs, _ in model.calls[3:]:
        for conversation in convs:
            q = next(q for q in questions if q.turns[1] == conversation[-1]["content"])
            assert conversation == [
                {"role": "user", "content": q.turns[0]},
                {"role": "assistant", "content": f"answer-{q.question_id}-t1"},
                {"role": "user", "content": q.turns[1]},
            ]

    # judgments: one batched greedy call, two lines per question with the exact judge_messages
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 12
    assert judge.calls[0][1].max_tokens == 99 and judge.calls[0][1].temperature == 0.0
    lines = read_jsonl(out / "judgments.jsonl")
    assert [(line["question_id"], line["turn"]) for line in lines] == list(JUDGE_ANSWERS)
    for line in lines:
        q = next(q for q in questions if q.question_id == line["question_id"])
        qid = q.question_id
        messages, name = mt_bench.judge_messages(
            q, [f"answer-{qid}-t1", f"answer-{qid}-t2"], line["turn"], prompts, references.get(qid)
        )
        assert line["messages"] == messages and line["judge_prompt"] == name
        assert line["category"] == q.category and line["raw"] == JUDGE_ANSWERS[(qid, line["turn"])]
        score, reason = mt_bench.parse_score(line["raw"])
        assert (line["score"], line["reason"]) == (score, reason)
    math_lines = [x for x in lines if x["question_id"] == 111]
    assert [x["judge_prompt"] for x in math_lines] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert references[111][0] in math_lines[0]["messages"][-1]["content"]
    assert references[111][1] in math_lines[1]["messages"][-1]["content"]
    assert references[111][0] not in lines[0]["messages"][-1]["content"]

    # results by hand: turn 1 scores 8 7 4 3 6, turn 2 6 5 9 10 6; 83/1 and 111/2 failed
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert results["score"] == pytest.approx(64 / 10)
    assert (results["n"], results["n_scored"], results["n_failed"]) == (12, 10, 2)
    assert results["turns"]["1"] == {"score": pytest.approx(5.6), "n": 6, "n_scored": 5, "n_failed": 1}
    assert results["turns"]["2"] == {"score": pytest.approx(7.2), "n": 6, "n_scored": 5, "n_failed": 1}
    writing = results["categories"]["writing"]
    assert writing["score"] == pytest.approx(7.0) and writing["n_failed"] == 1
    assert writing["turn_1"] == pytest.approx(19 / 3) and writing["turn_2"] == pytest.approx(7.5)
    assert results["categories"]["math"] == {
        "score": 3.0, "n": 2, "n_scored": 1, "n_failed": 1, "turn_1": 3.0, "turn_2": None,
    }  # fmt: skip
    assert results["failures"] == [
        {"question_id": 83, "turn": 1, "reason": mt_bench.NO_SCORE},
        {"question_id": 111, "turn": 2, "reason": mt_bench.NO_SCORE},
    ]
    assert results["missing"] == []
    report = (out / "results.md").read_text()
    assert "**Score: 6.40**" in report and "| math | 3.00 | 3.00 | n/a | 1 | 1 |" in report
    assert (out / "categories.png").read_bytes()[:4] == b"\x89PNG"

    # answers.jsonl complete: a second run judges again without answering again
    model.calls.clear()
    again = run_mt_bench(
        "fake-model", "fake-judge", out, questions=path, model_generator=model, judge_generator=FakeJudge()
    )
    assert model.calls == [] and again == results
    other = run_mt_bench(  # another model's answers are not reused
        "other-model", "fake-judge", out, questions=path, model_generator=model, judge_generator=FakeJudge()
    )
    assert len(model.calls) == 6 and other["model"] == "other-model"
    assert {a["model"] for a in read_jsonl(out / "answers.jsonl")} == {"other-model"}
    assert len(read_jsonl(out / "judgments.jsonl")) == 12


def test_a_failed_answer_is_not_judged_and_counts_as_a_failure(tmp_path, setup):
    path, questions, _, _ = setup
    model, judge = FakeModel(questions, fail={(82, 2)}), FakeJudge()
    out = tmp_path / "out"
    results = run_mt_bench(
        "m", "j", out, questions=path, limit=4, model_generator=model, judge_generator=judge
    )
    assert len(judge.calls[0][0]) == 7  # 82/2 not sent
    [answer] = [a for a in read_jsonl(out / "answers.jsonl") if a["question_id"] == 82]
    assert answer["finish_reasons"] == ["stop", "error"] and answer["errors"] == [None, "HTTP 500: boom"]
    [line] = [x for x in read_jsonl(out / "judgments.jsonl") if (x["question_id"], x["turn"]) == (82, 2)]
    assert line["messages"] is None and line["score"] is None
    assert line["reason"] == f"{ANSWER_FAILED}: HTTP 500: boom"
    assert (results["n"], results["n_failed"]) == (8, 2)  # 83/1 unparsed, 82/2 unanswered
    # writing only: scores 8 7 4 6 9 10
    assert results["score"] == pytest.approx(44 / 6)
    assert not (out / "categories.png").exists()  # one category: no radar to draw
    # an answers.jsonl with a failed answer is not reused
    model.calls.clear()
    run_mt_bench("m", "j", out, questions=path, limit=4, model_generator=model, judge_generator=FakeJudge())
    assert len(model.calls) == 2


@pytest.mark.slow
def test_smollm2_as_model_and_judge_through_the_cli(tmp_path):
    from zephyr.cli import main

    out = tmp_path / "mt"
    spec = "asset:smollm2-135m-instruct"
    code = main(
        ["eval", "mt-bench", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "2",
         "--max-new-tokens", "32", "--judge-max-tokens", "64"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 4 and results["n_scored"] + results["n_failed"] == 4
    assert len(results["failures"]) == results["n_failed"]
    assert len(read_jsonl(out / "answers.jsonl")) == 2 and len(read_jsonl(out / "judgments.jsonl")) == 4
