"""The two ways teachers write dSFT dialogues, as pure functions: seeds, prompts, parsing, turn counts.

- `self_instruct`: the teacher answers a seed instruction x⁰ with y⁰, then writes a new, more specific or
  harder instruction x¹ on the same topic given (x⁰, y⁰) (`refine_request`, read back by
  `parse_refined_instruction`), answers it, … for J rounds; the final pair (x_J, y_J) is the dialogue.
- `ultrachat`: a user simulator and the assistant talk for a number of exchanges drawn per dialogue
  (`draw_turns`). The simulator is an ordinary chat model that sees the dialogue with the roles swapped
  (`user_simulator_view`): its own earlier messages as the assistant's turns, the assistant's replies as
  the user's, so that "the next assistant turn" it writes is the user's next message.

Seeds follow UltraChat's three sectors: questions about the world (`world`), creative writing (`writing`)
and assistance on given material (`material`: an instruction plus the text it is about). The runner
(`zephyr.stages.generate.run`) does the I/O and the calls to the models.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zephyr.data.schema import Problem, json_type

STRATEGIES = ("self_instruct", "ultrachat")
SECTORS = ("world", "writing", "material")
SEED_KEYS = ("id", "sector", "text", "material")
# A refined instruction longer than this is taken for an answer that ignored the format.
MAX_INSTRUCTION_CHARS = 2000


@dataclass(frozen=True)
class Seed:
    """One seed: an opening question or instruction (`text`), and for the `material` sector the material
    it is about (`material`), which is shown after the instruction."""

    id: str
    sector: str
    text: str
    material: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Seeds


def check_seed(record: Any) -> list[Problem]:
    """Problems of one seed record `{"id", "sector", "text", "material"?}` (empty when valid).

    `material` is required for the `material` sector and not allowed for the others (it would be silently
    unused); other keys are refused so that a misspelt `material` is not dropped either.
    """
    if not isinstance(record, dict):
        return [Problem("record", f"must be an object, got {json_type(record)}")]
    problems = [
        Problem(key, f"unknown key (expected {', '.join(SEED_KEYS)})")
        for key in record
        if key not in SEED_KEYS
    ]
    for key in ("id", "sector", "text"):
        value = record.get(key)
        if key not in record:
            problems.append(Problem(key, "missing"))
        elif not isinstance(value, str):
            problems.append(Problem(key, f"must be a string, got {json_type(value)}"))
        elif not value.strip():
            problems.append(Problem(key, "is empty"))
    sector = record.get("sector")
    if isinstance(sector, str) and sector.strip() and sector not in SECTORS:
        problems.append(Problem("sector", f"unknown sector {sector!r} (expected {', '.join(SECTORS)})"))
    material = record.get("material")
    if sector == "material":
        if not isinstance(material, str) or not material.strip():
            shown = "missing" if "material" not in record else f"got {json_type(material)} {material!r:.40}"
            problems.append(Problem("material", f"sector 'material' needs a non-empty string ({shown})"))
    elif "material" in record:
        problems.append(Problem("material", f"only used by sector 'material' (sector is {sector!r})"))
    return problems


def seed_from_record(record: Mapping[str, Any]) -> Seed:
    """A `Seed` from a record that passed `check_seed` (texts stripped of surrounding whitespace)."""
    material = record.get("material")
    return Seed(
        id=record["id"].strip(),
        sector=record["sector"],
        text=record["text"].strip(),
        material=material.strip() if isinstance(material, str) else None,
    )


def dialogue_id(seed: Seed, strategy: str) -> str:
    """The prompt_id of a seed's dialogue: sha256 of what it is made from (content and strategy, not the
    seed's id, so renaming a seed keeps its dialogue and two seeds with the same content are one)."""
    payload = {"strategy": strategy, "sector": seed.sector, "text": seed.text, "material": seed.material}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compose_prompt(instruction: str, material: str | None) -> str:
    """The user message: the instruction, then the material it is about (when there is one)."""
    return instruction if material is None else f"{instruction}\n\n{material}"


# ---------------------------------------------------------------------------------------------------------
# Random draws keyed by a dialogue, so they do not depend on the order or company it is generated in


def _keyed_int(*parts: object) -> int:
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def draw_turns(prompt_id: str, seed: int, min_turns: int, max_turns: int) -> int:
    """How many user/assistant exchanges a dialogue has: uniform in [min_turns, max_turns], fixed by
    (seed, prompt_id), so a resumed run draws what an uninterrupted one would have."""
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    return random.Random(_keyed_int("turns", seed, prompt_id)).randint(min_turns, max_turns)


def sampling_seed(seed: int, prompt_id: str, step: str) -> int:
    """The sampling seed of one model call of a dialogue (`step` names it, e.g. "answer-2")."""
    return _keyed_int("sample", seed, prompt_id, step) % 2**31


def order_key(seed: int, prompt_id: str) -> int:
    """Where a dialogue falls in the seeded order of a run: `num_prompts` takes the first ones, so a larger
    `num_prompts` keeps the dialogues of a smaller one and mixes the sectors."""
    return _keyed_int("order", seed, prompt_id)


# ---------------------------------------------------------------------------------------------------------
# self_instruct: refining an instruction

REFINE_TEMPLATE = """\
Below is an instruction that a user gave to an AI assistant, followed by the assistant's answer.

Instruction:
{instruction}

Answer:
{answer}

Write one new instruction on the same topic that asks for something more specific or more demanding than \
the instruction above, so that answering it well takes more knowledge, reasoning or care. {context_rule}

Reply with the new instruction only, on a line that starts with "New instruction:"."""

_STANDALONE_RULE = "The new instruction must make sense on its own, without the text above."
_MATERIAL_RULE = (
    "The new instruction is about the same material, which will be given again after it: refer to it as "
    '"the text" and do not copy it.'
)


def refine_request(instruction: str, answer: str, material: str | None = None) -> list[dict[str, str]]:
    """The conversation that asks the teacher for a refined instruction, given the last (x, y).

    `instruction` is the instruction part of x; with `material` the teacher is shown x as the user saw it
    (instruction and material) and asked for a new instruction about the same material.
    """
    rule = _STANDALONE_RULE if material is None else _MATERIAL_RULE
    text = REFINE_TEMPLATE.format(
        instruction=compose_prompt(instruction, material), answer=answer.strip(), context_rule=rule
    )
    return [{"role": "user", "content": text}]


# A line that introduces the instruction: "New instruction:", "**Refined Instruction:**", "### New instruction".
_MARKER = re.compile(
    r"^[ \t>*_#`-]*(?P<qualifier>(?:new|refined|improved|rewritten|harder|revised)[ \t]+)?instruction"
    r"[ \t]*[*_]*[ \t]*(?::|$)[ \t]*[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


def parse_refined_instruction(answer: str, previous: str, *, truncated: bool = False) -> str | None:
    """The new instruction in a teacher's answer to `refine_request`, or None when there is none.

    Read, in order of preference:
    - the paragraph after the last "New instruction:"-style marker (qualified markers such as "Refined
      instruction" win over a plain "Instruction:", which may be an echo of the prompt);
    - without a marker, the answer itself when it is one paragraph (after an optional preamble paragraph
      ending in a colon) that reads as a request: a question, or a sentence opening with an imperative verb
      ("Explain ...", "Write ..."). An answer that merely talks about the topic is not taken for an
      instruction: a wrong instruction costs more than keeping the previous one.
    Quotes and emphasis around it are removed. None when that leaves nothing, text longer than
    `MAX_INSTRUCTION_CHARS`, the previous instruction unchanged, or, for an answer cut by the token limit
    (`truncated`), a paragraph that runs to the end of the answer (it may be cut short).
    """
    text = answer.replace("\r\n", "\n").strip()
    markers = list(_MARKER.finditer(text))
    # A marker with nothing after it is a failed answer, not an instruction that reads "New instruction:".
    found = _after_marker(text, markers) if markers else _request_paragraph(text)
    if found is None:
        return None
    candidate, runs_to_end = found
    if truncated and runs_to_end:
        return None
    candidate = _unwrap(candidate)
    if not candidate or len(candidate) > MAX_INSTRUCTION_CHARS:
        return None
    if _normalized(candidate) == _normalized(previous):
        return None
    return candidate


def _after_marker(text: str, matches: list[re.Match[str]]) -> tuple[str, bool] | None:
    """The paragraph after the preferred marker, and whether it is the end of the text."""
    qualified = [m for m in matches if m["qualifier"]]
    match = (qualified or matches)[-1]
    rest = text[match.end() :].lstrip(" \t")
    if rest.startswith("\n"):  # the marker stands on a line of its own: the instruction is the next paragraph
        rest = rest.lstrip()
    parts = _PARAGRAPH_BREAK.split(rest, maxsplit=1)
    paragraph = parts[0].strip()
    return (paragraph, len(parts) == 1) if paragraph else None


# First words of a request without a marker: imperative verbs and question words.
_REQUEST_START = re.compile(
    r"^(?:please\s+)?(?:analy[sz]e|assess|calculate|classify|compare|compose|contrast|convert|create|critique|debate|"
    r"define|describe|design|develop|discuss|draft|evaluate|examine|explain|explore|extract|find|generate|"
    r"give|identify|illustrate|imagine|investigate|list|name|outline|plan|predict|propose|provide|rank|"
    r"rewrite|show|solve|suggest|summari[sz]e|tell|trace|translate|turn|use|write|"
    r"can|could|how|in what|what|when|where|which|who|why|would)\b",
    re.IGNORECASE,
)


def _request_paragraph(text: str) -> tuple[str, bool] | None:
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    if len(paragraphs) == 2 and paragraphs[0].endswith(":"):  # "Here is a harder instruction:"
        paragraphs = paragraphs[1:]
    if len(paragraphs) != 1:
        return None
    paragraph = paragraphs[0]
    unwrapped = _unwrap(paragraph)
    if not (unwrapped.endswith("?") or _REQUEST_START.match(unwrapped)):
        return None
    return paragraph, True


def _unwrap(text: str) -> str:
    """Remove emphasis and quotes wrapped around the whole text (repeatedly: **"..."**). A pair counts only
    when neither mark occurs inside: `"a" and "b"` is not one quotation."""
    while True:
        before = text
        for opening, closing in (("**", "**"), ("__", "__"), ("*", "*"), ("_", "_"), *_QUOTES.items()):
            inner = text[len(opening) : len(text) - len(closing)]
            wrapped = len(text) >= len(opening) + len(closing) and text.startswith(opening)
            if wrapped and text.endswith(closing) and opening not in inner and closing not in inner:
                text = inner.strip()
        if text == before:
            return text


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


# ---------------------------------------------------------------------------------------------------------
# ultrachat: the user simulator

USER_SIMULATOR_PROMPT = """\
You are a curious human user talking with an AI assistant. In this conversation your own messages appear as \
the assistant's turns and the AI assistant's replies appear as the user's turns. Write your next message to \
the AI assistant: a follow-up question, a request for more detail or for a change, or a new related \
request, in one or a few sentences, in the first person. Write only your message; do not answer it yourself \
and do not write the AI assistant's part."""

# What a curious user of each sector tends to ask next (UltraChat's sectors had their own user prompts).
SECTOR_HINTS = {
    "world": "Ask about something the assistant's reply mentioned, or go deeper into the topic.",
    "writing": "You may ask for changes to the piece, a continuation, or a new piece in another form or style.",
    "material": (
        "You may ask more about the material, or for another task on it, such as a summary, a rewrite, "
        "questions about it or a translation."
    ),
}

# The swapped dialogue opens with this user turn, so that it alternates user/assistant from the start as
# strict chat templates require; the simulator's first message (the seed's opening) answers it.
SIMULATOR_KICKOFF = "Start the conversation with your first message."


def user_simulator_system_prompt(sector: str, custom: str | None = None) -> str:
    """The simulator's system prompt: `custom` when a recipe sets one, else the default with the sector's hint."""
    if custom is not None:
        return custom
    return f"{USER_SIMULATOR_PROMPT} {SECTOR_HINTS[sector]}"


def user_simulator_view(messages: Sequence[Mapping[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """The dialogue as the user simulator sees it: its system prompt, the kickoff, then every message with
    user and assistant swapped. `messages` is the dialogue so far (user first, ending with the assistant)."""
    swap = {"user": "assistant", "assistant": "user"}
    view = [{"role": "system", "content": system_prompt}, {"role": "user", "content": SIMULATOR_KICKOFF}]
    view += [{"role": swap[m["role"]], "content": m["content"]} for m in messages]
    return view


_USER_PREFIX = re.compile(r"^\s*[*_]*(?:user|human|me)[*_]*\s*:\s*[*_]*\s*", re.IGNORECASE)
_ASSISTANT_LINE = re.compile(
    r"^[ \t]*[*_]*(?:assistant|ai assistant|ai|bot)[*_]*[ \t]*:", re.IGNORECASE | re.MULTILINE
)


def clean_user_turn(text: str) -> str:
    """The user simulator's message without the role prefix it may write ("User:") and without any
    assistant turn it went on to write ("Assistant: ..."); empty when nothing is left."""
    text = _USER_PREFIX.sub("", text.strip(), count=1)
    cut = _ASSISTANT_LINE.search(text)
    if cut is not None:
        text = text[: cut.start()]
    return _unwrap(text.strip())
