"""The architecture page shows the stage table as it is (reading the table imports no torch)."""

from __future__ import annotations

from pathlib import Path

from zephyr.stages import STAGES

ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"


def stage_rows(text: str) -> dict[str, list[str]]:
    """The cells of each row of the page's stage table (the table whose header starts `| stage |`), by stage."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| stage |"))
    rows = {}
    for line in lines[start + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_the_architecture_page_lists_every_stage_with_its_run_function_config_outputs():
    rows = stage_rows(ARCHITECTURE.read_text(encoding="utf-8"))
    assert list(rows) == [s.name for s in STAGES]  # every stage, in the table's order
    for s in STAGES:
        _, run, config, outputs, _, trains, *_ = rows[s.name]
        assert run == f"`{s.run.removeprefix('zephyr.')}`", s.name
        assert config == f"`{s.config.__name__}`", s.name
        assert [part for part, path in s.outputs.items() if f"{part}: `{path}" not in outputs] == [], s.name
        assert trains == ("yes" if s.trains else "no"), s.name
