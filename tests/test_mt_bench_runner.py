"""`zephyr eval mt-bench` end to end: a fake model and a scripted judge on real MT-Bench questions (writing
81-84, math 111, stem 141), checked against hand-computed results; the slow one runs SmolLM2-135M-Instruct
as model and judge through the CLI.
"""

from __future__ import annotations

import json
import math

import pytest

from zephyr.core.config import MtBenchEvalConfig, build
from zephyr.core.errors import ConfigError, DataError
from zephyr.generation import Completion, SamplingParams, Usage
from zephyr.models import assets
from zephyr.stages.mt_bench import protocol as mt_bench
from zephyr.stages.mt_bench.run import (
    ANSWER_FAILED,
    BASELINE_FAILED,
    Answer,
    judge_id,
    read_answer_file,
    run_mt_bench,
)

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
    """Answers `answer-QID-tTURN` (or another prefix), recognising the question by its text; records every
    call."""

    def __init__(self, questions, fail=(), prefix="answer", model_id="fake-model"):
        self.turn_of = {t: (q.question_id, k) for q in questions for k, t in enumerate(q.turns, start=1)}
        self.fail = fail
        self.prefix = prefix
        self.model_id = model_id
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
                out.append(Completion(f"  {self.prefix}-{qid}-t{turn}\n", "stop", 10 * turn, 4))
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


@pytest.fixture
def protocol(tmp_path, setup):
    """One MT-Bench run of the fake model and judge: (out folder, results, model, judge)."""
    path, questions, _, _ = setup
    model, judge = FakeModel(questions), FakeJudge()
    out = tmp_path / "out"
    cfg = MtBenchEvalConfig(judge="fake-judge", questions=str(path), max_new_tokens=77, judge_max_tokens=99)
    results = run_mt_bench(cfg, "fake-model", out, model_generator=model, judge_generator=judge)
    return out, results, model, judge


def test_answers_keep_both_turns_stripped_with_token_counts_and_finish_reasons(protocol):
    out, _, _, _ = protocol
    answers = read_jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == QUESTION_IDS
    for a in answers:
        qid = a["question_id"]
        assert a["turns"] == [f"answer-{qid}-t1", f"answer-{qid}-t2"]
        assert a["finish_reasons"] == ["stop", "stop"] and a["prompt_tokens"] == [10, 20]
        assert a["completion_tokens"] == [4, 4] and a["model"] == "fake-model"


def test_turn_one_is_answered_for_all_then_turn_two_in_one_call_per_temperature_group(protocol, setup):
    """writing 0.7, math greedy, stem 0.1; turn 2 sees turn 1's answer."""
    _, questions, _, _ = setup
    _, _, model, _ = protocol
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


def test_judgments_are_one_batched_greedy_call_with_the_exact_judge_messages(protocol, setup):
    """Two lines per question; math questions get the reference answers in their prompts."""
    _, questions, prompts, references = setup
    out, _, _, judge = protocol
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
        rating = mt_bench.parse_score(line["raw"])
        assert (line["score"], line["reason"]) == (rating.value, rating.reason)
    math_lines = [x for x in lines if x["question_id"] == 111]
    assert [x["judge_prompt"] for x in math_lines] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert references[111][0] in math_lines[0]["messages"][-1]["content"]
    assert references[111][1] in math_lines[1]["messages"][-1]["content"]
    assert references[111][0] not in lines[0]["messages"][-1]["content"]


def test_results_by_hand(protocol):
    """Turn 1 scores 8 7 4 3 6, turn 2 6 5 9 10 6; 83/1 and 111/2 failed."""
    out, results, _, _ = protocol
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


def test_complete_answers_are_judged_again_without_answering_again_but_not_another_models(protocol, setup):
    path, _, _, _ = setup
    out, results, model, _ = protocol
    model.calls.clear()
    cfg = MtBenchEvalConfig(judge="fake-judge", questions=str(path))
    again = run_mt_bench(cfg, "fake-model", out, model_generator=model, judge_generator=FakeJudge())
    assert model.calls == [] and again == results
    # another model's answers are not reused
    other = run_mt_bench(cfg, "other-model", out, model_generator=model, judge_generator=FakeJudge())
    assert len(model.calls) == 6 and other["model"] == "other-model"
    assert {a["model"] for a in read_jsonl(out / "answers.jsonl")} == {"other-model"}
    assert len(read_jsonl(out / "judgments.jsonl")) == 12


def test_a_failed_answer_is_not_judged_and_counts_as_a_failure(tmp_path, setup):
    path, questions, _, _ = setup
    model, judge = FakeModel(questions, fail={(82, 2)}), FakeJudge()
    out = tmp_path / "out"
    cfg = MtBenchEvalConfig(judge="j", questions=str(path), limit=4)
    results = run_mt_bench(cfg, "m", out, model_generator=model, judge_generator=judge)
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
    cfg = MtBenchEvalConfig(judge="j", questions=str(path), limit=4)
    run_mt_bench(cfg, "m", out, model_generator=model, judge_generator=FakeJudge())
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


# ---------------------------------------------------------------------------------------------------------
# Pairwise mode: the model (answers `answer-...`) against a baseline (answers `base-...`)

# The judge's answer per (question, turn): (model shown as A, baseline shown as A).
PAIR_VERDICTS = {
    (81, 1): ("Verdict: [[A]]", "[[B]]"),  # model wins in both orders: win
    (81, 2): ("[[B]]", "[[A]]"),  # baseline wins in both orders: loss
    (82, 1): ("[[A]]", "[[A]]"),  # always A (position bias): inconsistent, tie
    (82, 2): ("[[C]]", "[[C]]"),  # tie in both orders: tie, consistent
    (83, 1): ("[[C]]", "[[B]]"),  # tie, then model: inconsistent, tie
    (83, 2): ("I cannot decide.", "[[A]]"),  # no verdict in game 1: failed game
    (84, 1): ("[[A]]", "[[B]]"),  # win
    (84, 2): ("[[B]]", "[[A]]"),  # loss
    (111, 1): ("[[A]]", "[[B]]"),  # win (math: reference-guided)
    (111, 2): ("[[B]]", "[[A]]"),  # loss
    (141, 1): ("[[A]]", "[[B]]"),  # win
    (141, 2): ("[[B]]", "[[B]]"),  # always B: inconsistent, tie
}
# Outcome for the model, as FastChat's show_result counts it.
PAIR_OUTCOMES = {
    (81, 1): "model_1", (81, 2): "model_2", (82, 1): "tie", (82, 2): "tie", (83, 1): "tie", (83, 2): None,
    (84, 1): "model_1", (84, 2): "model_2", (111, 1): "model_1", (111, 2): "model_2", (141, 1): "model_1",
    (141, 2): "tie",
}  # fmt: skip


class FakePairJudge:
    """Answers from PAIR_VERDICTS: the game is the latest model answer in the prompt, the order is whether
    the model's answer comes before the baseline's."""

    model_id = "fake-judge"

    def __init__(self):
        self.calls = []
        self.usage = Usage()

    def generate(self, conversations, params):
        self.calls.append((list(conversations), params))
        out = []
        for messages in conversations:
            text = messages[-1]["content"]
            qid, turn = next(k for k in reversed(PAIR_VERDICTS) if f"answer-{k[0]}-t{k[1]}" in text)
            model_first = text.index(f"answer-{qid}-t1") < text.index(f"base-{qid}-t1")
            out.append(Completion(PAIR_VERDICTS[(qid, turn)][0 if model_first else 1], "stop", 100, 7))
        return out


def write_baseline(path, questions, fastchat=False):
    lines = []
    for q in questions:
        turns = [f"base-{q.question_id}-t{k}" for k in (1, 2)]
        if fastchat:  # FastChat model_answer/NAME.jsonl
            record = {
                "question_id": q.question_id,
                "answer_id": "x",
                "choices": [{"index": 0, "turns": turns}],
            }
        else:
            record = Answer(
                q.question_id, q.category, "base-model", turns, ["stop"] * 2, [1, 2], [3, 4], [None] * 2
            )
            record = record.to_dict()
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path


def hand_filled(raw_prompts, raw_refs, q, turn, a, b):
    """The judge messages FastChat's run_judge_pair sends, filled here from the asset's raw lines."""
    name = ("pair-math-v1" if q.category in ("math", "reasoning", "coding") else "pair-v2") + (
        "-multi-turn" if turn == 2 else ""
    )
    prompt = raw_prompts[name]
    kwargs = {}
    if q.question_id in raw_refs and q.category in ("math", "reasoning", "coding"):
        ref = raw_refs[q.question_id]["choices"][0]["turns"]
        kwargs = {"ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    qid = q.question_id
    if turn == 1:
        user = prompt["prompt_template"].format(
            question=q.turns[0], answer_a=f"{a}-{qid}-t1", answer_b=f"{b}-{qid}-t1", **kwargs
        )
    else:
        user = prompt["prompt_template"].format(
            question_1=q.turns[0], question_2=q.turns[1],
            answer_a_1=f"{a}-{qid}-t1", answer_b_1=f"{b}-{qid}-t1",
            answer_a_2=f"{a}-{qid}-t2", answer_b_2=f"{b}-{qid}-t2", **kwargs,
        )  # fmt: skip
    return name, [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


@pytest.fixture
def pairwise(tmp_path, setup):
    """One pairwise MT-Bench run against an earlier run's answers: (out folder, results, judge, baseline)."""
    path, questions, _, _ = setup
    (tmp_path / "base").mkdir()
    baseline = write_baseline(tmp_path / "base" / "answers.jsonl", questions)
    judge = FakePairJudge()
    out = tmp_path / "out"
    cfg = MtBenchEvalConfig(
        judge="fake-judge", questions=str(path), judge_max_tokens=99, baseline=str(baseline)
    )
    results = run_mt_bench(
        cfg, "fake-model", out, model_generator=FakeModel(questions), judge_generator=judge
    )
    return out, results, judge, baseline


def test_pairwise_is_one_batched_greedy_judge_call_of_two_games_per_turn(pairwise):
    _, _, judge, _ = pairwise
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 24
    assert (judge.calls[0][1].temperature, judge.calls[0][1].max_tokens) == (0.0, 99)


def test_pairwise_games_swap_positions_with_fastchats_prompts_byte_for_byte(pairwise, setup):
    _, questions, _, _ = setup
    out, _, _, _ = pairwise
    folder = assets.fetch("mt-bench")
    raw_prompts = {
        p["name"]: p for p in map(json.loads, (folder / "judge_prompts.jsonl").read_text().splitlines())
    }
    raw_refs = {
        r["question_id"]: r
        for r in map(json.loads, (folder / "reference_answer" / "gpt-4.jsonl").read_text().splitlines())
    }
    lines = read_jsonl(out / "pairwise.jsonl")
    assert [(x["question_id"], x["turn"]) for x in lines] == list(PAIR_VERDICTS)
    for line in lines:
        q = next(q for q in questions if q.question_id == line["question_id"])
        key = (q.question_id, line["turn"])
        name, g1 = hand_filled(raw_prompts, raw_refs, q, line["turn"], "answer", "base")
        _, g2 = hand_filled(raw_prompts, raw_refs, q, line["turn"], "base", "answer")
        assert line["judge_prompt"] == name and line["category"] == q.category
        assert (line["model_1"], line["model_2"]) == ("fake-model", "base-model")
        g1_line, g2_line = line["games"]
        assert (g1_line["game"], g1_line["a"], g2_line["game"], g2_line["a"]) == (
            "g1",
            "model_1",
            "g2",
            "model_2",
        )
        assert g1_line["messages"] == g1 and g2_line["messages"] == g2  # byte for byte
        assert (g1_line["raw"], g2_line["raw"]) == PAIR_VERDICTS[key]
        assert line["outcome"] == PAIR_OUTCOMES[key]
    # the turn-1 prompt written out by hand once (pair-v2)
    q81 = questions[0]
    assert lines[0]["games"][0]["messages"][1]["content"] == (
        "[User Question]\n" + q81.turns[0] + "\n\n"
        "[The Start of Assistant A's Answer]\nanswer-81-t1\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\nbase-81-t1\n[The End of Assistant B's Answer]"
    )
    assert [x["judge_prompt"] for x in lines if x["question_id"] == 111] == [
        "pair-math-v1", "pair-math-v1-multi-turn",
    ]  # fmt: skip
    assert raw_refs[111]["choices"][0]["turns"][1] in lines[9]["games"][1]["messages"][1]["content"]


def test_pairwise_verdicts_as_written_and_as_fastchats_winners(pairwise):
    out, _, _, _ = pairwise
    lines = read_jsonl(out / "pairwise.jsonl")
    by_key = {(x["question_id"], x["turn"]): x for x in lines}
    line = by_key[(82, 1)]  # [[A]] twice: the model, then the baseline
    assert [g["verdict"] for g in line["games"]] == ["A", "A"]
    assert (line["g1_winner"], line["g2_winner"], line["outcome"]) == ("model_1", "model_2", "tie")
    line = by_key[(83, 1)]
    assert (line["g1_winner"], line["g2_winner"], line["outcome"]) == ("tie", "model_1", "tie")
    line = by_key[(83, 2)]
    assert [g["verdict"] for g in line["games"]] == [None, "A"] and line["outcome"] is None
    assert (
        line["reason"] == f"g1: {mt_bench.NO_VERDICT}" and line["games"][0]["reason"] == mt_bench.NO_VERDICT
    )
    assert by_key[(81, 1)]["games"][0]["verdict"] == "A" and by_key[(81, 1)]["g2_winner"] == "model_1"


def test_pairwise_results_by_hand(pairwise):
    """4 wins (81/1 84/1 111/1 141/1), 3 losses (81/2 84/2 111/2), 4 ties (82/1 82/2 83/1 141/2; all but 82/2
    inconsistent), 83/2 failed."""
    out, results, _, baseline = pairwise
    assert json.loads((out / "results.json").read_text()) == results
    assert (results["mode"], results["model"], results["baseline"]) == (
        "pairwise",
        "fake-model",
        str(baseline),
    )
    assert {k: results[k] for k in ("n", "win", "loss", "tie", "n_failed", "n_inconsistent")} == {
        "n": 12, "win": 4, "loss": 3, "tie": 4, "n_failed": 1, "n_inconsistent": 3,
    }  # fmt: skip
    assert results["win_rate"] == pytest.approx(4 / 11) and results["loss_rate"] == pytest.approx(3 / 11)
    assert results["win_rate_adjusted"] == pytest.approx(6 / 11)
    assert results["turns"]["1"]["win_rate_adjusted"] == pytest.approx(5 / 6)  # 4 wins, 2 ties
    assert results["turns"]["2"]["win_rate_adjusted"] == pytest.approx(1 / 5)  # 3 losses, 2 ties, 1 failed
    writing = results["categories"]["writing"]
    assert (writing["win"], writing["loss"], writing["tie"], writing["n_failed"]) == (2, 2, 3, 1)
    assert writing["win_rate_adjusted"] == pytest.approx(0.5)
    assert results["categories"]["math"]["win_rate_adjusted"] == pytest.approx(0.5)
    assert results["categories"]["stem"]["win_rate_adjusted"] == pytest.approx(0.75)
    assert results["failures"] == [{"question_id": 83, "turn": 2, "reason": f"g1: {mt_bench.NO_VERDICT}"}]
    assert results["missing"] == []
    report = (out / "results.md").read_text()
    assert results["baseline_model"] == "base-model" and report.startswith(
        "# MT-Bench pairwise: fake-model vs base-model"
    )
    assert "**Win rate: 54.5%**" in report and "| writing | 50.0% | 2 | 2 | 3 | 2 | 1 |" in report
    assert not (out / "judgments.jsonl").exists() and not (out / "categories.png").exists()


def test_pairwise_baseline_spec_is_answered_by_the_same_protocol(tmp_path, setup):
    path, questions, _, _ = setup
    base = FakeModel(questions, fail={(82, 2)}, prefix="base", model_id="base-gen")
    judge, out = FakePairJudge(), tmp_path / "out"
    cfg = MtBenchEvalConfig(
        judge="fake-judge", questions=str(path), limit=4, max_new_tokens=55, baseline="base-spec"
    )
    results = run_mt_bench(
        cfg,
        "fake-model",
        out,
        model_generator=FakeModel(questions),
        judge_generator=judge,
        baseline_generator=base,
    )
    # the baseline: turn 1 then turn 2 (its own answer in the history), writing's temperature and seed
    assert [(p.temperature, p.seed, p.max_tokens, len(c)) for c, p in base.calls] == [(0.7, 0, 55, 4)] * 2
    assert base.calls[1][0][0][1] == {"role": "assistant", "content": "base-81-t1"}
    saved = read_jsonl(out / "baseline_answers.jsonl")
    assert [a["model"] for a in saved] == ["base-spec"] * 4 and saved[0]["turns"] == [
        "base-81-t1",
        "base-81-t2",
    ]
    # 82/2 of the baseline failed: not judged, a failed game
    assert len(judge.calls[0][0]) == 14
    [line] = [x for x in read_jsonl(out / "pairwise.jsonl") if (x["question_id"], x["turn"]) == (82, 2)]
    assert line["games"] is None and line["outcome"] is None
    assert line["reason"] == f"{BASELINE_FAILED}: HTTP 500: boom"
    # writing only: wins 81/1 84/1, losses 81/2 84/2, ties 82/1 83/1; 82/2 and 83/2 failed
    assert (results["win"], results["loss"], results["tie"], results["n_failed"]) == (2, 2, 2, 2)
    assert results["win_rate_adjusted"] == pytest.approx(0.5) and results["baseline"] == "base-spec"


def test_baseline_answer_files_fastchat_format_and_errors(tmp_path, setup):
    _, questions, _, _ = setup
    fastchat = write_baseline(tmp_path / "gpt-3.5-turbo.jsonl", questions, fastchat=True)
    answers = read_answer_file(fastchat, questions[:3])
    assert [a.question_id for a in answers] == [81, 82, 83]
    assert answers[0].model == "gpt-3.5-turbo" and answers[0].turns == ["base-81-t1", "base-81-t2"]
    assert answers[0].errors == [None, None]
    short = tmp_path / "short.jsonl"
    short.write_text(fastchat.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"short\.jsonl: no answer to question 82"):
        read_answer_file(short, questions)
    short.write_text('{"question_id": 81, "model": "m", "turns": ["only one"]}\n')
    with pytest.raises(DataError, match="question 81: 1 answer turn"):
        read_answer_file(short, questions[:1])
    short.write_text('{"question_id": 81, "model": "m", "turns": "text"}\n')
    with pytest.raises(DataError, match=r"short\.jsonl:1: turns: expected a non-empty list"):
        read_answer_file(short, questions[:1])
    short.write_text('{"question_id": 81, "turns": ["a", "b"]}\nnot json\n')
    with pytest.raises(DataError, match=r"short\.jsonl:2: record: invalid JSON"):
        read_answer_file(short, questions[:1])
    with pytest.raises(DataError, match="no such file"):  # a .jsonl baseline is a file, never a model spec
        cfg = MtBenchEvalConfig(judge="j", limit=1, baseline=str(tmp_path / "missing.jsonl"))
        run_mt_bench(
            cfg, "m", tmp_path / "o", model_generator=FakeModel(questions), judge_generator=FakePairJudge()
        )


def test_pairwise_through_the_cli_with_the_tiny_model(tmp_path, setup, tiny_model_dir):
    from zephyr.cli import main

    _, questions, _, _ = setup
    baseline = write_baseline(tmp_path / "gpt-3.5-turbo.jsonl", questions, fastchat=True)
    out, spec = tmp_path / "mt", str(tiny_model_dir)
    code = main(
        ["eval", "mt-bench", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "2",
         "--max-new-tokens", "4", "--judge-max-tokens", "4", "--baseline", str(baseline)]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "pairwise" and results["n"] == 4
    assert results["win"] + results["loss"] + results["tie"] + results["n_failed"] == 4
    lines = read_jsonl(out / "pairwise.jsonl")
    assert [line["model_2"] for line in lines] == ["gpt-3.5-turbo"] * 4
    assert all(len(line["games"]) == 2 and line["games"][1]["a"] == "model_2" for line in lines)
    assert "base-81-t2" in lines[1]["games"][0]["messages"][1]["content"]


# ---------------------------------------------------------------------------------------------------------
# Logprobs judge mode: the judge's next-token probabilities after a forced answer start

LN = math.log
# Top log-probs per (question, turn): after "Rating: [[" and after "Rating: [[1". Unlisted keys get RATED_6.
RATED_6 = ({"6": 0.0}, {"]]": 0.0})
LOGPROB_TOPS = {
    (81, 1): ({"7": LN(0.5), "8": LN(0.5)}, {"]]": 0.0}),  # 7.5
    (81, 2): ({"1": LN(0.4), "9": LN(0.2), "R": LN(0.4)}, {"0": LN(0.25), "]]": LN(0.75)}),  # 31/6
    (82, 1): ({"R": LN(0.9995), "5": LN(4e-4)}, {"]]": 0.0}),  # the rating tokens hold 4e-4: a failure
}
# Per (question, turn): the top log-probs after "[[" in game 1 (model shown as A) and game 2 (baseline as A).
PAIR_TOPS = {
    (81, 1): ({"A": LN(0.6), "B": LN(0.3), "C": LN(0.1)}, {"A": LN(0.2), "B": LN(0.7)}),  # model both: win
    (81, 2): ({"A": LN(0.1), "B": LN(0.5)}, {"A": LN(0.5), "C": LN(0.4)}),  # baseline both: loss
    (82, 1): ({"A": LN(0.5), "B": LN(0.4)}, {"A": LN(0.5), "B": LN(0.4)}),  # A both: inconsistent tie
    (82, 2): ({"C": LN(0.5), "A": LN(0.2)}, {"I": 0.0, "A": LN(1e-4)}),  # game 2 not in the format: failed
}


class FakeLogprobJudge:
    """A local judge's scorer: fixed top log-probs per (question, turn, prefix); `generate` must not run."""

    model_id = "fake-logprob-judge"

    def __init__(self, tops, keys):
        self.tops = tops
        self.keys = keys  # (question, turn) keys, latest turn last: the prompt names the latest answer
        self.calls = []
        self.usage = Usage()

    def generate(self, conversations, params):
        raise AssertionError("a logprobs judge writes no answer")

    def next_token_logprobs(self, conversations, top_k=20, *, candidates=(), answer_prefix=""):
        return [{c: -30.0 for c in candidates} for _ in conversations]  # the client's candidate probe

    def prefix_logprobs(self, conversations, prefixes, top_k=20, *, candidates=()):
        self.calls.append((list(conversations), tuple(prefixes), top_k, tuple(candidates)))
        return [[self.top(c, p) for p in prefixes] for c in conversations]

    def top(self, messages, prefix):
        text = messages[-1]["content"]
        qid, turn = next(k for k in reversed(self.keys) if f"answer-{k[0]}-t{k[1]}" in text)
        if prefix == mt_bench.VERDICT_PREFIX:
            model_first = text.index(f"answer-{qid}-t1") < text.index(f"base-{qid}-t1")
            return dict(self.tops.get((qid, turn), ({"C": 0.0}, {"C": 0.0}))[0 if model_first else 1])
        return dict(self.tops.get((qid, turn), RATED_6)[mt_bench.RATING_PREFIXES.index(prefix)])


def test_logprobs_mode_scores_the_expected_rating_of_the_official_prompt(tmp_path, setup):
    path, questions, prompts, references = setup
    judge = FakeLogprobJudge(LOGPROB_TOPS, list(JUDGE_ANSWERS))
    out = tmp_path / "out"
    cfg = MtBenchEvalConfig(judge="fake-judge", questions=str(path), judge_mode="logprobs")
    results = run_mt_bench(
        cfg, "fake-model", out, model_generator=FakeModel(questions), judge_generator=judge
    )

    # one scoring call per judge prompt, both prefixes at once, the rating digits always scored
    assert len(judge.calls) == 12
    for conversations, prefixes, top_k, candidates in judge.calls:
        assert prefixes == ("Rating: [[", "Rating: [[1") and top_k == 20
        assert candidates == tuple("0123456789") and len(conversations) == 1
    lines = read_jsonl(out / "judgments.jsonl")
    assert [(x["question_id"], x["turn"]) for x in lines] == list(JUDGE_ANSWERS)
    for line, (conversations, _, _, _) in zip(lines, judge.calls, strict=True):
        q = next(q for q in questions if q.question_id == line["question_id"])
        qid = q.question_id
        messages, name = mt_bench.judge_messages(
            q, [f"answer-{qid}-t1", f"answer-{qid}-t2"], line["turn"], prompts, references.get(qid)
        )
        # the prompt of text mode, byte for byte, sent and recorded
        assert conversations[0] == messages and line["messages"] == messages and line["judge_prompt"] == name
        assert line["judge_mode"] == "logprobs" and line["raw"] is None
        assert line["answer_prefixes"] == ["Rating: [[", "Rating: [[1"]
        assert line["top_logprobs"] == [
            pytest.approx(t) for t in LOGPROB_TOPS.get((qid, line["turn"]), RATED_6)
        ]
        assert line["score"] == line["ratings"][0]["value"]
    # the turn-1 prompt filled from the asset's template by hand (single-v1)
    q81 = questions[0]
    assert judge.calls[0][0][0] == [
        {"role": "system", "content": prompts["single-v1"].system_prompt},
        {
            "role": "user",
            "content": prompts["single-v1"].prompt_template.format(
                question=q81.turns[0], answer="answer-81-t1"
            ),
        },
    ]

    by_key = {(x["question_id"], x["turn"]): x for x in lines}
    assert by_key[(81, 1)]["score"] == pytest.approx(7.5)
    evidence = by_key[(81, 2)]["ratings"][0]["evidence"]
    assert by_key[(81, 2)]["score"] == pytest.approx(31 / 6)  # 1: .5, 9: 1/3, 10: 1/6
    assert evidence["rating_mass"] == pytest.approx(0.6)
    assert evidence["distribution"] == {
        "1": pytest.approx(0.5),
        "9": pytest.approx(1 / 3),
        "10": pytest.approx(1 / 6),
    }
    failed = by_key[(82, 1)]
    assert (failed["score"], failed["reason"]) == (None, mt_bench.LOW_RATING_MASS)
    assert failed["ratings"][0]["evidence"]["rating_mass"] == pytest.approx(4e-4)

    # results by hand: turn 1 7.5, (82/1 failed), 6 x 4; turn 2 31/6, 6 x 5
    assert results["judge_mode"] == "logprobs"
    assert (results["n"], results["n_scored"], results["n_failed"]) == (12, 11, 1)
    assert results["score"] == pytest.approx((7.5 + 31 / 6 + 9 * 6) / 11)
    assert results["turns"]["1"]["score"] == pytest.approx((7.5 + 24) / 5)
    assert results["turns"]["2"]["score"] == pytest.approx((31 / 6 + 30) / 6)
    assert results["failures"] == [{"question_id": 82, "turn": 1, "reason": mt_bench.LOW_RATING_MASS}]
    assert json.loads((out / "results.json").read_text()) == results
    assert "expected rating" in (out / "results.md").read_text()
    # a judge id of its own: logprobs scores are never mixed with text scores unnoticed
    params = SamplingParams(max_tokens=2048, temperature=0.0)
    assert lines[0]["judge"] == judge_id(judge, params, mode="mt-bench-single-logprobs")
    assert lines[0]["judge"] != judge_id(judge, params)


def test_logprobs_mode_needs_a_judge_that_scores_forced_answers(tmp_path, setup):
    path, questions, _, _ = setup
    model = FakeModel(questions)
    with pytest.raises(ConfigError, match=r"judge_mode logprobs.*'text-judge'"):
        cfg = MtBenchEvalConfig(judge="text-judge", questions=str(path), judge_mode="logprobs")
        run_mt_bench(cfg, "m", tmp_path / "o", model_generator=model, judge_generator=FakeJudge())
    assert model.calls == []  # refused before any answer is generated
    with pytest.raises(ConfigError, match=r"judge_mode: must be one of 'text' \| 'logprobs', got 'probs'"):
        build(MtBenchEvalConfig, {"judge_mode": "probs"})  # the config refuses it, before any run


def test_pairwise_logprobs_mode_takes_the_likeliest_verdict_per_order(tmp_path, setup):
    path, questions, _, _ = setup
    baseline = write_baseline(tmp_path / "answers.jsonl", questions)
    judge = FakeLogprobJudge(PAIR_TOPS, list(PAIR_VERDICTS))
    out = tmp_path / "out"
    cfg = MtBenchEvalConfig(
        judge="fake-judge", questions=str(path), limit=2, baseline=str(baseline), judge_mode="logprobs"
    )
    results = run_mt_bench(
        cfg, "fake-model", out, model_generator=FakeModel(questions), judge_generator=judge
    )
    assert len(judge.calls) == 8
    assert {(c[1], c[3]) for c in judge.calls} == {(("[[",), ("A", "B", "C"))}
    lines = read_jsonl(out / "pairwise.jsonl")
    by_key = {(x["question_id"], x["turn"]): x for x in lines}
    assert [g["verdict"] for g in by_key[(81, 1)]["games"]] == ["A", "B"]
    assert by_key[(81, 1)]["outcome"] == "model_1"
    assert [g["verdict"] for g in by_key[(81, 2)]["games"]] == ["B", "A"]
    assert by_key[(81, 2)]["outcome"] == "model_2"
    assert by_key[(82, 1)]["outcome"] == "tie"
    game = by_key[(81, 1)]["games"][0]
    assert game["answer_prefixes"] == ["[["] and game["top_logprobs"] == [
        pytest.approx(PAIR_TOPS[(81, 1)][0])
    ]
    assert game["evidence"]["probabilities"] == {
        "A": pytest.approx(0.6), "B": pytest.approx(0.3), "tie": pytest.approx(0.1),
    }  # fmt: skip
    failed = by_key[(82, 2)]
    assert [g["verdict"] for g in failed["games"]] == ["tie", None] and failed["outcome"] is None
    assert failed["reason"] == f"g2: {mt_bench.LOW_VERDICT_MASS}" and failed["judge_mode"] == "logprobs"
    assert {k: results[k] for k in ("win", "loss", "tie", "n_failed", "n_inconsistent")} == {
        "win": 1, "loss": 1, "tie": 1, "n_failed": 1, "n_inconsistent": 1,
    }  # fmt: skip
    assert results["judge_mode"] == "logprobs" and "likeliest" in (out / "results.md").read_text()


def test_pairwise_logprobs_with_a_random_tiny_judge_fails_every_game_clearly(tmp_path, setup, tiny_model_dir):
    """A random model spreads its probability over the whole vocabulary: A, B and C hold far below 1e-3, so
    every game is a counted failure, not a made-up verdict (the real backend's prefix_logprobs path)."""
    from zephyr.cli import main

    _, questions, _, _ = setup
    baseline = write_baseline(tmp_path / "gpt-3.5-turbo.jsonl", questions, fastchat=True)
    out, spec = tmp_path / "mt", str(tiny_model_dir)
    code = main(
        ["eval", "mt-bench", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "1",
         "--max-new-tokens", "4", "--baseline", str(baseline), "--judge-mode", "logprobs"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["n"], results["n_failed"]) == (2, 2)
    for line in read_jsonl(out / "pairwise.jsonl"):
        for game in line["games"]:
            assert game["reason"] == mt_bench.LOW_VERDICT_MASS and game["evidence"]["verdict_mass"] < 1e-3
            assert set(game["top_logprobs"][0]) >= {"A", "B", "C"}  # the candidates are always scored


@pytest.mark.slow
def test_smollm2_logprobs_judge_scores_every_turn_through_the_cli(tmp_path):
    from zephyr.cli import main

    out = tmp_path / "mt"
    spec = "asset:smollm2-135m-instruct"
    code = main(
        ["eval", "mt-bench", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "1",
         "--max-new-tokens", "16", "--judge-mode", "logprobs"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["n"], results["n_scored"], results["n_failed"]) == (2, 2, 0)
    for turn in ("1", "2"):
        assert 1.0 <= results["turns"][turn]["score"] <= 10.0
    for line in read_jsonl(out / "judgments.jsonl"):
        assert line["judge_mode"] == "logprobs" and 1.0 <= line["score"] <= 10.0
        assert line["answer_prefixes"] == ["Rating: [[", "Rating: [[1"] and len(line["top_logprobs"]) == 2
        assert line["ratings"][0]["evidence"]["rating_mass"] >= 1e-3
