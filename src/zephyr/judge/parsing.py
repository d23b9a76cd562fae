"""Ratings read from a judge's answer: from its text, or from the probabilities of its rating tokens.

Generic, rubric-free readers (each returns `zephyr.judge.rating.Rating`); a protocol's own answer format
and its parser (UltraFeedback's, FastChat's, alpaca_eval's) live with the stage that follows it.

Text mode, one rating (`parse_rating`). The text is cleaned first (markdown `*` and backticks removed,
dashes unified, scale statements such as "on a scale of 1 to 10" or "(1-10)" and references such as
"Output 2" dropped so their digits are not read as ratings). Then the first of these tiers that matches
anywhere decides, and within it the LAST match in the text wins (a judge states its final verdict last):

1. a double-bracketed number, `[[8]]` (MT-Bench's format);
2. a marker word (`rating`, `score`, `grade`, `verdict`; `scores` and `overall` before `:`) followed in the
   same sentence by a number: "Rating: 8", "Score: 7.5", "Final score: 9", "My rating for this is 6";
3. a verdict verb (`give`, `rate`, `assign`, `award`, `deserve`, `earn`, `merit`) with an object or an
   article before the number: "I'd give it a 9.", "I would rate this response 8 out of 10", "deserves an
   8" (not "gives 2 examples");
4. a fraction: "8/10", "4 out of 5";
5. a single-bracketed number, `[8]` (a citation such as "[2]" reads as a rating too, when nothing above
   matched);
6. a last line that holds only a number: "9", "(9)", "Output 1: 4".

The number read is then checked: followed by "/D" or "out of D" with D not the scale → "wrong scale";
followed by a second number as a range or alternative ("7-8", "7 or 8") → "ambiguous"; outside 1..scale →
"out of range". No tier matches → "no rating found". Numbers written as words are not read.

Text mode, several completions (`parse_ratings`, `parse_aspect_ratings`): the answer is split into blocks at
headers "Output k" (also "Response k", "Completion k"; at line starts when they cover every k, else
anywhere). A completion's rating comes from its LAST block that yields a verdict, so a closing summary
("Output 1: 4") overrides the discussion above it.

Logprobs mode (`expected_rating`): the expected value of the rating under the judge's next-token
distribution at the answer position, renormalised over the tokens that are valid ratings.

Failure reasons of these readers are a small fixed vocabulary (`REASONS`), counted per reason by the
statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from zephyr.judge.rating import Rating

NO_RATING = "no rating found"
OUT_OF_RANGE = "out of range"
WRONG_SCALE = "wrong scale"
AMBIGUOUS = "ambiguous"
NO_RATING_TOKEN = "no rating token in top logprobs"
REASONS = (NO_RATING, OUT_OF_RANGE, WRONG_SCALE, AMBIGUOUS, NO_RATING_TOKEN)


# ---------------------------------------------------------------------------------------------------------
# One rating in text

_NUM = r"(?P<num>-?\d+(?:\.\d+)?)"
# What may follow the number: a denominator, or a second number making it a range / an alternative.
_AFTER = r"(?P<after>[ \t]*(?:/|out\s+of)[ \t]*(?P<den>\d+(?:\.\d+)?)|[ \t]*(?:-|to|or)[ \t]*-?\d)?"
# Between a marker and its number: same line, same sentence, no other digit.
_GAP = r"[^\d\n.!?;]{0,40}?"
_MARKER_WORDS = r"(?:ratings?|score|grade|verdict|(?:scores|overall)(?=\s*[:=]))"
_VERB_WORDS = (
    r"(?:give|gives|gave|giving|rate|rates|rated|assign|assigns|assigned|award|awards|awarded"
    r"|deserves?|earns?|merits?)"
)
# A verb counts only with an object or an article before the number: "I'd give it a 9", "deserves an 8",
# but not "gives 2 examples".
_OBJECT = r"(?:it|this|that|them|(?:the|this|that|each)\s+(?:response|answer|output|completion|one))"
_VERB_PHRASE = _VERB_WORDS + r"\s+(?:" + _OBJECT + r"\s+(?:(?:as|at)\s+)?(?:an?\s+)?|an?\s+)"

_TIERS = (
    re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]" + _AFTER),
    re.compile(r"\b" + _MARKER_WORDS + r"\b" + _GAP + _NUM + _AFTER, re.I),
    re.compile(r"\b" + _VERB_PHRASE + _NUM + _AFTER, re.I),
    re.compile(r"(?<![\d.])" + _NUM + r"(?P<after>[ \t]*(?:/|out\s+of)[ \t]*(?P<den>\d+(?:\.\d+)?))", re.I),
    re.compile(r"\[\s*" + _NUM + r"\s*\]" + _AFTER),
)
_BARE_LINE = re.compile(r"^[\s:=>#(\[-]*?" + _NUM + r"\s*(?:/\s*(?P<den>\d+))?\s*[)\]]?\s*[.!]?\s*$")

_CLEANUPS = (
    (re.compile(r"[*`]"), ""),
    (re.compile(r"[\u2012\u2013\u2014\u2015\u2212]"), "-"),
    (re.compile(r"\b(?:on\s+)?(?:a|the)\s+scale\s+(?:of|from)\s+\d+\s*(?:-|to)\s*\d+", re.I), " "),
    (re.compile(r"\bfrom\s+[01]\s*(?:-|to)\s*\d+\b", re.I), " "),
    (re.compile(r"[(\[]\s*[01]\s*(?:-|to)\s*\d+\s*[)\]]", re.I), " "),
    # Capitalised labels only: "I'd rate this response 8" is a rating, "better than Output 2" is not.
    (re.compile(r"\b(Output|Response|Completion|Assistant|Answer|Text|OUTPUT|RESPONSE)\s*#?\s*\d+\b"), r"\1"),
)


def _clean(text: str) -> str:
    for pattern, replacement in _CLEANUPS:
        text = pattern.sub(replacement, text)
    return text


def parse_rating(text: str, scale: int) -> Rating:
    """The rating a judge's answer gives one completion on a 1..`scale` scale (rules: module docstring)."""
    text = _clean(text)
    for tier in _TIERS:
        matches = list(tier.finditer(text))
        if matches:
            return _checked(matches[-1], scale)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and (match := _BARE_LINE.match(lines[-1])):
        return _checked(match, scale)
    return Rating(None, NO_RATING)


def _checked(match: re.Match[str], scale: int) -> Rating:
    """The number of a match, checked against the scale, its denominator and a trailing range."""
    groups = match.groupdict()
    if groups.get("after") and groups.get("den") is None:
        return Rating(None, AMBIGUOUS)
    if groups.get("den") is not None and float(groups["den"]) != scale:
        return Rating(None, WRONG_SCALE)
    value = float(groups["num"])
    if not 1 <= value <= scale:
        return Rating(None, OUT_OF_RANGE)
    return Rating(value)


# ---------------------------------------------------------------------------------------------------------
# Several completions in one answer

_HEADER_WORDS = r"(?:output|response|completion|answer|text)"
_LINE_HEADER = re.compile(r"^[ \t#*>_-]*" + _HEADER_WORDS + r"\s*#?\s*(\d+)\b", re.I | re.M)
# Anywhere in a line only capitalised: "I'd rate this response 8" is not a header.
_INLINE_HEADER = re.compile(r"\b(?:Output|Response|Completion|OUTPUT|RESPONSE)\s*#?\s*(\d+)\b")
_RATING_LINE = re.compile(r"\b(?:rating|score)\b\s*[:=]\s*\[*\s*-?\d", re.I)


def split_outputs(text: str, n: int) -> list[list[str]]:
    """The blocks of text about each of `n` outputs, in text order (`blocks[k - 1]` for "Output k").

    Headers at the start of a line are used when they name every output 1..n; otherwise headers anywhere
    ("Output 1: Rating 4 ... Output 2: Rating 2" on one line). A block runs from its header to the next
    header, whatever its number; headers outside 1..n only end the block before them.
    """
    headers = list(_LINE_HEADER.finditer(text))
    if not {str(k) for k in range(1, n + 1)} <= {m.group(1) for m in headers}:
        headers = list(_INLINE_HEADER.finditer(text))
    blocks: list[list[str]] = [[] for _ in range(n)]
    for i, header in enumerate(headers):
        k = int(header.group(1))
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        if 1 <= k <= n:
            blocks[k - 1].append(text[header.end() : end])
    return blocks


def parse_ratings(text: str, n: int, scale: int) -> list[Rating]:
    """One rating per output of an answer that rates `n` outputs in prompt order (`Output 1` … `Output n`).

    An output's rating comes from its last block that holds a verdict (a rating or a failure other than
    "no rating found"). Without any header: one output reads the whole text; several outputs are read from
    `Rating: N` lines in order when there are exactly n of them; otherwise every output gets
    "no rating found".
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    blocks = split_outputs(text, n)
    if not any(blocks):
        return _headerless(text, n, scale)
    return [_last_verdict([parse_rating(b, scale) for b in output_blocks]) for output_blocks in blocks]


def _headerless(text: str, n: int, scale: int) -> list[Rating]:
    if n == 1:
        return [parse_rating(text, scale)]
    lines = list(_RATING_LINE.finditer(text))
    if len(lines) != n:
        return [Rating(None, NO_RATING)] * n
    ends = [m.start() for m in lines[1:]] + [len(text)]
    return [parse_rating(text[m.start() : end], scale) for m, end in zip(lines, ends, strict=True)]


def _last_verdict(parsed: Sequence[Rating]) -> Rating:
    for rating in reversed(parsed):
        if rating.reason != NO_RATING:
            return rating
    return Rating(None, NO_RATING)


def _aspect_pattern(aspect: str) -> re.Pattern[str]:
    words = r"[\s_-]*".join(re.escape(w) for w in re.split(r"[\s_-]+", aspect))
    return re.compile(r"\b" + words + r"(?:[ \t]+(?:rating|score))?[ \t]*[:=][ \t]*(?P<rest>[^\n]*)", re.I)


def _aspect_rating(block: str, aspect: re.Pattern[str], scale: int) -> Rating:
    """The value on the block's last `Aspect: N` line."""
    matches = list(aspect.finditer(_clean(block)))
    if not matches:
        return Rating(None, NO_RATING)
    rest = matches[-1].group("rest")
    if lead := re.match(r"[\s\[(]*" + _NUM + _AFTER, rest, re.I):
        return _checked(lead, scale)
    return parse_rating(rest, scale)


def parse_aspect_ratings(text: str, n: int, aspects: Sequence[str], scale: int) -> list[dict[str, Rating]]:
    """Per output, per aspect ratings of an all-aspects answer (`Helpfulness: 4` lines in each block).

    Aspect names match case-insensitively with `-`, `_` or spaces between words, optionally followed by
    "rating" / "score". Each (output, aspect) is read from the last block of that output holding the
    aspect's line, and within it from the last such line.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    blocks = split_outputs(text, n)
    if not any(blocks) and n == 1:
        blocks = [[text]]
    patterns = {a: _aspect_pattern(a) for a in aspects}
    return [
        {a: _last_verdict([_aspect_rating(b, p, scale) for b in output_blocks]) for a, p in patterns.items()}
        for output_blocks in blocks
    ]


_RATIONALE = re.compile(r"\brationale\s*:\s*", re.I)
# "Label: N" lines, or a "Rating: N" within the line, end a rationale.
_LABELLED_NUMBER = re.compile(r"^[ \t*#>_-]*[A-Za-z][\w \t-]{0,40}:\s*[\[(*]*\s*-?\d", re.M)


def parse_rationales(text: str, n: int) -> list[str]:
    """Per output, the judge's rationale: the text after `Rationale:` up to the rating lines ("" if none).

    Taken from the output's last block that has a `Rationale:`; without one, its last block minus the rating
    lines. With one output and no header the whole answer is the block.
    """
    blocks = split_outputs(text, n)
    if not any(blocks) and n == 1:
        blocks = [[text]]
    return [_rationale(output_blocks) for output_blocks in blocks]


def _rationale(blocks: Sequence[str]) -> str:
    if not blocks:
        return ""
    with_marker = [b for b in blocks if _RATIONALE.search(b)]
    block = with_marker[-1] if with_marker else blocks[-1]
    if marker := list(_RATIONALE.finditer(block)):
        block = block[marker[-1].end() :]
    ends = [m.start() for m in (_LABELLED_NUMBER.search(block), _RATING_LINE.search(block)) if m]
    if ends:
        block = block[: min(ends)]
    return block.strip().lstrip(":").strip()


# ---------------------------------------------------------------------------------------------------------
# Logprobs mode

_SPACE_MARKERS = "\u2581\u0120"  # SentencePiece "▁" and byte-level BPE "Ġ" in raw token strings
_DIGITS = re.compile(r"[0-9]+")
_TEN_CONTINUATION = re.compile(r"0(?![0-9])")  # "0", "0/", "0." after "1"


def _token_value(token: str) -> int | None:
    """The integer a token spells (surrounding whitespace ignored), or None."""
    text = token.strip().strip(_SPACE_MARKERS).strip()
    if not _DIGITS.fullmatch(text) or (len(text) > 1 and text[0] == "0"):
        return None
    return int(text)


def rating_distribution(
    top_logprobs: Mapping[str, float], scale: int, *, after_one: Mapping[str, float] | None = None
) -> dict[int, float]:
    """The judge's probability of each rating 1..`scale`, renormalised over the valid rating tokens.

    `top_logprobs` maps token → log-probability at the position where the rating is written. Tokens that
    spell the same number (" 8", "8") add up; tokens that are not a whole number in 1..scale are dropped.

    "10" on the 1–10 scale: a tokenizer with a "10" token gives it directly. Tokenizers that split digits
    (Mistral, Llama 2, SmolLM2) write 10 as "1" then "0", so the mass of "1" holds both 1 and 10. Pass the
    top logprobs of the next position after a forced "1" as `after_one` to split it: the "1" mass goes to 10
    in proportion to the mass of "0" there, is dropped for other digits (11–19 are not ratings), and stays
    with 1 for everything else, all relative to the listed mass. Without `after_one`, "1" counts as 1, which
    biases such judges low on the 1–10 scale: prefer the 1–5 scale for them.
    Returns {} when no listed token is a valid rating.
    """
    mass: dict[int, float] = {}
    for token, logprob in top_logprobs.items():
        value = _token_value(token)
        if value is not None and 1 <= value <= scale and not math.isnan(logprob):
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    if after_one is not None and scale >= 10 and mass.get(1, 0.0) > 0:
        _split_one(mass, after_one)
    total = sum(mass.values())
    if total <= 0:
        return {}
    return {value: p / total for value, p in sorted(mass.items()) if p > 0}


def _split_one(mass: dict[int, float], after_one: Mapping[str, float]) -> None:
    """Move the share of the "1" mass that continues with "0" to rating 10 (see `rating_distribution`).

    Continuation tokens are read without stripping: after "1", " 0" writes "1 0", not 10.
    """
    probs = [(t, math.exp(lp)) for t, lp in after_one.items() if not math.isnan(lp)]
    listed = sum(p for _, p in probs)
    if listed <= 0:
        return
    ten = sum(p for t, p in probs if _TEN_CONTINUATION.match(t))
    other_digit = sum(p for t, p in probs if _DIGITS.match(t) and not _TEN_CONTINUATION.match(t))
    p_one = mass.pop(1)
    mass[10] = mass.get(10, 0.0) + p_one * ten / listed
    mass[1] = p_one * (listed - ten - other_digit) / listed


def expected_rating(
    top_logprobs: Mapping[str, float], scale: int, *, after_one: Mapping[str, float] | None = None
) -> Rating:
    """The expected rating under `rating_distribution`; "no rating token in top logprobs" when it is empty.

    Always a score when any valid rating token has mass, so small local judges that rarely follow the
    answer format still rate every completion.
    """
    distribution = rating_distribution(top_logprobs, scale, after_one=after_one)
    if not distribution:
        return Rating(None, NO_RATING_TOKEN)
    return Rating(sum(value * p for value, p in distribution.items()))
