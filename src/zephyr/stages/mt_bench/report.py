"""The reports of an MT-Bench run: `results.md` (single grading or pairwise) and `categories.png`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zephyr.plots import category_plot


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.2f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown report: overall, per turn, per category, failures."""
    if results.get("mode") == "pairwise":
        return pairwise_markdown(results)
    lines = [
        f"# MT-Bench: {results['model']}",
        "",
        f"Judge: {results['judge']}{_mode_note(results)}",
        "",
        f"**Score: {_fmt(results['score'])}** ({results['n_scored']} of {results['n']} judgments scored, "
        f"{results['n_failed']} failed)",
        "",
        "| turn | score | scored | failed |",
        "|---|---|---|---|",
    ]
    for turn, summary in results["turns"].items():
        lines.append(f"| {turn} | {_fmt(summary['score'])} | {summary['n_scored']} | {summary['n_failed']} |")
    lines += ["", "| category | score | turn 1 | turn 2 | scored | failed |", "|---|---|---|---|---|---|"]
    for category, s in results["categories"].items():
        lines.append(
            f"| {category} | {_fmt(s['score'])} | {_fmt(s.get('turn_1'))} | {_fmt(s.get('turn_2'))} "
            f"| {s['n_scored']} | {s['n_failed']} |"
        )
    return "\n".join(lines + _failure_lines(results, "Failures (not in the means)", "judgments")) + "\n"


def _mode_note(results: Mapping[str, Any]) -> str:
    if results.get("judge_mode") != "logprobs":
        return ""
    if results.get("mode") == "pairwise":
        return " (logprobs: each verdict is the judge's likeliest of [[A]], [[B]], [[C]])"
    return " (logprobs: each score is the judge's expected rating over the tokens 1-10)"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pair_row(name: str, s: Mapping[str, Any]) -> str:
    return (
        f"| {name} | {_rate(s['win_rate_adjusted'])} | {s['win']} | {s['loss']} | {s['tie']} "
        f"| {s['n_inconsistent']} | {s['n_failed']} |"
    )


def pairwise_markdown(results: Mapping[str, Any]) -> str:
    """Pairwise results as Markdown: the model's win rate against the baseline overall, per turn and per
    category, and the failed games."""
    header = ["| {} | win rate | win | loss | tie | inconsistent | failed |", "|---|---|---|---|---|---|---|"]
    lines = [
        f"# MT-Bench pairwise: {results['model']} vs {results['baseline_model']}",
        "",
        f"Baseline: {results['baseline']}. Judge: {results['judge']}{_mode_note(results)}",
        "",
        f"**Win rate: {_rate(results['win_rate_adjusted'])}** (win + tie / 2 over "
        f"{results['n'] - results['n_failed']} games; {results['win']} won, {results['loss']} lost, "
        f"{results['tie']} tied, of which {results['n_inconsistent']} inconsistent between the two orders; "
        f"{results['n_failed']} failed)",
        "",
        header[0].format("turn"),
        header[1],
        *(_pair_row(turn, s) for turn, s in results["turns"].items()),
        "",
        header[0].format("category"),
        header[1],
        *(_pair_row(category, s) for category, s in results["categories"].items()),
    ]
    return "\n".join(lines + _failure_lines(results, "Failed games (not in the rates)", "games")) + "\n"


def _failure_lines(results: Mapping[str, Any], title: str, what: str) -> list[str]:
    """The Markdown list of failed turns and the count of missing ones, under the results tables."""
    lines = []
    if results["failures"]:
        lines += ["", f"{title}:", ""]
        lines += [
            f"- question {f['question_id']} turn {f['turn']}: {f['reason']}" for f in results["failures"]
        ]
    if results.get("missing"):
        lines += ["", f"Missing {what}: {len(results['missing'])}"]
    return lines


def plot_categories(results: Mapping[str, Any], path: Path) -> None:
    """The per-category radar of one model's results (when there are three categories or more)."""
    if len(results["categories"]) >= 3:  # a radar needs three spokes; a --limit run may have fewer
        category_plot({results["model"]: results}, path)
