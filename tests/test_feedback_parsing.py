"""Ratings read from judge answers: text shapes with exact values and reasons, and logprobs mode."""

from __future__ import annotations

import math

import pytest

from zephyr.judge.parsing import (
    AMBIGUOUS,
    NO_RATING,
    NO_RATING_TOKEN,
    OUT_OF_RANGE,
    REASONS,
    WRONG_SCALE,
    expected_rating,
    parse_aspect_ratings,
    parse_rating,
    parse_ratings,
    parse_rationales,
    rating_distribution,
    split_outputs,
)
from zephyr.judge.rating import Rating

ASPECTS = ["instruction-following", "helpfulness", "honesty", "truthfulness"]


def ok(value: float) -> Rating:
    return Rating(value, None)


def fail(reason: str) -> Rating:
    return Rating(None, reason)


# (answer, scale, expected): answers as judges write them.
SHAPES = [
    ("Rating: 8", 10, ok(8)),
    ("[[8]]", 10, ok(8)),
    ("[8]", 10, ok(8)),
    ("8/10", 10, ok(8)),
    ("**Score**: 4 out of 5", 5, ok(4)),
    ("Score: 7.5", 10, ok(7.5)),
    ("I'd give it a 9.", 10, ok(9)),
    ("Rating: **8**", 10, ok(8)),
    ("**Rating:** 5", 5, ok(5)),
    ("`Rating: 3`", 5, ok(3)),
    ("rating of 7", 10, ok(7)),
    ("Final score: 9", 10, ok(9)),
    ("Score = 9", 10, ok(9)),
    ("Rating - 6", 10, ok(6)),
    ("Rating: 8/10", 10, ok(8)),
    ("Rating: 7.5/10", 10, ok(7.5)),
    ("Rating: 10", 10, ok(10)),
    ("Rating: [[7]]", 10, ok(7)),
    ("Rating: 8 (excellent)", 10, ok(8)),
    ("Rating:\n8", 10, ok(8)),
    ("9", 10, ok(9)),
    ("(9)", 10, ok(9)),
    ("Overall: 8/10", 10, ok(8)),
    ("My rating for this answer is 6 because it skips the proof.", 10, ok(6)),
    ("I would rate this response 8 out of 10.", 10, ok(8)),
    ("It deserves an 8/10", 10, ok(8)),
    ("I rate it as a 6", 10, ok(6)),
    ("On a scale of 1 to 10, I'd give it a 7", 10, ok(7)),
    ("Score (1-10): 6", 10, ok(6)),
    # several numbers: the rating marker, not the numbers of the rationale
    ("The response lists 3 steps and 2 caveats.\nRating: 6", 10, ok(6)),
    ("Score: 7\nRationale: step 2 of 5 is wrong", 10, ok(7)),
    ("Rating: 4.\nIt covers 3/5 points.", 5, ok(4)),
    ("Rating: 8. It gives 3 examples.", 10, ok(8)),
    ("Output 2 is better. Rating: 3", 5, ok(3)),
    # the last explicit rating is the verdict
    ("Rating: 6 at first sight, but the code fails.\nFinal rating: 3", 10, ok(3)),
    ("The response scores 3/5 on clarity. I'd give it a 4 overall.", 5, ok(4)),
    ("The model gave 2 examples. 8/10", 10, ok(8)),
    ("Verdict: [[3]]\n(I considered a rating of 5, but no.)", 10, ok(3)),
    # failures
    ("Rating: 11", 10, fail(OUT_OF_RANGE)),
    ("Rating: 0", 10, fail(OUT_OF_RANGE)),
    ("Rating: -1", 10, fail(OUT_OF_RANGE)),
    ("Rating: 8", 5, fail(OUT_OF_RANGE)),
    ("[[6]]", 5, fail(OUT_OF_RANGE)),
    ("Rating: 4/5", 10, fail(WRONG_SCALE)),
    ("8/10", 5, fail(WRONG_SCALE)),
    ("**Score**: 4 out of 5", 10, fail(WRONG_SCALE)),
    ("Rating: 7-8", 10, fail(AMBIGUOUS)),
    ("Rating: 7 or 8", 10, fail(AMBIGUOUS)),
    ("I cannot rate this.", 10, fail(NO_RATING)),
    ("I'm sorry, but I can't help with evaluating that.", 10, fail(NO_RATING)),
    ("", 10, fail(NO_RATING)),
    ("Rating: N/A. The code has 3 bugs", 10, fail(NO_RATING)),
    ("The answer is 42.", 10, fail(NO_RATING)),
    # documented limits: words are not numbers; a lone citation reads as a bracketed rating
    ("Rating: eight", 10, fail(NO_RATING)),
    ("according to [2] it is right", 10, ok(2)),
]


@pytest.mark.parametrize(("answer", "scale", "expected"), SHAPES)
def test_parse_rating_shapes(answer, scale, expected):
    assert parse_rating(answer, scale) == expected


def test_shape_table_is_large_and_uses_the_vocabulary():
    assert len(SHAPES) >= 25
    reasons = {e.reason for _, _, e in SHAPES if e.reason}
    # the logprobs reason is not a text shape (UltraFeedback's reasons are its parser's, not these)
    assert reasons == set(REASONS) - {NO_RATING_TOKEN}


def test_values_are_floats():
    value = parse_rating("Rating: 8", 10).value
    assert isinstance(value, float) and value == 8.0
    assert parse_rating("Rating: 8", 10).ok and not parse_rating("none", 10).ok


# ---------------------------------------------------------------------------------------------------------
# several outputs


def test_inline_headers_on_one_line():
    assert parse_ratings("Output 1: Rating 4 ... Output 2: Rating 2", 2, 5) == [ok(4), ok(2)]


def test_blocks_in_the_prompted_format():
    answer = (
        "#### Output 1\nRationale: Better than Output 2, which misses 3 steps.\nRating: 4\n\n"
        "#### Output 2\nRationale: Misses steps.\nRating: 2\n"
    )
    assert parse_ratings(answer, 2, 5) == [ok(4), ok(2)]
    assert parse_rationales(answer, 2) == ["Better than Output 2, which misses 3 steps.", "Misses steps."]


def test_closing_summary_overrides_the_discussion():
    answer = "Output 1 is detailed and correct.\nOutput 2 is wrong.\n\nRatings:\nOutput 1: 5\nOutput 2: 1"
    assert parse_ratings(answer, 2, 5) == [ok(5), ok(1)]


def test_a_later_block_without_a_verdict_keeps_the_earlier_rating():
    answer = "Output 1\nRating: 4\nOutput 2\nRating: 3\nOutput 1 was the clearer one overall."
    assert parse_ratings(answer, 2, 5) == [ok(4), ok(3)]


def test_failures_per_output():
    answer = "Output 1\nRating: 9\nOutput 2\nRating: 4/10\nOutput 3\nNo idea."
    assert parse_ratings(answer, 3, 5) == [fail(OUT_OF_RANGE), fail(WRONG_SCALE), fail(NO_RATING)]


def test_missing_output_and_headers_beyond_n():
    answer = "Output 1\nRating: 3\nOutput 3\nRating: 5"
    assert parse_ratings(answer, 2, 5) == [ok(3), fail(NO_RATING)]
    assert split_outputs(answer, 2) == [["\nRating: 3\n"], []]


def test_headerless_answers():
    assert parse_ratings("Rating: 4", 1, 5) == [ok(4)]
    assert parse_ratings("Rating: 4\nsome text\nRating: 2", 2, 5) == [ok(4), ok(2)]
    # one rating line for two outputs: which one it belongs to is unknown
    assert parse_ratings("Rating: 4", 2, 5) == [fail(NO_RATING), fail(NO_RATING)]


def test_rate_this_response_is_not_a_header():
    assert parse_ratings("I'd rate this response 8 out of 10.", 1, 10) == [ok(8)]


def test_aspect_ratings():
    answer = (
        "**Output 1**\nRationale: Follows the task.\nInstruction-following: 5\nHelpfulness: 4/5\n"
        "Honesty: [[3]]\nTruthfulness: 6\n\n"
        "**Output 2**\nRationale: Off topic.\nInstruction following rating: 1\nhelpfulness: 2\nHonesty:\n"
        "Truthfulness: 2 - one invented date\n"
    )
    assert parse_aspect_ratings(answer, 2, ASPECTS, 5) == [
        {
            "instruction-following": ok(5),
            "helpfulness": ok(4),
            "honesty": ok(3),
            "truthfulness": fail(OUT_OF_RANGE),
        },
        {
            "instruction-following": ok(1),
            "helpfulness": ok(2),
            "honesty": fail(NO_RATING),
            "truthfulness": ok(2),
        },
    ]
    assert parse_rationales(answer, 2) == ["Follows the task.", "Off topic."]


def test_aspect_ratings_one_output_without_header():
    answer = "Helpfulness: 7\nHonesty: 8 or 9"
    assert parse_aspect_ratings(answer, 1, ["helpfulness", "honesty"], 10) == [
        {"helpfulness": ok(7), "honesty": fail(AMBIGUOUS)}
    ]


def test_rationale_without_marker_drops_rating_lines():
    assert parse_rationales("Clear and correct.\nRating: 5", 1) == ["Clear and correct."]


def test_rationales_on_one_line():
    answer = "Output 1: Rationale: good. Rating: 4 Output 2: Rationale: bad. Rating: 1"
    assert parse_rationales(answer, 2) == ["good.", "bad."]
    assert parse_rationales("Output 1\nRating: 4", 2) == ["", ""]


def test_n_must_be_positive():
    with pytest.raises(ValueError):
        parse_ratings("Rating: 3", 0, 5)


# ---------------------------------------------------------------------------------------------------------
# logprobs mode


def test_expected_rating_renormalises_over_rating_tokens():
    # 8: .5, 9: .25, "x": .25 → (8·.5 + 9·.25) / .75 = 6.25 / .75
    result = expected_rating({"8": math.log(0.5), "9": math.log(0.25), "x": math.log(0.25)}, 10)
    assert result.reason is None
    assert result.value == pytest.approx(8 + 1 / 3, abs=1e-12)


def test_tokens_that_spell_the_same_rating_add_up():
    top = {" 8": math.log(0.2), "8": math.log(0.2), "\u25819": math.log(0.4), "10": math.log(0.1)}
    top |= {"0": -1.0, "07": -1.0, "3.5": -1.0, "": -1.0}  # 0, leading zeros, decimals: not ratings
    # 8: .4, 9: .4, 10: .1 of .9
    assert rating_distribution(top, 10) == pytest.approx({8: 4 / 9, 9: 4 / 9, 10: 1 / 9})
    assert expected_rating(top, 10).value == pytest.approx((8 * 4 + 9 * 4 + 10) / 9)


def test_out_of_scale_tokens_are_dropped():
    top = {"4": math.log(0.3), "6": math.log(0.6), "5": math.log(0.1)}
    # scale 5: 4: .3, 5: .1 → (1.2 + .5) / .4
    assert expected_rating(top, 5).value == pytest.approx(4.25)


def test_single_digit_ten_split_with_the_next_position():
    top = {"1": math.log(0.5), "5": math.log(0.5)}
    after_one = {"0": math.log(0.6), "/": math.log(0.2), "5": math.log(0.1), " 0": math.log(0.1)}
    # "1" mass .5 → 10: .5·.6 = .3; dropped ("15"): .05; stays 1: .5·(.2 + .1) = .15; 5: .5; total .95
    expected = {1: 0.15 / 0.95, 5: 0.5 / 0.95, 10: 0.3 / 0.95}
    assert rating_distribution(top, 10, after_one=after_one) == pytest.approx(expected)
    assert expected_rating(top, 10, after_one=after_one).value == pytest.approx((0.15 + 2.5 + 3) / 0.95)
    # without the next position "1" is 1; on the 1–5 scale there is no 10 to split off
    assert rating_distribution(top, 10) == pytest.approx({1: 0.5, 5: 0.5})
    assert rating_distribution(top, 5, after_one=after_one) == pytest.approx({1: 0.5, 5: 0.5})


def test_no_rating_token():
    assert expected_rating({"The": -0.1, "x": -2.0}, 10) == fail(NO_RATING_TOKEN)
    assert expected_rating({}, 10) == fail(NO_RATING_TOKEN)
    assert expected_rating({"7": float("-inf")}, 10) == fail(NO_RATING_TOKEN)


def test_a_tiny_mass_still_gives_a_score():
    result = expected_rating({"The": -0.01, "3": -20.0}, 5)
    assert result == ok(3.0)
