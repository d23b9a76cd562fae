"""Multiple-choice metrics, as lm-evaluation-harness defines them. Pure: numbers in, numbers out.

Per item (log-likelihoods `lls[i]` of each choice given the context):
- `acc`: the highest log-likelihood is a gold choice (with several gold indices: any of them).
- `acc_norm`: the same after dividing each log-likelihood by its choice's length in characters — the
  choice text itself, without the leading space the continuation is scored with (lm-eval's
  `completion_len = len(choice)`).
- `mc1`: the highest log-likelihood is the first gold index (TruthfulQA MC1: one true answer, listed first).
- `mc2`: the probability mass of the gold choices after normalising over all choices (TruthfulQA MC2).

Ties go to the lowest index, as `numpy.argmax`. Over items: the mean and its standard error
`sample_std / sqrt(n)` (lm-eval's `mean_stderr`); a mean of subtask means (MMLU) has the standard error
`sqrt(sum(se_i^2)) / k` (lm-eval's `unweighted_mean_stderr`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Gold = int | Sequence[int]


def gold_indices(gold: Gold) -> list[int]:
    """The gold indices of an item as a list (an int gold is a list of one)."""
    return [gold] if isinstance(gold, int) else list(gold)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as `numpy.argmax`)."""
    if not values:
        raise ValueError("argmax of an empty sequence")
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def acc(lls: Sequence[float], gold: Gold) -> float:
    return 1.0 if argmax(lls) in gold_indices(gold) else 0.0


def normalized_lls(lls: Sequence[float], choices: Sequence[str]) -> list[float]:
    """Each log-likelihood divided by the character length of its choice (not counting the delimiter)."""
    if len(lls) != len(choices):
        raise ValueError(f"{len(lls)} log-likelihoods for {len(choices)} choices")
    return [ll / len(choice) for ll, choice in zip(lls, choices, strict=True)]


def acc_norm(lls: Sequence[float], choices: Sequence[str], gold: Gold) -> float:
    return acc(normalized_lls(lls, choices), gold)


def mc1(lls: Sequence[float], gold: Gold) -> float:
    return 1.0 if argmax(lls) == gold_indices(gold)[0] else 0.0


def mc2(lls: Sequence[float], gold: Gold) -> float:
    """Normalised probability of the gold choices: sum(exp(ll_gold)) / sum(exp(ll_all)).

    Computed relative to the largest log-likelihood, which is the same number as lm-eval's
    `exp(ll) / sum(exp(ll))` but stays finite when every exp(ll) underflows (ll below about −745).
    """
    top = max(lls)
    probs = [math.exp(ll - top) for ll in lls]
    return sum(probs[i] for i in set(gold_indices(gold))) / sum(probs)


def item_metrics(lls: Sequence[float], choices: Sequence[str], gold: Gold, *, truthful: bool) -> dict:
    """The metrics of one item: acc and acc_norm, plus mc1 and mc2 when `truthful`."""
    metrics = {"acc": acc(lls, gold), "acc_norm": acc_norm(lls, choices, gold)}
    if truthful:
        metrics["mc1"] = mc1(lls, gold)
        metrics["mc2"] = mc2(lls, gold)
    return metrics


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n − 1) / sqrt(n); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    variance = sum((x - mu) ** 2 for x in values) / (n - 1)
    return math.sqrt(variance) / math.sqrt(n)


def unweighted_mean_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of an unweighted mean of k independent means: sqrt(sum(se_i^2)) / k."""
    known = [se for se in stderrs if se is not None]
    if not stderrs or len(known) < len(stderrs):
        return None
    return math.sqrt(sum(se * se for se in known)) / len(stderrs)


def summarize(items: Sequence[Mapping[str, float]], names: Sequence[str]) -> dict[str, float | None]:
    """`{name: mean, name_stderr: stderr}` over items for each metric name."""
    summary: dict[str, float | None] = {}
    for name in names:
        values = [item[name] for item in items]
        summary[name] = mean(values)
        summary[f"{name}_stderr"] = mean_stderr(values)
    return summary


def summarize_groups(groups: Mapping[str, Mapping[str, float | None]], names: Sequence[str]) -> dict:
    """The unweighted mean over groups of each metric (MMLU: over its 57 subjects), with its stderr."""
    summary: dict[str, float | None] = {}
    for name in names:
        summary[name] = mean([group[name] for group in groups.values()])
        summary[f"{name}_stderr"] = unweighted_mean_stderr(
            [group[f"{name}_stderr"] for group in groups.values()]
        )
    return summary
