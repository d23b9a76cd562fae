"""`zephyr report RUN`: a run folder as `report.json`, `report.md` and one self-contained `report.html`.

Three steps, I/O at the edges:

1. `collect_report(run_dir)` reads what the run folder holds (manifest, recipe, training metrics, eval
   results, sample answers, data statistics) into one JSON-ready dict and lists what is missing, and why.
   A missing or unreadable file is an entry of `missing`, never an error: a partial run still has a report.
2. `report_blocks(report)` lays the report out as blocks (headings, tables, figures, answers side by side).
   `render_markdown` and `render_html` render the same blocks, so the two files always say the same
   thing. Both are pure: the report dict in, text out.
3. `write_report(run_dir, out_dir)` writes the three files.

The run folder layout and the report's keys are described in docs/report.md.

Modules, by layer: `collect` (the run folder into the report dict, with `comparison`, `references` and
`values`), `layout` (the dict as blocks, with `blocks` and `eval_layout`), `markdown` and `html` (the
blocks as text), and `run` (writing the three files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr import io
from zephyr.stages.report.blocks import (
    Answers,
    Block,
    Code,
    Figure,
    Heading,
    Items,
    Table,
    Text,
    fmt,
    is_numeric,
)
from zephyr.stages.report.collect import (
    EXPECTED_FILES,
    IMAGES,
    MODEL_LABELS,
    REPORT_VERSION,
    RUN_MODELS,
    collect_report,
    json_safe,
    training_curves,
)
from zephyr.stages.report.comparison import comparison_table
from zephyr.stages.report.html import render_html
from zephyr.stages.report.layout import report_blocks
from zephyr.stages.report.markdown import render_markdown
from zephyr.stages.report.regression import update_regression

__all__ = [
    "EXPECTED_FILES",
    "IMAGES",
    "MODEL_LABELS",
    "REPORT_VERSION",
    "RUN_MODELS",
    "Answers",
    "Block",
    "Code",
    "Figure",
    "Heading",
    "Items",
    "ReportPaths",
    "Table",
    "Text",
    "collect_report",
    "comparison_table",
    "fmt",
    "is_numeric",
    "json_safe",
    "read_images",
    "render_html",
    "render_markdown",
    "report_blocks",
    "training_curves",
    "write_report",
]


@dataclass(frozen=True)
class ReportPaths:
    """The three files `write_report` wrote."""

    json: Path
    md: Path
    html: Path


def read_images(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> dict[str, bytes]:
    """The PNG files of the run the page embeds (`report["images"]`), by path relative to the run."""
    images = {}
    for rel in report.get("images", {}).values():
        path = Path(run_dir) / rel
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            images[rel] = data
    return images


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> ReportPaths:
    """Write `report.json`, `report.md` and `report.html` of the run folder `run_dir` into `out_dir`
    (default: the run folder) and return their paths. The regression check (`regression`) is brought up to
    date first: it loads the run's models when they changed since it last ran."""
    update_regression(run_dir)
    report = collect_report(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out / "report.json", out / "report.md", out / "report.html")
    io.write_text(paths.json, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    io.write_text(paths.md, render_markdown(report))
    io.write_text(paths.html, render_html(report, read_images(run_dir, report)))
    return paths
