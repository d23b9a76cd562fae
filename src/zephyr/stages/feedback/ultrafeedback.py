"""UltraFeedback's annotation protocol (Cui et al. 2023), and raw `openbmb/UltraFeedback` records as rated records.

The judge preset `ultrafeedback` (`JudgeConfig.preset`) rates as UltraFeedback's `annotate_preference.py` did:
one call per aspect, the completions of a prompt shown together as `<text 1> …` … `<text n> …` in a random
order, rated 1–5 in UltraFeedback's own answer format, read by its own parser. The texts are not in zephyr:
they come at run time from the `ultrafeedback-templates` asset (distilabel 1.5.3's UltraFeedback task from
PyPI): one Jinja2 rubric per aspect, rendered with `instruction` and `generations` exactly as distilabel
does, and the system prompt, read from distilabel's `ultrafeedback.py` as a string literal (the module is
never imported). docs/feedback.md compares them with UltraFeedback's own `preference_templates.py`.

The answer format, per text, in order, blocks separated by a blank line:

    #### Output for Text 1                      #### Output for Text 1
    Rating: 4                                   Type: 1, 2
    Rationale: ...                              Rationale: ...
                                                Rating: 4
    (instruction-following, honesty)            Rationale For Rating: ...   (helpfulness, truthfulness)

`parse_answer` is UltraFeedback's `process`: the answer is split at blank lines ("\\n\\n") into exactly n
sections, each must match `Rating: (.+?)\\nRationale: (.+)` (or `Type: (.+?)\\nRationale: (.+?)\\nRating:
(.+?)\\nRationale: (.+)`), and the rating is the first whole number of its field. "N/A" is a rating on
instruction-following and honesty (not applicable: left out of the mean); anything else that is not a
number is a format error of the whole answer, and UltraFeedback asked again, up to `ATTEMPTS` answers.
One deliberate difference: a number outside 1–5 is a format error here (UltraFeedback stored it).

Raw records (`rated_from_raw`, checked by `validate_raw`): `{"source", "instruction", "models",
"completions": [{"model", "principle", "custom_system_prompt", "response", "annotations": {aspect:
{"Rating": "1".."5" | "N/A", "Rationale", ("Type", "Rationale For Rating")}}, "fine-grained_score",
"overall_score", "critique"}], "correct_answers", "incorrect_answers"}` become rated records whose
`mean_rating` is the mean of the aspect ratings that are numbers (UltraFeedback's fine-grained score), and
whose `types` keep the typed aspects' `Type` (as the judge's answers do under the preset).
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr.core.errors import ConfigError
from zephyr.data.schema import Problem, json_type
from zephyr.judge.rating import Rating
from zephyr.stages.feedback.binarize import mean_rating

ASSET = "ultrafeedback-templates"
# Aspects as the templates name them, and as the raw records' `annotations` key them.
TEMPLATE_ASPECTS = ("instruction-following", "helpfulness", "honesty", "truthfulness")
RAW_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
TYPED = ("helpfulness", "truthfulness")  # answers with a Type line and a rationale for the rating
SCALE = 5
ATTEMPTS = 10  # annotate_preference.py: an answer in the wrong format is asked again, 10 answers at most
NA = "N/A"
MISSING = "missing annotation"  # a raw record without this aspect's annotation (UltraFeedback gave up)
# Rating reasons of this protocol: an answer not in its format after every retry, and a rating the judge
# declared not applicable ("N/A", not a failure: left out of the mean).
FORMAT_ERROR = "format error"
NOT_APPLICABLE = "not applicable"
REASONS = (FORMAT_ERROR, NOT_APPLICABLE)
IMPORTED_JUDGE = "gpt-4|openbmb/UltraFeedback"  # the judge id of imported records

_SYSTEM_SOURCE = "ultrafeedback.py"
_SYSTEM_FIELD = "_system_prompt"


@dataclass(frozen=True)
class Templates:
    """The preset's texts: the system prompt (with distilabel's `{no_texts}`) and a Jinja2 rubric per aspect."""

    system: str
    rubrics: Mapping[str, str]  # template aspect name -> Jinja2 source


def load_templates(folder: str | Path, aspects: Sequence[str] = TEMPLATE_ASPECTS) -> Templates:
    """The texts in a folder of the `ultrafeedback-templates` asset; ConfigError naming the file otherwise."""
    folder = Path(folder)
    unknown = [a for a in aspects if a not in TEMPLATE_ASPECTS]
    if unknown:
        raise ConfigError(
            f"UltraFeedback has no rubric for aspect {unknown[0]!r} (it has {TEMPLATE_ASPECTS})"
        )
    rubrics = {a: _read(folder / f"{a}.jinja2") for a in aspects}
    return Templates(system_prompt_of(_read(folder / _SYSTEM_SOURCE), folder / _SYSTEM_SOURCE), rubrics)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read UltraFeedback template: {exc}") from exc


def system_prompt_of(source: str, where: str | Path = _SYSTEM_SOURCE) -> str:
    """The default of `_system_prompt` in distilabel's UltraFeedback task, read from its source (never run)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConfigError(f"{where}: not Python source: {exc}") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == _SYSTEM_FIELD:
            call = node.value
            default = next((k.value for k in getattr(call, "keywords", []) if k.arg == "default"), None)
            if isinstance(default, ast.Constant) and isinstance(default.value, str):
                return default.value
    raise ConfigError(f"{where}: no string default of {_SYSTEM_FIELD} (the judge's system prompt)")


# ---------------------------------------------------------------------------------------------------------
# The judge's messages and answers


def build_messages(
    templates: Templates, aspect: str, instruction: str, responses: Sequence[str]
) -> list[dict[str, str]]:
    """The system and user messages of one call: `responses` in the order shown (`<text 1>` first).

    Rendered as distilabel's `format_input`: the system prompt through `str.format(no_texts=n)`, the rubric
    through a Jinja2 template with its default settings (one trailing newline dropped).
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if aspect not in templates.rubrics:
        raise ConfigError(f"unknown aspect {aspect!r}; the preset has {', '.join(templates.rubrics)}")
    if not responses:
        raise ValueError("no completions to judge")
    user = (
        ImmutableSandboxedEnvironment()
        .from_string(templates.rubrics[aspect])
        .render(instruction=instruction, generations=list(responses))
    )
    return [
        {"role": "system", "content": templates.system.format(no_texts=len(responses))},
        {"role": "user", "content": user},
    ]


@dataclass(frozen=True)
class Annotation:
    """One text's block of an answer: the rating, its rationale, and for typed aspects the types read."""

    rating: Rating
    rationale: str
    types: tuple[str, ...] | None = None


_PLAIN = re.compile(r"Rating: (.+?)\nRationale: (.+)", re.DOTALL)
_TYPED = re.compile(r"Type: (.+?)\nRationale: (.+?)\nRating: (.+?)\nRationale: (.+)", re.DOTALL)
_NUMBER = re.compile(r"\b\d+\b")


class FormatError(ValueError):
    """An answer that is not in UltraFeedback's format (the call is asked again)."""


def parse_answer(text: str, n: int, aspect: str) -> list[Annotation]:
    """The n annotations of an answer, in the order shown; FormatError when it breaks the format."""
    sections = text.split("\n\n")
    if len(sections) != n:
        raise FormatError(f"{len(sections)} blank-line separated sections for {n} texts")
    typed = aspect in TYPED
    annotations = []
    for k, section in enumerate(sections, start=1):
        match = (_TYPED if typed else _PLAIN).search(section)
        if match is None:
            raise FormatError(f"text {k}: no {'Type/Rationale/' if typed else ''}Rating/Rationale lines")
        if typed:
            kinds, rating, rationale = match.group(1), match.group(3), match.group(4)
            types = () if kinds == "None" else tuple(_NUMBER.findall(kinds))
            annotations.append(Annotation(_rating(rating, k, allow_na=False), rationale, types))
        else:
            annotations.append(Annotation(_rating(match.group(1), k, allow_na=True), match.group(2)))
    return annotations


def _rating(field: str, k: int, *, allow_na: bool) -> Rating:
    if allow_na and field == NA:
        return Rating(None, NOT_APPLICABLE)
    numbers = _NUMBER.findall(field)
    if not numbers:
        raise FormatError(f"text {k}: rating {field!r} is not a number")
    value = int(numbers[0])
    if not 1 <= value <= SCALE:
        raise FormatError(f"text {k}: rating {value} is outside 1-{SCALE}")
    return Rating(float(value))


# ---------------------------------------------------------------------------------------------------------
# Raw openbmb/UltraFeedback records


def is_raw(record: Any) -> bool:
    """Whether a record looks like a raw UltraFeedback record (an `instruction` with `completions`)."""
    return isinstance(record, dict) and "instruction" in record and "completions" in record


def prompt_id(instruction: str) -> str:
    """HuggingFaceH4/ultrafeedback_binarized's prompt id: the SHA-256 of the prompt text."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()


def validate_raw(record: Any) -> list[Problem]:
    """The problems of a raw record (empty when it imports); field paths as in `zephyr.data.schema`."""
    if not isinstance(record, dict):
        return [Problem("record", f"must be an object, got {json_type(record)}")]
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return [
            Problem("instruction", "missing" if "instruction" not in record else "must be a non-empty string")
        ]
    completions = record.get("completions")
    if not isinstance(completions, list) or not completions:
        return [Problem("completions", f"must be a non-empty list, got {json_type(completions)}")]
    problems = []
    for i, completion in enumerate(completions):
        problems += _completion_problems(completion, f"completions[{i}]")
    if not problems and not any(c["response"].strip() for c in completions):
        problems.append(Problem("completions", "no completion has a response"))
    return problems


def _completion_problems(completion: Any, path: str) -> list[Problem]:
    if not isinstance(completion, dict):
        return [Problem(path, f"must be an object, got {json_type(completion)}")]
    problems = []
    if not isinstance(completion.get("model"), str) or not completion["model"].strip():
        problems.append(Problem(f"{path}.model", "must be a non-empty string"))
    if not isinstance(completion.get("response"), str):
        problems.append(
            Problem(f"{path}.response", f"must be a string, got {json_type(completion.get('response'))}")
        )
    try:
        _overall_score(completion.get("overall_score"))
    except ValueError as exc:
        problems.append(Problem(f"{path}.overall_score", str(exc)))
    annotations = completion.get("annotations")
    if not isinstance(annotations, dict):
        return [*problems, Problem(f"{path}.annotations", f"must be an object, got {json_type(annotations)}")]
    for aspect in RAW_ASPECTS:
        where = f"{path}.annotations.{aspect}"
        try:
            annotation = _annotation(annotations.get(aspect))
            if annotation is not None:
                _raw_rating(annotation.get("Rating"))
        except ValueError as exc:
            problems.append(Problem(where, str(exc)))
    return problems


def _overall_score(value: Any) -> float | None:
    """`overall_score`: a number or a numeric string (the critique script wrote strings); null when absent."""
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"must be a number, got {value!r}")
    return number


def _annotation(value: Any) -> dict | None:
    """One aspect's annotation: an object, a list of one (the annotation script's own output), or None when
    missing (absent, null, an empty list: UltraFeedback gave up on the call)."""
    if value is None or value == []:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {json_type(value)}")
    return value


def _raw_rating(value: Any) -> float | None:
    """A raw `Rating`: "1".."5" (a string upstream; a whole number is accepted) or "N/A" (None)."""
    if value == NA:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SCALE:
        raise ValueError(f"Rating must be '1'..'{SCALE}' or '{NA}', got {value!r}")
    return float(value)


def rated_from_raw(record: Mapping[str, Any]) -> dict[str, Any]:
    """A raw record (valid by `validate_raw`) as a rated record; blank responses listed, not rated."""
    completions, failures = [], []
    for raw in record["completions"]:
        if not raw["response"].strip():
            failures.append({"model": raw["model"], "error": "empty response"})
            continue
        ratings: dict[str, float | None] = {}
        rationales: dict[str, str] = {}
        reasons: dict[str, str] = {}
        types: dict[str, list[str]] = {}
        for aspect in RAW_ASPECTS:
            annotation = _annotation(raw["annotations"].get(aspect))
            ratings[aspect] = None if annotation is None else _raw_rating(annotation.get("Rating"))
            rationales[aspect] = _rationale(annotation, aspect)
            if ratings[aspect] is None:
                reasons[aspect] = MISSING if annotation is None else NOT_APPLICABLE
            if (
                aspect in TYPED
                and annotation is not None
                and (kinds := _types(annotation.get("Type"))) is not None
            ):
                types[aspect] = kinds
        entry: dict[str, Any] = {
            "model": raw["model"],
            "response": raw["response"],
            "ratings": ratings,
            "rationales": rationales,
            "mean_rating": mean_rating(ratings),
            "overall_score": _overall_score(raw.get("overall_score")),
            "principle": raw.get("principle"),
            "system_prompt": raw.get("custom_system_prompt"),
            "critique": raw.get("critique"),
        }
        if reasons:
            entry["rating_reasons"] = reasons
        if types:
            entry["types"] = types
        completions.append(entry)
    instruction = record["instruction"]
    return {
        "prompt_id": prompt_id(instruction),
        "prompt": instruction,
        "source": record.get("source"),
        "completions": completions,
        "judge": IMPORTED_JUDGE,
        "generation_failures": failures,
    }


def _types(value: Any) -> list[str] | None:
    """A raw `Type`: a list of type numbers as strings (["1", "3"]), or the answer's own line ("1, 3", "None");
    [] for none, None when absent or not of those shapes."""
    if isinstance(value, str):
        return [] if value.strip() == "None" else _NUMBER.findall(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [n for v in value for n in _NUMBER.findall(v)]
    return None


def _rationale(annotation: Mapping[str, Any] | None, aspect: str) -> str:
    """The rationale of the rating: "Rationale For Rating" on typed aspects (their "Rationale" explains the type)."""
    if annotation is None:
        return ""
    key = "Rationale For Rating" if aspect in TYPED else "Rationale"
    value = annotation.get(key)
    return value if isinstance(value, str) else ""
