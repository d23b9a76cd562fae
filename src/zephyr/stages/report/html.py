"""The HTML page of a report: one self-contained file that opens offline.

No scripts, no network, no external CSS or fonts: the styles are inline, plots are PNGs inside the page as
`data:` URIs (matplotlib's Agg canvas, imported only when a plot is drawn), and a Content-Security-Policy
forbids the browser to load anything else. Every text that comes from the run (model answers, prompts,
config values, error messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from string import Template
from typing import Any

from zephyr.stages.report.blocks import Answers, Block, Code, Figure, Heading, Items, Table, Text, is_numeric
from zephyr.stages.report.layout import report_blocks

logger = logging.getLogger(__name__)


def render_html(report: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML page. `images` holds the PNG files of the run the page embeds, by path
    relative to the run folder (`report.read_images`); a figure whose file is not given is left out."""
    blocks = report_blocks(report)
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "zephyr report")
    nav = "".join(
        f'<li><a href="#{_e(b.anchor)}">{_e(b.text)}</a></li>'
        for b in blocks
        if isinstance(b, Heading) and b.level == 2
    )
    body = "\n".join(_block_html(b, images or {}) for b in blocks)
    page = Template(resources.files("zephyr").joinpath("templates/report/page.html").read_text("utf-8"))
    return page.substitute(title=_e(title), nav=f"<ul>{nav}</ul>", body=body)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _block_html(block: Block, images: Mapping[str, bytes]) -> str:
    match block:
        case Heading(text, level, anchor):
            attr = f' id="{_e(anchor)}"' if anchor else ""
            return f"<h{level}{attr}>{_e(text)}</h{level}>"
        case Text(text):
            return f"<p>{_e(text)}</p>"
        case Items(items):
            return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"
        case Table():
            return _table_html(block)
        case Code(text, lang):
            return f'<pre class="code {_e(lang)}"><code>{_e(text)}</code></pre>'
        case Figure():
            return _figure_html(block, images)
        case Answers(prompt, answers, number):
            cells = "".join(
                f'<div class="answer"><h4>{_e(label)}</h4>'
                + (f"<pre>{_e(answer)}</pre>" if answer is not None else '<p class="none">(no answer)</p>')
                + "</div>"
                for label, answer in answers
            )
            return (
                f'<div class="sample"><div class="prompt"><h4>Prompt {number}</h4><pre>{_e(prompt)}</pre></div>'
                f'<div class="answers">{cells}</div></div>'
            )
    raise TypeError(f"not a report block: {block!r}")


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
    rows = []
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            text = f"<strong>{_e(cell)}</strong>" if (i, j) in table.strong else _e(cell)
            cls = ' class="num"' if j > 0 and is_numeric(cell) else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _figure_html(figure: Figure, images: Mapping[str, bytes]) -> str:
    if figure.kind == "image":
        png = images.get(figure.data)
        if png is None:
            return f'<p class="note">{_e(figure.caption)}: the image could not be read.</p>'
    else:
        try:
            png = _FIGURES[figure.kind](figure.data)
        except Exception as exc:  # a plot must never take the report down: say so in its place
            logger.warning("report plot %r not drawn: %s", figure.kind, exc)
            return f'<p class="note">{_e(figure.caption)}: plot not drawn ({_e(exc)}).</p>'
        if png is None:
            return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )


# ---------------------------------------------------------------------------------------------------------
# Plots: each takes a figure's data and returns PNG bytes (None when there is nothing to draw)


def _canvas(panels: int, columns: int = 3, size: tuple[float, float] = (4.4, 3.1)):
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    columns = min(panels, columns)
    rows = math.ceil(panels / columns)
    width, height = size[0] * columns, size[1] * rows
    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # Fixed margins in inches: a layout engine (constrained, tight) doubles the drawing time of a page.
    fig.subplots_adjust(
        left=0.7 / width,
        right=1 - 0.2 / width,
        bottom=0.75 / height,
        top=1 - 0.45 / height,
        wspace=0.3,
        hspace=0.5,  # of an axes' height: room for the x label above and the title below
    )
    return fig, [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, metadata={"Software": None})
    return buffer.getvalue()


def _points(columns: Mapping[str, Sequence[Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metric, where both are numbers."""
    steps, values = columns.get("step") or [], columns.get(key) or []
    pairs = [(float(x), float(y)) for x, y in zip(steps, values, strict=False) if _finite(x) and _finite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# (title, training keys, eval keys) of the panels of one run
_SFT_PANELS = (
    ("loss", ("loss",), ("eval/loss",)),
    ("learning rate", ("lr",), ()),
    ("grad norm", ("grad_norm",), ()),
)
_DPO_PANELS = (
    ("loss", ("loss",), ("eval/loss",)),
    ("rewards/margins", ("rewards/margins",), ("eval/rewards/margins",)),
    ("rewards/accuracies", ("rewards/accuracies",), ("eval/rewards/accuracies",)),
    (
        "rewards/chosen, rewards/rejected",
        ("rewards/chosen", "rewards/rejected"),
        ("eval/rewards/chosen", "eval/rewards/rejected"),
    ),
    ("learning rate", ("lr",), ()),
    ("grad norm", ("grad_norm",), ()),
)


def training_png(run: Mapping[str, Any]) -> bytes | None:
    """Curves of one training run (`report.training_curves` plus `kind`): train lines, eval points."""
    train, evals = run.get("train") or {}, run.get("eval") or {}
    layout = _DPO_PANELS if run.get("kind") == "dpo" else _SFT_PANELS
    panels = []
    for title, train_keys, eval_keys in layout:
        series = [
            (f"train {k}" if len(train_keys) > 1 else "train", *_points(train, k), "-") for k in train_keys
        ]
        series += [
            (f"eval {k[5:]}" if len(eval_keys) > 1 else "eval", *_points(evals, k), "o-") for k in eval_keys
        ]
        series = [s for s in series if s[1]]
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig, axes = _canvas(len(panels))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for label, xs, ys, style in series:
            ax.plot(xs, ys, style, label=label, linewidth=1.4, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    return _png(fig)


def dpo_runs_png(runs: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """The DPO runs of the report on shared axes: training loss, held-out reward accuracy and margin."""
    layout = (
        ("train loss", "train", "loss"),
        ("held-out rewards/accuracies", "eval", "eval/rewards/accuracies"),
        ("held-out rewards/margins", "eval", "eval/rewards/margins"),
    )
    panels = []
    for title, part, key in layout:
        series = [(label, *_points(run.get(part) or {}, key)) for label, run in runs.items()]
        series = [s for s in series if s[1]]
        if series:
            panels.append((title, series, part == "eval"))
    if not panels:
        return None
    fig, axes = _canvas(len(panels))
    for ax, (title, series, marked) in zip(axes, panels, strict=True):
        for label, xs, ys in series:
            ax.plot(xs, ys, "o-" if marked else "-", label=label, linewidth=1.4, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _png(fig)


def _grouped_bars(ax, groups: Sequence[str], series: Sequence[tuple[str, list, list | None]]) -> None:
    """Bars per group (x), one bar per series, with error bars where given."""
    width = 0.8 / max(len(series), 1)
    for k, (label, values, errors) in enumerate(series):
        xs = [g - 0.4 + width * (k + 0.5) for g in range(len(groups))]
        heights = [v if _finite(v) else 0.0 for v in values]
        yerr = [e if _finite(e) else 0.0 for e in errors] if errors and any(map(_finite, errors)) else None
        ax.bar(xs, heights, width=width, yerr=yerr, capsize=3, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def mc_png(data: Mapping[str, Any]) -> bytes:
    """Multiple choice: one group per set, one bar per model."""
    fig, (ax,) = _canvas(1, size=(max(5.0, 1.6 * len(data["sets"]) + 3), 3.6))
    series = [
        (model, values, errors)
        for model, values, errors in zip(data["models"], data["values"], data["stderr"], strict=True)
    ]
    _grouped_bars(ax, data["sets"], series)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("Multiple choice")
    return _png(fig)


def mt_bench_png(data: Mapping[str, Any]) -> bytes:
    """MT-Bench: one group per category, one bar per model."""
    categories = data["categories"]
    fig, (ax,) = _canvas(1, size=(max(6.0, 1.1 * len(categories) + 3), 3.8))
    series = [(model, [scores.get(c) for c in categories], None) for model, scores in data["models"].items()]
    _grouped_bars(ax, categories, series)
    ax.set_ylim(0, 10)
    ax.set_title("MT-Bench per category")
    return _png(fig)


def alpaca_eval_png(data: Mapping[str, Any]) -> bytes:
    """AlpacaEval: win rate and length-controlled win rate per model."""
    fig, (ax,) = _canvas(1, size=(max(5.0, 1.2 * len(data["models"]) + 3), 3.6))
    series = [("win rate", data["win_rate"], data["standard_error"])]
    if any(_finite(v) for v in data["lc_win_rate"]):
        series.append(("LC win rate", data["lc_win_rate"], data["lc_standard_error"]))
    _grouped_bars(ax, data["models"], series)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("AlpacaEval")
    return _png(fig)


def ratings_png(histograms: Mapping[str, Any]) -> bytes:
    """Rating histograms of the feedback stage (when the run has no ratings.png)."""
    from zephyr.stages.feedback.stats import histograms_png

    return histograms_png(histograms)


_FIGURES: dict[str, Callable[[Any], bytes | None]] = {
    "training": training_png,
    "dpo_runs": dpo_runs_png,
    "mc": mc_png,
    "mt_bench": mt_bench_png,
    "alpaca_eval": alpaca_eval_png,
    "ratings": ratings_png,
}
