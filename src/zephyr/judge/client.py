"""The judge client shared by AI feedback and the judged evaluations (MT-Bench, AlpacaEval).

`JudgeClient` runs judge requests through any `Generator`. A `JudgeRequest` holds the exact messages, a
`parse` function that reads one or more ratings (its `slots`) from the answer, and metadata for the audit
log. The client batches the requests, turns failed calls into null ratings with the reason
`JUDGE_CALL_FAILED` (never dropped), writes one JSON line per call to the audit log (messages sent, raw
answer, every rating or null with its reason) and keeps the usage of the calls apart from other users of the
same generator. Requests with `prefixes` are not generated: the client asks the generator for the next-token
log-probabilities after each forced answer prefix, which only a `LogprobScorer` (the transformers backend)
gives. MT-Bench-style single grading is one slot per request and `parse=lambda a: [parse_score(a.text)]`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.generation.base import (
    MAX_TOP_LOGPROBS,
    Completion,
    Generator,
    LogprobScorer,
    Metered,
    SamplingParams,
    TokenLogprob,
)
from zephyr.judge.rating import Rating

JUDGE_CALL_FAILED = "judge request failed"
USAGE_FIELDS = ("requests", "sent", "cache_hits", "retries", "failures", "prompt_tokens", "completion_tokens")


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
        """Next-token log-probs after every prefix of every request, each request's prompt run once for all
        of its prefixes (one rating per answer shown: the prompt is most of the tokens)."""
        if not requests:
            return []
        scorer = self.generator
        if not isinstance(scorer, LogprobScorer):
            raise ConfigError(
                f"judge {self.judge_id}: forced answer prefixes need a generator that scores them "
                "(a LogprobScorer: the transformers backend)"
            )
        candidates = self.candidates if self._candidates_usable(scorer) else ()
        answers = []
        for request in requests:
            try:
                (tops,) = scorer.prefix_logprobs(
                    [request.messages], request.prefixes, self.top_k, candidates=candidates
                )
            except (ZephyrError, RuntimeError) as exc:  # one request (too long, say) must not fail the others
                answers.append(JudgeAnswer(error=f"{type(exc).__name__}: {exc}"))
                continue
            answers.append(JudgeAnswer(next_tokens=list(tops)))
        return answers

    def _candidates_usable(self, scorer: LogprobScorer) -> bool:
        """Whether the generator's tokenizer has every candidate as one token (SentencePiece tokenizers
        write a lone "1" as "▁" + "1"); without them only the top-k tokens are scored. The tokenizer
        decides, so the scorer is asked once, with a one-token conversation."""
        if self._candidates_ok is None:
            self._candidates_ok = bool(self.candidates)
            if self.candidates:
                try:
                    scorer.next_token_logprobs(
                        [[{"role": "user", "content": "1"}]], 1, candidates=self.candidates
                    )
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


def _usage_of(generator: Generator) -> dict[str, Any] | None:
    return generator.usage.to_dict() if isinstance(generator, Metered) else None


def check_logprobs_judge(generator: Generator, spec: str) -> None:
    """The logprobs judge mode reads next-token probabilities after a forced answer start, which only a
    `LogprobScorer` (the local transformers backend) gives; checked before any answer is generated."""
    if not isinstance(generator, LogprobScorer):
        raise ConfigError(
            f"judge_mode logprobs: the judge {spec!r} cannot score a forced answer start (only local "
            "transformers judges can); use judge_mode text with this judge"
        )
