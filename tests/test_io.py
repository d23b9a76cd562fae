"""Reading with validation and bad-record policies, writers, crash repair, held-out splits."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest

from zephyr import io
from zephyr.core.errors import DataError, ZephyrError
from zephyr.io import BadRecord

DATA = Path(__file__).parent / "data"
FIRST = {
    name: (DATA / "good" / f"{name}.jsonl").read_text().splitlines()[0]
    for name in ("pairs", "conversations", "mc")
}
GOOD_PAIR = FIRST["pairs"]  # prompt_id p1
ORDER = "(user and assistant alternate, user first)"


def _pair(pid: str, chosen: str = "Paris.", rejected: str = "Lyon.", **extra) -> dict:
    user = {"role": "user", "content": "Capital of France?"}
    return {
        "prompt_id": pid,
        "prompt": "Capital of France?",
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "score_chosen": 9.0,
        "score_rejected": 3.0,
        **extra,
    }


def _write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------------------
# read_records: good data


@pytest.mark.parametrize(("fmt", "count"), [("conversations", 3), ("pairs", 3), ("rated", 2), ("mc", 2)])
def test_read_good_fixtures(fmt, count):
    path = DATA / "good" / f"{fmt}.jsonl"
    expected = [json.loads(line) for line in path.read_text().splitlines()]
    for asked in (fmt, "auto"):
        result = io.read_records(path, asked)
        assert result.records == expected
        assert (result.bad, result.total, result.source, result.fmt) == ([], count, str(path), fmt)


def test_limit_counts_valid_records(tmp_path):
    path = _write_lines(
        tmp_path / "p.jsonl", json.dumps(_pair("a")), "{", json.dumps(_pair("b")), json.dumps(_pair("c"))
    )
    result = io.read_records(path, "pairs", on_bad_record="skip", limit=2)
    assert [r["prompt_id"] for r in result.records] == ["a", "b"]
    assert result.total == 3
    assert result.bad == [
        BadRecord(2, "record", "invalid JSON: Expecting property name enclosed in double quotes at column 2")
    ]


def test_blank_lines_count_as_lines_and_a_bom_is_ignored(tmp_path):
    path = _write_lines(
        tmp_path / "p.jsonl", b"\xef\xbb\xbf" + GOOD_PAIR.encode(), "", "   ", json.dumps(_pair("p1"))
    )
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs")
    assert str(exc.value) == f"{path}:4: prompt_id: duplicate of line 1"


# ---------------------------------------------------------------------------------------------------------
# read_records: the error policy names file, line and field


BAD_LINES = [
    (
        "broken JSON",
        "pairs",
        '{"prompt_id": "p2", "chosen": [',
        "record",
        "invalid JSON: Expecting value at column 32",
    ),
    (
        "missing field",
        "pairs",
        json.dumps({k: v for k, v in _pair("p2").items() if k != "rejected"}),
        "rejected",
        "missing",
    ),
    (
        "wrong role order",
        "conversations",
        json.dumps({"prompt_id": "c2", "prompt": "a", "messages": [{"role": "assistant", "content": "b"}]}),
        "messages[0].role",
        f"expected 'user', got 'assistant' {ORDER}",
    ),
    ("empty answer", "pairs", json.dumps(_pair("p2", chosen="")), "chosen[-1].content", "is empty"),
    (
        "duplicate id",
        "pairs",
        json.dumps(_pair("p1", chosen="Lyon.", rejected="Nice.")),
        "prompt_id",
        "duplicate of line 1",
    ),
    (
        "NaN score",
        "pairs",
        json.dumps(_pair("p2", score_rejected=float("nan"))),
        "score_rejected",
        "must be a finite number, got nan",
    ),
    ("not an object", "pairs", '["p2"]', "record", "must be an object, got array"),
    # "auto" detects once per file: a conversation after a pair is a pair missing its answers
    ("format of the file", "auto", FIRST["conversations"], "chosen", "missing"),
    ("wrong format", "mc", GOOD_PAIR.replace('"p1"', '"p2"'), "id", "missing"),
]


@pytest.mark.parametrize(
    ("fmt", "line", "field", "problem"), [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_error_policy_names_file_line_and_field(tmp_path, fmt, line, field, problem):
    path = _write_lines(tmp_path / "data.jsonl", FIRST.get(fmt, GOOD_PAIR), "", line)
    with pytest.raises(DataError) as exc:
        io.read_records(path, fmt)
    assert str(exc.value) == f"{path}:3: {field}: {problem}"
    result = io.read_records(path, fmt, on_bad_record="skip")
    assert (len(result.records), result.bad, result.total) == (1, [BadRecord(3, field, problem)], 2)


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    # the é of "café" in Latin-1: byte 0xe9 at column 35 of line 2
    path = _write_lines(
        tmp_path / "p.jsonl",
        GOOD_PAIR,
        b'{"prompt_id": "p2", "prompt": "caf\xe9"}',
        GOOD_PAIR.replace('"p1"', '"p3"'),
    )
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs")
    assert str(exc.value) == f"{path}:2: record: not valid UTF-8: byte 0xe9 at column 35"
    result = io.read_records(path, "pairs", on_bad_record="skip")
    assert [r["prompt_id"] for r in result.records] == ["p1", "p3"]
    assert result.bad == [BadRecord(2, "record", "not valid UTF-8: byte 0xe9 at column 35")]


def test_bad_pairs_fixture_under_both_policies():
    path = DATA / "bad" / "pairs.jsonl"
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs")
    assert str(exc.value) == f"{path}:3: chosen[-1].content: is empty"
    result = io.read_records(path, "pairs", on_bad_record="skip")
    assert [r["prompt_id"] for r in result.records] == ["p1", "p8", "p9", "p12"]
    assert result.total == 13  # 14 lines, one blank
    assert result.bad == [
        BadRecord(3, "chosen[-1].content", "is empty"),
        BadRecord(4, "record", "invalid JSON: Expecting value at column 52"),
        BadRecord(6, "rejected[0].content", "differs from chosen[0].content (the prompt must be shared)"),
        BadRecord(7, "prompt_id", "duplicate of line 1"),
        BadRecord(8, "score_chosen", "must be a finite number, got nan"),
        BadRecord(9, "chosen", "missing"),
        BadRecord(10, "rejected[-1].content", "identical to chosen[-1].content"),
        BadRecord(12, "score_rejected", "must be a number, got boolean"),
        BadRecord(13, "score_chosen", "lower than score_rejected (2.0 < 9.0)"),
    ]


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        (
            "conversations",
            [
                BadRecord(2, "messages[1].role", f"expected 'assistant', got 'user' {ORDER}"),
                BadRecord(3, "messages[1].role", "unknown role 'bot' (expected system, user or assistant)"),
                BadRecord(4, "messages[2].role", "last message must be from the assistant, got 'user'"),
                BadRecord(5, "prompt_id", "missing"),
                BadRecord(6, "record", "must be an object, got array"),
            ],
        ),
        (
            "rated",
            [
                BadRecord(2, "completions[0].ratings.honesty", "must be a finite number, got nan"),
                BadRecord(3, "completions[1].ratings.helpfulness", "must be a number, got boolean"),
                BadRecord(4, "completions[0].mean_rating", "6.5 is not the mean of the ratings (8)"),
            ],
        ),
        (
            "mc",
            [
                BadRecord(2, "gold", "2 is out of range for 2 choices"),
                BadRecord(3, "id", "duplicate of line 1"),
                BadRecord(4, "choices[1]", "is empty"),
                BadRecord(5, "gold", "repeats an index"),
            ],
        ),
    ],
)
def test_bad_fixtures_skip_counts(name, bad, caplog):
    path = DATA / "bad" / f"{name}.jsonl"
    with caplog.at_level(logging.WARNING, logger="zephyr.io"):
        result = io.read_records(path, "auto", on_bad_record="skip")
    assert result.fmt == name
    assert result.bad == bad
    assert result.total == len(bad) + len(result.records)
    assert f"skipped {len(bad)} of {result.total} records" in caplog.text


def test_auto_with_no_recognisable_keys(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", '{"text": "hello"}')
    with pytest.raises(DataError) as exc:
        io.read_records(path, "auto")
    assert str(exc.value) == f"{path}:1: record: its keys match no format (conversations, pairs, rated, mc)"


def test_duplicate_of_a_skipped_record_is_not_a_duplicate(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", json.dumps(_pair("p1", chosen="")), json.dumps(_pair("p1")))
    result = io.read_records(path, "pairs", on_bad_record="skip")
    assert [r["prompt_id"] for r in result.records] == ["p1"]
    assert result.bad == [BadRecord(1, "chosen[-1].content", "is empty")]


def test_auto_detects_from_the_first_recognisable_record(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", "{oops", "[1]", GOOD_PAIR)
    result = io.read_records(path, "auto", on_bad_record="skip")
    assert (result.fmt, len(result.records), [b.line for b in result.bad]) == ("pairs", 1, [1, 2])


def test_empty_missing_and_unsupported_sources(tmp_path):
    for content in (b"", b"\n  \n"):
        (tmp_path / "e.jsonl").write_bytes(content)
        with pytest.raises(DataError, match=r"e\.jsonl: no records \(the file is empty\)"):
            io.read_records(tmp_path / "e.jsonl", "pairs", on_bad_record="skip")
    with pytest.raises(DataError, match="no such file"):
        io.read_records(tmp_path / "absent.jsonl", "pairs")
    with pytest.raises(DataError, match="unsupported file type"):
        io.read_records(tmp_path / "data.csv", "pairs")
    with pytest.raises(DataError, match="unknown format 'pair'"):
        io.read_records(DATA / "good" / "pairs.jsonl", "pair")


# ---------------------------------------------------------------------------------------------------------
# .json lists and Parquet


def test_json_list_reports_the_line_a_record_starts_on(tmp_path):
    good = _pair("a")
    bad = _pair("b", chosen="")
    text = "[\n" + json.dumps(good, indent=2) + ",\n\n" + json.dumps(bad, indent=2) + "\n]\n"
    path = tmp_path / "p.json"
    path.write_text(text)
    # line 1 "[", lines 2-27 the good record (26 lines), line 28 blank, line 29 "{" of the bad one
    start_of_bad = 29
    assert text.split("\n")[start_of_bad - 1] == "{"
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs")
    assert str(exc.value) == f"{path}:{start_of_bad}: chosen[-1].content: is empty"
    compact = tmp_path / "c.json"
    compact.write_text(json.dumps([good, bad]))
    result = io.read_records(compact, "pairs", on_bad_record="skip")
    assert (result.records, result.bad) == ([good], [BadRecord(1, "chosen[-1].content", "is empty")])


def test_json_file_broken_as_a_whole(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n{"a": 1},\n{"a": 2\n]')
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs", on_bad_record="skip")
    assert str(exc.value) == f"{path}:4: record: invalid JSON: Expecting ',' delimiter at column 1"
    path.write_text('{"prompt_id": "a"}')
    with pytest.raises(DataError) as exc:
        io.read_records(path, "pairs")
    assert str(exc.value) == f"{path}:1: record: a .json file must hold a list of records, got object"


@pytest.mark.parametrize("name", ["pairs", "rated", "mc"])
def test_parquet_roundtrip(tmp_path, name):
    records = io.read_records(DATA / "good" / f"{name}.jsonl", name).records
    if name == "mc":  # one Parquet column holds one type: gold as lists throughout
        records = [
            {**r, "id": str(r["id"]), "gold": r["gold"] if isinstance(r["gold"], list) else [r["gold"]]}
            for r in records
        ]
    path = tmp_path / f"{name}.parquet"
    io.write_records(path, records)
    assert os.listdir(tmp_path) == [path.name]
    result = io.read_records(path, name)
    assert (result.records, result.total, result.fmt) == (records, len(records), name)


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "p.parquet"
    io.write_parquet(path, [_pair("a"), _pair("b", rejected="Paris."), _pair("a")])
    result = io.read_records(path, "pairs", on_bad_record="skip")
    assert [r["prompt_id"] for r in result.records] == ["a"]
    assert result.bad == [
        BadRecord(2, "rejected[-1].content", "identical to chosen[-1].content"),
        BadRecord(3, "prompt_id", "duplicate of line 1"),
    ]
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        io.read_records(tmp_path / "x.parquet", "pairs")
    with pytest.raises(DataError, match="cannot be stored as Parquet"):
        io.write_parquet(tmp_path / "y.parquet", [{"gold": 1}, {"gold": [1, 2]}])
    assert sorted(os.listdir(tmp_path)) == ["p.parquet", "x.parquet"]


# ---------------------------------------------------------------------------------------------------------
# hub datasets


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_source_rows_and_default_split(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [_pair("a"), _pair("b", chosen="")]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    result = io.read_records("hf:org/prefs", "auto", on_bad_record="skip")
    assert calls == [("org/prefs", "train")]
    assert (result.source, result.fmt, [r["prompt_id"] for r in result.records]) == (
        "hf:org/prefs",
        "pairs",
        ["a"],
    )
    assert result.bad == [BadRecord(2, "chosen[-1].content", "is empty")]
    io.read_records("hf:org/prefs:test_prefs", "pairs", on_bad_record="skip")
    assert calls[-1] == ("org/prefs", "test_prefs")


@pytest.mark.parametrize(
    ("source", "name", "revision", "split"),
    [
        ("hf:HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrachat_200k", None, None),
        ("hf:HuggingFaceH4/ultrachat_200k:train_sft", "HuggingFaceH4/ultrachat_200k", None, "train_sft"),
        ("hf:org/prefs@8c4e5a1b:test_prefs", "org/prefs", "8c4e5a1b", "test_prefs"),
        ("hf:org/prefs@v1.0", "org/prefs", "v1.0", None),
        ("hf:org/prefs@refs/convert/parquet:train", "org/prefs", "refs/convert/parquet", "train"),
    ],
)
def test_hub_specs_parse_into_name_revision_and_split(source, name, revision, split):
    assert io.parse_hub_spec(source) == io.HubSpec(name, revision, split)


@pytest.mark.parametrize(
    "source", ["hf:", "hf:org/prefs@", "hf:org/prefs@:train", "hf:org/p:a:b", "hf:a@b@c"]
)
def test_malformed_hub_specs_are_errors_naming_the_spec(source):
    with pytest.raises(DataError) as err:
        io.parse_hub_spec(source)
    assert str(err.value).startswith(f"{source}: expected hf:NAME[@REVISION][:SPLIT]")


def test_a_pinned_revision_reaches_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return [_pair("a")]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    io.read_records("hf:org/prefs@8c4e5a1b:test_prefs", "pairs")
    io.read_records("hf:org/prefs@v2", "pairs")
    io.read_records("hf:org/prefs:test_prefs", "pairs")  # unpinned: the hub's latest, no revision passed
    assert calls == [
        ("org/prefs", "test_prefs", {"revision": "8c4e5a1b"}),
        ("org/prefs", "train", {"revision": "v2"}),
        ("org/prefs", "test_prefs", {}),
    ]


def test_the_run_manifest_records_each_stages_hub_datasets_and_revisions(tmp_path, monkeypatch):
    from zephyr.core.config import load_recipe
    from zephyr.pipeline import run as pipeline
    from zephyr.pipeline.manifest import hub_datasets, load_manifest

    assert hub_datasets({"model": "m", "instructions": "hf:tatsu-lab/alpaca_eval:eval", "data": None}) == {
        "instructions": {"dataset": "tatsu-lab/alpaca_eval", "revision": None, "split": "eval"}
    }
    monkeypatch.setattr(pipeline, "_run_training", lambda kind, cfg, resume, launcher: None)  # no training
    recipe = load_recipe(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            "run.stages=[sft]",
            "sft.train_data=hf:HuggingFaceH4/ultrachat_200k@8c4e5a1b:train_sft",
            "sft.eval_data=hf:HuggingFaceH4/ultrachat_200k:test_sft",
        ],
    )
    pipeline.run_pipeline(recipe, None)
    record = load_manifest(tmp_path / "run", "").stages["sft"]
    assert record.status == "done"
    assert record.datasets == {
        "train_data": {
            "dataset": "HuggingFaceH4/ultrachat_200k",
            "revision": "8c4e5a1b",
            "split": "train_sft",
        },
        "eval_data": {"dataset": "HuggingFaceH4/ultrachat_200k", "revision": None, "split": "test_sft"},
    }


def test_hub_failure_is_a_clear_error(monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    with pytest.raises(ZephyrError) as exc:
        io.read_records("hf:org/prefs:train", "pairs")
    assert str(exc.value).startswith(
        "hf:org/prefs:train: could not load the dataset (ConnectionError: Couldn't reach the Hub)"
    )


def test_hub_unreachable_with_the_real_datasets_package():
    # conftest sets HF_DATASETS_OFFLINE=1: the hub is never contacted
    with pytest.raises(ZephyrError, match=r"hf:zephyr-tests/no-such-dataset: could not load the dataset"):
        io.read_records("hf:zephyr-tests/no-such-dataset", "pairs")


# ---------------------------------------------------------------------------------------------------------
# summaries


def test_summarize_good_and_bad():
    good = DATA / "good" / "pairs.jsonl"
    assert (
        io.summarize(io.read_records(good, "pairs"), good, "pairs")
        == f"{good}: 3 records ok (pairs), 0 skipped"
    )
    bad = DATA / "bad" / "mc.jsonl"
    assert io.summarize(io.read_records(bad, "auto", on_bad_record="skip"), bad, "auto") == "\n".join(
        [
            f"{bad}: 1 record ok (mc), 4 skipped",
            "  count  field       problem (first seen)",
            "      1  gold        2 is out of range for 2 choices (line 2)",
            "      1  id          duplicate of line 1 (line 3)",
            "      1  choices[*]  is empty (line 4)",
            "      1  gold        repeats an index (line 5)",
        ]
    )


def test_summarize_counts_one_rule_across_indices_and_lines(tmp_path):
    lines = [json.dumps(_pair(f"p{i}")) for i in range(3)]
    lines += [json.dumps(_pair("p0")), json.dumps(_pair("p1"))]
    conv = {
        "prompt_id": "c",
        "prompt": "a",
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
    }
    path = _write_lines(tmp_path / "p.jsonl", *lines)
    result = io.read_records(path, "pairs", on_bad_record="skip")
    assert io.summarize(result, "p.jsonl", "pairs").splitlines() == [
        "p.jsonl: 3 records ok (pairs), 2 skipped",
        "  count  field      problem (first seen)",
        "      2  prompt_id  duplicate of line 1 (line 4)",
    ]
    conv2 = {
        **conv,
        "prompt_id": "d",
        "messages": [
            *conv["messages"][:1],
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": " "},
            {"role": "assistant", "content": "c"},
        ],
    }
    path = _write_lines(tmp_path / "c.jsonl", json.dumps(conv), json.dumps(conv2))
    result = io.read_records(path, "conversations", on_bad_record="skip")
    assert io.summarize(result, "c.jsonl", "conversations").splitlines()[1:] == [
        "  count  field                problem (first seen)",
        "      2  messages[*].content  is empty (line 1)",
    ]


# ---------------------------------------------------------------------------------------------------------
# writers and crash repair


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "data.jsonl"
    records = [{"prompt_id": "a", "text": "café"}, {"prompt_id": "b", "n": 1}]
    io.write_jsonl(path, records)
    assert (
        path.read_text(encoding="utf-8") == '{"prompt_id": "a", "text": "café"}\n{"prompt_id": "b", "n": 1}\n'
    )
    assert os.listdir(path.parent) == ["data.jsonl"]

    def failing():
        yield {"prompt_id": "c"}
        raise RuntimeError("generator failed half-way")

    with pytest.raises(RuntimeError):
        io.write_jsonl(path, failing())
    # the old file is untouched and the temporary file is gone
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == records
    assert os.listdir(path.parent) == ["data.jsonl"]


def test_write_records_picks_by_suffix(tmp_path):
    records = [_pair("a"), _pair("b")]
    for suffix in (".jsonl", ".json", ".parquet"):
        path = tmp_path / f"data{suffix}"
        io.write_records(path, records)
        assert io.read_records(path, "pairs").records == records
    assert json.loads((tmp_path / "data.json").read_text()) == records
    with pytest.raises(DataError, match="unsupported file type"):
        io.write_records(tmp_path / "data.csv", records)
    assert sorted(os.listdir(tmp_path)) == ["data.json", "data.jsonl", "data.parquet"]


def test_append_and_resume_after_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "runs" / "answers.jsonl"
    assert io.read_jsonl_resumable(path) == []
    io.append_jsonl(path, {"i": 0})
    io.append_jsonl(path, {"i": 1})
    complete = path.read_bytes()
    assert complete == b'{"i": 0}\n{"i": 1}\n'
    with path.open("ab") as f:  # a crash in the middle of writing the third line
        f.write(b'{"i": 2, "text": "caf\xc3')
    with caplog.at_level(logging.WARNING, logger="zephyr.io"):
        assert io.read_jsonl_resumable(path) == [{"i": 0}, {"i": 1}]
    assert "dropped 22 bytes" in caplog.text
    assert path.read_bytes() == complete
    io.append_jsonl(path, {"i": 2})
    assert io.read_jsonl_resumable(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_resume_keeps_a_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}')
    assert io.read_jsonl_resumable(path) == [{"i": 0}, {"i": 1}]
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1}\n'
    path.write_bytes(b'{"i": 0}')  # a torn first line is dropped like any other
    path.write_bytes(b'{"i": ')
    assert io.read_jsonl_resumable(path) == []
    assert path.read_bytes() == b""


def test_resume_refuses_a_broken_line_before_the_last(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": \n{"i": 2}\n')
    with pytest.raises(DataError) as exc:
        io.read_jsonl_resumable(path)
    assert str(exc.value) == f"{path}:2: record: invalid JSON: Expecting value at column 7"


# ---------------------------------------------------------------------------------------------------------
# held-out splits


def _ids(records):
    return [r["prompt_id"] for r in records]


def test_split_is_deterministic_disjoint_and_order_preserving():
    records = [{"prompt_id": f"p{i}"} for i in range(1000)]
    train, held = io.train_eval_split(records, 0.2, seed=0)
    assert io.train_eval_split(records, 0.2, seed=0) == (train, held)
    assert sorted(_ids(train) + _ids(held), key=lambda x: int(x[1:])) == _ids(records)
    assert _ids(train) == sorted(_ids(train), key=lambda x: int(x[1:]))
    assert 150 <= len(held) <= 250  # binomial(1000, 0.2): mean 200, sd 12.6
    other_seed = io.train_eval_split(records, 0.2, seed=1)[1]
    assert set(_ids(other_seed)) != set(_ids(held))


def test_split_is_stable_under_reordering_and_added_records():
    records = [{"prompt_id": f"p{i}"} for i in range(200)]
    held = set(_ids(io.train_eval_split(records, 0.1, seed=3)[1]))
    shuffled = records[::-1] + [{"prompt_id": f"new{i}"} for i in range(300)]
    held_after = set(_ids(io.train_eval_split(shuffled, 0.1, seed=3)[1]))
    assert held_after & set(_ids(records)) == held
    held_subset = set(_ids(io.train_eval_split(records[:50], 0.1, seed=3)[1]))
    assert held_subset == held & set(_ids(records[:50]))


def test_split_keeps_records_of_one_key_together_and_handles_edges():
    records = [{"prompt_id": f"p{i % 10}", "n": i} for i in range(40)]
    train, held = io.train_eval_split(records, 0.3, seed=0)
    assert not set(_ids(train)) & set(_ids(held))
    assert io.train_eval_split(records, 0.0, seed=0) == (records, [])
    # a tiny set still gets one held-out key, and keeps one for training
    tiny = [{"prompt_id": "a"}, {"prompt_id": "b"}, {"prompt_id": "c"}]
    assert [len(x) for x in io.train_eval_split(tiny, 1e-9, seed=0)] == [2, 1]
    assert [len(x) for x in io.train_eval_split(tiny, 0.999999, seed=0)] == [1, 2]
    mc = [{"id": i} for i in range(20)]
    assert sum(len(x) for x in io.train_eval_split(mc, 0.5, seed=0, key="id")) == 20
    with pytest.raises(ValueError, match="eval_fraction"):
        io.train_eval_split(records, 1.0, seed=0)
    with pytest.raises(DataError, match="record 0 has no 'id' field"):
        io.train_eval_split(records, 0.1, seed=0, key="id")


def test_follow_umask_opens_owner_only_files_to_what_the_umask_grants(tmp_path):
    (tmp_path / "final" / "sub").mkdir(parents=True)
    files = [tmp_path / "final" / "model.safetensors", tmp_path / "final" / "sub" / "optimizer.bin"]
    for path in files:
        path.write_bytes(b"x")
        path.chmod(0o600)  # as mkstemp leaves them
    previous = os.umask(0o022)
    try:
        io.follow_umask(tmp_path / "final")
    finally:
        os.umask(previous)
    assert [oct(p.stat().st_mode & 0o777) for p in files] == ["0o644", "0o644"]


# --- sealed folders, streamed records --------------------------------------------------------------------


def test_a_seal_names_the_first_damaged_file(tmp_path):
    import zlib

    folder = tmp_path / "sealed"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abcd")
    (folder / "sub" / "b.bin").write_bytes(b"xyz")
    io.seal(folder)
    seal = json.loads((folder / io.SEAL_FILE).read_text())
    assert seal["files"] == {
        "a.bin": {"bytes": 4, "crc32": f"{zlib.crc32(b'abcd'):08x}"},
        "sub/b.bin": {"bytes": 3, "crc32": f"{zlib.crc32(b'xyz'):08x}"},
    }
    assert io.seal_problem(folder) is None
    (folder / "sub" / "b.bin").write_bytes(b"xyw")  # same size, other bytes
    assert io.seal_problem(folder, checksums=False) is None
    problem = io.seal_problem(folder)
    assert problem.startswith(f"{folder / 'sub' / 'b.bin'}: its bytes changed since it was sealed")
    (folder / "a.bin").write_bytes(b"ab")
    assert io.seal_problem(folder) == f"{folder / 'a.bin'}: 2 bytes, sealed with 4"
    (folder / "a.bin").unlink()
    assert io.seal_problem(folder) == f"{folder / 'a.bin'}: missing"
    (folder / io.SEAL_FILE).unlink()
    assert io.seal_problem(folder).endswith("missing (the folder was never completed)")


def test_a_record_stream_yields_what_read_records_keeps(tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good = {"prompt_id": "a", "prompt": "hi", "messages": messages}
    lines = [json.dumps(good), "{", json.dumps({**good, "prompt_id": "b"}), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")
    stream = io.RecordStream(path, "conversations", on_bad_record="skip")
    assert [(line, r["prompt_id"]) for line, r in stream] == [(1, "a"), (3, "b")]
    assert [(b.line, b.field) for b in stream.bad] == [(2, "record"), (4, "prompt_id")] and stream.total == 4
    read = io.read_records(path, "conversations", on_bad_record="skip")
    assert [r["prompt_id"] for r in read.records] == ["a", "b"] and read.total == 4
