"""Record schemas: every rule with its exact list of problems."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from zephyr.data.schema import (
    FORMATS,
    Problem,
    detect_format,
    validate_conversation,
    validate_mc,
    validate_pair,
    validate_rated,
)

DATA = Path(__file__).parent / "data"
ORDER = "(user and assistant alternate, user first)"


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "good" / f"{name}.jsonl").read_text().splitlines()]


def _conv(*turns: tuple[str, str], **extra) -> dict:
    return {
        "prompt_id": "c1",
        "prompt": "Hi?",
        "messages": [{"role": r, "content": c} for r, c in turns],
        **extra,
    }


def _pair(chosen: str = "Paris.", rejected: str = "Lyon.", **extra) -> dict:
    user = {"role": "user", "content": "Capital of France?"}
    return {
        "prompt_id": "p1",
        "prompt": "Capital of France?",
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [dict(user), {"role": "assistant", "content": rejected}],
        "score_chosen": 9.0,
        "score_rejected": 3.0,
        **extra,
    }


def _rated(*ratings: dict, mean: float | str | None = "auto") -> dict:
    completions = [
        {
            "model": f"m{i}",
            "response": f"answer {i}",
            "ratings": r,
            "rationales": {k: "because" for k in r},
            "mean_rating": sum(r.values()) / len(r) if mean == "auto" else mean,
        }
        for i, r in enumerate(ratings)
    ]
    return {"prompt_id": "r1", "prompt": "Name a colour.", "completions": completions}


def _mc(**over) -> dict:
    return {"id": "q1", "query": "2 + 2 =", "choices": ["3", "4", "5"], "gold": 1, **over}


# ---------------------------------------------------------------------------------------------------------
# good records


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_good_fixtures_have_no_problems_and_are_detected(fmt):
    records = _records(fmt)
    assert records
    for record in records:
        assert FORMATS[fmt](record) == []
        assert detect_format(record) == fmt


def test_formats_registry():
    assert {
        "conversations": validate_conversation,
        "pairs": validate_pair,
        "rated": validate_rated,
        "mc": validate_mc,
    } == FORMATS


# ---------------------------------------------------------------------------------------------------------
# conversations


def test_conversation_system_first_and_extra_keys_are_fine():
    record = _conv(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), source="ultrachat")
    record["messages"][1]["name"] = "alice"
    assert validate_conversation(record) == []


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        (
            [("user", "a"), ("user", "b"), ("assistant", "c")],
            [Problem("messages[1].role", f"expected 'assistant', got 'user' {ORDER}")],
        ),
        (
            [("assistant", "a"), ("user", "b"), ("assistant", "c")],
            [Problem("messages[0].role", f"expected 'user', got 'assistant' {ORDER}")],
        ),
        (
            [("system", "s"), ("assistant", "a")],
            [Problem("messages[1].role", f"expected 'user', got 'assistant' {ORDER}")],
        ),
        # only the first break of the order is reported
        (
            [("user", "a"), ("user", "b"), ("user", "c"), ("assistant", "d")],
            [Problem("messages[1].role", f"expected 'assistant', got 'user' {ORDER}")],
        ),
        (
            [("user", "a"), ("bot", "b")],
            [Problem("messages[1].role", "unknown role 'bot' (expected system, user or assistant)")],
        ),
        (
            [("user", "a"), ("system", "s"), ("assistant", "b")],
            [Problem("messages[1].role", "a system message is allowed only first")],
        ),
        (
            [("system", "s"), ("system", "t"), ("user", "a"), ("assistant", "b")],
            [Problem("messages[1].role", "a system message is allowed only first")],
        ),
        (
            [("user", "a"), ("assistant", "b"), ("user", "c")],
            [Problem("messages[2].role", "last message must be from the assistant, got 'user'")],
        ),
        ([("system", "s")], [Problem("messages", "has no user message")]),
        ([("user", "a"), ("assistant", "")], [Problem("messages[1].content", "is empty")]),
        ([("user", " \n\t"), ("assistant", "b")], [Problem("messages[0].content", "is empty")]),
    ],
)
def test_conversation_rules(turns, expected):
    assert validate_conversation(_conv(*turns)) == expected


def test_conversation_not_for_training_may_end_with_the_user():
    record = _conv(("user", "a"), ("assistant", "b"), ("user", "c"))
    assert validate_conversation(record, for_training=False) == []
    assert validate_conversation(_conv(("user", "a")), for_training=False) == []
    assert validate_conversation(_conv(("system", "s")), for_training=False) == [
        Problem("messages", "has no user message")
    ]


def test_conversation_structure_problems():
    assert validate_conversation(_conv()) == [Problem("messages", "is empty")]
    assert validate_conversation({"prompt_id": "c1", "prompt": "Hi?", "messages": "Hi?"}) == [
        Problem("messages", "must be a list of messages, got string")
    ]
    assert validate_conversation({"prompt_id": "c1", "prompt": "Hi?"}) == [Problem("messages", "missing")]
    record = _conv(("user", "a"), ("assistant", "b"))
    record["messages"][1] = "b"
    assert validate_conversation(record) == [Problem("messages[1]", "must be an object, got string")]
    record = _conv(("user", "a"), ("assistant", "b"))
    del record["messages"][0]["role"]
    record["messages"][1]["content"] = None
    assert validate_conversation(record) == [
        Problem("messages[0].role", "missing"),
        Problem("messages[1].content", "must be a string, got null"),
    ]
    record = _conv(("user", "a"), ("assistant", "b"))
    del record["messages"][1]["content"]
    assert validate_conversation(record) == [Problem("messages[1].content", "missing")]
    assert validate_conversation([1, 2]) == [Problem("record", "must be an object, got array")]


def test_conversation_reports_every_independent_problem_in_order():
    record = _conv(("user", "a"), ("assistant", ""))
    del record["prompt_id"]
    record["prompt"] = 7
    assert validate_conversation(record) == [
        Problem("prompt_id", "missing"),
        Problem("prompt", "must be a string, got integer"),
        Problem("messages[1].content", "is empty"),
    ]


# ---------------------------------------------------------------------------------------------------------
# pairs


def test_pair_answers_are_named_minus_one():
    assert validate_pair(_pair(chosen="")) == [Problem("chosen[-1].content", "is empty")]
    assert validate_pair(_pair(rejected="  ")) == [Problem("rejected[-1].content", "is empty")]
    record = _pair()
    record["chosen"][-1]["role"] = "user"
    assert validate_pair(record) == [Problem("chosen[-1].role", f"expected 'assistant', got 'user' {ORDER}")]
    record = _pair()
    record["rejected"].append({"role": "user", "content": "And Spain?"})
    assert validate_pair(record) == [
        Problem("rejected[-1].role", "last message must be from the assistant, got 'user'")
    ]


def test_pair_identical_answers():
    assert validate_pair(_pair(chosen="Paris.", rejected="Paris.")) == [
        Problem("rejected[-1].content", "identical to chosen[-1].content")
    ]
    # surrounding whitespace does not make answers different
    assert validate_pair(_pair(chosen="Paris.", rejected="\nParis. ")) == [
        Problem("rejected[-1].content", "identical to chosen[-1].content")
    ]


def test_pair_prompt_must_be_shared():
    record = _pair()
    record["rejected"][0]["content"] = "Capital of Spain?"
    assert validate_pair(record) == [
        Problem("rejected[0].content", "differs from chosen[0].content (the prompt must be shared)")
    ]
    record = _pair()
    record["chosen"][:0] = [{"role": "system", "content": "Be brief."}]
    assert validate_pair(record) == [
        Problem("rejected", "has 2 messages, chosen has 3 (all but the last message must be equal)")
    ]


def test_pair_prompt_comparison_waits_for_valid_sides():
    record = _pair(chosen="")
    record["rejected"][0]["content"] = "Capital of Spain?"
    assert validate_pair(record) == [Problem("chosen[-1].content", "is empty")]
    record = _pair()
    del record["chosen"]
    assert validate_pair(record) == [Problem("chosen", "missing")]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({"score_chosen": math.nan}, [Problem("score_chosen", "must be a finite number, got nan")]),
        ({"score_rejected": math.inf}, [Problem("score_rejected", "must be a finite number, got inf")]),
        ({"score_chosen": -math.inf}, [Problem("score_chosen", "must be a finite number, got -inf")]),
        ({"score_chosen": True}, [Problem("score_chosen", "must be a number, got boolean")]),
        ({"score_rejected": "3"}, [Problem("score_rejected", "must be a number, got string")]),
        (
            {"score_chosen": 2, "score_rejected": 5.5},
            [Problem("score_chosen", "lower than score_rejected (2 < 5.5)")],
        ),
        ({"score_chosen": 5, "score_rejected": 5.0}, []),
        ({"score_chosen": None, "score_rejected": None}, []),
    ],
)
def test_pair_scores(scores, expected):
    assert validate_pair(_pair(**scores)) == expected


def test_pair_scores_are_optional():
    record = _pair()
    del record["score_chosen"], record["score_rejected"]
    assert validate_pair(record) == []


# ---------------------------------------------------------------------------------------------------------
# rated


def test_rated_rating_values():
    record = _rated({"honesty": 5, "helpfulness": 4}, {"honesty": 3, "helpfulness": 2})
    bad = copy.deepcopy(record)
    bad["completions"][1]["ratings"]["honesty"] = math.nan
    assert validate_rated(bad) == [
        Problem("completions[1].ratings.honesty", "must be a finite number, got nan")
    ]
    bad = copy.deepcopy(record)
    bad["completions"][0]["ratings"]["helpfulness"] = True
    assert validate_rated(bad) == [
        Problem("completions[0].ratings.helpfulness", "must be a number, got boolean")
    ]
    bad = copy.deepcopy(record)
    bad["completions"][0]["ratings"]["helpfulness"] = "4"
    assert validate_rated(bad) == [
        Problem("completions[0].ratings.helpfulness", "must be a number, got string")
    ]
    bad = copy.deepcopy(record)
    bad["completions"][0]["ratings"] = [5, 4]
    assert validate_rated(bad) == [Problem("completions[0].ratings", "must be an object, got array")]


def test_rated_mean_rating():
    # the mean of 10, 9, 9 is 9.333...; a value rounded to two decimals is accepted
    assert validate_rated(_rated({"a": 10, "b": 9, "c": 9}, mean=9.33)) == []
    assert validate_rated(_rated({"a": 8, "b": 8}, mean=6.5)) == [
        Problem("completions[0].mean_rating", "6.5 is not the mean of the ratings (8)")
    ]
    # a null rating (no value in the judge's answer) is left out of the mean
    assert validate_rated(_rated({"a": 4, "b": None}, mean=4)) == []
    assert validate_rated(_rated({"a": None, "b": None}, mean=None)) == []
    assert validate_rated(_rated({"a": None}, mean=3)) == [
        Problem("completions[0].mean_rating", "3 is not the mean of the ratings (no ratings)")
    ]
    assert validate_rated(_rated({"a": 2}, mean=None)) == [
        Problem("completions[0].mean_rating", "is null but ratings are given")
    ]
    record = _rated({"a": 2})
    del record["completions"][0]["mean_rating"]
    assert validate_rated(record) == [Problem("completions[0].mean_rating", "missing")]


def test_rated_completion_fields():
    record = _rated({"a": 2}, {"a": 4})
    record["completions"][0]["response"] = ""
    del record["completions"][1]["model"]
    record["completions"][1]["rationales"] = {"a": 4}
    assert validate_rated(record) == [
        Problem("completions[0].response", "is empty"),
        Problem("completions[1].model", "missing"),
        Problem("completions[1].rationales.a", "must be a string, got integer"),
    ]
    record = _rated({"a": 2})
    del record["completions"][0]["rationales"]
    assert validate_rated(record) == []
    assert validate_rated({"prompt_id": "r1", "prompt": "x", "completions": []}) == [
        Problem("completions", "is empty")
    ]
    assert validate_rated({"prompt_id": "r1", "prompt": "x", "completions": {}}) == [
        Problem("completions", "must be a list, got object")
    ]
    assert validate_rated({"prompt_id": "r1", "prompt": "x", "completions": [3]}) == [
        Problem("completions[0]", "must be an object, got integer")
    ]
    assert validate_rated({"prompt": "x"}) == [
        Problem("prompt_id", "missing"),
        Problem("completions", "missing"),
    ]


# ---------------------------------------------------------------------------------------------------------
# multiple choice


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"gold": 3}, [Problem("gold", "3 is out of range for 3 choices")]),
        ({"gold": -1}, [Problem("gold", "-1 is out of range for 3 choices")]),
        ({"gold": True}, [Problem("gold", "must be an integer, got boolean")]),
        ({"gold": 1.0}, [Problem("gold", "must be an integer, got number")]),
        ({"gold": [0, 2]}, []),
        ({"gold": [0, 5]}, [Problem("gold[1]", "5 is out of range for 3 choices")]),
        ({"gold": [0, "1"]}, [Problem("gold[1]", "must be an integer, got string")]),
        ({"gold": []}, [Problem("gold", "is empty")]),
        ({"gold": [1, 1]}, [Problem("gold", "repeats an index")]),
        ({"choices": ["4"], "gold": 0}, [Problem("choices", "needs at least 2 choices, got 1")]),
        ({"choices": ["4", ""]}, [Problem("choices[1]", "is empty")]),
        ({"choices": "4"}, [Problem("choices", "must be a list, got string")]),
        ({"id": 7}, []),
        ({"id": False}, [Problem("id", "must be a string or an integer, got boolean")]),
        ({"query": ""}, []),
        ({"query": None}, [Problem("query", "must be a string, got null")]),
    ],
)
def test_mc_rules(over, expected):
    assert validate_mc(_mc(**over)) == expected


def test_mc_missing_fields():
    assert validate_mc({}) == [
        Problem("id", "missing"),
        Problem("query", "missing"),
        Problem("choices", "missing"),
        Problem("gold", "missing"),
    ]


# ---------------------------------------------------------------------------------------------------------
# detection


def test_detect_format():
    binarized = _pair(messages=_pair()["chosen"])  # ultrafeedback_binarized rows also carry `messages`
    assert detect_format(binarized) == "pairs"
    assert detect_format(_conv(("user", "a"), ("assistant", "b"))) == "conversations"
    assert detect_format(_rated({"a": 1})) == "rated"
    assert detect_format(_mc()) == "mc"
    assert detect_format({"prompt": "x"}) is None
    assert detect_format({"choices": ["a", "b"]}) is None
    assert detect_format(["messages"]) is None
