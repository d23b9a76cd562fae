"""The Evaluation section of the report: multiple choice, MT-Bench and AlpacaEval, one table and one
figure each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zephyr.stages.report.blocks import Block, Figure, Heading, Table, Text, fmt
from zephyr.stages.report.comparison import _mt_bench, mc_metric, mc_percent, mc_sets
from zephyr.stages.report.values import _get, _mapping, _number

_MC_METRICS = ("acc", "acc_norm", "mc1", "mc2")


def _mc_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    sets = list(dict.fromkeys(name for e in evals.values() for name in e.get("mc", {})))
    if not sets:
        return []
    rows = []
    for name in sets:
        for model, e in evals.items():
            if (r := e.get("mc", {}).get(name)) is None:
                continue
            rows.append(
                [
                    name,
                    model,
                    fmt(mc_metric(r)),
                    *(_percent_with_se(r, m) for m in _MC_METRICS),
                    fmt(_get(r, "counts", "items") or r.get("n_items")),
                    fmt(r.get("num_fewshot")),
                ]
            )
    header = ["set", "model", "headline", *(f"{m} (%)" for m in _MC_METRICS), "items", "shots"]
    headline = mc_sets(evals)
    bars = {
        "sets": [f"{name} {metric}" for name, (metric, _) in headline.items()],
        "models": [labels.get(m, m) for m in evals],
        "values": [
            [mc_percent(_get(e, "mc", n), m)[0] for n, (m, _) in headline.items()] for e in evals.values()
        ],
        "stderr": [
            [mc_percent(_get(e, "mc", n), m)[1] for n, (m, _) in headline.items()] for e in evals.values()
        ],
    }
    blocks: list[Block] = [
        Heading("Multiple choice", 3, "multiple-choice"),
        Text(
            "In percent (results.json holds fractions). `headline` is the set's own metric, the one the"
            " comparison table shows; MMLU's acc is the unweighted mean of its subjects."
        ),
        Table(header, rows),
    ]
    if headline:
        caption = "Multiple choice: each set's headline metric per model, % (error bars: standard error)"
        blocks.append(Figure("mc", caption, bars))
    return blocks


def _percent_with_se(result: Mapping[str, Any], metric: str) -> str:
    value, se = mc_percent(result, metric)
    if value is None:
        return "–"
    return fmt(value, 2) + (f" ± {fmt(se, 2)}" if se is not None else "")


def _mt_bench_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    results = {m: r for m in evals if (r := _mt_bench(evals, m)) is not None}
    if not results:
        return []
    rows = [
        [
            model,
            fmt(_number(r.get("score")), 2),
            fmt(_number(_get(r, "turns", "1", "score")), 2),
            fmt(_number(_get(r, "turns", "2", "score")), 2),
            fmt(r.get("n_scored")),
            fmt(r.get("n_failed")),
            fmt(len(r.get("missing") or [])),
            fmt(r.get("judge")),
        ]
        for model, r in results.items()
    ]
    header = ["model", "overall", "turn 1", "turn 2", "scored", "parse failures", "unjudged", "judge"]
    blocks: list[Block] = [Heading("MT-Bench", 3, "mt-bench"), Table(header, rows)]
    categories = _mt_bench_categories(results)
    if categories:
        blocks.append(
            Table(
                ["category", *results],
                [
                    [c, *(fmt(_number(_get(r, "categories", c, "score")), 2) for r in results.values())]
                    for c in categories
                ],
            )
        )
        scores = {
            labels.get(m, m): {c: _number(_get(r, "categories", c, "score")) for c in categories}
            for m, r in results.items()
        }
        blocks.append(
            Figure(
                "mt_bench", "MT-Bench score per category (1–10)", {"categories": categories, "models": scores}
            )
        )
    return blocks


def _mt_bench_categories(results: Mapping[str, Any]) -> list[str]:
    from zephyr.plots import MT_BENCH_CATEGORIES

    present = {c for r in results.values() for c in _mapping(r.get("categories"))}
    ordered = [c for c in MT_BENCH_CATEGORIES if c in present]
    return ordered + sorted(present - set(ordered))


def _alpaca_eval_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    results = {m: e["alpaca_eval"] for m, e in evals.items() if isinstance(e.get("alpaca_eval"), dict)}
    if not results:
        return []
    rows = []
    for model, r in results.items():
        rows.append(
            [
                model,
                _pm(r.get("win_rate"), r.get("standard_error")),
                _pm(r.get("length_controlled_winrate"), r.get("lc_standard_error")),
                fmt(_number(r.get("discrete_win_rate")), 2),
                f"{fmt(r.get('n_wins'))} / {fmt(r.get('n_wins_base'))} / {fmt(r.get('n_draws'))}",
                f"{fmt(r.get('n_annotations'))} ({fmt(r.get('n_failed'))})",
                fmt(_number(r.get("avg_length")), 0),
                fmt(r.get("judge")),
            ]
        )
    header = ["model", "win rate (%)", "LC win rate (%)", "discrete (%)", "wins / losses / draws"]
    header += ["annotations (failed)", "avg length", "judge"]
    bars = {
        "models": [labels.get(m, m) for m in results],
        "win_rate": [_number(r.get("win_rate")) for r in results.values()],
        "standard_error": [_number(r.get("standard_error")) for r in results.values()],
        "lc_win_rate": [_number(r.get("length_controlled_winrate")) for r in results.values()],
        "lc_standard_error": [_number(r.get("lc_standard_error")) for r in results.values()],
    }
    notes = [
        f"{m}: {r['length_controlled_note']}" for m, r in results.items() if r.get("length_controlled_note")
    ]
    blocks: list[Block] = [Heading("AlpacaEval", 3, "alpacaeval"), Table(header, rows)]
    if notes:
        blocks.append(Text("Length-controlled win rate not computed: " + "; ".join(notes)))
    glms = [f"{m}: {r['length_controlled_glm']}" for m, r in results.items() if "length_controlled_glm" in r]
    if glms:  # alpaca_eval's LC variant: only length_controlled_v1 is the AlpacaEval 2.0 leaderboard's
        blocks.append(Text("Length-controlled GLM (leaderboard: length_controlled_v1): " + ", ".join(glms)))
    blocks.append(Figure("alpaca_eval", "AlpacaEval win rates (error bars: standard error)", bars))
    return blocks


def _pm(value: Any, se: Any) -> str:
    if _number(value) is None:
        return "–"
    return fmt(_number(value), 2) + (f" ± {fmt(_number(se), 2)}" if _number(se) is not None else "")
