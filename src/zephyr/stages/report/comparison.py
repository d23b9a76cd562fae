"""The comparison table (the paper's ablations): one row per model, one column per metric, and reference
rows (the paper's published numbers, rows from a user's file) beside the run's models.

A multiple-choice column shows its set's headline metric: results.json `metric`, which `zephyr eval mc`
writes from the preset's declaration (`zephyr.stages.mc.presets.Preset.metric`: ARC and HellaSwag
acc_norm, MMLU acc, the unweighted mean of its subjects, TruthfulQA mc2; acc, or mc2 with gold lists, for
a plain file). Results hold fractions; the table shows percentages, as the paper and the Open LLM
Leaderboard do. With all four Open LLM v1 presets, their average follows, computed as the leaderboard did.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from zephyr.stages.mc.presets import OPEN_LLM_V1, PRESETS, open_llm_average
from zephyr.stages.report.values import _get, _mapping, _number

PERCENT = 100.0  # multiple-choice results are fractions; the table shows them in percent
OPEN_LLM_AVERAGE = "open_llm/average"


@dataclass(frozen=True)
class ReferenceRow:
    """A row of published numbers beside the run's models (built in, or read by `references`)."""

    label: str
    source: str
    values: Mapping[str, float]  # reference key -> number (multiple choice in percent)


@dataclass(frozen=True)
class _Metric:
    key: str
    label: str
    group: str
    digits: int
    higher_is_better: bool = True
    stderr: str | None = None
    benchmark: str | None = None  # the key reference rows give this column's value by; None: `key`

    @property
    def reference_key(self) -> str:
        return self.benchmark or self.key


_Read = Callable[[str], tuple[Any, Any]]  # model -> (value, standard error)

# (key, label, path in results.json) of the MT-Bench columns: single-answer grading only
_MT_BENCH = (
    ("mt_bench/overall", "MT-Bench", ("score",)),
    ("mt_bench/turn_1", "MT-Bench turn 1", ("turns", "1", "score")),
    ("mt_bench/turn_2", "MT-Bench turn 2", ("turns", "2", "score")),
)
# (key, label, value key, standard-error key) of the AlpacaEval columns, in percent as results.json holds them
_ALPACA_EVAL = (
    ("alpaca_eval/win_rate", "AlpacaEval win rate (%)", "win_rate", "standard_error"),
    (
        "alpaca_eval/lc_win_rate",
        "AlpacaEval LC win rate (%)",
        "length_controlled_winrate",
        "lc_standard_error",
    ),
)
# (column, training kind, key of the last eval line)
_TRAINING = (
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
_MC_KEY = re.compile(r"mc/[^/]+/[^/]+")
# Reference keys in percent of a multiple-choice metric (the presets' and the Open LLM average)
PERCENT_KEYS = (*PRESETS, OPEN_LLM_AVERAGE)


def reference_keys() -> tuple[str, ...]:
    """The keys a reference row's values may have besides `mc/SET/METRIC`: a preset name (its headline
    metric, in percent, in the column of the set that ran the preset with its shots), the Open LLM
    average, and the other columns' keys."""
    fixed = [key for key, *_ in (*_MT_BENCH, *_ALPACA_EVAL)] + [m.key for m, *_ in _TRAINING]
    return (*PERCENT_KEYS, *fixed)


def is_reference_key(key: str) -> bool:
    return key in reference_keys() or bool(_MC_KEY.fullmatch(key))


def _mt_bench(evals: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    """A model's MT-Bench scores: single-answer grading only (pairwise results hold win rates, no score)."""
    result = _get(evals, model, "mt_bench")
    return result if isinstance(result, dict) and result.get("mode", "single") == "single" else None


def mc_metric(result: Any) -> str | None:
    """A set's headline metric: results.json `metric` (the preset's declared metric, written by eval mc)."""
    metric = _get(result, "metric")
    return metric if isinstance(metric, str) else None


def mc_benchmark(result: Any) -> str | None:
    """The preset a set's results measure as published numbers are measured: the preset it ran, with the
    preset's number of shots (a 0-shot ARC run is not ARC-25)."""
    preset = _get(result, "preset")
    if isinstance(preset, str) and preset in PRESETS:
        return preset if _get(result, "num_fewshot") == PRESETS[preset].num_fewshot else None
    return None


def mc_percent(result: Any, metric: str) -> tuple[float | None, float | None]:
    """A set's `metric` and its standard error in percent (None where absent)."""
    value, se = _number(_get(result, metric)), _number(_get(result, f"{metric}_stderr"))
    return (
        None if value is None else value * PERCENT,
        None if se is None else se * PERCENT,
    )


def mc_sets(evals: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Every MC set of the run, in order of appearance, with its headline metric and benchmark (from the
    first model whose results name a metric; a set whose results name none has no column)."""
    sets: dict[str, tuple[str, str | None]] = {}
    for e in evals.values():
        for name, result in _mapping(e.get("mc")).items():
            if name not in sets and (metric := mc_metric(result)) is not None:
                sets[name] = (metric, mc_benchmark(result))
    return sets


def _mc_columns(evals: Mapping[str, Any]) -> list[tuple[_Metric, _Read]]:
    sets = mc_sets(evals)
    columns: list[tuple[_Metric, _Read]] = []
    for name, (metric, benchmark) in sets.items():

        def read(model: str, name: str = name, metric: str = metric) -> tuple[Any, Any]:
            return mc_percent(_get(evals, model, "mc", name), metric)

        label = f"{name} {metric} (%)"
        columns.append(
            (_Metric(f"mc/{name}/{metric}", label, "multiple choice", 2, benchmark=benchmark), read)
        )
    open_llm: dict[str, str] = {}  # benchmark -> the first set that measures it
    for name, (_, benchmark) in sets.items():
        if benchmark in OPEN_LLM_V1:
            open_llm.setdefault(benchmark, name)
    if len(open_llm) == len(OPEN_LLM_V1):

        def average(model: str) -> tuple[Any, Any]:
            percent = {b: mc_percent(_get(evals, model, "mc", n), sets[n][0])[0] for b, n in open_llm.items()}
            return open_llm_average(percent), None

        columns.append((_Metric(OPEN_LLM_AVERAGE, "Open LLM v1 average (%)", "multiple choice", 2), average))
    return columns


def _metrics(evals: Mapping[str, Any], training: Mapping[str, Any]) -> list[tuple[_Metric, _Read]]:
    """The table's columns, each with a function model -> (value, standard error)."""
    columns = _mc_columns(evals)
    for key, label, path in _MT_BENCH:
        columns.append((_Metric(key, label, "MT-Bench", 2), partial(_mt_bench_value, evals, path)))
    for key, label, value_key, se_key in _ALPACA_EVAL:
        metric = _Metric(key, label, "AlpacaEval", 2, stderr=f"{key}_se")
        columns.append((metric, partial(_alpaca_eval_value, evals, value_key, se_key)))
    for metric, kind, key in _TRAINING:
        columns.append((metric, partial(_training_value, training, kind, key)))
    return columns


def _mt_bench_value(evals: Mapping[str, Any], path: Sequence[str], model: str) -> tuple[Any, Any]:
    return _get(_mt_bench(evals, model), *path), None


def _alpaca_eval_value(evals: Mapping[str, Any], value_key: str, se_key: str, model: str) -> tuple[Any, Any]:
    return _get(evals, model, "alpaca_eval", value_key), _get(evals, model, "alpaca_eval", se_key)


def _training_value(training: Mapping[str, Any], kind: str, key: str, model: str) -> tuple[Any, Any]:
    """A training run's last eval metric, in the column of its kind of training only (sft, dpo)."""
    same_kind = _get(training, model, "kind") == kind
    return (_get(training, model, "last_eval", key) if same_kind else None), None


def _reference_row(reference: ReferenceRow, columns: Sequence[_Metric]) -> dict[str, Any]:
    values: dict[str, float | None] = dict(reference.values)
    if OPEN_LLM_AVERAGE not in values:
        values[OPEN_LLM_AVERAGE] = open_llm_average(values)
    return {
        "model": reference.label,
        "label": f"reference: {reference.source}",
        "reference": True,
        "source": reference.source,
        "values": {m.key: values.get(m.reference_key, values.get(m.key)) for m in columns},
        "stderr": {},
    }


def comparison_table(
    models: Sequence[Mapping[str, Any]],
    evals: Mapping[str, Any],
    training: Mapping[str, Any],
    references: Sequence[ReferenceRow] = (),
) -> dict[str, Any]:
    """One row per model, one column per metric that any model has, then one row per reference.

    Columns: per MC set its headline metric in percent, and the Open LLM v1 average when the run has the
    four presets; MT-Bench overall, turn 1, turn 2; AlpacaEval win rate and length-controlled win rate
    (with standard errors); the reward accuracy and margin of the last held-out eval of each DPO run; the
    held-out loss of the SFT run. A reference value lands in the column whose `benchmark` (an MC set that
    ran a preset with its shots: the preset's name) or else whose key it names. Returns `{"columns": [{key,
    label, group, digits, higher_is_better, stderr, benchmark}], "rows": [{model, label, values, stderr}
    and for references also reference: true, source]}`; a value is None where a row lacks it.
    """
    columns = _metrics(evals, training)
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
    if kept:
        rows += [_reference_row(reference, kept) for reference in references]
    return {"columns": [asdict(m) for m in kept], "rows": rows}
