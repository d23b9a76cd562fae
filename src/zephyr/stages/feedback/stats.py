"""Statistics of AI feedback: rating histograms, ties, parse failures, judge agreement, position bias,
token usage and cost.

Every function takes records or observations and returns plain dicts (JSON-ready: string keys), so the
stage writes them as they are; `render_markdown` turns a `summarize` result into the report section and
`histograms_png` draws the histograms (matplotlib's Agg canvas, imported only when called).

Conventions:
- Histograms count ratings rounded to the nearest whole number (half up): logprobs-mode ratings are
  fractional. Buckets are "1" … str(scale); ratings outside 1..scale are counted in `outside_scale`.
- Positions are where a completion was shown in the judge prompt, 0 = first ("Output 1").
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from zephyr.judge import parsing
from zephyr.judge.rating import Rating
from zephyr.stages.feedback import ultrafeedback
from zephyr.stages.feedback.binarize import BinarizeStats

# Every reason a feedback rating can fail for, listed (zeros included) in the statistics.
REASONS = parsing.REASONS + ultrafeedback.REASONS

_EPS = 1e-9


def _bucket(value: float) -> int:
    return math.floor(value + 0.5)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rated_means(record: Mapping[str, Any]) -> list[float]:
    return [c["mean_rating"] for c in record["completions"] if c.get("mean_rating") is not None]


# ---------------------------------------------------------------------------------------------------------
# Ratings


def rating_histograms(records: Iterable[Mapping[str, Any]], scale: int) -> dict[str, Any]:
    """Counts of each rating per aspect and per generator (all aspects of its completions pooled).

    Returns `{"by_aspect": {aspect: {"1": n, …}}, "by_model": {model: {"1": n, …}}, "outside_scale": n}`.
    """
    empty = dict.fromkeys((str(v) for v in range(1, scale + 1)), 0)
    by_aspect: dict[str, dict[str, int]] = defaultdict(lambda: dict(empty))
    by_model: dict[str, dict[str, int]] = defaultdict(lambda: dict(empty))
    outside = 0
    for record in records:
        for completion in record["completions"]:
            for aspect, value in completion.get("ratings", {}).items():
                if value is None:
                    continue
                bucket = _bucket(value)
                if not 1 <= bucket <= scale:
                    outside += 1
                    continue
                by_aspect[aspect][str(bucket)] += 1
                by_model[completion["model"]][str(bucket)] += 1
    return {"by_aspect": dict(by_aspect), "by_model": dict(by_model), "outside_scale": outside}


def model_means(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per generator: its completions, how many have a mean rating, and the average of those means."""
    means: dict[str, list[float]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for record in records:
        for completion in record["completions"]:
            counts[completion["model"]] += 1
            if completion.get("mean_rating") is not None:
                means[completion["model"]].append(completion["mean_rating"])
    return {
        model: {"completions": counts[model], "rated": len(means[model]), "mean_rating": _mean(means[model])}
        for model in sorted(counts)
    }


def unrated(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Ratings not given, per aspect and reason (`rating_reasons`): a judge's failures, an aspect declared not
    applicable ("N/A"), an imported record's missing annotation. Left out of each completion's mean."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        for completion in record["completions"]:
            reasons = completion.get("rating_reasons", {})
            for aspect, value in completion.get("ratings", {}).items():
                if value is None:
                    counts[aspect][reasons.get(aspect, "unknown")] += 1
    return {aspect: dict(sorted(counts[aspect].items())) for aspect in sorted(counts)}


def tie_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Prompts, those with two or more rated completions, those whose top mean is shared, those all equal."""
    prompts = rated = top_tie = all_equal = 0
    for record in records:
        prompts += 1
        means = _rated_means(record)
        if len(means) < 2:
            continue
        rated += 1
        best = max(means)
        top_tie += sum(m >= best - _EPS for m in means) > 1
        all_equal += max(means) - min(means) <= _EPS
    return {"prompts": prompts, "with_two_rated": rated, "top_tie": top_tie, "all_equal": all_equal}


# ---------------------------------------------------------------------------------------------------------
# The judge


def parse_failures(parsed: Iterable[Rating]) -> dict[str, Any]:
    """Ratings read, and failures per reason (every reason of the vocabulary listed, zeros included)."""
    failed = dict.fromkeys(REASONS, 0)
    total = ok = 0
    for rating in parsed:
        total += 1
        if rating.value is not None:
            ok += 1
        else:
            failed[rating.reason or "unknown"] = failed.get(rating.reason or "unknown", 0) + 1
    return {"total": total, "parsed": ok, "failed": failed}


def agreement(repeats: Iterable[Sequence[float | None]]) -> dict[str, Any]:
    """How well repeated judgments of the same item (completion and aspect) agree.

    Each element of `repeats` holds one item's ratings over the repeats (None = a failed parse, left out).
    Over every pair of ratings within an item: the mean absolute difference, and the share of pairs that
    are exactly equal (logprobs-mode ratings are fractional and rarely equal: read the difference there).
    Items with fewer than two ratings are not counted.
    """
    diffs: list[float] = []
    items = 0
    for ratings in repeats:
        values = [v for v in ratings if v is not None]
        if len(values) < 2:
            continue
        items += 1
        diffs += [abs(a - b) for a, b in combinations(values, 2)]
    return {
        "items": items,
        "pairs": len(diffs),
        "mean_abs_diff": _mean(diffs),
        "exact_agreement": _mean([float(d <= _EPS) for d in diffs]),
    }


def position_bias(observations: Iterable[tuple[int, float | None]]) -> dict[str, dict[str, Any]]:
    """Mean rating by position in the judge prompt, from (position, rating) observations.

    An unbiased judge with shuffled completions gives about the same mean at every position. Observations
    without a rating are counted in `failed` for their position.
    """
    values: dict[int, list[float]] = defaultdict(list)
    failed: Counter[int] = Counter()
    for position, rating in observations:
        if rating is None:
            failed[position] += 1
        else:
            values[position].append(rating)
    return {
        str(p): {"n": len(values[p]), "failed": failed[p], "mean": _mean(values[p])}
        for p in sorted(set(values) | set(failed))
    }


def position_effect(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """How much the position a completion was shown at moves its rating, before and after the repeats.

    `first[p]`: the mean rating of the first repeat's judgments at position p (what one judgment carries);
    `final[p]`: the mean kept rating (the median over the repeats) of the completions shown at p in the first
    repeat. `first_spread` and `final_spread` are the highest mean minus the lowest; `removed` = 1 -
    final_spread / first_spread is the share of the position effect that reordering the completions across
    repeats took out (0 with one repeat: the kept rating is the first judgment).
    """
    first: dict[int, list[float]] = defaultdict(list)
    final: dict[int, list[float]] = defaultdict(list)
    for record in records:
        for completion in record["completions"]:
            for j in completion.get("judgments", []):
                if j["repeat"] != 0:
                    continue
                if j["value"] is not None:
                    first[j["position"]].append(j["value"])
                kept = completion.get("ratings", {}).get(j["aspect"])
                if kept is not None:
                    final[j["position"]].append(kept)
    means = {
        name: {str(p): _mean(v) for p, v in sorted(d.items())}
        for name, d in (("first", first), ("final", final))
    }
    spreads = {name: _spread(m.values()) for name, m in means.items()}
    removed = None
    if spreads["first"] and spreads["final"] is not None:
        removed = 1.0 - spreads["final"] / spreads["first"]
    return {
        **means,
        "first_spread": spreads["first"],
        "final_spread": spreads["final"],
        "removed": removed,
    }


def _spread(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) - min(present) if len(present) > 1 else None


def chosen_position(
    records: Iterable[Mapping[str, Any]], pairs: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """Where the chosen answer of each pair was shown: the share of its judgments at the first and at the
    last position, averaged over pairs, against what a judge blind to position gives (`expected`: 1 over
    the completions shown). A judge that favours late answers chooses answers it saw last."""
    by_id = {r["prompt_id"]: r for r in records}
    first, last, expected = [], [], []
    for pair in pairs:
        record = by_id.get(pair["prompt_id"])
        if record is None:
            continue
        n = len(record["completions"])
        chosen = next((c for c in record["completions"] if c.get("model") == pair.get("chosen_model")), None)
        positions = [j["position"] for j in (chosen or {}).get("judgments", [])]
        if not positions:
            continue
        first.append(sum(p == 0 for p in positions) / len(positions))
        last.append(sum(p == n - 1 for p in positions) / len(positions))
        expected.append(1 / n)
    return {
        "pairs": len(first),
        "shown_first": _mean(first),
        "shown_last": _mean(last),
        "expected": _mean(expected),
    }


# ---------------------------------------------------------------------------------------------------------
# Token usage and cost


def token_usage(
    records: Iterable[Mapping[str, Any]], prices: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, Any]:
    """Tokens the rated records took, per generator and for the judge, with their cost where a price is known.

    Counted from the records (each completion's `prompt_tokens` / `completion_tokens`, each record's
    `judge_usage`), so it is what the data cost, answers reused from a cache included. `prices` maps a
    generator name or the judge's name to USD per million `prompt` and `completion` tokens; `cost` is None
    for models without a price, `total_cost` the sum of the known ones (None when none is known).
    """
    prices = prices or {}
    generators: dict[str, dict[str, Any]] = {}
    judges: dict[str, dict[str, Any]] = {}
    for record in records:
        for completion in record["completions"]:
            entry = generators.setdefault(str(completion["model"]), _usage_entry("completions"))
            entry["completions"] += 1
            entry["prompt_tokens"] += int(completion.get("prompt_tokens") or 0)
            entry["completion_tokens"] += int(completion.get("completion_tokens") or 0)
        judge_usage = record.get("judge_usage")
        if isinstance(judge_usage, Mapping):
            name = str(record.get("judge", "")).split("|")[0]
            entry = judges.setdefault(name, _usage_entry("calls"))
            for key in ("calls", "prompt_tokens", "completion_tokens"):
                entry[key] += int(judge_usage.get(key) or 0)
    costs = []
    for name, entry in [*generators.items(), *judges.items()]:
        entry["cost"] = cost(entry, prices.get(name))
        if entry["cost"] is not None:
            costs.append(entry["cost"])
    return {
        "generators": dict(sorted(generators.items())),
        "judge": judges,
        "total_cost": sum(costs) if costs else None,
    }


def _usage_entry(count: str) -> dict[str, Any]:
    return {count: 0, "prompt_tokens": 0, "completion_tokens": 0}


def cost(tokens: Mapping[str, Any], price: Mapping[str, float] | None) -> float | None:
    """USD for `prompt_tokens` and `completion_tokens` at `price` (USD per million of each), or None."""
    if price is None:
        return None
    return (
        tokens["prompt_tokens"] * price.get("prompt", 0.0)
        + tokens["completion_tokens"] * price.get("completion", 0.0)
    ) / 1e6


# ---------------------------------------------------------------------------------------------------------
# Pairs


def pair_stats(pairs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Pairs, their mean scores and margin, and how often each generator is chosen or rejected."""
    chosen, rejected, margins = [], [], []
    chosen_by: Counter[str] = Counter()
    rejected_by: Counter[str] = Counter()
    for pair in pairs:
        chosen.append(pair["score_chosen"])
        rejected.append(pair["score_rejected"])
        margins.append(pair["score_chosen"] - pair["score_rejected"])
        chosen_by[str(pair.get("chosen_model"))] += 1
        rejected_by[str(pair.get("rejected_model"))] += 1
    return {
        "pairs": len(margins),
        "mean_score_chosen": _mean(chosen),
        "mean_score_rejected": _mean(rejected),
        "mean_margin": _mean(margins),
        "chosen_by_model": dict(sorted(chosen_by.items())),
        "rejected_by_model": dict(sorted(rejected_by.items())),
    }


def summarize(
    records: Sequence[Mapping[str, Any]],
    scale: int,
    *,
    parsed: Iterable[Rating] | None = None,
    repeats: Iterable[Sequence[float | None]] | None = None,
    positions: Iterable[tuple[int, float | None]] | None = None,
    pairs: Sequence[Mapping[str, Any]] | None = None,
    binarize_stats: BinarizeStats | None = None,
    prices: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """All statistics of a feedback run as one dict; sections whose input is not given are left out."""
    summary: dict[str, Any] = {
        "scale": scale,
        "histograms": rating_histograms(records, scale),
        "models": model_means(records),
        "unrated": unrated(records),
        "ties": tie_counts(records),
    }
    optional: dict[str, tuple[Any, Callable[[Any], dict[str, Any]]]] = {
        "parse_failures": (parsed, parse_failures),
        "agreement": (repeats, agreement),
        "position_bias": (positions, position_bias),
        "pairs": (pairs, pair_stats),
    }
    for name, (data, compute) in optional.items():
        if data is not None:
            summary[name] = compute(data)
    if binarize_stats is not None:
        summary["binarization"] = binarize_stats.to_dict()
    if positions is not None:
        summary["position_effect"] = position_effect(records)
        if pairs is not None:
            summary["chosen_position"] = chosen_position(records, pairs)
    summary["usage"] = token_usage(records, prices)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _histogram_table(histograms: Mapping[str, Mapping[str, int]], label: str) -> list[str]:
    names = list(histograms)
    buckets = list(next(iter(histograms.values()))) if histograms else []
    return _table([label, *names], ([b, *(histograms[n][b] for n in names)] for b in buckets))


def _section(title: str, *parts: list[str]) -> list[str]:
    lines = ["", f"### {title}"]
    for part in parts:
        lines += ["", *part]
    return lines


def _ratings_sections(summary: Mapping[str, Any]) -> list[str]:
    scale, histograms = summary["scale"], summary["histograms"]
    lines = _section("Ratings per aspect", _histogram_table(histograms["by_aspect"], "rating"))
    lines += _section(
        "Ratings per generator (all aspects)", _histogram_table(histograms["by_model"], "rating")
    )
    if histograms["outside_scale"]:
        lines += ["", f"Ratings outside 1–{scale}: {histograms['outside_scale']}"]
    models = summary["models"].items()
    lines += _section(
        "Generators",
        _table(
            ["model", "completions", "rated", "mean rating"],
            ([m, v["completions"], v["rated"], v["mean_rating"]] for m, v in models),
        ),
    )
    if summary.get("unrated"):
        lines += _section(
            "Ratings not given (left out of the means)",
            _table(
                ["aspect", "reason", "count"],
                (
                    [aspect, reason, n]
                    for aspect, by in summary["unrated"].items()
                    for reason, n in by.items()
                ),
            ),
        )
    return lines + _section("Ties", _table(["", "prompts"], summary["ties"].items()))


def _judge_sections(summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if failures := summary.get("parse_failures"):
        lines += _section(
            "Judge parse failures",
            [f"{failures['parsed']} of {failures['total']} ratings read."],
            _table(["reason", "count"], failures["failed"].items()),
        )
    if "agreement" in summary:
        lines += _section(
            "Agreement of repeated judgments", _table(["", "value"], summary["agreement"].items())
        )
    if "position_bias" in summary:
        rows = (
            [f"Output {int(p) + 1}", v["n"], v["failed"], v["mean"]]
            for p, v in summary["position_bias"].items()
        )
        lines += _section(
            "Mean rating by position in the judge prompt",
            _table(["position", "ratings", "failed", "mean"], rows),
        )
    if effect := summary.get("position_effect"):
        positions = list(dict.fromkeys([*effect["first"], *effect["final"]]))
        rows = ([f"Output {int(p) + 1}", effect["first"].get(p), effect["final"].get(p)] for p in positions)
        lines += _section(
            "Position effect before and after the repeats",
            _table(["shown at (first repeat)", "one judgment", "kept rating"], rows),
            [
                f"Spread (highest mean - lowest): {_fmt(effect['first_spread'])} for one judgment, "
                f"{_fmt(effect['final_spread'])} for the kept rating; share removed by the repeats: "
                f"{_fmt(effect['removed'])}."
            ],
        )
    if chosen := summary.get("chosen_position"):
        lines += _section(
            "Where the chosen answer was shown",
            _table(["", "share of its judgments"], [[k, v] for k, v in chosen.items() if k != "pairs"]),
            [f"Over {chosen['pairs']} pairs; `expected` is what a judge blind to position gives."],
        )
    return lines


def _usage_sections(summary: Mapping[str, Any]) -> list[str]:
    usage = summary.get("usage")
    if not usage:
        return []
    rows = [
        [
            name,
            role,
            e.get("completions", e.get("calls")),
            e["prompt_tokens"],
            e["completion_tokens"],
            e["cost"],
        ]
        for role, group in (("generator", usage["generators"]), ("judge", usage["judge"]))
        for name, e in group.items()
    ]
    total = usage["total_cost"]
    return _section(
        "Tokens and cost",
        _table(
            ["model", "role", "completions / calls", "prompt tokens", "completion tokens", "cost (USD)"], rows
        ),
        [f"Total cost: {'–' if total is None else f'${total:.4f}'} (prices from `feedback.prices`)."],
    )


def _pair_sections(summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if stats := summary.get("binarization"):
        lines += _section(
            "Binarization",
            [f"{stats['kept']} pairs from {stats['total']} prompts."],
            _table(["dropped because", "prompts"], stats["dropped"].items()),
        )
    if pairs := summary.get("pairs"):
        chosen, rejected = pairs["chosen_by_model"], pairs["rejected_by_model"]
        models = sorted(set(chosen) | set(rejected))
        lines += _section(
            "Pairs",
            _table(["", "value"], ((k, v) for k, v in pairs.items() if not isinstance(v, dict))),
            _table(
                ["model", "chosen", "rejected"], ([m, chosen.get(m, 0), rejected.get(m, 0)] for m in models)
            ),
        )
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The statistics as Markdown: one section per part of a `summarize` result."""
    lines = [f"## AI feedback statistics (ratings 1–{summary['scale']})"]
    lines += _ratings_sections(summary) + _judge_sections(summary) + _pair_sections(summary)
    lines += _usage_sections(summary)
    return "\n".join(lines) + "\n"


def histograms_png(histograms: Mapping[str, Any]) -> bytes:
    """A PNG of the rating histograms (`rating_histograms`' result): per aspect, and per generator."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:  # a dependency of zephyr, but the plot must not take the stage down
        raise ImportError("plotting the rating histograms needs matplotlib: pip install matplotlib") from exc
    panels = [("per aspect", histograms["by_aspect"]), ("per generator", histograms["by_model"])]
    # A Figure on the Agg canvas, not pyplot: no global backend switch, no GUI, safe in threads.
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    for i, (title, groups) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, i)
        buckets = list(next(iter(groups.values()))) if groups else []
        width = 0.8 / max(len(groups), 1)
        for j, (name, counts) in enumerate(groups.items()):
            xs = [int(b) - 0.4 + width * (j + 0.5) for b in buckets]
            axes.bar(xs, [counts[b] for b in buckets], width=width, label=name)
        axes.set_title(f"Ratings {title}")
        axes.set_xlabel("rating")
        axes.set_ylabel("count")
        axes.set_xticks([int(b) for b in buckets])
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        if groups:
            axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
