"""Record schemas of zephyr's data files, as pure validators.

The formats follow the Hugging Face datasets that zephyr reproduces, so hub data drops in:

- conversations (ultrachat_200k): `{"prompt_id", "prompt", "messages": [{"role", "content"}, ...]}`
- rated (UltraFeedback): `{"prompt_id", "prompt", "completions": [{"model", "response",
  "ratings": {aspect: number}, "rationales": {aspect: text}, "mean_rating"}]}`
- pairs (ultrafeedback_binarized): `{"prompt_id", "prompt", "chosen": [messages], "rejected": [messages],
  "score_chosen", "score_rejected"}`
- mc: `{"id", "query", "choices": [str], "gold": int | [int]}`

Each validator takes one decoded record and returns the list of `Problem`s it breaks (empty when valid).
Field paths name the offending value: `messages[2].role`, `chosen[-1].content`,
`completions[1].ratings.honesty`. Keys that a format does not name are allowed and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    """One broken rule: where (`field`, a path inside the record) and what (`message`)."""

    field: str
    message: str


Validator = Callable[[Any], list[Problem]]


# ---------------------------------------------------------------------------------------------------------
# Scalar checks shared by the formats


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about data files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_string(value: Any, path: str, *, non_empty: bool = False) -> list[Problem]:
    """A string; with `non_empty`, one that holds more than whitespace."""
    if not isinstance(value, str):
        return [Problem(path, f"must be a string, got {json_type(value)}")]
    if non_empty and not value.strip():
        return [Problem(path, "is empty")]
    return []


def _check_number(value: Any, path: str) -> list[Problem]:
    """A finite int or float. A boolean is not a number (JSON true would silently read as 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [Problem(path, f"must be a number, got {json_type(value)}")]
    if not math.isfinite(value):
        return [Problem(path, f"must be a finite number, got {value}")]
    return []


def _check_text(value: Any, path: str) -> list[Problem]:
    return _check_string(value, path, non_empty=True)


def _check_key(
    obj: dict[str, Any], key: str, path: str, check: Callable[[Any, str], list[Problem]]
) -> list[Problem]:
    """`obj[key]` exists and passes `check`; problems are named by `path`."""
    if key not in obj:
        return [Problem(path, "missing")]
    return check(obj[key], path)


def _check_prompt_fields(record: dict[str, Any]) -> list[Problem]:
    """`prompt_id` and `prompt` are strings holding more than whitespace."""
    return _check_key(record, "prompt_id", "prompt_id", _check_text) + _check_key(
        record, "prompt", "prompt", _check_text
    )


def _not_an_object(record: Any) -> list[Problem]:
    if isinstance(record, dict):
        return []
    return [Problem("record", f"must be an object, got {json_type(record)}")]


# ---------------------------------------------------------------------------------------------------------
# conversations


def _message_path(name: str, index: int, count: int, last_as_minus_one: bool) -> str:
    shown = -1 if last_as_minus_one and index == count - 1 else index
    return f"{name}[{shown}]"


def _check_messages(
    messages: Any, name: str, *, for_training: bool, last_as_minus_one: bool = False
) -> list[Problem]:
    """The message rules of a conversation.

    - a non-empty list of objects, each with a `role` and a string `content` holding more than whitespace;
    - roles are system, user or assistant; one system message at most, and only as the first message;
    - after it, user and assistant alternate, starting with user (only the first break of the order is
      reported: every later message would repeat it);
    - for training, the last message is the assistant's (the answer the loss is computed on).
    With `last_as_minus_one` the last message is named `name[-1]` (pairs: the answer).
    """
    if not isinstance(messages, list):
        return [Problem(name, f"must be a list of messages, got {json_type(messages)}")]
    if not messages:
        return [Problem(name, "is empty")]
    problems: list[Problem] = []
    order_ok = True
    offset = 0  # index of the first non-system message
    for i, message in enumerate(messages):
        path = _message_path(name, i, len(messages), last_as_minus_one)
        if not isinstance(message, dict):
            problems.append(Problem(path, f"must be an object, got {json_type(message)}"))
            order_ok = False
            continue
        if order_ok:
            role_problem = _check_role(message, i, offset, path)
            if role_problem is not None:
                problems.append(role_problem)
                order_ok = False
            elif message["role"] == "system":
                offset = 1
        problems += _check_key(message, "content", f"{path}.content", _check_text)
    if order_ok and offset == len(messages):
        problems.append(Problem(name, "has no user message"))
    elif order_ok and for_training and messages[-1]["role"] != "assistant":
        path = _message_path(name, len(messages) - 1, len(messages), last_as_minus_one)
        problems.append(
            Problem(f"{path}.role", f"last message must be from the assistant, got {messages[-1]['role']!r}")
        )
    return problems


def _check_role(message: dict[str, Any], index: int, offset: int, path: str) -> Problem | None:
    """The role of message `index`, given `offset` = 1 when the conversation opened with a system message."""
    if "role" not in message:
        return Problem(f"{path}.role", "missing")
    role = message["role"]
    if role not in ROLES:
        return Problem(f"{path}.role", f"unknown role {role!r} (expected system, user or assistant)")
    if role == "system":
        return None if index == 0 else Problem(f"{path}.role", "a system message is allowed only first")
    expected = "user" if (index - offset) % 2 == 0 else "assistant"
    if role != expected:
        return Problem(
            f"{path}.role", f"expected {expected!r}, got {role!r} (user and assistant alternate, user first)"
        )
    return None


def validate_conversation(record: Any, *, for_training: bool = True) -> list[Problem]:
    """A conversation record (ultrachat_200k).

    - `prompt_id` and `prompt` are strings;
    - `messages` follows the message rules of `_check_messages` (roles, order, non-empty content; for
      training the last message is the assistant's; prompts to be answered pass `for_training=False`).
    """
    if problems := _not_an_object(record):
        return problems
    return _check_prompt_fields(record) + _check_key(
        record, "messages", "messages", lambda v, k: _check_messages(v, k, for_training=for_training)
    )


# ---------------------------------------------------------------------------------------------------------
# pairs


def _check_shared_prompt(chosen: list[Any], rejected: list[Any]) -> list[Problem]:
    """chosen and rejected answer the same prompt: all their messages but the last are equal."""
    if len(chosen) != len(rejected):
        return [
            Problem(
                "rejected",
                f"has {len(rejected)} messages, chosen has {len(chosen)} "
                "(all but the last message must be equal)",
            )
        ]
    for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        for key in ("role", "content"):
            if c[key] != r[key]:
                return [
                    Problem(
                        f"rejected[{i}].{key}", f"differs from chosen[{i}].{key} (the prompt must be shared)"
                    )
                ]
    return []


def _check_scores(record: dict[str, Any]) -> list[Problem]:
    """Optional scores: finite numbers when given, the chosen one not below the rejected one."""
    scores = {key: record.get(key) for key in ("score_chosen", "score_rejected")}
    problems = [p for key, value in scores.items() if value is not None for p in _check_number(value, key)]
    chosen, rejected = scores.values()
    if problems or chosen is None or rejected is None or chosen >= rejected:
        return problems
    return [Problem("score_chosen", f"lower than score_rejected ({chosen} < {rejected})")]


def validate_pair(record: Any) -> list[Problem]:
    """A preference pair (ultrafeedback_binarized).

    - `prompt_id` and `prompt` are strings holding more than whitespace;
    - `chosen` and `rejected` are conversations for training (the message rules, the answer named `[-1]`);
    - they share the prompt: all messages but the last are equal (role and content);
    - their answers differ (ignoring surrounding whitespace): identical answers teach nothing;
    - `score_chosen` / `score_rejected` are optional (DPO does not read them); when given, finite numbers
      with the chosen score not below the rejected one (a lower one means swapped labels).
    """
    if problems := _not_an_object(record):
        return problems
    problems = _check_prompt_fields(record)
    sides = {}
    for side in ("chosen", "rejected"):
        side_problems = _check_key(
            record, side, side, lambda v, k: _check_messages(v, k, for_training=True, last_as_minus_one=True)
        )
        problems += side_problems
        if not side_problems:
            sides[side] = record[side]
    if len(sides) == 2:
        problems += _check_shared_prompt(sides["chosen"], sides["rejected"])
        if sides["chosen"][-1]["content"].strip() == sides["rejected"][-1]["content"].strip():
            problems.append(Problem("rejected[-1].content", "identical to chosen[-1].content"))
    problems += _check_scores(record)
    return problems


# ---------------------------------------------------------------------------------------------------------
# rated completions

# Stored means are often rounded to two decimals; a wider gap means the mean is of other ratings.
_MEAN_TOLERANCE = 0.01


def _check_aspects(value: Any, path: str, check: Callable[[Any, str], list[Problem]]) -> list[Problem]:
    """An object of aspect -> value; null values pass (an aspect the judge's answer gave no value for)."""
    if not isinstance(value, dict):
        return [Problem(path, f"must be an object, got {json_type(value)}")]
    return [p for aspect, v in value.items() if v is not None for p in check(v, f"{path}.{aspect}")]


def _check_mean_rating(completion: dict[str, Any], path: str) -> list[Problem]:
    """`mean_rating` is the mean of the numeric ratings, or null when there is none."""
    if "mean_rating" not in completion:
        return [Problem(f"{path}.mean_rating", "missing")]
    ratings = [v for v in completion["ratings"].values() if v is not None]
    mean = completion["mean_rating"]
    if mean is None:
        return [Problem(f"{path}.mean_rating", "is null but ratings are given")] if ratings else []
    if problems := _check_number(mean, f"{path}.mean_rating"):
        return problems
    expected = sum(ratings) / len(ratings) if ratings else None
    if expected is None or abs(mean - expected) > _MEAN_TOLERANCE:
        shown = "no ratings" if expected is None else f"{expected:g}"
        return [Problem(f"{path}.mean_rating", f"{mean:g} is not the mean of the ratings ({shown})")]
    return []


def _check_completion(completion: Any, path: str) -> list[Problem]:
    if not isinstance(completion, dict):
        return [Problem(path, f"must be an object, got {json_type(completion)}")]
    problems = _check_key(completion, "model", f"{path}.model", _check_text)
    problems += _check_key(completion, "response", f"{path}.response", _check_text)
    ratings = _check_key(
        completion, "ratings", f"{path}.ratings", lambda v, p: _check_aspects(v, p, _check_number)
    )
    if "rationales" in completion:
        problems += _check_aspects(completion["rationales"], f"{path}.rationales", _check_string)
    problems += ratings
    if not ratings:
        problems += _check_mean_rating(completion, path)
    return problems


def validate_rated(record: Any) -> list[Problem]:
    """A prompt with rated completions (UltraFeedback).

    - `prompt_id` and `prompt` are strings holding more than whitespace;
    - `completions` is a non-empty list of objects with a `model` name and a non-empty `response`;
    - `ratings` maps aspect -> finite number (null: the judge's answer held no rating for it);
    - `rationales`, when present, maps aspect -> string;
    - `mean_rating` is the mean of the numeric ratings (to 0.01), null only when there is none.
    """
    if problems := _not_an_object(record):
        return problems
    problems = _check_prompt_fields(record)
    if "completions" not in record:
        return [*problems, Problem("completions", "missing")]
    completions = record["completions"]
    if not isinstance(completions, list):
        return [*problems, Problem("completions", f"must be a list, got {json_type(completions)}")]
    if not completions:
        return [*problems, Problem("completions", "is empty")]
    for i, completion in enumerate(completions):
        problems += _check_completion(completion, f"completions[{i}]")
    return problems


# ---------------------------------------------------------------------------------------------------------
# multiple choice


def _check_gold(gold: Any, n_choices: int) -> list[Problem]:
    """An index into `choices`, or a non-empty list of distinct indices (mc2: several true answers)."""
    indices = gold if isinstance(gold, list) else [gold]
    if isinstance(gold, list) and not gold:
        return [Problem("gold", "is empty")]
    for i, index in enumerate(indices):
        path = f"gold[{i}]" if isinstance(gold, list) else "gold"
        if isinstance(index, bool) or not isinstance(index, int):
            return [Problem(path, f"must be an integer, got {json_type(index)}")]
        if not 0 <= index < n_choices:
            return [Problem(path, f"{index} is out of range for {n_choices} choices")]
    if len(set(indices)) != len(indices):
        return [Problem("gold", "repeats an index")]
    return []


def _check_choices(choices: Any, path: str) -> list[Problem]:
    if not isinstance(choices, list):
        return [Problem(path, f"must be a list, got {json_type(choices)}")]
    if len(choices) < 2:
        return [Problem(path, f"needs at least 2 choices, got {len(choices)}")]
    return [p for i, choice in enumerate(choices) for p in _check_text(choice, f"{path}[{i}]")]


def validate_mc(record: Any) -> list[Problem]:
    """A multiple-choice item.

    - `id` is a string or an integer;
    - `query` is a string (the context the choices continue; it may be empty);
    - `choices` is a list of at least two non-empty strings (acc_norm divides by a choice's length);
    - `gold` is an index into `choices`, or a non-empty list of distinct indices (mc2-style items).
    """
    if problems := _not_an_object(record):
        return problems
    problems = []
    if "id" not in record:
        problems.append(Problem("id", "missing"))
    elif isinstance(record["id"], bool) or not isinstance(record["id"], str | int):
        problems.append(Problem("id", f"must be a string or an integer, got {json_type(record['id'])}"))
    problems += _check_key(record, "query", "query", _check_string)
    problems += _check_key(record, "choices", "choices", _check_choices)
    if "gold" not in record:
        problems.append(Problem("gold", "missing"))
    elif isinstance(record.get("choices"), list):  # the range of gold is known
        problems += _check_gold(record["gold"], len(record["choices"]))
    return problems


# ---------------------------------------------------------------------------------------------------------
# registry

FORMATS: dict[str, Validator] = {
    "conversations": validate_conversation,
    "pairs": validate_pair,
    "rated": validate_rated,
    "mc": validate_mc,
}

# The field that identifies a record within a file (a repeated value is a problem).
ID_FIELDS: dict[str, str] = {
    "conversations": "prompt_id",
    "pairs": "prompt_id",
    "rated": "prompt_id",
    "mc": "id",
}


def detect_format(record: Any) -> str | None:
    """The format a record looks like, by its keys, or None.

    Pairs are tested before conversations: ultrafeedback_binarized rows also carry a `messages` column.
    """
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return "pairs"
    if "completions" in record:
        return "rated"
    if "choices" in record and "gold" in record:
        return "mc"
    if "messages" in record:
        return "conversations"
    return None
