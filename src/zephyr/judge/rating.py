"""The one rating type: what every judge parser returns and every judge audit line records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rating:
    """One rating read from a judge's answer: `value`, or None and the `reason` it could not be read.

    `evidence` is what the value was read from when that is not the answer's text (top log-probabilities,
    the rating distribution and its probability mass); the audit log writes it beside the value.
    The value's meaning is the reader's: a 1..scale rating (AI feedback, MT-Bench), Assistant A's share of
    a pairwise game (MT-Bench pairwise) or an AlpacaEval preference in [1, 2].
    """

    value: float | None
    reason: str | None = None
    evidence: Mapping[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None
