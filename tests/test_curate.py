"""`zephyr curate` end to end through the CLI on the shipped raw sample (recipes/data/raw_dialogues.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zephyr import io
from zephyr.cli import main
from zephyr.core.config import CurateConfig
from zephyr.core.errors import ConfigError
from zephyr.stages.curate.run import run_curate

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2/curate.yaml"

# (step, removed, remaining) of the shipped recipe on the raw sample: 42 lines, one bad (raw-40 ends with a
# user message), then each filter's hand-planted cases.
EXPECTED_STEPS = [
    ("truecase", 0, 41),  # 10 messages changed (raw-02 x2, -03, -09 x2, -15, -16, -23, -32 x2)
    ("turns", 1, 40),  # raw-38: 4 turns > 3
    ("chars", 2, 38),  # raw-36 "Yes." < 10 chars; raw-37 3,078 chars > 2,000
    ("refusals", 4, 34),  # raw-27 "I'm sorry, but I can't", raw-29 "As an AI", raw-30, raw-31 (2nd answer)
    ("duplicate_conversations", 1, 33),  # raw-32 = raw-11 up to case and whitespace
    ("duplicate_prompts", 1, 32),  # raw-33 asks raw-01's question again
    ("near_duplicates", 1, 31),  # raw-34 rewords raw-25 (Jaccard 0.844)
    ("contamination", 1, 30),  # raw-35 copies MT-Bench question 81
]
EXPECTED_REMOVED = {
    "turns": ["raw-38"],
    "chars": ["raw-36", "raw-37"],
    "refusals": ["raw-27", "raw-29", "raw-30", "raw-31"],
    "duplicate_conversations": ["raw-32"],
    "duplicate_prompts": ["raw-33"],
    "near_duplicates": ["raw-34"],
    "contamination": ["raw-35"],
}
EXPECTED_TEST = ["raw-02", "raw-09", "raw-10"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's input path is relative to the repository root


def curate(out: Path, *overrides: str) -> int:
    return main(["curate", RECIPE, f"curate.output_dir={out}", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_curate_end_to_end(in_repo, tmp_path, capsys):
    out = tmp_path / "curated"
    assert curate(out) == 0
    report = json.loads((out / "curation_report.json").read_text())
    assert [(s["name"], s["removed"], s["remaining"]) for s in report["steps"]] == EXPECTED_STEPS
    assert report["steps"][0]["detail"] == "10 messages changed"
    assert (report["records_read"], report["bad_records"], report["valid_records"]) == (42, 1, 41)
    assert report["bad_examples"][0]["line"] == 40
    assert (report["remaining"], report["train"], report["test"]) == (30, 27, 3)
    assert report["contamination"]["eval_prompts"] == 160
    assert list(report["contamination"]["hits"]) == ["mt-bench:81/1"]
    assert report["contamination"]["hits"]["mt-bench:81/1"]["dialogues"] == ["raw-35"]

    removed = read_jsonl(out / "removed.jsonl")
    by_step: dict[str, list[str]] = {}
    for row in removed:
        by_step.setdefault(row["step"], []).append(row["prompt_id"])
    assert by_step == EXPECTED_REMOVED

    train = io.read_records(out / "train.jsonl", "conversations").records  # valid conversations
    test = io.read_records(out / "test.jsonl", "conversations").records
    assert [r["prompt_id"] for r in test] == EXPECTED_TEST
    kept = {r["prompt_id"] for r in train + test}
    raw = {r["prompt_id"] for r in read_jsonl(REPO / "recipes/data/raw_dialogues.jsonl")}
    assert kept == raw - {"raw-40"} - {pid for ids in EXPECTED_REMOVED.values() for pid in ids}
    assert "raw-28" in kept  # its prompt's first answer (raw-27) was a refusal: the good answer stays
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}

    # truecasing reached the written data; code and "e.g." did not change
    by_id = {r["prompt_id"]: r for r in train + test}
    assert by_id["raw-02"]["prompt"] == "How do i boil an egg? I want the yolk to stay soft."
    assert by_id["raw-02"]["messages"][0]["content"] == by_id["raw-02"]["prompt"]
    assert (
        "\nFor example, `square(3)` returns 9. It works for floats too, e.g. `square(1.5)`"
        in (by_id["raw-03"]["messages"][1]["content"])
    )
    assert "# works for ints and floats. also for numpy arrays" in by_id["raw-03"]["messages"][1]["content"]

    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["output_dir"] == str(out) and resolved["near_dup_threshold"] == 0.8

    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in table.splitlines()[2:] if line.startswith("  ")}
    for name, removed_n, remaining in EXPECTED_STEPS:
        assert rows[name] == [str(removed_n), str(remaining)]
    assert rows["read"] == ["1", "41"]
    assert "split: 27 train, 3 test (test_fraction 0.1, seed 42)" in table
    assert "contaminated by mt-bench:81/1: raw-35" in table


def test_curate_is_deterministic(in_repo, tmp_path):
    outputs = []
    for name in ("a", "b"):
        assert curate(tmp_path / name) == 0
        outputs.append(
            [(tmp_path / name / f).read_bytes() for f in ("train.jsonl", "test.jsonl", "removed.jsonl")]
        )
    assert outputs[0] == outputs[1]
    assert curate(tmp_path / "seed", "curate.seed=7") == 0
    test_ids = [r["prompt_id"] for r in read_jsonl(tmp_path / "seed" / "test.jsonl")]
    assert test_ids != EXPECTED_TEST and len(test_ids) >= 1


def test_steps_can_be_turned_off(in_repo, tmp_path):
    out = tmp_path / "off"
    overrides = [
        "curate.truecase=false",
        "curate.drop_refusals=false",
        "curate.dedup_exact=false",
        "curate.near_dup_threshold=null",
        "curate.decontaminate=[]",
        "curate.test_fraction=0",
    ]
    assert curate(out, *overrides) == 0
    report = json.loads((out / "curation_report.json").read_text())
    assert [(s["name"], s["removed"], s["remaining"]) for s in report["steps"]] == [
        ("turns", 1, 40),
        ("chars", 2, 38),
    ]
    assert (report["train"], report["test"]) == (38, 0)
    assert (out / "test.jsonl").read_text() == ""
    train = read_jsonl(out / "train.jsonl")
    assert next(r for r in train if r["prompt_id"] == "raw-02")["prompt"].startswith("how do i")


def test_curate_errors_exit_2(in_repo, tmp_path, capsys):
    assert curate(tmp_path / "e1", "curate.on_bad_record=error") == 2
    assert "raw_dialogues.jsonl:40: messages[0].role: last message must be from the assistant" in (
        capsys.readouterr().err
    )
    assert curate(tmp_path / "e2", "curate.refusal_patterns=['(unclosed']") == 2
    assert "curate.refusal_patterns[0]: not a valid regex" in capsys.readouterr().err
    assert curate(tmp_path / "e3", "curate.decontaminate=[asset:nope]") == 2
    assert "curate.decontaminate[0]: unknown eval asset 'nope'" in capsys.readouterr().err
    assert curate(tmp_path / "e4", "curate.max_turns=0") == 2  # the config's own range check
    assert "curate.max_turns: must be >= 1, got 0" in capsys.readouterr().err
    assert curate(tmp_path / "e5", "curate.min_turns=3", "curate.max_turns=2") == 2
    assert "curate.max_turns: must be >= min_turns (3)" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("e1", "e2", "e3", "e5"))


def test_bad_eval_prompt_files_name_file_line_and_field(in_repo, tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    assert curate(tmp_path / "e1", f"curate.decontaminate=[{bad}]") == 2
    assert f"error: {bad}:2: record: invalid JSON: Expecting value at column 1\n" in capsys.readouterr().err
    listed = tmp_path / "eval.json"  # a JSON list: a record's line is the line it starts on
    listed.write_text('[\n  {"prompt": "ok"},\n  {"text": "no prompt"}\n]\n')
    assert curate(tmp_path / "e2", f"curate.decontaminate=[{listed}]") == 2
    assert f"error: {listed}:3: no eval prompt: expected" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("e1", "e2"))


def test_run_curate_without_input():
    with pytest.raises(ConfigError, match=r"curate\.input: required"):
        run_curate(CurateConfig())
