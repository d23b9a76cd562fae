"""Binarization of rated completions into preference pairs: seeded choices, ties, margins, schema."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from zephyr.data.schema import validate_pair, validate_rated
from zephyr.stages.feedback.binarize import (
    DROP_REASONS,
    FEWER_THAN_TWO,
    IDENTICAL,
    MARGIN,
    TIE,
    binarize,
    binarize_all,
    mean_rating,
)

ASPECTS = ("instruction-following", "helpfulness", "honesty", "truthfulness")


def completion(model: str, ratings: list[float | None], response: str | None = None) -> dict:
    rated = dict(zip(ASPECTS, ratings, strict=True))
    return {
        "model": model,
        "response": response if response is not None else f"answer from {model}",
        "ratings": rated,
        "rationales": {a: "because" for a in ASPECTS},
        "mean_rating": mean_rating(rated),
    }


def record(prompt_id: str, *completions: dict, prompt: str = "What is 2 + 2?") -> dict:
    return {"prompt_id": prompt_id, "prompt": prompt, "completions": list(completions)}


def four(prompt_id: str = "p1") -> dict:
    # means: a 4.5, b 2.0, c 3.25, d 1.0
    return record(
        prompt_id,
        completion("a", [5, 4, 5, 4]),
        completion("b", [2, 2, 2, 2]),
        completion("c", [3, 4, 3, 3]),
        completion("d", [1, 1, 1, 1]),
    )


def test_mean_rating_skips_null_aspects():
    assert mean_rating({"a": 4, "b": None, "c": 3}) == 3.5
    assert mean_rating({"a": 1, "b": 2, "c": 2}) == pytest.approx(5 / 3)
    assert mean_rating({"a": None}) is None
    assert mean_rating({}) is None
    assert mean_rating({"a": float("nan"), "b": 2}) == 2


def test_inputs_pass_the_rated_schema():
    assert validate_rated(four()) == []


def test_random_rejected_is_seeded_per_prompt():
    # golden: fixed by the seeding rule (SHA-256 of seed and prompt id); a change here changes datasets
    pair, reason = binarize(four("p1"), rng_seed=0)
    assert reason is None
    assert pair == {
        "prompt_id": "p1",
        "prompt": "What is 2 + 2?",
        "chosen": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "answer from a"},
        ],
        "rejected": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "answer from c"},
        ],
        "score_chosen": 4.5,
        "score_rejected": 3.25,
        "chosen_model": "a",
        "rejected_model": "c",
    }
    assert validate_pair(pair) == []
    assert binarize(four("p1"), rng_seed=1)[0]["rejected_model"] == "d"
    assert binarize(four("p2"), rng_seed=0)[0]["rejected_model"] == "d"


def test_random_rejected_covers_the_others_uniformly():
    counts = Counter(binarize(four(f"p{i}"), rng_seed=0)[0]["rejected_model"] for i in range(600))
    assert set(counts) == {"b", "c", "d"}
    assert all(150 <= n <= 250 for n in counts.values()), counts


def test_pairs_do_not_depend_on_record_order():
    records = [four(f"p{i}") for i in range(20)]
    forward, _ = binarize_all(records, rng_seed=3)
    backward, _ = binarize_all(list(reversed(records)), rng_seed=3)
    assert forward == list(reversed(backward))


def test_lowest_mode():
    pair, reason = binarize(four(), rejected="lowest")
    assert reason is None
    assert (pair["chosen_model"], pair["rejected_model"]) == ("a", "d")
    assert (pair["score_chosen"], pair["score_rejected"]) == (4.5, 1.0)


def test_lowest_mode_takes_the_first_of_equally_low():
    rec = record(
        "p", completion("a", [5, 5, 5, 5]), completion("b", [1, 1, 1, 1]), completion("c", [1, 1, 1, 1])
    )
    assert binarize(rec, rejected="lowest")[0]["rejected_model"] == "b"


def test_tie_for_the_top_is_dropped_when_asked():
    rec = record(
        "p", completion("a", [4, 4, 4, 4]), completion("b", [5, 3, 4, 4]), completion("c", [1, 1, 1, 1])
    )
    assert binarize(rec, drop_ties=True) == (None, TIE)


def test_tie_for_the_top_is_kept_by_default():
    # the paper's rule: best mean chosen, a random other rejected; a shared top mean drops nothing
    def tied(prompt_id: str) -> dict:
        return record(
            prompt_id,
            completion("a", [4, 4, 4, 4]),  # mean 4.0
            completion("b", [5, 3, 4, 4]),  # mean 4.0
            completion("c", [1, 1, 1, 1]),  # mean 1.0
        )

    pairs, stats = binarize_all([tied(f"p{i}") for i in range(400)], rng_seed=0)
    assert stats.kept == 400 and stats.dropped[TIE] == 0
    chosen = Counter(p["chosen_model"] for p in pairs)
    assert set(chosen) == {"a", "b"} and all(150 <= n <= 250 for n in chosen.values()), chosen
    for pair in pairs:  # the other tied answer may be rejected: a random one of the rest
        assert pair["rejected_model"] in {"a", "b", "c"} - {pair["chosen_model"]}
        assert pair["score_chosen"] == 4.0 and pair["score_rejected"] in {4.0, 1.0}


def test_tie_break_first_takes_the_first_of_the_tied():
    # HuggingFaceH4/ultrafeedback_binarized: Python's max() over the completions in record order
    rec = record(
        "p", completion("a", [1, 1, 1, 1]), completion("b", [4, 4, 4, 4]), completion("c", [5, 3, 4, 4])
    )
    for seed in range(20):
        pair, _ = binarize(rec, tie_break="first", rejected="lowest", rng_seed=seed)
        assert (pair["chosen_model"], pair["rejected_model"]) == ("b", "a")


def test_tie_kept_when_asked():
    rec = record(
        "p", completion("a", [4, 4, 4, 4]), completion("b", [5, 3, 4, 4]), completion("c", [1, 1, 1, 1])
    )
    pair, reason = binarize(rec, drop_ties=False, rejected="lowest")
    assert reason is None
    assert pair["chosen_model"] in {"a", "b"}
    assert pair["rejected_model"] == "c"
    assert validate_pair(pair) == []
    # equal scores are allowed by the pair schema (chosen not below rejected)
    two = record("p", completion("a", [4, 4, 4, 4]), completion("b", [4, 4, 4, 4]))
    pair, _ = binarize(two, drop_ties=False)
    assert pair["score_chosen"] == pair["score_rejected"] == 4.0
    assert validate_pair(pair) == []


def test_a_tie_below_the_top_is_not_a_tie():
    rec = record(
        "p", completion("a", [5, 5, 5, 5]), completion("b", [2, 2, 2, 2]), completion("c", [2, 2, 2, 2])
    )
    assert binarize(rec)[1] is None


def test_margin():
    # a 4.5 vs b 2.0 (2.5), c 3.25 (1.25), d 1.0 (3.5)
    for seed in range(10):
        pair, _ = binarize(four(), min_margin=2.5, rng_seed=seed)
        assert pair["rejected_model"] in {"b", "d"}
    assert binarize(four(), min_margin=3.5, rng_seed=0)[0]["rejected_model"] == "d"
    assert binarize(four(), min_margin=3.6) == (None, MARGIN)
    assert binarize(four(), min_margin=3.6, rejected="lowest") == (None, MARGIN)


def test_fewer_than_two_rated():
    rec = record("p", completion("a", [5, 5, 5, 5]), completion("b", [None, None, None, None]))
    assert rec["completions"][1]["mean_rating"] is None
    assert validate_rated(rec) == []
    assert binarize(rec) == (None, FEWER_THAN_TWO)
    assert binarize(record("p", completion("a", [5, 5, 5, 5]))) == (None, FEWER_THAN_TWO)


def test_null_means_are_ignored():
    rec = record(
        "p", completion("a", [None] * 4), completion("b", [3, 3, 3, 3]), completion("c", [2, 2, 2, 2])
    )
    pair, reason = binarize(rec)
    assert reason is None
    assert (pair["chosen_model"], pair["rejected_model"]) == ("b", "c")


def test_partial_ratings_use_the_stored_mean():
    rec = record("p", completion("a", [5, None, 3, None]), completion("b", [3, 3, 3, 3]))
    pair, _ = binarize(rec)
    assert (pair["chosen_model"], pair["score_chosen"], pair["score_rejected"]) == ("a", 4.0, 3.0)


def test_identical_answers_are_not_a_pair():
    rec = record("p", completion("a", [5, 5, 5, 5], "4"), completion("b", [2, 2, 2, 2], " 4\n"))
    assert binarize(rec) == (None, IDENTICAL)
    rec["completions"].append(completion("c", [1, 1, 1, 1], "5"))
    assert binarize(rec)[0]["rejected_model"] == "c"


def test_multi_turn_prompt_messages():
    rec = four()
    rec["prompt_messages"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    pair, _ = binarize(rec, rejected="lowest")
    assert pair["chosen"][:4] == rec["prompt_messages"]
    assert pair["rejected"][:4] == rec["prompt_messages"]
    assert pair["chosen"][-1] == {"role": "assistant", "content": "answer from a"}
    assert validate_pair(pair) == []
    pair["chosen"][0]["content"] = "edited"
    assert pair["rejected"][0]["content"] == "Be brief."


def test_input_is_not_modified():
    rec = four()
    before = copy.deepcopy(rec)
    binarize(rec)
    assert rec == before


def test_binarize_all_counts():
    records = [
        four("p1"),
        record("p2", completion("a", [4] * 4), completion("b", [4] * 4)),  # tie
        record("p3", completion("a", [4] * 4)),  # one completion
        four("p4"),
        record("p5", completion("a", [4] * 4, "same"), completion("b", [1] * 4, "same")),  # identical
    ]
    pairs, stats = binarize_all(records, min_margin=0.0, drop_ties=True)
    assert [p["prompt_id"] for p in pairs] == ["p1", "p4"]
    assert stats.to_dict() == {
        "total": 5,
        "kept": 2,
        "dropped": {FEWER_THAN_TWO: 1, TIE: 1, IDENTICAL: 1, MARGIN: 0},
    }
    assert tuple(stats.dropped) == DROP_REASONS
    assert all(validate_pair(p) == [] for p in pairs)


def test_overall_score_ranks_by_the_critique_score():
    # UltraFeedback's overall_score (1-10), what HuggingFaceH4/ultrafeedback_binarized ranked by
    rec = four()  # means: a 4.5, b 2.0, c 3.25, d 1.0
    for c, overall in zip(rec["completions"], (6.0, 8.5, None, 3.0), strict=True):
        c["overall_score"] = overall
    pair, reason = binarize(rec, score="overall", rejected="lowest")
    assert reason is None
    assert (pair["chosen_model"], pair["rejected_model"]) == ("b", "d")  # c has no overall_score
    assert (pair["score_chosen"], pair["score_rejected"]) == (8.5, 3.0)
    assert validate_pair(pair) == []
    # the same record by the mean: a over d
    assert binarize(rec, rejected="lowest")[0]["chosen_model"] == "a"
    # records without the field (judged ones) have nothing to rank by
    assert binarize(four(), score="overall") == (None, FEWER_THAN_TWO)


def test_bad_options():
    with pytest.raises(ValueError, match="rejected"):
        binarize(four(), rejected="worst")
    with pytest.raises(ValueError, match="min_margin"):
        binarize_all([four()], min_margin=-1)
    with pytest.raises(ValueError, match="score"):
        binarize(four(), score="median")
    with pytest.raises(ValueError, match="tie_break"):
        binarize_all([four()], tie_break="last")
