"""Curation filters for conversation records (ultrachat_200k schema): pure, deterministic, order-preserving.

Each filter takes records and returns a `FilterResult`: the records kept, in input order, and the records
removed, each with the reason. Filters that drop a dialogue drop all of it: a conversation with one bad
answer would still teach that answer. Where one record duplicates another, the first occurrence is kept.
No filter mutates its input; `truecase_records` returns new records.

Text normalisations used below:
- *normalised text* (exact duplicates): Unicode NFKC, lowercased, runs of whitespace collapsed to one space;
- *words* (near duplicates, decontamination): NFKC, lowercased, the runs of word characters (`\\w+`), so
  punctuation separates words and is otherwise dropped ("don't" -> "don", "t" on both sides of a comparison).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zephyr.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Removal:
    """A record a filter removed, and why (one line, quoting what matched where useful)."""

    record: dict
    reason: str


@dataclass
class FilterResult:
    kept: list[dict]
    removed: list[Removal] = field(default_factory=list)


def _messages(record: Mapping[str, Any]) -> list[dict]:
    return record["messages"]


def first_user_message(record: Mapping[str, Any]) -> str:
    """The opening user message of a conversation (after any system message); `prompt` when it has none."""
    for message in _messages(record):
        if message["role"] == "user":
            return message["content"]
    return record["prompt"]


def _normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped: the unit of near-duplicate and contamination n-grams."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


# ---------------------------------------------------------------------------------------------------------
# Truecasing
#
# A sentence start is the start of the text, a position after ".", "!" or "?" followed by spaces or tabs, or
# the start of a line, unless the line before ends in a letter, digit, "," ";" or "-" (then the sentence runs
# on across the line break: verse, hard-wrapped prose). The word at a sentence start is capitalised only when
# it is a plain lowercase word: letters only (apostrophes and hyphens between them allowed), all lowercase,
# optionally followed by punctuation. So "iPhone", "eBay", "e.g.", "x86", "my_var", "print()", "`code`",
# URLs and file names are never changed.
# Not a sentence end: "." after an abbreviation ("etc.", "vs.", "Dr.", ...), after a token with an inner dot
# ("e.g.", "i.e.", "a.m.", "example.com.") or as part of an ellipsis ("..."). Never touched: fenced code
# blocks (``` or ~~~, to the closing fence or the end of the text), inline code spans (`...`) and lines
# indented by four spaces or a tab (Markdown's indented code). An indented line is not a sentence start
# (the character after the newline is a space). When in doubt, nothing changes.

_FENCED = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_INDENTED_CODE = re.compile(r"^(?: {4}|\t).*$", re.MULTILINE)  # Markdown's indented code blocks
_START = re.compile(r"\n|(?<=[.!?])[ \t]+")
_TRAILING_PUNCT = ".,;:!?)]}\"'’”…"
_TOKEN = re.compile(r"\S+")
# fmt: off
_ABBREVIATIONS = frozenset((
    "etc", "vs", "cf", "approx", "incl", "esp", "fig", "figs", "eq", "eqs", "vol", "pp", "al", "ca", "mr",
    "mrs", "ms", "dr", "prof", "sr", "jr", "dept", "viz", "resp", "avg",
))
# fmt: on


def _protected_spans(text: str) -> list[tuple[int, int]]:
    spans = [m.span() for m in _FENCED.finditer(text)]
    for m in [*_INLINE_CODE.finditer(text), *_INDENTED_CODE.finditer(text)]:
        if not any(a <= m.start() < b for a, b in spans):
            spans.append(m.span())
    return spans


def _is_plain_lowercase_word(token: str) -> bool:
    word = token.rstrip(_TRAILING_PUNCT)
    parts = re.split(r"['’-]", word)
    return bool(word) and all(p.isalpha() and p.islower() for p in parts)


def _ends_sentence(text: str, punct_at: int) -> bool:
    """Whether the "." / "!" / "?" at `punct_at` ends a sentence (see the rules above)."""
    if text[punct_at] != ".":
        return True
    begin = punct_at
    while begin > 0 and not text[begin - 1].isspace():
        begin -= 1
    token = text[begin:punct_at]
    token = token.lstrip("(\"'")
    # an inner dot: "e.g", "a.m", "example.com", and an ellipsis ("wait.." before its last dot)
    return "." not in token and token.lower() not in _ABBREVIATIONS


def _lowercase_sentence_starts(text: str) -> Iterator[int]:
    """Sentence starts (rules above) whose character is a lowercase letter: the only ones that can change."""
    if text[:1].islower():
        yield 0
    for m in _START.finditer(text):
        start = m.end()
        if start >= len(text) or not text[start].islower():  # the common case: checked first
            continue
        if _ends_sentence(text, m.start() - 1) if m.group() != "\n" else not _continues(text, m.start()):
            yield start


def _continues(text: str, newline_at: int) -> bool:
    """Whether the line ending at `newline_at` runs on into the next one (see the rules above)."""
    line_start = text.rfind("\n", 0, newline_at) + 1
    last = text[line_start:newline_at].rstrip()[-1:]
    return bool(last) and (last.isalnum() or last in ",;-–")


def truecase(text: str) -> str:
    """Capitalise the first letter of each sentence (the rules are in the comment above this function)."""
    starts = list(_lowercase_sentence_starts(text))
    if not starts:
        return text
    spans = _protected_spans(text)
    chars = list(text)
    for start in starts:
        if any(a <= start < b for a, b in spans):
            continue
        token = _TOKEN.match(text, start).group()
        upper = token[0].upper()
        if len(upper) == 1 and _is_plain_lowercase_word(token):
            chars[start] = upper
    return "".join(chars)


def truecase_records(records: Iterable[dict]) -> tuple[list[dict], int]:
    """Truecase every message (and `prompt`) of each record; returns new records and how many messages
    changed."""
    out: list[dict] = []
    changed = 0
    for record in records:
        messages = []
        for message in _messages(record):
            content = truecase(message["content"])
            changed += content != message["content"]
            messages.append({**message, "content": content})
        out.append({**record, "prompt": truecase(record["prompt"]), "messages": messages})
    return out, changed


# ---------------------------------------------------------------------------------------------------------
# Refusals and AI disclaimers (ultrachat_200k removed answers like "I don't have emotions")

_APOS = "['’]"
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    # "As an AI language model, ...", "As an AI assistant", "as an artificial intelligence"
    r"\bas an? (?:ai|artificial intelligence)\b",
    r"\bas a (?:large )?language model\b",
    # "I'm just an AI", "I am an AI language model", "I'm only a language model"
    rf"\bi(?: am|{_APOS}m) (?:just |only |merely )?an? (?:ai|artificial intelligence|(?:large )?language model)\b",
    # "I don't have emotions / feelings / personal opinions / beliefs / preferences / personal experiences"
    rf"\bi (?:do not|don{_APOS}t|do n{_APOS}t) (?:have|possess|experience) (?:any )?(?:personal |human |real )?"
    r"(?:emotions|feelings|opinions|beliefs|preferences|experiences|likes or dislikes)\b",
    rf"\bi (?:am not|{_APOS}m not) (?:capable of|able to) (?:having|experiencing|feeling) "
    r"(?:emotions|feelings|opinions)\b",
    # plain refusals
    rf"\bi(?: am|{_APOS}m) sorry,? but i (?:cannot|can{_APOS}t|am unable to|{_APOS}m unable to|won{_APOS}t) "
    r"(?:help|assist|provide|fulfil|fulfill|comply|do that|create|write|generate)",
    rf"\bi (?:cannot|can{_APOS}t|am unable to) (?:fulfil|fulfill|comply with) (?:this|that|your) request\b",
)


def compile_refusal_patterns(patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    """Case-insensitive regexes; None = `DEFAULT_REFUSAL_PATTERNS`. A bad regex is a ConfigError naming it."""
    compiled = []
    for i, pattern in enumerate(DEFAULT_REFUSAL_PATTERNS if patterns is None else patterns):
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(
                f"curate.refusal_patterns[{i}]: not a valid regex ({exc}): {pattern!r}"
            ) from None
    return compiled


def _screen(patterns: Sequence[re.Pattern[str]]) -> re.Pattern[str] | None:
    """All patterns as one alternation: one scan of a message instead of one per pattern (most messages match
    none). Only for patterns without groups, whose meaning cannot change when joined; else None."""
    if not patterns or any(p.groups for p in patterns):
        return None
    try:
        return re.compile("|".join(f"(?:{p.pattern})" for p in patterns), re.IGNORECASE)
    except re.error:  # e.g. a pattern's inline global flag, valid only at the start
        return None


def drop_refusals(records: Iterable[dict], patterns: Sequence[re.Pattern[str]]) -> FilterResult:
    """Drop every dialogue in which an assistant message matches one of `patterns` (user messages may say
    anything)."""
    result = FilterResult([])
    screen = _screen(patterns)
    for record in records:
        hit = _first_refusal(record, patterns, screen)
        if hit is None:
            result.kept.append(record)
        else:
            result.removed.append(Removal(record, hit))
    return result


def _first_refusal(
    record: dict, patterns: Sequence[re.Pattern[str]], screen: re.Pattern[str] | None
) -> str | None:
    for i, message in enumerate(_messages(record)):
        if message["role"] != "assistant" or (screen is not None and not screen.search(message["content"])):
            continue
        for k, pattern in enumerate(patterns):
            m = pattern.search(message["content"])
            if m:
                return f"messages[{i}] says {m.group()!r} (refusal pattern {k})"
    return None


# ---------------------------------------------------------------------------------------------------------
# Length limits


def limit_turns(records: Iterable[dict], min_turns: int, max_turns: int | None) -> FilterResult:
    """Keep dialogues whose number of turns (user messages) lies in [min_turns, max_turns]."""
    result = FilterResult([])
    for record in records:
        turns = sum(m["role"] == "user" for m in _messages(record))
        if turns < min_turns:
            result.removed.append(Removal(record, f"{turns} turns < min_turns {min_turns}"))
        elif max_turns is not None and turns > max_turns:
            result.removed.append(Removal(record, f"{turns} turns > max_turns {max_turns}"))
        else:
            result.kept.append(record)
    return result


def limit_chars(records: Iterable[dict], min_chars: int, max_chars: int | None) -> FilterResult:
    """Drop dialogues with an assistant message shorter than `min_chars` (surrounding whitespace not
    counted) or any message longer than `max_chars`."""
    result = FilterResult([])
    for record in records:
        reason = _length_problem(_messages(record), min_chars, max_chars)
        if reason is None:
            result.kept.append(record)
        else:
            result.removed.append(Removal(record, reason))
    return result


def _length_problem(messages: list[dict], min_chars: int, max_chars: int | None) -> str | None:
    for i, message in enumerate(messages):
        n = len(message["content"].strip())
        if message["role"] == "assistant" and n < min_chars:
            return f"messages[{i}] (assistant) has {n} chars < min_chars {min_chars}"
        if max_chars is not None and n > max_chars:
            return f"messages[{i}] ({message['role']}) has {n} chars > max_chars {max_chars}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Exact duplicates


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _drop_repeated_keys(records: Iterable[dict], key_of, what: str) -> FilterResult:
    result = FilterResult([])
    first: dict[bytes, str] = {}
    for record in records:
        key = key_of(record)
        if key in first:
            result.removed.append(Removal(record, f"{what} {first[key]}"))
        else:
            first[key] = record["prompt_id"]
            result.kept.append(record)
    return result


def _conversation_key(record: dict) -> bytes:
    # \x1e / \x1f separate roles and messages: they cannot appear in normalised text and be confused.
    return _digest("\x1e".join(f"{m['role']}\x1f{_normalised(m['content'])}" for m in _messages(record)))


def dedup_conversations(records: Iterable[dict]) -> FilterResult:
    """Drop conversations equal to an earlier one (every role and message, after whitespace/case
    normalisation)."""
    return _drop_repeated_keys(records, _conversation_key, "same conversation as")


def dedup_prompts(records: Iterable[dict]) -> FilterResult:
    """Drop conversations whose first user message equals an earlier one's (whitespace/case normalised).

    One answer per prompt: a repeated prompt adds no new instruction, and copies under different ids could
    land on both sides of the train/test split.
    """
    return _drop_repeated_keys(
        records, lambda r: _digest(_normalised(first_user_message(r))), "same prompt as"
    )


# ---------------------------------------------------------------------------------------------------------
# Near duplicates (MinHash LSH over word shingles of the first user message)

SHINGLE_WORDS = 3  # word 3-grams: one changed word in a 40-word prompt keeps Jaccard ~0.86
NUM_PERM = 128
MINHASH_SEED = 1
_RECALL_AT_THRESHOLD = 0.99


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    """Word `size`-grams of `text` joined by spaces; a text shorter than `size` words is one shingle."""
    tokens = words(text)
    if not tokens:
        return set()
    if len(tokens) < size:
        return {" ".join(tokens)}
    return {" ".join(g) for g in _ngrams(tokens, size)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) for MinHash LSH: the most rows per band such that a pair at exactly `threshold` is a
    candidate with probability >= 0.99. More rows = fewer candidates to verify; the probability of a pair of
    Jaccard s is 1 - (1 - s^rows)^bands, so pairs above the threshold are found even more surely."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= _RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


def drop_near_duplicates(
    records: Iterable[dict], threshold: float, shingle_size: int = SHINGLE_WORDS
) -> FilterResult:
    """Drop dialogues whose first user message has Jaccard similarity >= `threshold` (over word shingles)
    with the first user message of an earlier kept dialogue.

    MinHash LSH finds the candidates (bands from `lsh_bands`: at least 99% recall at the threshold); each
    candidate is confirmed with the exact Jaccard of the two shingle sets, so no pair below the threshold is
    ever removed. Prompts without words are left to the other filters.
    """
    from datasketch import MinHash, MinHashLSH  # imports numpy and scipy: only when near-dedup runs

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(threshold))
    empty = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)  # copies share its permutations: built once
    kept_shingles: dict[int, set[str]] = {}
    result = FilterResult([])
    items = ((r, shingles(first_user_message(r), shingle_size)) for r in records)
    for record, sh in items:
        if not sh:
            result.kept.append(record)
            continue
        mh = empty.copy()
        mh.update_batch(s.encode("utf-8") for s in sh)
        match = _closest(lsh.query(mh), sh, kept_shingles, threshold)
        if match is None:
            lsh.insert(len(result.kept), mh)
            kept_shingles[len(result.kept)] = sh
            result.kept.append(record)
        else:
            index, similarity = match
            other = result.kept[index]["prompt_id"]
            result.removed.append(Removal(record, f"near duplicate of {other} (Jaccard {similarity:.3f})"))
    return result


def _closest(
    candidates: Iterable[int], sh: set[str], kept: Mapping[int, set[str]], threshold: float
) -> tuple[int, float] | None:
    """The earliest candidate with the highest exact Jaccard >= threshold, or None."""
    best: tuple[int, float] | None = None
    for index in sorted(candidates):
        similarity = jaccard(sh, kept[index])
        if similarity >= threshold and (best is None or similarity > best[1]):
            best = (index, similarity)
    return best


# ---------------------------------------------------------------------------------------------------------
# Decontamination against evaluation prompts


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt of an evaluation set, e.g. `EvalPrompt("mt-bench:81/1", "Compose an engaging ...")`."""

    id: str
    text: str


def eval_texts(record: Any) -> list[str]:
    """The prompts a model is evaluated on, from one record of an eval file, by its keys:
    MT-Bench questions (`turns`: every turn), conversations (`messages`: every user message), AlpacaEval
    (`instruction`), multiple choice (`query`), anything with a `prompt`. DataError when none applies."""
    if isinstance(record, dict):
        if isinstance(record.get("turns"), list):
            return [t for t in record["turns"] if isinstance(t, str)]
        if isinstance(record.get("messages"), list):
            return [
                m["content"]
                for m in record["messages"]
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
            ]
        for key in ("instruction", "query", "prompt"):
            if isinstance(record.get(key), str):
                return [record[key]]
    raise DataError(
        "no eval prompt: expected an MT-Bench question (turns), a conversation (messages), an AlpacaEval "
        "instruction (instruction), a multiple-choice item (query) or a prompt (prompt)"
    )


@dataclass
class NgramIndex:
    """The word n-grams of the eval prompts: n-gram -> indices of the prompts that contain it.

    A prompt shorter than n words is one n-gram of its own length (the whole prompt). Prompts without words
    cannot be matched (size 0, no n-grams). `starts` maps a word to the lengths of the n-grams that begin
    with it, so a text is scanned position by position and a tuple is built only where an n-gram can start.
    """

    n: int
    prompts: list[EvalPrompt]
    sizes: list[int]  # distinct n-grams per prompt
    grams: dict[tuple[str, ...], list[int]]
    starts: dict[str, set[int]]


def build_ngram_index(prompts: Sequence[EvalPrompt], n: int) -> NgramIndex:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams: dict[tuple[str, ...], list[int]] = {}
    sizes = []
    for i, prompt in enumerate(prompts):
        tokens = words(prompt.text)
        own = _ngrams(tokens, n) if len(tokens) >= n else ({tuple(tokens)} if tokens else set())
        sizes.append(len(own))
        for gram in own:
            grams.setdefault(gram, []).append(i)
    starts: dict[str, set[int]] = {}
    for gram in grams:
        starts.setdefault(gram[0], set()).add(len(gram))
    return NgramIndex(n, list(prompts), sizes, grams, starts)


def coverage(text: str, index: NgramIndex) -> dict[int, float]:
    """For each eval prompt sharing an n-gram with `text`: the share of its n-grams that `text` contains."""
    tokens = words(text)
    matched = set()
    for i, token in enumerate(tokens):
        for length in index.starts.get(token, ()):
            gram = tuple(tokens[i : i + length])
            if gram in index.grams:
                matched.add(gram)
    found: Counter[int] = Counter(i for gram in matched for i in index.grams[gram])
    return {i: count / index.sizes[i] for i, count in found.items()}


def decontaminate(
    records: Iterable[dict], index: NgramIndex, threshold: float
) -> tuple[FilterResult, dict[str, list[str]]]:
    """Drop dialogues in which some user message contains at least `threshold` of some eval prompt's
    n-grams. Also returns, for every eval prompt hit, the prompt_ids of the dialogues that hit it."""
    result = FilterResult([])
    hits: dict[str, list[str]] = {}
    for record in records:
        hit = _hits(record, index, threshold)
        if not hit:
            result.kept.append(record)
            continue
        for i in hit:
            hits.setdefault(index.prompts[i].id, []).append(record["prompt_id"])
        worst = max(hit, key=lambda i: (hit[i], -i))
        shown = ", ".join(index.prompts[i].id for i in sorted(hit))
        result.removed.append(
            Removal(
                record,
                f"contains {hit[worst]:.0%} of the n-grams of {index.prompts[worst].id} (hits: {shown})",
            )
        )
    return result, hits


def _hits(record: dict, index: NgramIndex, threshold: float) -> dict[int, float]:
    hit: dict[int, float] = {}
    for message in _messages(record):
        if message["role"] != "user":
            continue
        for i, share in coverage(message["content"], index).items():
            if share >= threshold:
                hit[i] = max(share, hit.get(i, 0.0))
    return hit
