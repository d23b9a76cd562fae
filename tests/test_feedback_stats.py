"""Feedback statistics: every number computed by hand from small records."""

from __future__ import annotations

import json
import struct

import pytest

from zephyr.data.schema import validate_rated
from zephyr.judge.parsing import NO_RATING, OUT_OF_RANGE
from zephyr.judge.rating import Rating
from zephyr.stages.feedback.binarize import BinarizeStats, binarize_all
from zephyr.stages.feedback.stats import (
    agreement,
    chosen_position,
    cost,
    histograms_png,
    model_means,
    pair_stats,
    parse_failures,
    position_bias,
    position_effect,
    rating_histograms,
    render_markdown,
    summarize,
    tie_counts,
    token_usage,
    unrated,
)


def completion(model: str, helpfulness, honesty, mean) -> dict:
    return {
        "model": model,
        "response": f"answer from {model}",
        "ratings": {"helpfulness": helpfulness, "honesty": honesty},
        "mean_rating": mean,
    }


# scale 5; means: r1 a 4.5, b 2.0 | r2 a 3.0, b 3.0 (tie, all equal) | r3 a none, b 4.0 (7 is off the scale)
RECORDS = [
    {
        "prompt_id": "r1",
        "prompt": "Q1",
        "completions": [completion("a", 4, 5, 4.5), completion("b", 2, None, 2.0)],
    },
    {
        "prompt_id": "r2",
        "prompt": "Q2",
        "completions": [completion("a", 3, 3, 3.0), completion("b", 2.5, 3.5, 3.0)],
    },
    {
        "prompt_id": "r3",
        "prompt": "Q3",
        "completions": [completion("a", None, None, None), completion("b", 1, 7, 4.0)],
    },
]


def test_records_are_valid():
    assert all(validate_rated(r) == [] for r in RECORDS)


def test_ratings_not_given_are_counted_per_aspect_and_reason():
    # None ratings: helpfulness r3 a; honesty r1 b, r3 a; records without `rating_reasons` say "unknown"
    assert unrated(RECORDS) == {"helpfulness": {"unknown": 1}, "honesty": {"unknown": 2}}
    records = json.loads(json.dumps(RECORDS))
    records[0]["completions"][1]["rating_reasons"] = {"honesty": "not applicable"}
    records[2]["completions"][0]["rating_reasons"] = {
        "helpfulness": "format error",
        "honesty": "format error",
    }
    assert unrated(records) == {
        "helpfulness": {"format error": 1},
        "honesty": {"format error": 1, "not applicable": 1},
    }


def test_histograms():
    # helpfulness 4, 2, 3, 2.5→3, 1; honesty 5, 3, 3.5→4 (7 outside)
    assert rating_histograms(RECORDS, 5) == {
        "by_aspect": {
            "helpfulness": {"1": 1, "2": 1, "3": 2, "4": 1, "5": 0},
            "honesty": {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1},
        },
        "by_model": {
            "a": {"1": 0, "2": 0, "3": 2, "4": 1, "5": 1},
            "b": {"1": 1, "2": 1, "3": 1, "4": 1, "5": 0},
        },
        "outside_scale": 1,
    }


def test_model_means_and_ties():
    assert model_means(RECORDS) == {
        "a": {"completions": 3, "rated": 2, "mean_rating": 3.75},
        "b": {"completions": 3, "rated": 3, "mean_rating": 3.0},
    }
    assert tie_counts(RECORDS) == {"prompts": 3, "with_two_rated": 2, "top_tie": 1, "all_equal": 1}


def test_parse_failures_per_reason():
    parsed = [
        Rating(3.0),
        Rating(None, NO_RATING),
        Rating(None, NO_RATING),
        Rating(None, OUT_OF_RANGE),
        Rating(5.0),
    ]
    assert parse_failures(parsed) == {
        "total": 5,
        "parsed": 2,
        "failed": {
            "no rating found": 2,
            "out of range": 1,
            "wrong scale": 0,
            "ambiguous": 0,
            "no rating token in top logprobs": 0,
            "format error": 0,
            "not applicable": 0,
        },
    }


def test_agreement_of_repeats():
    # pairs: |4-4| = 0; |3-5| = 2; [2, None] has one rating; 1,2,4 → 1, 3, 2
    result = agreement([[4, 4], [3, 5], [2, None], [1, 2, 4]])
    assert result == {"items": 3, "pairs": 5, "mean_abs_diff": pytest.approx(8 / 5), "exact_agreement": 0.2}
    assert agreement([[1, None]]) == {"items": 0, "pairs": 0, "mean_abs_diff": None, "exact_agreement": None}


def test_position_bias():
    observations = [(0, 4.0), (0, 2.0), (1, 5.0), (1, None), (2, 3.0), (3, None)]
    assert position_bias(observations) == {
        "0": {"n": 2, "failed": 0, "mean": 3.0},
        "1": {"n": 1, "failed": 1, "mean": 5.0},
        "2": {"n": 1, "failed": 0, "mean": 3.0},
        "3": {"n": 0, "failed": 1, "mean": None},
    }


def judged(model, kept, readings, prompt_tokens=0, completion_tokens=0):
    """A completion rated on aspect "h": `readings` are (repeat, position, value)."""
    return {
        "model": model,
        "response": model,
        "ratings": {"h": kept},
        "judgments": [
            {"aspect": "h", "repeat": r, "position": p, "value": v, "reason": None} for r, p, v in readings
        ],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


# Two repeats, the second in reverse order. Prompt 1: x at position 0 then 1 (ratings 2, 4: kept 3), y at
# 1 then 0 (5, 3: kept 4). Prompt 2: u never rated; v at position 2 both times (1, 1); w at 0 (2, 2).
JUDGED = [
    {"prompt_id": "p1", "completions": [judged("x", 3.0, [(0, 0, 2.0), (1, 1, 4.0)]),
                                        judged("y", 4.0, [(0, 1, 5.0), (1, 0, 3.0)])]},
    {"prompt_id": "p2", "completions": [judged("u", None, [(0, 1, None), (1, 1, None)]),
                                        judged("v", 1.0, [(0, 2, 1.0), (1, 2, 1.0)]),
                                        judged("w", 2.0, [(0, 0, 2.0), (1, 0, 2.0)])]},
]  # fmt: skip


def test_position_effect_before_and_after_the_repeats():
    effect = position_effect(JUDGED)
    # first repeat by position: 0 -> x 2, w 2; 1 -> y 5; 2 -> v 1. Kept ratings by that position: 0 -> 3, 2;
    # 1 -> 4; 2 -> 1.
    assert effect["first"] == {"0": 2.0, "1": 5.0, "2": 1.0}
    assert effect["final"] == {"0": 2.5, "1": 4.0, "2": 1.0}
    assert effect["first_spread"] == 4.0 and effect["final_spread"] == 3.0
    assert effect["removed"] == 0.25  # 1 - 3/4
    one_repeat = [{"completions": [judged("x", 2.0, [(0, 0, 2.0)]), judged("y", 5.0, [(0, 1, 5.0)])]}]
    assert position_effect(one_repeat)["removed"] == 0.0


def test_where_the_chosen_answer_was_shown():
    pairs = [{"prompt_id": "p1", "chosen_model": "y"}, {"prompt_id": "p2", "chosen_model": "v"}]
    # y: positions 1, 0 of 2 (first 1/2, last 1/2); v: positions 2, 2 of 3 (first 0, last 1)
    assert chosen_position(JUDGED, pairs) == {
        "pairs": 2,
        "shown_first": 0.25,
        "shown_last": 0.75,
        "expected": pytest.approx((1 / 2 + 1 / 3) / 2),
    }


def test_token_usage_and_cost():
    records = [
        {"judge": "J|0a1b", "judge_usage": {"calls": 2, "prompt_tokens": 900, "completion_tokens": 40},
         "completions": [judged("x", 1.0, [], 100, 30), judged("y", 1.0, [], 120, 50)]},
        {"judge": "J|0a1b", "judge_usage": {"calls": 2, "prompt_tokens": 700, "completion_tokens": 60},
         "completions": [judged("x", 1.0, [], 80, 10)]},
    ]  # fmt: skip
    usage = token_usage(
        records, {"x": {"prompt": 2.0, "completion": 10.0}, "J": {"prompt": 1.0, "completion": 4.0}}
    )
    assert usage["generators"] == {
        "x": {
            "completions": 2,
            "prompt_tokens": 180,
            "completion_tokens": 40,
            "cost": (180 * 2 + 40 * 10) / 1e6,
        },
        "y": {"completions": 1, "prompt_tokens": 120, "completion_tokens": 50, "cost": None},
    }
    assert usage["judge"] == {
        "J": {"calls": 4, "prompt_tokens": 1600, "completion_tokens": 100, "cost": (1600 + 100 * 4) / 1e6}
    }
    assert usage["total_cost"] == pytest.approx((760 + 2000) / 1e6)
    assert token_usage(records)["total_cost"] is None
    assert cost({"prompt_tokens": 10**6, "completion_tokens": 0}, {"completion": 3.0}) == 0.0


def test_pair_stats():
    pairs = [
        {"score_chosen": 4.5, "score_rejected": 2.0, "chosen_model": "a", "rejected_model": "b"},
        {"score_chosen": 4.0, "score_rejected": 3.5, "chosen_model": "b", "rejected_model": "c"},
        {"score_chosen": 5.0, "score_rejected": 1.0, "chosen_model": "a", "rejected_model": "c"},
    ]
    assert pair_stats(pairs) == {
        "pairs": 3,
        "mean_score_chosen": 4.5,
        "mean_score_rejected": pytest.approx(6.5 / 3),
        "mean_margin": pytest.approx(7 / 3),  # 2.5 + 0.5 + 4
        "chosen_by_model": {"a": 2, "b": 1},
        "rejected_by_model": {"b": 1, "c": 2},
    }


def full_summary() -> dict:
    pairs, bstats = binarize_all(RECORDS, drop_ties=True)  # r1 kept; r2 tie; r3 one rated
    assert bstats.to_dict()["dropped"]["tie for the top"] == 1
    return summarize(
        RECORDS,
        5,
        parsed=[Rating(4.0), Rating(None, NO_RATING)],
        repeats=[[4, 5]],
        positions=[(0, 4.0), (1, 2.0)],
        pairs=pairs,
        binarize_stats=bstats,
    )


def test_summarize_is_json_and_leaves_out_what_is_not_given():
    summary = full_summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["binarization"] == {
        "total": 3,
        "kept": 1,
        "dropped": {
            "fewer than two rated completions": 1,
            "tie for the top": 1,
            "identical responses": 0,
            "margin below minimum": 0,
        },
    }
    assert summary["pairs"]["mean_margin"] == 2.5
    bare = summarize(RECORDS, 5)
    assert set(bare) == {"scale", "histograms", "models", "unrated", "ties", "usage"}  # from the records


def test_markdown():
    text = render_markdown(full_summary())
    assert text.startswith("## AI feedback statistics (ratings 1–5)\n")
    assert (
        "| rating | helpfulness | honesty |\n|---|---|---|\n| 1 | 1 | 0 |\n| 2 | 1 | 0 |\n| 3 | 2 | 1 |"
        in text
    )
    assert "| a | 3 | 2 | 3.750 |" in text
    assert "| top_tie | 1 |" in text
    assert "1 of 2 ratings read." in text and "| no rating found | 1 |" in text
    assert "| mean_abs_diff | 1.000 |" in text
    assert "| Output 1 | 1 | 0 | 4.000 |" in text and "| Output 2 | 1 | 0 | 2.000 |" in text
    assert "1 pairs from 3 prompts." in text and "| tie for the top | 1 |" in text
    assert "| a | 1 | 0 |" in text and "| b | 0 | 1 |" in text
    assert "Ratings outside 1–5: 1" in text
    assert "Judge parse failures" not in render_markdown(summarize(RECORDS, 5))


def test_histogram_png():
    png = histograms_png(rating_histograms(RECORDS, 5))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1100, 400)
    empty = histograms_png({"by_aspect": {}, "by_model": {}, "outside_scale": 0})
    assert empty[:8] == b"\x89PNG\r\n\x1a\n"


def test_binarize_stats_counts_unknown_reasons_loudly():
    stats = BinarizeStats()
    with pytest.raises(KeyError):
        stats.add("no such reason")
