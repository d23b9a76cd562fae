"""The blocks a report is laid out in (headings, tables, figures, answers side by side) and the text of
table cells. Both renderers draw these blocks."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Text:
    text: str


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    """Cells are display strings; `strong` marks (row, column) cells to emphasize (the best of a column)."""

    header: list[str]
    rows: list[list[str]]
    strong: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Figure:
    """A plot drawn by the HTML renderer (`kind` names the plot, `data` is what it draws); the Markdown
    report leaves figures out."""

    kind: str
    caption: str
    data: Any


@dataclass
class Answers:
    """One prompt and each model's answer (None: the model has none), shown side by side."""

    prompt: str
    answers: list[tuple[str, str | None]]
    number: int = 1


Block = Heading | Text | Items | Table | Code | Figure | Answers


_NUMERIC = re.compile(r"^(?:[-+]?[\d.]+(?:e[-+]?\d+)?(?: ± [\d.]+)?|–)$")


def is_numeric(cell: str) -> bool:
    """A table cell that holds a number (or the "–" of a missing one): aligned right."""
    return bool(_NUMERIC.match(cell))


def fmt(value: Any, digits: int | None = None) -> str:
    """A value as table text: `digits` decimals for a number when given, else a short form."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if digits is not None:
            return f"{value:.{digits}f}"
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _key_values(data: Mapping[str, Any], keys: Sequence[str] | None = None) -> Table:
    keys = [k for k in (keys or data) if k in data and not isinstance(data[k], (dict, list))]
    return Table(["", "value"], [[k, fmt(data[k])] for k in keys])


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _section(title: str) -> Heading:
    return Heading(title, 2, _anchor(title))
