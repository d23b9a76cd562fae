"""The report as Markdown: the blocks of `report_blocks` as text and tables (figures are left out)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from zephyr.stages.report.blocks import Answers, Block, Code, Figure, Heading, Items, Table, Text, is_numeric
from zephyr.stages.report.layout import report_blocks


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (tables and text; the plots are in report.html)."""
    lines: list[str] = []
    for block in report_blocks(report):
        if isinstance(block, Figure):  # drawn in the HTML page only
            continue
        lines += [*_markdown(block), ""]
        if isinstance(block, Heading) and block.level == 1:
            lines += ["Plots are in report.html, next to this file.", ""]
    return "\n".join(lines).rstrip() + "\n"


def md_text(text: str) -> str:
    """Text safe in a Markdown line: no raw HTML (`<` and a `&` that would start an entity escaped), no table
    breaks, no quote at its start; a `>` or `&` elsewhere stays as written, readable in the raw file too."""
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text).replace("<", "&lt;")
    text = " ".join(text.replace("|", "\\|").split())
    return "\\" + text if text.startswith(">") else text


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _markdown(block: Block) -> list[str]:
    match block:
        case Heading(text, level, _):
            return ["#" * level + " " + md_text(text)]
        case Text(text):
            return [md_text(text)]
        case Items(items):
            return [f"- {md_text(item)}" for item in items]
        case Table(header, rows, strong):
            out = ["| " + " | ".join(md_text(h) or " " for h in header) + " |"]
            numeric = [j > 0 and all(is_numeric(r[j]) for r in rows) for j in range(len(header))]
            out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            for i, row in enumerate(rows):
                cells = [md_text(c) for c in row]
                cells = [f"**{c}**" if (i, j) in strong else c for j, c in enumerate(cells)]
                out.append("| " + " | ".join(cells) + " |")
            return out
        case Code(text, lang):
            fence = _fence(text)
            return [fence + lang, text.rstrip("\n"), fence]
        case Answers(prompt, answers, number):
            fence = _fence(prompt)
            out = [f"**Prompt {number}**", "", fence, prompt, fence]
            for label, answer in answers:
                fence = _fence(answer or "")
                body = [fence, answer, fence] if answer is not None else ["(no answer)"]
                out += ["", f"**{md_text(label)}**", "", *body]
            return out
        case _:
            raise TypeError(f"not a Markdown block: {block!r}")
