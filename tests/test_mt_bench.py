"""MT-Bench judge prompts (byte-identical to FastChat's, filled by hand here), score parsing, aggregation."""

from __future__ import annotations

import json
import math

import pytest

from zephyr.core.errors import DataError
from zephyr.judge.rating import Rating
from zephyr.models import assets
from zephyr.stages.mt_bench import protocol as mt_bench
from zephyr.stages.mt_bench.protocol import Judgment, Question

# FastChat judge_prompts.jsonl, written out here so the expected prompts do not come from the code under test.
SINGLE_V1_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    'you must rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for '
    'example: "Rating: [[5]]".\n\n'
)
SINGLE_MATH_V1_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and "
    "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
    "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
    "objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
    'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)
MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus "
    "on the assistant's answer to the second user question. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate the response on "
    'a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)
MATH_MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the "
    "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
    "Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must "
    'rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n'
)
PAIR_V2_SYSTEM_START = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI"
)

# Answers with braces and template field names: values must be inserted verbatim, never re-formatted.
ANSWERS = ["Aloha! {question} and {answer} stay {{as}} written.", "A trip. A {0} day. A beach."]


@pytest.fixture(scope="module")
def mt_files():
    folder = assets.fetch("mt-bench")
    return {
        "questions": {q.question_id: q for q in mt_bench.load_questions(folder / "question.jsonl")},
        "prompts": mt_bench.load_judge_prompts(folder / "judge_prompts.jsonl"),
        "references": mt_bench.load_references(folder / "reference_answer" / "gpt-4.jsonl"),
    }


def test_assets_load(mt_files):
    questions = mt_files["questions"]
    assert len(questions) == 80
    assert sorted({q.category for q in questions.values()}) == sorted(mt_bench.CATEGORY_TEMPERATURE)
    assert all(len(q.turns) == 2 for q in questions.values())
    # every question that needs a reference has one in gpt-4.jsonl
    need = {q.question_id for q in questions.values() if q.needs_reference}
    assert len(need) == 30 and need <= set(mt_files["references"])
    assert questions[81].temperature == 0.7 and questions[111].temperature == 0.0
    assert questions[141].temperature == 0.1  # stem
    assert mt_files["prompts"]["single-v1"].output_format == "[[rating]]"


def test_general_turn_1_prompt(mt_files):
    q = mt_files["questions"][81]
    messages, name = mt_bench.judge_messages(q, ANSWERS, 1, mt_files["prompts"])
    assert name == "single-v1"
    user = (
        SINGLE_V1_INSTRUCTION
        + "[Question]\nCompose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
        "experiences and must-see attractions.\n\n"
        "[The Start of Assistant's Answer]\nAloha! {question} and {answer} stay {{as}} written.\n"
        "[The End of Assistant's Answer]"
    )
    assert messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user},
    ]


def test_general_turn_2_prompt(mt_files):
    q = mt_files["questions"][81]
    messages, name = mt_bench.judge_messages(q, ANSWERS, 2, mt_files["prompts"])
    assert name == "single-v1-multi-turn"
    user = (
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\nCompose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
        "experiences and must-see attractions.\n\n"
        "### Assistant A:\nAloha! {question} and {answer} stay {{as}} written.\n\n"
        "### User:\nRewrite your previous response. Start every sentence with the letter A.\n\n"
        "### Assistant A:\nA trip. A {0} day. A beach.\n\n"
        "<|The End of Assistant A's Conversation with User|>"
    )
    assert messages == [
        {"role": "system", "content": MULTI_TURN_SYSTEM},
        {"role": "user", "content": user},
    ]


REF_111_TURN_1 = (
    "To find the area of the triangle, we can use the formula for the area of a triangle with coordinates "
    "A(x1, y1), B(x2, y2), and C(x3, y3):\n\nArea = (1/2) * |(x1(y2 - y3) + x2(y3 - y1) + x3(y1 - y2))|\n\n"
    "In this case, the coordinates are A(0, 0), B(-1, 1), and C(3, 3). Plugging these values into the formula, "
    "we get:\n\nArea = (1/2) * |(0(1 - 3) + (-1)(3 - 0) + 3(0 - 1))|\n\nArea = (1/2) * |(-0 + 3 - 3)|\n\n"
    "Area = (1/2) * |0|\n\nArea = 0\n\nThe area of the triangle is 0. This means that the three points are "
    "collinear, and there is no triangle formed by these points."
)
REF_111_TURN_2 = (
    "Since the three points are collinear and do not form a triangle, there is no circumscribed circle for this "
    "set of points. A circumscribed circle can only be formed around a triangle with non-collinear points."
)


def test_math_turn_1_prompt_with_reference(mt_files):
    q = mt_files["questions"][111]
    assert q.category == "math"
    reference = mt_files["references"][111]
    assert reference == [REF_111_TURN_1, REF_111_TURN_2]
    messages, name = mt_bench.judge_messages(q, ["It is 3.", "5 pi."], 1, mt_files["prompts"], reference)
    assert name == "single-math-v1"
    user = (
        SINGLE_MATH_V1_INSTRUCTION
        + "[Question]\nThe vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of "
        "the triangle?\n\n"
        "[The Start of Reference Answer]\n" + REF_111_TURN_1 + "\n[The End of Reference Answer]\n\n"
        "[The Start of Assistant's Answer]\nIt is 3.\n[The End of Assistant's Answer]"
    )
    assert messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user},
    ]


def test_math_turn_2_prompt_with_reference(mt_files):
    q = mt_files["questions"][111]
    reference = mt_files["references"][111]
    messages, name = mt_bench.judge_messages(q, ["It is 3.", "5 pi."], 2, mt_files["prompts"], reference)
    assert name == "single-math-v1-multi-turn"
    q1 = "The vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of the triangle?"
    q2 = "What's area of the circle circumscribing the triangle?"
    user = (
        "<|The Start of Reference Answer|>\n\n"
        f"### User:\n{q1}\n\n### Reference answer:\n{REF_111_TURN_1}\n\n"
        f"### User:\n{q2}\n\n### Reference answer:\n{REF_111_TURN_2}\n\n"
        "<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        f"### User:\n{q1}\n\n### Assistant A:\nIt is 3.\n\n"
        f"### User:\n{q2}\n\n### Assistant A:\n5 pi.\n\n"
        "<|The End of Assistant A's Conversation with User|>"
    )
    assert messages == [
        {"role": "system", "content": MATH_MULTI_TURN_SYSTEM},
        {"role": "user", "content": user},
    ]


def test_prompt_choice_per_category(mt_files):
    """Reasoning and coding use the reference-guided prompts (FastChat NEED_REF_CATS); stem does not."""
    prompts, refs = mt_files["prompts"], mt_files["references"]
    for qid, one, two in (
        (101, "single-math-v1", "single-math-v1-multi-turn"),  # reasoning
        (121, "single-math-v1", "single-math-v1-multi-turn"),  # coding
        (141, "single-v1", "single-v1-multi-turn"),  # stem: its question line has a `reference`, unused
    ):
        q = mt_files["questions"][qid]
        assert mt_bench.judge_messages(q, ANSWERS, 1, prompts, refs.get(qid))[1] == one
        assert mt_bench.judge_messages(q, ANSWERS, 2, prompts, refs.get(qid))[1] == two
    # a general question ignores a reference it is given
    q = mt_files["questions"][81]
    assert mt_bench.judge_messages(q, ANSWERS, 1, prompts, ["ref"]) == mt_bench.judge_messages(
        q, ANSWERS, 1, prompts
    )


def test_prompt_errors(mt_files):
    prompts = mt_files["prompts"]
    with pytest.raises(DataError, match="reference answer"):
        mt_bench.judge_messages(mt_files["questions"][111], ANSWERS, 1, prompts, None)
    with pytest.raises(DataError, match="turn 2 needs 2"):
        mt_bench.judge_messages(mt_files["questions"][81], ANSWERS[:1], 2, prompts)
    with pytest.raises(ValueError, match="turn must be 1 or 2"):
        mt_bench.judge_messages(mt_files["questions"][81], ANSWERS, 3, prompts)
    one_turn = Question(1, "writing", ("only one",))
    with pytest.raises(DataError, match="no turn 2"):
        mt_bench.judge_messages(one_turn, ANSWERS, 2, prompts)


def test_pairwise_prompt_and_verdicts(mt_files):
    q = mt_files["questions"][81]
    messages, name = mt_bench.pairwise_messages(q, ["first A"], ["first B"], 1, mt_files["prompts"])
    assert name == "pair-v2"
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith(PAIR_V2_SYSTEM_START)
    assert messages[1]["content"] == (
        "[User Question]\n" + q.turns[0] + "\n\n"
        "[The Start of Assistant A's Answer]\nfirst A\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\nfirst B\n[The End of Assistant B's Answer]"
    )
    ref = mt_files["references"][111]
    assert mt_bench.pairwise_messages(
        mt_files["questions"][111], ANSWERS, ANSWERS, 2, mt_files["prompts"], ref
    )[1] == ("pair-math-v1-multi-turn")

    # a verdict is a rating: Assistant A's share of the game
    assert mt_bench.parse_verdict("B is better. [[B]]") == Rating(0.0)
    assert mt_bench.parse_verdict("[[C]]") == Rating(0.5)
    # FastChat checks [[A]] first anywhere in the text
    assert mt_bench.parse_verdict('format "[[A]]" ... my verdict: [[B]]') == Rating(1.0)
    assert mt_bench.parse_verdict("A is better") == Rating(None, mt_bench.NO_VERDICT)
    assert [mt_bench.verdict_of(Rating(v)) for v in (1.0, 0.5, 0.0, None)] == ["A", "tie", "B", None]

    assert mt_bench.combine_verdicts("A", "B") == "model_1"  # both orders pick model 1
    assert mt_bench.combine_verdicts("B", "A") == "model_2"
    assert mt_bench.combine_verdicts("A", "A") == "tie"  # position bias: inconsistent
    assert mt_bench.combine_verdicts("tie", "B") == "tie"
    assert mt_bench.combine_verdicts("A", "tie") == "tie"
    assert mt_bench.combine_verdicts("A", None) is None
    summary = mt_bench.pairwise_summary(["model_1", "model_1", "model_2", "tie", None])
    assert summary == {
        "win": 2,
        "loss": 1,
        "tie": 1,
        "n_failed": 1,
        "win_rate": 0.5,
        "loss_rate": 0.25,
        "win_rate_adjusted": 0.625,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is helpful.\n\nRating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("Rating: [[10]]", 10.0),
        ("[[8.]]", 8.0),
        ("I'd say [9] at first, but final: [[3]]", 3.0),  # [[x]] wins over an earlier [x]
        ("[[4]] then later [[6]]", 4.0),  # the first match
        ("See [2] for details; no double brackets", 2.0),  # FastChat's backup pattern reads a citation
        ("Rating: [[0]]", 0.0),  # no range check, as FastChat
        ("Rating: [[08]]", 8.0),
    ],
)
def test_parse_score(text, expected):
    assert mt_bench.parse_score(text) == Rating(expected)


@pytest.mark.parametrize(
    "text", ["Rating: 8", "Rating: [[eight]]", "[[ 8 ]]", "[[-1]]", "", "score 7/10", "[[8/10]]"]
)
def test_parse_score_failures(text):
    assert mt_bench.parse_score(text) == Rating(None, mt_bench.NO_SCORE)


# ---------------------------------------------------------------------------------------------------------
# Logprobs mode


def test_expected_score_hand_computed():
    ln = math.log
    half = mt_bench.expected_score({"7": ln(0.5), "8": ln(0.5)})
    assert half.value == pytest.approx(7.5) and half.reason is None
    # the evidence as the judge audit writes it: the rating tokens' mass, the distribution by rating
    assert half.evidence == {
        "rating_mass": pytest.approx(1.0),
        "distribution": {"7": pytest.approx(0.5), "8": pytest.approx(0.5)},
    }
    # other tokens are not ratings (dropped before renormalising); " 6" and "6" are the same rating; "0" and
    # "11" are out of range
    mixed = mt_bench.expected_score(
        {"R": ln(0.3), "6": ln(0.1), " 6": ln(0.1), "9": ln(0.2), "0": ln(0.1), "11": ln(0.1)}
    )
    assert mixed.evidence["rating_mass"] == pytest.approx(0.4)  # 6, 6, 9
    assert mixed.value == pytest.approx((6 * 0.2 + 9 * 0.2) / 0.4)


def test_expected_score_splits_one_into_one_and_ten():
    ln = math.log
    # P(1)=.4, P(9)=.2; after "1": P("0")=.25, P("]]")=.75 -> 10 gets .1, 1 keeps .3; over .6 in all
    scored = mt_bench.expected_score(
        {"1": ln(0.4), "9": ln(0.2), "R": ln(0.4)}, {"0": ln(0.25), "]]": ln(0.75)}
    )
    distribution = {"1": pytest.approx(0.5), "9": pytest.approx(1 / 3), "10": pytest.approx(1 / 6)}
    assert scored.evidence["distribution"] == distribution
    assert scored.value == pytest.approx(0.5 + 3 + 10 / 6)
    assert scored.evidence["rating_mass"] == pytest.approx(0.6)
    # only "1" written: "0" -> 10 (.2), "]" and "]]" -> 1 (.6), "2" -> 12, not a rating (dropped)
    ten_or_one = mt_bench.expected_score(
        {"1": 0.0}, {"0": ln(0.2), "]": ln(0.3), "]]": ln(0.3), "2": ln(0.2)}
    )
    assert ten_or_one.evidence["distribution"] == {"1": pytest.approx(0.75), "10": pytest.approx(0.25)}
    assert ten_or_one.value == pytest.approx(3.25)
    # without the second distribution "1" is 1
    assert mt_bench.expected_score({"1": ln(0.5), "3": ln(0.5)}).value == pytest.approx(2.0)


def test_expected_score_with_too_little_rating_mass_is_a_failure():
    ln_ = math.log
    low = mt_bench.expected_score({"R": ln_(0.9995), "5": ln_(4e-4)})
    assert (low.value, low.reason) == (None, mt_bench.LOW_RATING_MASS)
    assert low.evidence["rating_mass"] == pytest.approx(4e-4)
    assert mt_bench.expected_score({"5": ln_(2e-3)}).value == pytest.approx(5.0)  # above the threshold
    assert mt_bench.expected_score({}).reason == mt_bench.LOW_RATING_MASS
    assert mt_bench.expected_score({"R": 0.0}).reason == mt_bench.LOW_RATING_MASS


def test_likeliest_verdict():
    ln = math.log
    read = mt_bench.likeliest_verdict({"A": ln(0.2), "B": ln(0.3), "C": ln(0.1), "I": ln(0.4)})
    assert mt_bench.verdict_of(read) == "B" and read.value == 0.0 and read.reason is None
    assert read.evidence == {
        "verdict_mass": pytest.approx(0.6),
        "probabilities": {"A": pytest.approx(1 / 3), "B": pytest.approx(0.5), "tie": pytest.approx(1 / 6)},
    }
    assert mt_bench.verdict_of(mt_bench.likeliest_verdict({"C": ln(0.5), "A": ln(0.2)})) == "tie"
    # "[[ A]]" is not the format
    assert mt_bench.verdict_of(mt_bench.likeliest_verdict({" A": 0.0, "A": ln(0.01)})) == "A"
    low = mt_bench.likeliest_verdict({"I": 0.0, "A": ln(5e-4)})
    assert (low.value, low.reason, low.evidence["probabilities"]) == (None, mt_bench.LOW_VERDICT_MASS, {})
    assert low.evidence["verdict_mass"] == pytest.approx(5e-4)


def test_forced_prefixes_follow_the_prompts_answer_format(mt_files):
    prompts = mt_files["prompts"]
    for name in mt_bench.SINGLE_PROMPTS.values():
        prompt = prompts[name]
        assert prompt.output_format == "[[rating]]"
        assert 'example: "Rating: [[5]]"' in prompt.system_prompt + prompt.prompt_template
    for name in mt_bench.PAIR_PROMPTS.values():
        assert prompts[name].output_format == "[[A]]"
        assert '"[[A]]"' in prompts[name].system_prompt and '"[[C]]" for a tie' in prompts[name].system_prompt
    # the forced starts continue into answers the text mode reads
    assert mt_bench.parse_score(mt_bench.RATING_PREFIX + "7]]") == Rating(7.0)
    assert mt_bench.parse_score(mt_bench.RATING_PREFIXES[1] + "0]]") == Rating(10.0)
    assert mt_bench.verdict_of(mt_bench.parse_verdict(mt_bench.VERDICT_PREFIX + "C]]")) == "tie"


def test_aggregate_counts_failures():
    judgments = [
        Judgment(81, "writing", 1, 8.0),
        Judgment(81, "writing", 2, 6.0),
        Judgment(82, "writing", 1, None, "no [[rating]] or [rating] in the judge's answer"),
        Judgment(82, "writing", 2, 9.0),
        Judgment(111, "math", 1, 4.0),
        Judgment.from_record({"question_id": 111, "turn": 2, "score": -1}, category="math"),  # FastChat row
        Judgment(112, "math", 1, 1.0),
        Judgment(112, "math", 2, 2.5),
    ]
    questions = [
        Question(81, "writing", ("a", "b")),
        Question(82, "writing", ("a", "b")),
        Question(111, "math", ("a", "b")),
        Question(112, "math", ("a", "b")),
        Question(113, "math", ("a", "b")),
    ]
    result = mt_bench.aggregate(judgments, questions)
    # parsed scores: 8, 6, 9, 4, 1, 2.5 -> 30.5 / 6
    assert result["score"] == pytest.approx(30.5 / 6)
    assert (result["n"], result["n_scored"], result["n_failed"]) == (8, 6, 2)
    assert result["turns"]["1"] == {"score": pytest.approx(13 / 3), "n": 4, "n_scored": 3, "n_failed": 1}
    assert result["turns"]["2"] == {"score": pytest.approx(17.5 / 3), "n": 4, "n_scored": 3, "n_failed": 1}
    assert result["categories"]["writing"] == {
        "score": pytest.approx(23 / 3),
        "n": 4,
        "n_scored": 3,
        "n_failed": 1,
        "turn_1": 8.0,
        "turn_2": 7.5,
    }
    assert result["categories"]["math"] == {
        "score": pytest.approx(7.5 / 3),
        "n": 4,
        "n_scored": 3,
        "n_failed": 1,
        "turn_1": 2.5,
        "turn_2": 2.5,
    }
    assert result["failures"] == [
        {"question_id": 82, "turn": 1, "reason": mt_bench.NO_SCORE},
        {"question_id": 111, "turn": 2, "reason": mt_bench.NO_SCORE},
    ]
    assert result["missing"] == [{"question_id": 113, "turn": 1}, {"question_id": 113, "turn": 2}]
    json.dumps(result)  # results.json material


def test_judgment_from_record():
    row = {"question_id": 5, "category": "stem", "turn": 1, "score": 7, "judge_prompt": "single-v1"}
    assert Judgment.from_record(row) == Judgment(5, "stem", 1, 7.0, None)
    assert Judgment.from_record({**row, "score": None, "reason": "timeout"}).reason == "timeout"
    with pytest.raises(DataError, match="category"):
        Judgment.from_record({"question_id": 5, "turn": 1, "score": 7})


def test_aggregate_all_failed_category_is_none():
    result = mt_bench.aggregate([Judgment(1, "stem", 1, None), Judgment(2, "coding", 1, 5.0)])
    assert result["categories"]["stem"]["score"] is None
    assert result["categories"]["stem"]["n_failed"] == 1
    assert result["score"] == 5.0
    assert "missing" not in result


def test_loader_errors_name_file_and_line(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(
        '{"question_id": 1, "category": "writing", "turns": ["hi"]}\n{"question_id": "2", "category": "x"}\n'
    )
    with pytest.raises(DataError, match=r"question\.jsonl:2: question_id"):
        mt_bench.load_questions(path)
    path.write_text('{"question_id": 1, "category": "writing", "turns": []}\n')
    with pytest.raises(DataError, match=r"question\.jsonl:1: turns"):
        mt_bench.load_questions(path)
    path.write_text("not json\n")
    with pytest.raises(DataError, match=r"question\.jsonl:1: not valid JSON"):
        mt_bench.load_questions(path)
    refs = tmp_path / "gpt-4.jsonl"
    refs.write_text('{"question_id": 5, "choices": [{"turns": "a string"}]}\n')
    with pytest.raises(DataError, match=r"gpt-4\.jsonl:1: choices\[0\]: turns"):
        mt_bench.load_references(refs)


def test_category_plot(tmp_path):
    from zephyr.plots import category_plot

    judgments = [
        Judgment(i, cat, t, float((i + t) % 10))
        for i, cat in enumerate(mt_bench.CATEGORY_TEMPERATURE)
        for t in (1, 2)
    ]
    results = {"sft": mt_bench.aggregate(judgments), "dpo": mt_bench.aggregate(judgments[:-2])}
    out = category_plot(results, tmp_path / "plots" / "mt_bench.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="at least 3 categories"):
        category_plot({"x": mt_bench.aggregate(judgments[:2])}, tmp_path / "bad.png")
