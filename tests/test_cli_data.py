"""`zephyr data validate`: exit 0 with counts, exit 2 with `FILE:LINE: field: problem`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zephyr.cli import main

DATA = Path(__file__).parent / "data"


@pytest.fixture
def bad_pairs(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    shutil.copy(DATA / "bad" / "pairs.jsonl", path)
    return str(path)


@pytest.mark.parametrize(("fmt", "count"), [("conversations", 3), ("pairs", 3), ("rated", 2), ("mc", 2)])
def test_validate_good_file(capsys, fmt, count):
    path = str(DATA / "good" / f"{fmt}.jsonl")
    assert main(["data", "validate", path, "--format", fmt]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{path}: {count} records ok ({fmt}), 0 skipped\n", "")


def test_validate_bad_file_fails_at_the_first_bad_record(capsys, bad_pairs):
    assert main(["data", "validate", bad_pairs, "--format", "pairs"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {bad_pairs}:3: chosen[-1].content: is empty\n"


def test_validate_bad_file_with_skip_counts_the_problems(capsys, bad_pairs):
    assert main(["data", "validate", bad_pairs, "--format", "pairs", "--on-bad-record", "skip"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        f"{bad_pairs}: 4 records ok (pairs), 9 skipped",
        "  count  field                 problem (first seen)",
        "      1  chosen[-1].content    is empty (line 3)",
        "      1  record                invalid JSON: Expecting value at column 52 (line 4)",
        "      1  rejected[*].content   differs from chosen[0].content (the prompt must be shared) (line 6)",
        "      1  prompt_id             duplicate of line 1 (line 7)",
        "      1  score_chosen          must be a finite number, got nan (line 8)",
        "      1  chosen                missing (line 9)",
        "      1  rejected[-1].content  identical to chosen[-1].content (line 10)",
        "      1  score_rejected        must be a number, got boolean (line 12)",
        "      1  score_chosen          lower than score_rejected (2.0 < 9.0) (line 13)",
    ]


def test_validate_with_the_wrong_format(capsys):
    path = str(DATA / "good" / "pairs.jsonl")
    assert main(["data", "validate", path, "--format", "conversations"]) == 2
    assert capsys.readouterr().err == f"error: {path}:1: messages: missing\n"


def test_validate_missing_and_empty_files(capsys, tmp_path):
    assert main(["data", "validate", str(tmp_path / "none.jsonl"), "--format", "mc"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.jsonl'}: no such file\n"
    (tmp_path / "empty.jsonl").write_text("")
    assert (
        main(["data", "validate", str(tmp_path / "empty.jsonl"), "--format", "mc", "--on-bad-record", "skip"])
        == 2
    )
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty.jsonl'}: no records (the file is empty)\n"
