"""The comparison table (the paper's ablations): one row per model, one column per metric."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from zephyr.report.values import _get, _mapping, _number


@dataclass(frozen=True)
class _Metric:
    key: str
    label: str
    group: str
    digits: int
    higher_is_better: bool = True
    stderr: str | None = None


def _mt_bench(evals: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    """A model's MT-Bench scores: single-answer grading only (pairwise results hold win rates, no score)."""
    result = _get(evals, model, "mt_bench")
    return result if isinstance(result, dict) and result.get("mode", "single") == "single" else None


def _mc_metric(evals: Mapping[str, Any], name: str) -> str:
    """The column of an MC set: acc_norm (the Open LLM Leaderboard's for ARC, HellaSwag), else the set's
    headline metric (TruthfulQA: mc2)."""
    results = [_get(e, "mc", name) for e in evals.values()]
    if any(_number(_get(r, "acc_norm")) is not None for r in results):
        return "acc_norm"
    return next((r["metric"] for r in results if isinstance(_get(r, "metric"), str)), "score")


def _metrics(evals: Mapping[str, Any]) -> list[tuple[_Metric, Callable[[str], tuple[Any, Any]]]]:
    """The table's columns, each with a function model -> (value, standard error)."""
    columns: list[tuple[_Metric, Callable[[str], tuple[Any, Any]]]] = []
    sets = dict.fromkeys(name for e in evals.values() for name in _mapping(e.get("mc")))
    for name in sets:
        metric = _mc_metric(evals, name)

        def mc(model: str, name=name, metric=metric) -> tuple[Any, Any]:
            result = _get(evals, model, "mc", name)
            return _get(result, metric), _get(result, f"{metric}_stderr")

        columns.append((_Metric(f"mc/{name}/{metric}", f"{name} {metric}", "multiple choice", 4), mc))
    for key, label, path in (
        ("overall", "MT-Bench", ("score",)),
        ("turn_1", "MT-Bench turn 1", ("turns", "1", "score")),
        ("turn_2", "MT-Bench turn 2", ("turns", "2", "score")),
    ):
        columns.append(
            (
                _Metric(f"mt_bench/{key}", label, "MT-Bench", 2),
                lambda model, path=path: (_get(_mt_bench(evals, model), *path), None),
            )
        )
    for key, label, value_key, se_key in (
        ("win_rate", "AlpacaEval win rate (%)", "win_rate", "standard_error"),
        ("lc_win_rate", "AlpacaEval LC win rate (%)", "length_controlled_winrate", "lc_standard_error"),
    ):
        metric = _Metric(f"alpaca_eval/{key}", label, "AlpacaEval", 2, stderr=f"alpaca_eval/{key}_se")
        columns.append(
            (
                metric,
                lambda model, v=value_key, s=se_key: (
                    _get(evals, model, "alpaca_eval", v),
                    _get(evals, model, "alpaca_eval", s),
                ),
            )
        )
    return columns


def comparison_table(
    models: Sequence[Mapping[str, Any]], evals: Mapping[str, Any], training: Mapping[str, Any]
) -> dict[str, Any]:
    """One row per model, one column per metric that any model has.

    Columns: MC (acc_norm, or the set's headline metric) per set; MT-Bench overall, turn 1, turn 2;
    AlpacaEval win rate and length-controlled win rate (with standard errors); the reward accuracy and
    margin of the last held-out eval of each DPO run; the held-out loss of the SFT run. Returns
    `{"columns": [{key, label, group, digits, higher_is_better, stderr}], "rows": [{model, label, values,
    stderr}]}`; a value is None where a model lacks it.
    """
    columns = _metrics(evals)
    training_columns = (
        (
            _Metric("dpo/eval_reward_accuracy", "held-out reward accuracy", "DPO training", 4),
            "dpo",
            "eval/rewards/accuracies",
        ),
        (
            _Metric("dpo/eval_reward_margin", "held-out reward margin", "DPO training", 4),
            "dpo",
            "eval/rewards/margins",
        ),
        (
            _Metric("sft/eval_loss", "SFT held-out loss", "SFT training", 4, higher_is_better=False),
            "sft",
            "eval/loss",
        ),
    )
    for metric, kind, key in training_columns:
        columns.append(
            (
                metric,
                lambda model, kind=kind, key=key: (
                    _get(training, model, "last_eval", key)
                    if _get(training, model, "kind") == kind
                    else None,
                    None,
                ),
            )
        )
    rows = []
    for model in models:
        values, stderr = {}, {}
        for metric, read in columns:
            value, se = read(model["name"])
            values[metric.key] = _number(value)
            if metric.stderr or _number(se) is not None:
                stderr[metric.key] = _number(se)
        rows.append({"model": model["name"], "label": model["label"], "values": values, "stderr": stderr})
    kept = [m for m, _ in columns if any(r["values"][m.key] is not None for r in rows)]
    for row in rows:
        row["values"] = {m.key: row["values"][m.key] for m in kept}
        row["stderr"] = {m.key: row["stderr"][m.key] for m in kept if m.key in row["stderr"]}
    return {"columns": [asdict(m) for m in kept], "rows": rows}
