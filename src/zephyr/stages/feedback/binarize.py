"""Binarization: rated completions (UltraFeedback) → preference pairs (ultrafeedback_binarized).

Per prompt, over the completions with a score (null scores are ignored). The score is the mean rating
(`score="mean"`, the paper's rule), or UltraFeedback's critique `overall_score` (`score="overall"`, what
HuggingFaceH4/ultrafeedback_binarized ranked by; only imported raw UltraFeedback records carry it):
- chosen = the completion with the highest score. When that score is shared, a seeded random one of the
  tied completions is chosen (`tie_break="first"`: the first in the record, as Python's `max` does), or
  the prompt is dropped as a tie with `drop_ties=True`;
- rejected = a seeded random one of the others (Zephyr's rule) or the lowest-rated one (`rejected="lowest"`;
  among equally low ones, the first in the record). Candidates whose answer is the chosen answer's text
  (ignoring surrounding whitespace) are skipped: identical answers teach nothing. With `min_margin`, only
  candidates at least that far below the chosen mean are considered;
- the random choices use a generator seeded from (`rng_seed`, `prompt_id`) through SHA-256, so a prompt's
  pair does not depend on the other records or their order.

The pair's conversations are the prompt messages plus the assistant's answer; `score_chosen` and
`score_rejected` are the scores; `chosen_model` / `rejected_model` name the generators. The prompt
messages are the record's optional `prompt_messages` (a conversation ending with the user's turn, for
multi-turn prompts), else one user message holding `prompt`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FEWER_THAN_TWO = "fewer than two rated completions"
TIE = "tie for the top"
IDENTICAL = "identical responses"
MARGIN = "margin below minimum"
DROP_REASONS = (FEWER_THAN_TWO, TIE, IDENTICAL, MARGIN)
REJECTED_MODES = ("random", "lowest")
SCORES = {"mean": "mean_rating", "overall": "overall_score"}  # option -> the completion field ranked by
TIE_BREAKS = ("random", "first")

# Means of integer ratings are exact in floating point; this only absorbs summation-order noise.
_EPS = 1e-9


def mean_rating(ratings: Mapping[str, float | None]) -> float | None:
    """The mean over the aspects that have a rating (null and NaN ones are left out); None if none has."""
    values = [v for v in ratings.values() if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def prompt_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation a rated record's completions answer (see the module docstring)."""
    messages = record.get("prompt_messages")
    if messages is None:
        return [{"role": "user", "content": record["prompt"]}]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class BinarizeStats:
    """How many records became pairs, and how many were dropped for each reason (`DROP_REASONS`)."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def add(self, reason: str | None) -> None:
        self.total += 1
        if reason is None:
            self.kept += 1
        else:
            self.dropped[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped)}


def _rng(rng_seed: int, prompt_id: str) -> random.Random:
    digest = hashlib.sha256(f"{rng_seed}\x00{prompt_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _completion_score(completion: Mapping[str, Any], score: str) -> float | None:
    """The completion's `score` field; a missing `mean_rating` is computed from `ratings`."""
    field_name = SCORES[score]
    if field_name in completion:
        return completion[field_name]
    return mean_rating(completion.get("ratings") or {}) if score == "mean" else None


def _check_options(rejected: str, min_margin: float, score: str, tie_break: str) -> None:
    if rejected not in REJECTED_MODES:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_MODES)}, got {rejected!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be non-negative, got {min_margin}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")


def binarize(
    rated_record: Mapping[str, Any],
    *,
    rejected: str = "random",
    min_margin: float = 0.0,
    rng_seed: int = 0,
    drop_ties: bool = False,
    tie_break: str = "random",
    score: str = "mean",
) -> tuple[dict[str, Any] | None, str | None]:
    """One rated record as a preference pair, or (None, the reason it was dropped: one of `DROP_REASONS`)."""
    _check_options(rejected, min_margin, score, tie_break)
    rated = [(c, m) for c in rated_record["completions"] if (m := _completion_score(c, score)) is not None]
    if len(rated) < 2:
        return None, FEWER_THAN_TWO
    rng = _rng(rng_seed, str(rated_record["prompt_id"]))
    best = max(m for _, m in rated)
    top = [i for i, (_, m) in enumerate(rated) if m >= best - _EPS]
    if len(top) > 1 and drop_ties:
        return None, TIE
    chosen_index = top[0] if len(top) == 1 or tie_break == "first" else rng.choice(top)
    chosen, chosen_mean = rated[chosen_index]
    others = [(c, m) for i, (c, m) in enumerate(rated) if i != chosen_index]
    others = [(c, m) for c, m in others if c["response"].strip() != chosen["response"].strip()]
    if not others:
        return None, IDENTICAL
    others = [(c, m) for c, m in others if chosen_mean - m >= min_margin - _EPS]
    if not others:
        return None, MARGIN
    if rejected == "random":
        loser, loser_mean = rng.choice(others)
    else:
        loser, loser_mean = min(others, key=lambda cm: cm[1])  # min keeps the first of equal ones
    return _pair(rated_record, chosen, chosen_mean, loser, loser_mean), None


def _pair(
    record: Mapping[str, Any], chosen: Mapping, chosen_mean: float, loser: Mapping, loser_mean: float
) -> dict[str, Any]:
    # Each side gets its own message dicts: editing one conversation must not change the other.
    return {
        "prompt_id": record["prompt_id"],
        "prompt": record["prompt"],
        "chosen": [*prompt_messages(record), {"role": "assistant", "content": chosen["response"]}],
        "rejected": [*prompt_messages(record), {"role": "assistant", "content": loser["response"]}],
        "score_chosen": chosen_mean,
        "score_rejected": loser_mean,
        "chosen_model": chosen.get("model"),
        "rejected_model": loser.get("model"),
    }


def binarize_all(
    records: Iterable[Mapping[str, Any]],
    *,
    rejected: str = "random",
    min_margin: float = 0.0,
    rng_seed: int = 0,
    drop_ties: bool = False,
    tie_break: str = "random",
    score: str = "mean",
) -> tuple[list[dict[str, Any]], BinarizeStats]:
    """`binarize` over records: the pairs in input order, and the counts of kept and dropped records."""
    _check_options(rejected, min_margin, score, tie_break)
    pairs: list[dict[str, Any]] = []
    stats = BinarizeStats()
    for record in records:
        pair, reason = binarize(
            record,
            rejected=rejected,
            min_margin=min_margin,
            rng_seed=rng_seed,
            drop_ties=drop_ties,
            tie_break=tie_break,
            score=score,
        )
        stats.add(reason)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats
