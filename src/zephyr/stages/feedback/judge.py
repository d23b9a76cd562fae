"""The feedback judge: UltraFeedback-style ratings of the completions of prompts by an AI judge.

It builds on `zephyr.judge.client.JudgeClient` (the calls, their audit log and accounting, shared with the
judged evaluations):

- `Judge` rates the completions of prompts on UltraFeedback's aspects (`JudgeConfig`): judge prompts from
  `zephyr.stages.feedback.prompts` with the completions shuffled (seeded by the item's key and the repeat), ratings
  read back in prompt order and mapped to the completions with `unshuffle`, `repeats` judgments per
  completion and aspect with the median kept.

Rating modes (`JudgeConfig.mode`):

- `text`: the judge writes its answer; ratings are read with `parse_ratings` (one aspect per call) or
  `parse_aspect_ratings` (all aspects in one call), rationales with `parse_rationales`.
- `logprobs`: the rating is the expected value under the judge's distribution over the rating tokens
  (`expected_rating`), read where the answer format puts the rating. With a generator that is a
  `LogprobScorer` (local models) the answer is forced up to that point, skipping the rationale:
  `Output 2\\nRating: ` (one aspect per call) or `Output 2\\nHonesty: ` (all aspects); every rating digit is
  scored, so every completion gets a rating. Other generators (HTTP) write the whole answer with
  `top_logprobs`, and the distribution is read at the token where each rating line's number starts; a
  rating line that is missing gives a null rating. On the 1–10 scale, "10" written as "1" then "0" is
  separated from "1" with the distribution after a forced "1" (`expected_rating(after_one=...)`); with
  generated answers that distribution is known only where the judge wrote "1", so prefer the 1–5 scale
  for judges whose tokenizer splits digits.

Presets (`JudgeConfig.preset`): `zephyr`, the rubric and answer format above; `ultrafeedback`, UltraFeedback's
annotation protocol (`zephyr.stages.feedback.ultrafeedback`): its rubric texts from the `ultrafeedback-templates`
asset, one call per aspect on a 1-5 scale, its answer format and parser; an answer in the wrong format is
asked again with a new seed (each try in the audit log, `attempt` 1, 2, ...), up to `ultrafeedback.ATTEMPTS`
answers, after which its ratings are null with the reason "format error".

Aspect names: ratings are keyed by the configured names (UltraFeedback's `instruction_following`); the
templates and the answer lines use the same words joined by "-" (`instruction-following`).

The judge id (`Judge.judge_id`) pins the judge: the model label and a hash of everything that decides its
ratings (templates, mode, scale, layout, aspects, sampling parameters). Outputs carry it, so ratings of
different judges are never mixed unnoticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from zephyr.core.config import JudgeConfig
from zephyr.core.errors import ConfigError
from zephyr.generation import make_generator
from zephyr.generation.base import MAX_TOP_LOGPROBS, Generator, LogprobScorer, SamplingParams, TokenLogprob
from zephyr.judge import parsing
from zephyr.judge.client import JUDGE_CALL_FAILED, JudgeAnswer, JudgeClient, JudgeReply, JudgeRequest
from zephyr.judge.rating import Rating
from zephyr.models import assets
from zephyr.stages.feedback import prompts, ultrafeedback

# ---------------------------------------------------------------------------------------------------------
# Rating the completions of a prompt (AI feedback)


class JudgeItem(NamedTuple):
    """What the judge rates: the completions of one prompt, `key` = the prompt id."""

    key: str
    prompt_messages: Sequence[Mapping[str, str]]
    completions: Sequence[str]


@dataclass(frozen=True)
class Reading:
    """One `rating` of `completion` on `aspect` in repeat `repeat`, shown at `position` (0 = Output 1)."""

    completion: int
    aspect: str
    repeat: int
    position: int
    rating: Rating


@dataclass
class JudgeResult:
    """The ratings of one item's completions (in the item's order).

    `ratings[c][aspect]` is the median over the repeats that gave a rating (None when none did, with the
    most common failure in `reasons[c][aspect]`); `rationales[c][aspect]` is the judge's rationale from the
    first repeat that gave one ("" in logprobs mode with forced answers); `types[c][aspect]` the types the
    `ultrafeedback` preset's typed aspects name (helpfulness, truthfulness: UltraFeedback's `Type` line, from
    the same repeat; [] for "None"); `readings` holds every rating; `usage` the judge calls made for the item
    and their tokens (none for forced-prefix scoring).
    """

    key: str
    ratings: list[dict[str, float | None]]
    reasons: list[dict[str, str | None]]
    rationales: list[dict[str, str]]
    readings: list[Reading]
    usage: dict[str, int] = dataclasses.field(default_factory=dict)
    types: list[dict[str, list[str]]] = dataclasses.field(default_factory=list)


def template_aspect(aspect: str) -> str:
    """The template and answer-line name of a configured aspect: `instruction_following` → `instruction-following`."""
    return aspect.replace("_", "-")


Templates = prompts.JudgeTemplates | ultrafeedback.Templates


def check_judge_config(config: JudgeConfig) -> Templates:
    """Everything about a judge config that can be wrong before any model loads; returns its templates
    (the `ultrafeedback` preset's come from its asset, fetched when missing)."""
    config.validate("judge")  # what the preset fixes, for configs not built from a recipe
    prompts.level_labels(config.scale)  # the scale is one the rubrics support (ConfigError otherwise)
    names = [template_aspect(a) for a in config.aspects]
    if len(set(names)) != len(names):
        raise ConfigError(f"judge.aspects: {config.aspects} name an aspect twice")
    if config.model.system_prompt is not None:
        raise ConfigError(
            "judge.model.system_prompt: the judge's system message is the template system.txt; "
            "change it through judge.template_dir"
        )
    if config.preset == "ultrafeedback":
        return ultrafeedback.load_templates(assets.fetch(ultrafeedback.ASSET), names)
    return prompts.load_templates(config.template_dir, names)


def judge_id(config: JudgeConfig, templates: Templates) -> str:
    """`LABEL|HASH`: the judge model's label and a hash of what else decides its ratings."""
    if isinstance(templates, ultrafeedback.Templates):
        texts: list = ["ultrafeedback", templates.system, dict(templates.rubrics)]
    else:  # unchanged since the first release: the ids of earlier runs stay valid
        texts = [templates.system, templates.one_aspect, templates.all_aspects, dict(templates.rubrics)]
    pinned = {
        "model": config.model.model,
        "mode": config.mode,
        "scale": config.scale,
        "layout": config.layout,
        "aspects": list(config.aspects),
        "templates": texts,
        "sampling": [config.model.temperature, config.model.top_p, config.model.max_tokens],
    }
    if config.order != "shuffle":  # pinned only when set: the ids of earlier runs stay valid
        pinned["order"] = config.order
    digest = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    return f"{config.model.label}|{digest[:12]}"


class Judge:
    """Rates completions on the configured aspects (module docstring). `seed` seeds the shuffles and samples."""

    def __init__(
        self,
        config: JudgeConfig,
        generator: Generator | None = None,
        *,
        seed: int = 0,
        audit_path: str | os.PathLike | None = None,
    ):
        self.config = config
        self.templates = check_judge_config(config)
        self.judge_id = judge_id(config, self.templates)
        self.seed = seed
        self.aspects = {a: template_aspect(a) for a in config.aspects}  # configured -> template name
        if generator is None:
            generator = make_generator(config.model.model)
        self.preset = self.templates if isinstance(self.templates, ultrafeedback.Templates) else None
        self.attempts = ultrafeedback.ATTEMPTS if self.preset is not None else 1
        self.forced = config.mode == "logprobs" and isinstance(generator, LogprobScorer)
        wants_logprobs = config.mode == "logprobs" and not self.forced
        params = SamplingParams(
            max_tokens=config.model.max_tokens,
            temperature=config.model.temperature,
            top_p=config.model.top_p,
            logprobs=wants_logprobs,
            top_logprobs=MAX_TOP_LOGPROBS if wants_logprobs else 0,
        )
        digits = [str(v) for v in range(1, min(config.scale, 9) + 1)]
        self.client = JudgeClient(
            generator,
            params,
            judge_id=self.judge_id,
            audit_path=audit_path if config.audit_log else None,
            candidates=digits,
        )

    def rate(self, items: Sequence[JudgeItem | tuple]) -> list[JudgeResult]:
        """One result per item, in order: every completion rated on every aspect, `repeats` times."""
        judged = [JudgeItem(*item) for item in items]
        for item in judged:
            if not item.completions:
                raise ValueError(f"judge item {item.key}: no completions to rate")
        plans = [
            (i, call)
            for i, item in enumerate(judged)
            for repeat in range(self.config.repeats)
            for call in self._calls(item, repeat)
        ]
        replies = self._judge_with_retries([call.request for _, call in plans])
        collected: list[list[tuple[_Call, JudgeReply]]] = [[] for _ in judged]
        for (i, call), reply in zip(plans, replies, strict=True):
            collected[i].append((call, reply))
        return [self._result(item, calls) for item, calls in zip(judged, collected, strict=True)]

    def usage(self) -> dict[str, Any]:
        return self.client.usage()

    def _judge_with_retries(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        """The replies; an answer in the wrong format is asked again (new seed) up to `self.attempts` times."""
        replies = self.client.judge(requests)
        for attempt in range(1, self.attempts):
            again = [i for i, reply in enumerate(replies) if _format_error(reply)]
            if not again:
                break
            retried = self.client.judge([_retry(replies[i].request, attempt) for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        return replies

    # -----------------------------------------------------------------------------------------------------
    # Requests

    def _calls(self, item: JudgeItem, repeat: int) -> list[_Call]:
        aspects: list[str | None] = list(self.aspects) if self.config.layout == "per_aspect" else [None]
        return [self._call(item, repeat, aspect) for aspect in aspects]

    def _call(self, item: JudgeItem, repeat: int, aspect: str | None) -> _Call:
        seed = self.seed + repeat
        if self.preset is not None and aspect is not None:
            return self._ultrafeedback_call(item, repeat, aspect, seed)
        name = self.aspects[aspect] if aspect is not None else None
        messages, order = prompts.build_judge_messages(
            item.prompt_messages,
            item.completions,
            name,
            self.config.scale,
            seed,
            key=item.key,
            templates=self.templates,
            order=self._order(len(item.completions), repeat, f"{item.key}/{name or 'all'}"),
        )
        rated = [aspect] if aspect is not None else list(self.aspects)
        n = len(item.completions)
        slots = tuple({"completion": order[p], "aspect": a, "position": p} for p in range(n) for a in rated)
        meta = {"aspect": aspect or "all", "repeat": repeat, "order": order, "mode": self.config.mode}
        labels = [self._label(aspect, a) for a in rated]
        if self.forced:
            prefixes = self._prefixes(n, labels)
            parse = _forced_parser(len(slots), self.config.scale)
        elif self.config.mode == "logprobs":
            prefixes, parse = (), _located_parser(n, labels, self.config.scale)
        else:
            names = None if aspect is not None else [self.aspects[a] for a in rated]
            prefixes, parse = (), _text_parser(n, names, self.config.scale)
        request = JudgeRequest(item.key, messages, parse, slots, meta, seed=seed, prefixes=prefixes)
        return _Call(request, order, rated)

    def _ultrafeedback_call(self, item: JudgeItem, repeat: int, aspect: str, seed: int) -> _Call:
        """One aspect's call in UltraFeedback's protocol: the texts in a seeded random order, as `_call`."""
        name, n = self.aspects[aspect], len(item.completions)
        order = self._order(n, repeat, f"{item.key}/{name}") or prompts.shuffle_order(
            n, seed, f"{item.key}/{name}"
        )
        # UltraFeedback sent the instruction and the responses as they are (no stripping)
        single = len(item.prompt_messages) == 1 and item.prompt_messages[0]["role"] == "user"
        instruction = (
            item.prompt_messages[0]["content"] if single else prompts.render_instruction(item.prompt_messages)
        )
        messages = ultrafeedback.build_messages(
            self.preset, name, instruction, [item.completions[i] for i in order]
        )
        slots = tuple({"completion": order[p], "aspect": aspect, "position": p} for p in range(n))
        meta = {"aspect": aspect, "repeat": repeat, "order": order, "mode": self.config.mode, "attempt": 0}
        request = JudgeRequest(item.key, messages, _ultrafeedback_parser(n, name), slots, meta, seed=seed)
        return _Call(request, order, [aspect])

    def _order(self, n: int, repeat: int, key: str) -> list[int] | None:
        """The balanced order of a repeat (`JudgeConfig.order`), or None: each repeat shuffles anew."""
        if self.config.order != "balanced":
            return None
        return prompts.balanced_order(prompts.shuffle_order(n, self.seed, key), repeat, self.config.repeats)

    def _label(self, call_aspect: str | None, aspect: str) -> str:
        """The word before the rating in the answer format: "Rating" (one aspect per call) or the aspect."""
        return "Rating" if call_aspect is not None else prompts.aspect_label(self.aspects[aspect])

    def _prefixes(self, n: int, labels: list[str]) -> tuple[str, ...]:
        """The forced answer starts, per slot (position-major), each followed on the 1–10 scale by the same
        start with "1" written (the distribution that tells 10 from 1)."""
        out = []
        for p in range(n):
            for label in labels:
                prefix = f"{prompts.OUTPUT_LABEL} {p + 1}\n{label}: "
                out += [prefix, prefix + "1"] if self.config.scale >= 10 else [prefix]
        return tuple(out)

    # -----------------------------------------------------------------------------------------------------
    # Results

    def _result(self, item: JudgeItem, calls: list[tuple[_Call, JudgeReply]]) -> JudgeResult:
        readings: list[Reading] = []
        rationales: list[dict[str, str]] = [dict.fromkeys(self.aspects, "") for _ in item.completions]
        types: list[dict[str, list[str]]] = [{} for _ in item.completions]
        for call, reply in calls:
            repeat = reply.request.meta["repeat"]
            for slot, rating in zip(reply.request.slots, reply.ratings, strict=True):
                readings.append(Reading(slot["completion"], slot["aspect"], repeat, slot["position"], rating))
            if self.config.mode == "text" and reply.answer.text:
                for position, (text, kinds) in enumerate(self._rationales(reply, call)):
                    completion = call.order[position]
                    for aspect in call.aspects:
                        if not rationales[completion][aspect]:
                            rationales[completion][aspect] = text
                            if kinds is not None:
                                types[completion][aspect] = list(kinds)
        ratings, reasons = _medians(readings, len(item.completions), list(self.aspects))
        usage = {
            "calls": len(calls),
            "prompt_tokens": sum(reply.answer.prompt_tokens for _, reply in calls),
            "completion_tokens": sum(reply.answer.completion_tokens for _, reply in calls),
        }
        return JudgeResult(item.key, ratings, reasons, rationales, readings, usage, types)

    def _rationales(self, reply: JudgeReply, call: _Call) -> list[tuple[str, tuple[str, ...] | None]]:
        """The rationale of each position's rating (empty where the answer could not be read), and the types
        its block names (None: an aspect without types)."""
        n = len(call.order)
        if self.preset is None:
            return [(text, None) for text in parsing.parse_rationales(reply.answer.text or "", n)]
        try:
            annotations = ultrafeedback.parse_answer(
                reply.answer.text or "", n, self.aspects[call.aspects[0]]
            )
        except ultrafeedback.FormatError:
            return [("", None)] * n
        return [(a.rationale.strip(), a.types) for a in annotations]


@dataclass(frozen=True)
class _Call:
    request: JudgeRequest
    order: list[int]
    aspects: list[str]  # configured aspect names this call rates


def _medians(
    readings: list[Reading], n: int, aspects: list[str]
) -> tuple[list[dict[str, float | None]], list[dict[str, str | None]]]:
    values: dict[tuple[int, str], list[float]] = {}
    failures: dict[tuple[int, str], list[str]] = {}
    for r in sorted(readings, key=lambda r: r.repeat):
        if r.rating.value is not None:
            values.setdefault((r.completion, r.aspect), []).append(r.rating.value)
        else:
            failures.setdefault((r.completion, r.aspect), []).append(r.rating.reason or parsing.NO_RATING)
    ratings: list[dict[str, float | None]] = []
    reasons: list[dict[str, str | None]] = []
    for c in range(n):
        ratings.append({})
        reasons.append({})
        for a in aspects:
            got = values.get((c, a))
            ratings[c][a] = float(statistics.median(got)) if got else None
            # Counter.most_common keeps first-seen order among equal counts: the earliest repeat's reason.
            reasons[c][a] = (
                None if got else Counter(failures.get((c, a), [parsing.NO_RATING])).most_common(1)[0][0]
            )
    return ratings, reasons


# ---------------------------------------------------------------------------------------------------------
# Reading the answers (pure)


def _text_parser(n: int, aspects: list[str] | None, scale: int) -> Callable[[JudgeAnswer], list[Rating]]:
    """Text mode: per position (and per aspect, position-major, when `aspects` is given)."""

    def parse(answer: JudgeAnswer) -> list[Rating]:
        text = answer.text or ""
        if aspects is None:
            return parsing.parse_ratings(text, n, scale)
        by_position = parsing.parse_aspect_ratings(text, n, aspects, scale)
        return [by_position[p][a] for p in range(n) for a in aspects]

    return parse


def _ultrafeedback_parser(n: int, aspect: str) -> Callable[[JudgeAnswer], list[Rating]]:
    """UltraFeedback's parser: every text's rating, or a format error for all of them (asked again)."""

    def parse(answer: JudgeAnswer) -> list[Rating]:
        try:
            return [a.rating for a in ultrafeedback.parse_answer(answer.text or "", n, aspect)]
        except ultrafeedback.FormatError:
            return [Rating(None, ultrafeedback.FORMAT_ERROR)] * n

    return parse


def _format_error(reply: JudgeReply) -> bool:
    return reply.answer.ok and any(r.reason == ultrafeedback.FORMAT_ERROR for r in reply.ratings)


def _retry(request: JudgeRequest, attempt: int) -> JudgeRequest:
    """The same call asked again: a new seed (a new sample, and a new entry in any response cache)."""
    digest = hashlib.sha256(f"{request.seed}\x00retry\x00{attempt}".encode()).digest()
    seed = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    return dataclasses.replace(request, seed=seed, meta={**request.meta, "attempt": attempt})


def _forced_parser(slots: int, scale: int) -> Callable[[JudgeAnswer], list[Rating]]:
    """Logprobs mode with forced prefixes: the expected rating of each slot's next-token distribution."""
    step = 2 if scale >= 10 else 1

    def parse(answer: JudgeAnswer) -> list[Rating]:
        tops = answer.next_tokens or []
        if len(tops) != slots * step:
            return [Rating(None, JUDGE_CALL_FAILED)] * slots
        ratings = []
        for s in range(slots):
            top = tops[s * step]
            after_one = tops[s * step + 1] if step == 2 else None
            ratings.append(parsing.expected_rating(top, scale, after_one=after_one))
        return ratings

    return parse


def _located_parser(n: int, labels: list[str], scale: int) -> Callable[[JudgeAnswer], list[Rating]]:
    """Logprobs mode with generated answers: the expected rating from the top log-probs at the token where
    each rating line's number starts (see `rating_offsets`)."""

    def parse(answer: JudgeAnswer) -> list[Rating]:
        tokens = answer.logprobs or []
        if not tokens:
            return [Rating(None, parsing.NO_RATING_TOKEN)] * (n * len(labels))
        # Offsets are found in the tokens' own text, so they map to tokens even where the decoded answer
        # differs from the concatenated token strings.
        text = "".join(t["token"] for t in tokens)
        ends = list(itertools.accumulate(len(t["token"]) for t in tokens))
        offsets = rating_offsets(text, n, labels)
        ratings = []
        for p in range(n):
            for label in labels:
                offset = offsets.get((p, label))
                if offset is None:
                    ratings.append(Rating(None, parsing.NO_RATING))
                    continue
                index = next(i for i, end in enumerate(ends) if end > offset)
                ratings.append(_rating_at(tokens, index, scale))
        return ratings

    return parse


def _rating_at(tokens: list[TokenLogprob], index: int, scale: int) -> Rating:
    top = {t["token"]: t["logprob"] for t in tokens[index]["top_logprobs"]}
    top.setdefault(tokens[index]["token"], tokens[index]["logprob"])
    after_one = None
    if scale >= 10 and tokens[index]["token"].strip() == "1" and index + 1 < len(tokens):
        following = tokens[index + 1]
        after_one = {t["token"]: t["logprob"] for t in following["top_logprobs"]}
        after_one.setdefault(following["token"], following["logprob"])
    evidence = {"token_index": index, "top_logprobs": top} | ({"after_one": after_one} if after_one else {})
    return dataclasses.replace(parsing.expected_rating(top, scale, after_one=after_one), evidence=evidence)


_HEADER = re.compile(r"^[ \t#*>_-]*" + prompts.OUTPUT_LABEL + r"\s*#?\s*(\d+)\b", re.I | re.M)


def rating_offsets(text: str, n: int, labels: Sequence[str]) -> dict[tuple[int, str], int]:
    """Where the number of each rating line starts: `(position, label) -> character offset`.

    The answer is split at `Output k` line headers (without any, a single output's block is the whole
    text); in output k's block the last line `Label: N` (`**Label**: [N]` and "Label rating: N" too) counts.
    """
    headers = list(_HEADER.finditer(text))
    blocks: dict[int, list[tuple[int, int]]] = {}
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        blocks.setdefault(int(header.group(1)) - 1, []).append((header.end(), end))
    if not headers and n == 1:
        blocks[0] = [(0, len(text))]
    offsets: dict[tuple[int, str], int] = {}
    for label in labels:
        words = r"[\s_-]*".join(re.escape(w) for w in re.split(r"[\s_-]+", label))
        line = re.compile(
            r"\b" + words + r"(?:[ \t]+(?:rating|score))?[*`]*[ \t]*[:=][ \t*`]*\[*[ \t]*(?=\d)", re.I
        )
        for position in range(n):
            found = [
                m.end() for start, end in blocks.get(position, []) for m in line.finditer(text, start, end)
            ]
            if found:
                offsets[(position, label)] = found[-1]
    return offsets
