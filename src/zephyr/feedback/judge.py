"""The judge layer: an AI judge's calls, their audit log and accounting, and the feedback judge built on it.

Two levels:

- `JudgeClient` runs judge requests through any `Generator`. A `JudgeRequest` holds the exact messages, a
  `parse` function that reads one or more ratings (its `slots`) from the answer, and metadata for the audit
  log. The client batches the requests, turns failed calls into null ratings with the reason
  `JUDGE_CALL_FAILED` (never dropped), writes one JSON line per call to the audit log (messages sent, raw
  answer, every rating or null with its reason) and keeps the usage of the calls apart from other users of
  the same generator. Requests with `prefixes` are not generated: the client asks the generator for the
  next-token log-probabilities after each forced answer prefix (`next_token_logprobs`, the local backend).
  MT-Bench-style single grading is one slot per request and `parse=lambda a: [Rating(*parse_score(a.text))]`.
- `Judge` rates the completions of prompts on UltraFeedback's aspects (`JudgeConfig`): judge prompts from
  `zephyr.feedback.prompts` with the completions shuffled (seeded by the item's key and the repeat), ratings
  read back in prompt order and mapped to the completions with `unshuffle`, `repeats` judgments per
  completion and aspect with the median kept.

Rating modes (`JudgeConfig.mode`):

- `text`: the judge writes its answer; ratings are read with `parse_ratings` (one aspect per call) or
  `parse_aspect_ratings` (all aspects in one call), rationales with `parse_rationales`.
- `logprobs`: the rating is the expected value under the judge's distribution over the rating tokens
  (`expected_rating`), read where the answer format puts the rating. With a generator that has
  `next_token_logprobs` (local models) the answer is forced up to that point, skipping the rationale:
  `Output 2\\nRating: ` (one aspect per call) or `Output 2\\nHonesty: ` (all aspects); every rating digit is
  scored, so every completion gets a rating. Other generators (HTTP) write the whole answer with
  `top_logprobs`, and the distribution is read at the token where each rating line's number starts; a
  rating line that is missing gives a null rating. On the 1–10 scale, "10" written as "1" then "0" is
  separated from "1" with the distribution after a forced "1" (`expected_rating(after_one=...)`); with
  generated answers that distribution is known only where the judge wrote "1", so prefer the 1–5 scale
  for judges whose tokenizer splits digits.

Aspect names: ratings are keyed by the configured names (UltraFeedback's `instruction_following`); the
templates and the answer lines use the same words joined by "-" (`instruction-following`).

The judge id (`Judge.judge_id`) pins the judge: the model label and a hash of everything that decides its
ratings (templates, mode, scale, layout, aspects, sampling parameters). Outputs carry it, so ratings of
different judges are never mixed unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from zephyr.config import JudgeConfig
from zephyr.errors import ConfigError, ZephyrError
from zephyr.feedback import parsing, prompts
from zephyr.feedback.parsing import ParsedRating
from zephyr.generation.base import MAX_TOP_LOGPROBS, Completion, Generator, SamplingParams, TokenLogprob

JUDGE_CALL_FAILED = "judge request failed"
USAGE_FIELDS = ("requests", "sent", "cache_hits", "retries", "failures", "prompt_tokens", "completion_tokens")

# ---------------------------------------------------------------------------------------------------------
# The generic client


@dataclass(frozen=True)
class Rating:
    """One rating read from a judge's answer: `value`, or None and the `reason`.

    `evidence` is what the value was read from when it is not the text: the top log-probabilities.
    """

    value: float | None
    reason: str | None = None
    evidence: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, parsed: ParsedRating, evidence: Mapping[str, Any] | None = None) -> Rating:
        return cls(parsed.value, parsed.reason, evidence)


@dataclass(frozen=True)
class JudgeAnswer:
    """What came back for one request: the text (with per-token log-probs when asked), or the next-token
    log-probabilities after each of the request's `prefixes`, or an error."""

    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    next_tokens: list[dict[str, float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class JudgeRequest:
    """One judge call.

    `parse(answer)` returns one `Rating` per slot; `slots` label them in the audit log (e.g.
    `{"completion": 2, "aspect": "honesty", "position": 0}`); `meta` is copied into the audit line as is.
    `prefixes`: forced answer starts whose next-token distributions are wanted instead of a generated answer.
    """

    key: str
    messages: list[dict[str, str]]
    parse: Callable[[JudgeAnswer], list[Rating]]
    slots: tuple[Mapping[str, Any], ...] = ({},)
    meta: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class JudgeReply:
    request: JudgeRequest
    answer: JudgeAnswer
    ratings: list[Rating]


class JudgeClient:
    """Runs judge requests through a generator, with the audit log and usage accounting (module docstring).

    `params` are the sampling parameters of every generated answer (a request's `seed`, when set, replaces
    theirs). `top_k` and `candidates` apply to prefix requests: the `top_k` most likely next tokens plus the
    `candidates` (e.g. the rating digits), when the generator's tokenizer has each as a single token.
    """

    def __init__(
        self,
        generator: Generator,
        params: SamplingParams,
        *,
        judge_id: str,
        audit_path: str | os.PathLike | None = None,
        top_k: int = MAX_TOP_LOGPROBS,
        candidates: Sequence[str] = (),
    ):
        self.generator = generator
        self.params = params
        self.judge_id = judge_id
        self.audit_path = Path(audit_path) if audit_path is not None else None
        self.top_k = top_k
        self.candidates = tuple(candidates)
        self._candidates_ok: bool | None = None
        self.calls = 0
        self.failed_calls = 0
        self.parse_failures: Counter[str] = Counter()
        self.backend_usage: dict[str, Any] = dict.fromkeys(USAGE_FIELDS, 0) | {"cost": None}

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """Run the requests (batched), parse every answer, log each call; one reply per request, in order."""
        answers: dict[int, JudgeAnswer] = {}
        generated = [i for i, r in enumerate(requests) if not r.prefixes]
        forced = [i for i, r in enumerate(requests) if r.prefixes]
        with self._metered():
            answers |= zip(generated, self._generate([requests[i] for i in generated]), strict=True)
            answers |= zip(forced, self._next_tokens([requests[i] for i in forced]), strict=True)
        replies = [self._reply(r, answers[i]) for i, r in enumerate(requests)]
        self._audit(replies)
        return replies

    def usage(self) -> dict[str, Any]:
        """Calls, failed calls, parse failures per reason, and the generator's usage during these calls."""
        return {
            "judge": self.judge_id,
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "parse_failures": dict(sorted(self.parse_failures.items())),
            "backend": dict(self.backend_usage),
        }

    # -----------------------------------------------------------------------------------------------------

    def _reply(self, request: JudgeRequest, answer: JudgeAnswer) -> JudgeReply:
        self.calls += 1
        if answer.ok:
            ratings = list(request.parse(answer))
            if len(ratings) != len(request.slots):
                raise ValueError(
                    f"judge request {request.key}: {len(ratings)} ratings for {len(request.slots)} slots"
                )
        else:
            self.failed_calls += 1
            ratings = [Rating(None, JUDGE_CALL_FAILED)] * len(request.slots)
        self.parse_failures.update(r.reason for r in ratings if r.value is None and r.reason)
        return JudgeReply(request, answer, ratings)

    def _generate(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        # One batched call per distinct seed (requests of one repeat share theirs).
        by_seed: dict[int | None, list[int]] = {}
        for i, request in enumerate(requests):
            seed = request.seed if request.seed is not None else self.params.seed
            by_seed.setdefault(seed, []).append(i)
        answers: dict[int, JudgeAnswer] = {}
        for seed, indices in by_seed.items():
            params = _with_seed(self.params, seed)
            completions = self.generator.generate([requests[i].messages for i in indices], params)
            if len(completions) != len(indices):
                raise ZephyrError(
                    f"judge {self.judge_id}: {len(completions)} answers for {len(indices)} requests"
                )
            for i, completion in zip(indices, completions, strict=True):
                answers[i] = _answer_of(completion)
        return [answers[i] for i in range(len(requests))]

    def _next_tokens(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Next-token log-probs after every prefix of every request; one call per distinct prefix."""
        if not requests:
            return []
        scorer = getattr(self.generator, "next_token_logprobs", None)
        if scorer is None:
            raise ConfigError(
                f"judge {self.judge_id}: forced answer prefixes need a generator with next_token_logprobs "
                "(the transformers backend)"
            )
        if hasattr(self.generator, "prefix_logprobs"):
            return self._branched_tokens(requests)
        by_prefix: dict[str, list[tuple[int, int]]] = {}
        for i, request in enumerate(requests):
            for j, prefix in enumerate(request.prefixes):
                by_prefix.setdefault(prefix, []).append((i, j))
        tops: list[list[dict[str, float] | None]] = [[None] * len(r.prefixes) for r in requests]
        errors: list[str | None] = [None] * len(requests)
        for prefix, places in by_prefix.items():
            conversations = [requests[i].messages for i, _ in places]
            for (i, j), result in zip(places, self._score(scorer, conversations, prefix), strict=True):
                if isinstance(result, str):
                    errors[i] = errors[i] or result
                else:
                    tops[i][j] = result
        return [
            JudgeAnswer(error=errors[i])
            if errors[i] is not None
            else JudgeAnswer(next_tokens=[t for t in tops[i] if t is not None])
            for i in range(len(requests))
        ]

    def _branched_tokens(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """As `_next_tokens`, with each request's prompt run once for all of its prefixes (one rating per
        answer shown: the prompt is most of the tokens)."""
        scorer = self.generator.prefix_logprobs
        candidates = self.candidates if self._candidates_usable(self.generator.next_token_logprobs) else ()
        answers = []
        for request in requests:
            try:
                (tops,) = scorer([request.messages], request.prefixes, self.top_k, candidates=candidates)
            except (ZephyrError, RuntimeError) as exc:  # one request (too long, say) must not fail the others
                answers.append(JudgeAnswer(error=f"{type(exc).__name__}: {exc}"))
                continue
            answers.append(JudgeAnswer(next_tokens=list(tops)))
        return answers

    def _score(self, scorer: Callable, conversations: list, prefix: str) -> list[dict[str, float] | str]:
        """Top log-probs per conversation, or the error text of a conversation that could not be scored."""
        candidates = self.candidates if self._candidates_usable(scorer) else ()
        try:
            return scorer(conversations, self.top_k, candidates=candidates, answer_prefix=prefix)
        except (ZephyrError, RuntimeError) as exc:
            if len(conversations) == 1:
                return [f"{type(exc).__name__}: {exc}"]
        # One conversation (too long for the context, say) must not fail the others: score them one by one.
        return [r for c in conversations for r in self._score(scorer, [c], prefix)]

    def _candidates_usable(self, scorer: Callable) -> bool:
        """Whether the generator's tokenizer has every candidate as one token (SentencePiece tokenizers
        write a lone "1" as "▁" + "1"); without them only the top-k tokens are scored."""
        if self._candidates_ok is None:
            self._candidates_ok = bool(self.candidates)
            if self.candidates:
                try:
                    scorer([[{"role": "user", "content": "1"}]], 1, candidates=self.candidates)
                except ZephyrError:
                    self._candidates_ok = False
        return self._candidates_ok

    @contextlib.contextmanager
    def _metered(self) -> Iterator[None]:
        """Add the generator's usage while the block runs (the generator may also serve other users)."""
        before = _usage_of(self.generator)
        try:
            yield
        finally:
            after = _usage_of(self.generator)
            if before is not None and after is not None:
                total = self.backend_usage
                for name in USAGE_FIELDS:
                    total[name] += after.get(name, 0) - before.get(name, 0)
                if after.get("cost") is not None:
                    total["cost"] = (total["cost"] or 0.0) + after["cost"] - (before.get("cost") or 0.0)

    def _audit(self, replies: list[JudgeReply]) -> None:
        if self.audit_path is None or not replies:
            return
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(audit_record(self.judge_id, r), ensure_ascii=False) + "\n" for r in replies]
        with open(self.audit_path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


def audit_record(judge_id: str, reply: JudgeReply) -> dict[str, Any]:
    """The audit log line of one judge call."""
    request, answer = reply.request, reply.answer
    record: dict[str, Any] = {
        "judge": judge_id,
        "key": request.key,
        **request.meta,
        "messages": request.messages,
    }
    if request.prefixes:
        record["answer_prefixes"] = list(request.prefixes)
        record["top_logprobs"] = answer.next_tokens
    record |= {
        "raw": answer.text,
        "finish_reason": answer.finish_reason,
        "error": answer.error,
        "ratings": [
            {**slot, "value": r.value, "reason": r.reason}
            | ({"evidence": dict(r.evidence)} if r.evidence else {})
            for slot, r in zip(request.slots, reply.ratings, strict=True)
        ],
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
    }
    return record


def _answer_of(completion: Completion) -> JudgeAnswer:
    return JudgeAnswer(
        text=completion.text if completion.ok else None,
        finish_reason=completion.finish_reason,
        error=None if completion.ok else (completion.error or "unknown error"),
        logprobs=completion.logprobs,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    values = params.to_dict() | {"seed": seed}
    values["stop"] = tuple(values["stop"])
    return SamplingParams(**values)


def _usage_of(generator: Any) -> dict[str, Any] | None:
    usage = getattr(generator, "usage", None)
    return usage.to_dict() if hasattr(usage, "to_dict") else None


# ---------------------------------------------------------------------------------------------------------
# Rating the completions of a prompt (AI feedback)


class JudgeItem(NamedTuple):
    """What the judge rates: the completions of one prompt, `key` = the prompt id."""

    key: str
    prompt_messages: Sequence[Mapping[str, str]]
    completions: Sequence[str]


@dataclass(frozen=True)
class Reading:
    """One rating: of `completion` on `aspect` in repeat `repeat`, shown at `position` (0 = Output 1)."""

    completion: int
    aspect: str
    repeat: int
    position: int
    value: float | None
    reason: str | None


@dataclass
class JudgeResult:
    """The ratings of one item's completions (in the item's order).

    `ratings[c][aspect]` is the median over the repeats that gave a rating (None when none did, with the
    most common failure in `reasons[c][aspect]`); `rationales[c][aspect]` is the judge's rationale from the
    first repeat that gave one ("" in logprobs mode with forced answers); `readings` holds every rating.
    """

    key: str
    ratings: list[dict[str, float | None]]
    reasons: list[dict[str, str | None]]
    rationales: list[dict[str, str]]
    readings: list[Reading]


def template_aspect(aspect: str) -> str:
    """The template and answer-line name of a configured aspect: `instruction_following` → `instruction-following`."""
    return aspect.replace("_", "-")


def check_judge_config(config: JudgeConfig) -> prompts.JudgeTemplates:
    """Everything about a judge config that can be wrong before any model loads; returns its templates."""
    prompts.level_labels(config.scale)  # the scale is one the rubrics support (ConfigError otherwise)
    names = [template_aspect(a) for a in config.aspects]
    if len(set(names)) != len(names):
        raise ConfigError(f"judge.aspects: {config.aspects} name an aspect twice")
    if config.model.system_prompt is not None:
        raise ConfigError(
            "judge.model.system_prompt: the judge's system message is the template system.txt; "
            "change it through judge.template_dir"
        )
    return prompts.load_templates(config.template_dir, names)


def judge_id(config: JudgeConfig, templates: prompts.JudgeTemplates) -> str:
    """`LABEL|HASH`: the judge model's label and a hash of what else decides its ratings."""
    pinned = {
        "model": config.model.model,
        "mode": config.mode,
        "scale": config.scale,
        "layout": config.layout,
        "aspects": list(config.aspects),
        "templates": [templates.system, templates.one_aspect, templates.all_aspects, dict(templates.rubrics)],
        "sampling": [config.model.temperature, config.model.top_p, config.model.max_tokens],
    }
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
            from zephyr.generation import make_generator

            generator = make_generator(config.model.model)
        self.forced = config.mode == "logprobs" and hasattr(generator, "next_token_logprobs")
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
        items = [JudgeItem(*item) for item in items]
        for item in items:
            if not item.completions:
                raise ValueError(f"judge item {item.key}: no completions to rate")
        plans = [
            (i, call)
            for i, item in enumerate(items)
            for repeat in range(self.config.repeats)
            for call in self._calls(item, repeat)
        ]
        replies = self.client.judge([call.request for _, call in plans])
        collected: list[list[tuple[_Call, JudgeReply]]] = [[] for _ in items]
        for (i, call), reply in zip(plans, replies, strict=True):
            collected[i].append((call, reply))
        return [self._result(item, calls) for item, calls in zip(items, collected, strict=True)]

    def usage(self) -> dict[str, Any]:
        return self.client.usage()

    # -----------------------------------------------------------------------------------------------------
    # Requests

    def _calls(self, item: JudgeItem, repeat: int) -> list[_Call]:
        aspects: list[str | None] = list(self.aspects) if self.config.layout == "per_aspect" else [None]
        return [self._call(item, repeat, aspect) for aspect in aspects]

    def _call(self, item: JudgeItem, repeat: int, aspect: str | None) -> _Call:
        seed = self.seed + repeat
        messages, order = prompts.build_judge_messages(
            item.prompt_messages,
            item.completions,
            self.aspects[aspect] if aspect is not None else None,
            self.config.scale,
            seed,
            key=item.key,
            templates=self.templates,
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
        for call, reply in calls:
            repeat = reply.request.meta["repeat"]
            for slot, rating in zip(reply.request.slots, reply.ratings, strict=True):
                readings.append(
                    Reading(
                        slot["completion"],
                        slot["aspect"],
                        repeat,
                        slot["position"],
                        rating.value,
                        rating.reason,
                    )
                )
            if self.config.mode == "text" and reply.answer.text:
                by_position = parsing.parse_rationales(reply.answer.text, len(call.order))
                for position, text in enumerate(by_position):
                    for aspect in call.aspects:
                        target = rationales[call.order[position]]
                        target[aspect] = target[aspect] or text
        ratings, reasons = _medians(readings, len(item.completions), list(self.aspects))
        return JudgeResult(item.key, ratings, reasons, rationales, readings)


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
        if r.value is not None:
            values.setdefault((r.completion, r.aspect), []).append(r.value)
        else:
            failures.setdefault((r.completion, r.aspect), []).append(r.reason or parsing.NO_RATING)
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
            return [Rating.of(r) for r in parsing.parse_ratings(text, n, scale)]
        by_position = parsing.parse_aspect_ratings(text, n, aspects, scale)
        return [Rating.of(by_position[p][a]) for p in range(n) for a in aspects]

    return parse


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
            ratings.append(Rating.of(parsing.expected_rating(top, scale, after_one=after_one)))
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
    return Rating.of(parsing.expected_rating(top, scale, after_one=after_one), evidence)


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


def check_logprobs_judge(generator: Generator, spec: str) -> None:
    """The logprobs judge mode reads next-token probabilities after a forced answer start, which only the
    local (transformers) backend gives."""
    if not hasattr(generator, "next_token_logprobs"):
        raise ConfigError(
            f"judge_mode logprobs: the judge {spec!r} cannot score a forced answer start (only local "
            "transformers judges can); use judge_mode text with this judge"
        )
