"""Judge prompts for AI feedback: rubric templates, shuffled completions, the answer format the parser reads.

Two layouts:
- one aspect per call (`aspect="helpfulness"`): the judge rates every completion on that aspect and ends
  each completion's block with `Rating: N`;
- all aspects in one call (`aspect=None`): each block ends with one `Aspect: N` line per aspect.

Templates are plain text files with `$name` placeholders (`string.Template`), shipped in
`zephyr/templates/feedback/`; a recipe can point at a folder of its own, whose files replace the shipped
ones by name (files it lacks fall back to the shipped ones):

| file | placeholders |
|---|---|
| `system.txt` | `$scale_max` |
| `one-aspect.txt` | `$n $scale_max $aspect $rubric $scale_note $instruction $outputs $answer_format` |
| `all-aspects.txt` | `$n $scale_max $aspect_list $rubrics $scale_note $instruction $outputs $answer_format` |
| `ASPECT.txt` (one per aspect) | `$b1 … $b5` (the labels of the five rubric levels), `$scale_max` |

A rubric describes five levels; on the 1–10 scale each level spans two ratings (`$b1` = "1-2" … `$b5` =
"9-10"), on the 1–5 scale one (`$b1` = "1"). The answer format is written by code, not by a template: it
is the contract with `zephyr.judge.parsing`.

Completions are shown in a seeded random order so that position bias does not follow the generator; the
order is returned so that ratings read by position map back to the completions.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from zephyr.core.errors import ConfigError

# UltraFeedback's four aspects, in the order the answer format lists them.
ASPECTS = ("instruction-following", "helpfulness", "honesty", "truthfulness")
SCALES = (5, 10)
LEVELS = 5  # levels a rubric file describes
OUTPUT_LABEL = "Output"  # completions are shown as "### Output 1" …; the parser splits on this word

_PACKAGE_DIR = "templates/feedback"
_ASPECT_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_FRAME = {"n", "scale_max", "scale_note", "instruction", "outputs", "answer_format"}
_ALLOWED = {
    "system.txt": {"scale_max"},
    "one-aspect.txt": _FRAME | {"aspect", "rubric"},
    "all-aspects.txt": _FRAME | {"aspect_list", "rubrics"},
}
# Without these the judge would not see what it rates, or would not know how to answer.
_REQUIRED = {
    "system.txt": set(),
    "one-aspect.txt": {"rubric", "instruction", "outputs", "answer_format"},
    "all-aspects.txt": {"rubrics", "instruction", "outputs", "answer_format"},
}
_RUBRIC_ALLOWED = {f"b{i}" for i in range(1, LEVELS + 1)} | {"scale_max"}


@dataclass(frozen=True)
class JudgeTemplates:
    """The template texts of one judge set-up, checked once when loaded (`load_templates`)."""

    system: str
    one_aspect: str
    all_aspects: str
    rubrics: Mapping[str, str]  # aspect -> rubric text

    @property
    def aspects(self) -> tuple[str, ...]:
        return tuple(self.rubrics)


def aspect_label(aspect: str) -> str:
    """How an aspect is named to the judge and in its answer lines: `instruction-following` → `Instruction-following`."""
    return aspect[:1].upper() + aspect[1:]


def load_templates(
    template_dir: str | Path | None = None, aspects: Sequence[str] = ASPECTS
) -> JudgeTemplates:
    """The judge templates: files in `template_dir` replace the shipped ones of the same name.

    Raises ConfigError naming the file for an unknown or missing placeholder, an unreadable file, or an
    aspect with no rubric file. Call it once per stage, before any judging, so template mistakes fail early.
    """
    aspects = tuple(aspects)
    if not aspects:
        raise ConfigError("no aspects to rate: give at least one")
    for aspect in aspects:
        if not _ASPECT_NAME.fullmatch(aspect):
            raise ConfigError(f"aspect {aspect!r}: use lowercase words joined by '-' (e.g. 'helpfulness')")
    if len(set(aspects)) != len(aspects):
        raise ConfigError(f"aspects repeat a name: {list(aspects)}")
    folder = Path(template_dir) if template_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"{folder}: judge template folder not found")
    texts = {name: _read_checked(name, folder, _ALLOWED[name], _REQUIRED[name]) for name in _ALLOWED}
    rubrics = {a: _read_checked(f"{a}.txt", folder, _RUBRIC_ALLOWED, set()) for a in aspects}
    return JudgeTemplates(texts["system.txt"], texts["one-aspect.txt"], texts["all-aspects.txt"], rubrics)


def _read_checked(name: str, folder: Path | None, allowed: set[str], required: set[str]) -> str:
    text, where = _read_template(name, folder)
    used = _placeholders(text, where)
    if unknown := sorted(used - allowed):
        raise ConfigError(
            f"{where}: unknown placeholder ${unknown[0]} (allowed: {', '.join('$' + a for a in sorted(allowed))})"
        )
    if missing := sorted(required - used):
        raise ConfigError(f"{where}: missing placeholder ${missing[0]} (the judge needs it)")
    return text.strip() + "\n"


def _read_template(name: str, folder: Path | None) -> tuple[str, str]:
    """The text of template `name` and where it came from (for messages)."""
    if folder is not None and (folder / name).is_file():
        path = folder / name
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read judge template: {exc}") from exc
    packaged = _packaged_template(name)
    if packaged is None:
        where = f"{folder / name} or the shipped templates" if folder is not None else "the shipped templates"
        raise ConfigError(f"no judge template {name!r} in {where}")
    return packaged, f"zephyr/{_PACKAGE_DIR}/{name}"


@cache
def _packaged_template(name: str) -> str | None:
    resource = resources.files("zephyr").joinpath(f"{_PACKAGE_DIR}/{name}")
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


def _placeholders(text: str, where: str) -> set[str]:
    """The `$name` / `${name}` placeholders of a template; a stray `$` is an error (`$$` writes one)."""
    names = set()
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            line = text.count("\n", 0, match.start("invalid")) + 1
            raise ConfigError(f"{where}:{line}: stray '$' (write '$$' for a dollar sign)")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


# ---------------------------------------------------------------------------------------------------------
# Order of the completions


def shuffle_order(n: int, seed: int, key: str = "") -> list[int]:
    """A seeded permutation: `order[position]` is the index of the completion shown at that position.

    The seed is derived from `seed` and `key` through SHA-256 (not Python's salted `hash`), so the order is
    the same in every process and does not depend on which other prompts are judged.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def balanced_order(base: Sequence[int], repeat: int, repeats: int) -> list[int]:
    """The order of repeat `repeat` of `repeats` in a balanced design over `base` (the first repeat's order).

    Repeats come in pairs: repeat 2j shows `base` rotated left by j × step, repeat 2j + 1 the reverse of
    that, with step = n // (repeats // 2) (at least 1). Two repeats put every completion at the mean position
    (n - 1) / 2, which cancels a bias that grows with the position; n repeats (n even) show every completion
    at every position once, which cancels any bias that depends on the position alone.
    """
    n = len(base)
    if n == 0:
        return []
    step = max(1, n // max(1, repeats // 2))
    k = (repeat // 2) * step % n
    rotated = [*base[k:], *base[:k]]
    return rotated[::-1] if repeat % 2 else rotated


def positions_from_order(order: Sequence[int]) -> list[int]:
    """The inverse permutation: `positions[i]` is where completion `i` was shown (0 = first)."""
    positions = [0] * len(order)
    for position, index in enumerate(order):
        positions[index] = position
    return positions


def unshuffle(by_position: Sequence, order: Sequence[int]) -> list:
    """Values read in prompt order (`by_position[p]` for the completion shown at `p`), by completion index."""
    if len(by_position) != len(order):
        raise ValueError(f"{len(by_position)} values for {len(order)} positions")
    result = [None] * len(order)
    for position, index in enumerate(order):
        result[index] = by_position[position]
    return result


# ---------------------------------------------------------------------------------------------------------
# Rendering


def build_judge_messages(
    prompt_messages: Sequence[Mapping[str, str]],
    completions: Sequence[str],
    aspect: str | None,
    scale: int,
    seed: int,
    *,
    key: str = "",
    templates: JudgeTemplates | None = None,
    order: Sequence[int] | None = None,
) -> tuple[list[dict[str, str]], list[int]]:
    """The judge's chat messages for one prompt, and the order the completions are shown in.

    `aspect` names one aspect (one call per aspect) or is None (every aspect of `templates` in one call).
    The completions are shuffled with `shuffle_order(len(completions), seed, key + "/" + layout)`: pass the
    prompt id as `key` so each prompt gets its own order, and each aspect's call a different one (or give
    the `order` to show them in). Read the ratings back with `zephyr.judge.parsing` in prompt order and map
    them with `unshuffle(..., order)`.
    """
    templates = templates if templates is not None else load_templates()
    _check_scale(scale)
    if not completions:
        raise ValueError("no completions to judge")
    if aspect is not None and aspect not in templates.rubrics:
        raise ConfigError(f"unknown aspect {aspect!r}; known: {', '.join(templates.aspects)}")
    if order is None:
        order = shuffle_order(len(completions), seed, f"{key}/{aspect or 'all'}")
    elif sorted(order) != list(range(len(completions))):
        raise ValueError(f"order {list(order)} is not a permutation of the {len(completions)} completions")
    order = list(order)
    fields = {
        "n": str(len(completions)),
        "scale_max": str(scale),
        "scale_note": _scale_note(scale),
        "instruction": render_instruction(prompt_messages),
        "outputs": render_outputs([completions[i] for i in order]),
    }
    if aspect is not None:
        fields |= {
            "aspect": aspect_label(aspect),
            "rubric": _render_rubric(templates.rubrics[aspect], scale),
            "answer_format": answer_format(len(completions), scale, None),
        }
        user = _substitute(templates.one_aspect, fields)
    else:
        fields |= {
            "aspect_list": ", ".join(aspect_label(a) for a in templates.aspects),
            "rubrics": "\n\n".join(_render_rubric(templates.rubrics[a], scale) for a in templates.aspects),
            "answer_format": answer_format(len(completions), scale, templates.aspects),
        }
        user = _substitute(templates.all_aspects, fields)
    system = _substitute(templates.system, {"scale_max": str(scale)})
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}], order


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ConfigError(f"rating scale must be one of {', '.join(map(str, SCALES))}, got {scale}")


def _substitute(template: str, fields: Mapping[str, str]) -> str:
    # Placeholders were checked at load time; `substitute` still fails loudly if that was bypassed.
    return string.Template(template).substitute(fields)


def level_labels(scale: int) -> list[str]:
    """The ratings each rubric level covers: `['1', …, '5']` on 1–5, `['1-2', …, '9-10']` on 1–10."""
    _check_scale(scale)
    width = scale // LEVELS
    return [str(lo) if width == 1 else f"{lo}-{lo + width - 1}" for lo in range(1, scale + 1, width)]


def _render_rubric(rubric: str, scale: int) -> str:
    labels = {f"b{i}": label for i, label in enumerate(level_labels(scale), start=1)}
    return _substitute(rubric, labels | {"scale_max": str(scale)}).strip()


def _scale_note(scale: int) -> str:
    if scale == LEVELS:
        return ""
    return (
        "\nEach rubric level covers two ratings: give the higher one when the answer fully fits the level, "
        "the lower one when it only just reaches it.\n"
    )


def render_instruction(prompt_messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt as the judge sees it: a lone user message as is, anything longer as a labelled transcript."""
    if not prompt_messages:
        raise ValueError("no prompt messages")
    if len(prompt_messages) == 1 and prompt_messages[0]["role"] == "user":
        return prompt_messages[0]["content"].strip()
    turns = [f"[{m['role'].capitalize()}]\n{m['content'].strip()}" for m in prompt_messages]
    return "\n\n".join(turns) + "\n\n(The answers below continue this conversation.)"


def render_outputs(responses: Sequence[str]) -> str:
    """The completions in prompt order, each under a `### Output k` heading (k from 1)."""
    return "\n\n".join(
        f"### {OUTPUT_LABEL} {k}\n{response.strip()}" for k, response in enumerate(responses, start=1)
    )


def answer_format(n: int, scale: int, aspects: Sequence[str] | None) -> str:
    """The answer format the parser reads: one block per output, a rationale, then the rating line(s).

    With `aspects=None` each block ends with `Rating: N`; otherwise with one `Aspect: N` line per aspect.
    """
    rating = f"<a whole number from 1 to {scale}>"
    if aspects is None:
        lines = [f"Rating: {rating}"]
        rationale = "<one to three sentences on how the answer meets the rubric>"
    else:
        lines = [f"{aspect_label(a)}: {rating}" for a in aspects]
        rationale = "<one to three sentences covering each aspect>"
    blocks = ["\n".join([f"{OUTPUT_LABEL} {k}", f"Rationale: {rationale}", *lines]) for k in range(1, n + 1)]
    intro = (
        f"Write exactly {n} block{'s' if n != 1 else ''}, one per answer, in this form and order, "
        "with nothing after the last block:"
    )
    return intro + "\n\n" + "\n\n".join(blocks)
