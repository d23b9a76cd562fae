"""Evaluation plots (PNG, matplotlib's Agg backend, imported only when a plot is drawn)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# MT-Bench's category order (FastChat's radar plot), other categories follow alphabetically.
MT_BENCH_CATEGORIES = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)


def _categories(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present = {c for result in results.values() for c in result.get("categories", {})}
    ordered = [c for c in MT_BENCH_CATEGORIES if c in present]
    return ordered + sorted(present - set(ordered))


def category_plot(
    results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "MT-Bench"
) -> Path:
    """Radar plot of MT-Bench category scores (0–10), one polygon per model.

    `results` maps a label (a model, a run) to `mt_bench.aggregate()`'s output. A category without any
    parsed score is drawn at 0 and marked "n/a" in the legend label, so a gap is visible, not hidden.
    """
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = _categories(results)
    if len(categories) < 3:
        raise ValueError(f"a radar plot needs at least 3 categories, got {categories}")
    angles = [2 * math.pi * k / len(categories) for k in range(len(categories))]
    fig = Figure(figsize=(6.5, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_zero_location("N")  # first category on top, then clockwise
    ax.set_theta_direction(-1)
    ax.set_rlabel_position(180 / len(categories))  # radial ticks between the first two spokes
    for label, result in results.items():
        scores = [result.get("categories", {}).get(c, {}).get("score") for c in categories]
        missing = [c for c, s in zip(categories, scores, strict=True) if s is None]
        values = [0.0 if s is None else float(s) for s in scores]
        overall = result.get("score")
        legend = f"{label} ({overall:.2f})" if overall is not None else label
        if missing:
            legend += f" — n/a: {', '.join(missing)}"
        ax.plot([*angles, angles[0]], [*values, values[0]], linewidth=1.5, label=legend)
        ax.fill([*angles, angles[0]], [*values, values[0]], alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels(categories)
    ax.set_ylim(0, 10)
    ax.set_yticks([2, 4, 6, 8, 10])
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.12), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
