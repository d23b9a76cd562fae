"""Reference rows of the comparison table: published numbers beside the run's models, so that a
reproduction is judged against them at a glance.

Built in: the paper's Zephyr-7B-β (`report.paper_reference: true` in the recipe). Others come from YAML or
JSON files (`report.references`), a list of rows:

    - label: our earlier model
      source: lm-evaluation-harness run of 2026-01-10
      values: {arc: 54.5, hellaswag: 75.6, mmlu: 55.4, truthfulqa: 56.3, mt_bench/overall: 6.8}

A value's key is a preset name (that benchmark's headline metric, in percent), `open_llm/average`, or a
column key of the table (`mt_bench/overall`, `alpaca_eval/win_rate`, `mc/SET/METRIC`, ...);
`comparison.reference_keys` lists them. Multiple-choice values are percentages, as published.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from zephyr.core.errors import DataError
from zephyr.stages.report.comparison import PERCENT_KEYS, ReferenceRow, is_reference_key, reference_keys

# Zephyr-7B-β as published: MT-Bench (GPT-4 judge), AlpacaEval v1 (win rate against text-davinci-003,
# GPT-4 annotator) and the Open LLM Leaderboard v1 tasks (ARC-25 acc_norm, HellaSwag-10 acc_norm, MMLU-5
# acc as the unweighted mean of 57 subjects, TruthfulQA-0 mc2). The average is derived by the table.
PAPER_ZEPHYR_7B_BETA = ReferenceRow(
    label="Zephyr-7B-β",
    source="paper (arXiv:2310.16944) / model card (HuggingFaceH4/zephyr-7b-beta)",
    values={
        "mt_bench/overall": 7.34,
        "alpaca_eval/win_rate": 90.60,
        "arc": 62.03,
        "hellaswag": 84.36,
        "mmlu": 61.07,
        "truthfulqa": 57.45,
    },
)

_FIELDS = ("label", "source", "values")


def parse_references(text: str, path: str) -> list[ReferenceRow]:
    """The rows of a reference file (YAML, or JSON, which YAML reads too). A problem is a DataError
    `PATH:LINE: FIELD: problem` naming the first one."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML or JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}:{_line(root)}: expected a list of rows, each with {', '.join(_FIELDS)}")
    return [_row(item, root.value[i], path, i) for i, item in enumerate(data)]


def _row(item: Any, node: Any, path: str, i: int) -> ReferenceRow:
    if not isinstance(item, dict):
        raise DataError(f"{path}:{_line(node)}: [{i}]: expected a mapping with {', '.join(_FIELDS)}")
    for key in item:
        if key not in _FIELDS:
            raise DataError(
                f"{path}:{_line(node)}: [{i}].{key}: unknown field (expected {', '.join(_FIELDS)})"
            )
    for key in ("label", "source"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise DataError(f"{path}:{_line(_child(node, key))}: [{i}].{key}: expected a non-empty string")
    values = item.get("values")
    values_node = _child(node, "values")
    if not isinstance(values, dict) or not values:
        raise DataError(f"{path}:{_line(values_node)}: [{i}].values: expected a mapping of key: number")
    for key, value in values.items():
        where = f"{path}:{_line(_child(values_node, key))}: [{i}].values.{key}"
        if problem := _value_problem(str(key), value):
            raise DataError(f"{where}: {problem}")
    return ReferenceRow(item["label"], item["source"], {str(k): float(v) for k, v in values.items()})


def _value_problem(key: str, value: Any) -> str | None:
    if not is_reference_key(key):
        return f"unknown key (expected one of {', '.join(reference_keys())}, or mc/SET/METRIC)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected a number, got {value!r}"
    if key in PERCENT_KEYS and not 1 < value <= 100:
        # Results hold fractions; published tables percentages. A fraction here would read as ~0%.
        return f"expected a percentage (62.03, not 0.6203), got {value!r}"
    return None


def _child(node: Any, key: str) -> Any:
    """The value node of `key` in a mapping node (the node itself when there is none: its line is used)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    return node


def _line(node: Any) -> int:
    return node.start_mark.line + 1 if node is not None else 1
