"""The bad-input corpus (tests/data/bad/) through the real commands: every file gives exit code 2 and one line
`error: FILE:LINE: field: problem` (no traceback), or, under the skip policy, a count of what was left out.

Files read by io.read_records are covered function by function in tests/test_io.py; here each goes through
`zephyr.cli.main`, as a user runs it, and through the stages that read it (sft, dpo, curate, eval mc).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from zephyr.cli import main

BAD = Path(__file__).parent / "data" / "bad"
TINY_CHAT = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"

# (file, format, line, field, problem): the first bad record of each file and what the error policy says
FIRST_PROBLEM = [
    (
        "invalid_json.jsonl",
        "conversations",
        2,
        "record",
        "invalid JSON: Expecting ',' delimiter at column 83",
    ),
    ("wrong_types.jsonl", "conversations", 2, "messages[1].content", "must be a string, got integer"),
    (
        "unknown_role.jsonl",
        "conversations",
        2,
        "messages[1].role",
        "unknown role 'bot' (expected system, user or assistant)",
    ),
    ("missing_role.jsonl", "conversations", 2, "messages[1].role", "missing"),
    ("empty_content.jsonl", "conversations", 2, "messages[1].content", "is empty"),
    ("non_utf8.jsonl", "conversations", 2, "record", "not valid UTF-8: byte 0xe9 at column 35"),
    (
        "deeply_nested.jsonl",
        "conversations",
        2,
        "record",
        "invalid JSON: nested too deeply (over 1000 levels)",
    ),
    ("mixed_schemas.jsonl", "pairs", 2, "chosen", "missing"),
    ("duplicate_ids.jsonl", "pairs", 3, "prompt_id", "duplicate of line 1"),
    ("nan_scores.jsonl", "pairs", 2, "score_chosen", "must be a finite number, got nan"),
    ("pairs.jsonl", "pairs", 3, "chosen[-1].content", "is empty"),
    ("conversations.jsonl", "conversations", 2, "messages[1].role", "expected 'assistant', got 'user' "),
    ("rated.jsonl", "rated", 2, "completions[0].ratings.honesty", "must be a finite number, got nan"),
    ("mc.jsonl", "mc", 2, "gold", "2 is out of range for 2 choices"),
]
# records left out under the skip policy, of how many
SKIPPED = {
    "invalid_json.jsonl": (1, 3),
    "wrong_types.jsonl": (1, 3),
    "unknown_role.jsonl": (1, 3),
    "missing_role.jsonl": (1, 3),
    "empty_content.jsonl": (1, 3),
    "non_utf8.jsonl": (1, 3),
    "deeply_nested.jsonl": (1, 3),
    "mixed_schemas.jsonl": (1, 3),
    "duplicate_ids.jsonl": (1, 3),
    "nan_scores.jsonl": (2, 3),  # NaN, then Infinity
    "pairs.jsonl": (9, 13),
    "conversations.jsonl": (5, 7),
    "rated.jsonl": (3, 4),
    "mc.jsonl": (4, 5),
}
IDS = [case[0].split(".")[0] for case in FIRST_PROBLEM]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one clear line, nothing else
    return lines[0]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A copy of the corpus: commands never write next to the files they read."""
    folder = tmp_path / "bad"
    shutil.copytree(BAD, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# zephyr data validate: every file, both policies


@pytest.mark.parametrize(("name", "fmt", "line", "field", "problem"), FIRST_PROBLEM, ids=IDS)
def test_validate_names_file_line_and_field(capsys, corpus, name, fmt, line, field, problem):
    path = corpus / name
    code, out, err = run(capsys, "data", "validate", str(path), "--format", fmt)
    assert (code, out) == (2, "")
    assert error_line(err).startswith(f"error: {path}:{line}: {field}: {problem}")


@pytest.mark.parametrize(("name", "fmt"), [case[:2] for case in FIRST_PROBLEM], ids=IDS)
def test_validate_skip_policy_counts_every_bad_record(capsys, corpus, name, fmt):
    path = corpus / name
    code, out, _ = run(capsys, "data", "validate", str(path), "--format", fmt, "--on-bad-record", "skip")
    skipped, total = SKIPPED[name]
    assert code == 0
    kept = total - skipped
    assert out.splitlines()[0] == f"{path}: {kept} record{'s' * (kept != 1)} ok ({fmt}), {skipped} skipped"
    counts = [int(row.split()[0]) for row in out.splitlines()[2:]]
    assert sum(counts) == skipped


def test_a_huge_line_is_read_and_its_error_placed(capsys, tmp_path):
    """A 6 MB valid record is accepted; a 4 MB line cut short is reported with its line and column."""
    good = {"prompt_id": "h1", "prompt": "Hi", "messages": [{"role": "user", "content": "x" * 6_000_000}]}
    good["messages"].append({"role": "assistant", "content": "Hello."})
    cut = json.dumps({**good, "prompt_id": "h2"})[:4_000_000]
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps(good) + "\n" + cut + "\n")
    code, _, err = run(capsys, "data", "validate", str(path), "--format", "conversations")
    assert code == 2
    assert (
        error_line(err) == f"error: {path}:2: record: invalid JSON: Unterminated string starting at column 78"
    )
    code, out, _ = run(
        capsys, "data", "validate", str(path), "--format", "conversations", "--on-bad-record", "skip"
    )
    assert code == 0 and out.startswith(f"{path}: 1 record ok (conversations), 1 skipped")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.jsonl", "{path}: no records (the file is empty)"),
        ("not_a_list.json", "{path}:1: record: a .json file must hold a list of records, got object"),
        ("missing.jsonl", "{path}: no such file"),
    ],
)
def test_files_that_hold_no_records(capsys, corpus, name, message):
    path = corpus / name
    code, _, err = run(capsys, "data", "validate", str(path), "--format", "conversations")
    assert code == 2 and error_line(err) == "error: " + message.format(path=path)


# ---------------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("recipe_typo.yaml", r"unknown key 'sft\.learning_rte' \(did you mean 'sft\.learning_rate'\?\)"),
        ("recipe_bad_value.yaml", r"sft\.precision: must be one of 'auto' \| 'fp32' \| 'bf16', got 'fp8'"),
        ("recipe_bad_yaml.yaml", r"not valid YAML: .*line 3, column 18"),
    ],
)
@pytest.mark.parametrize("command", ["check", "sft"])
def test_recipe_mistakes_stop_before_any_work(capsys, corpus, name, expected, command):
    path = corpus / name
    code, out, err = run(capsys, command, str(path))
    assert (code, out) == (2, "")
    assert re.match(rf"error: {re.escape(str(path))}(:\d+)?: ", err), err  # the line, where the key has one
    assert re.search(expected, err, flags=re.DOTALL), err


def test_an_override_typo_names_the_key(capsys):
    code, _, err = run(capsys, "check", "recipes/smollm2/sft.yaml", "sft.lerning_rate=1e-5")
    assert code == 2
    assert "unknown key 'sft.lerning_rate' (did you mean 'sft.learning_rate'?)" in error_line(err)


# ---------------------------------------------------------------------------------------------------------
# Through the stages that read the files


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft",
        "recipes/smollm2/sft.yaml",
        f"sft.model={model}",
        f"sft.train_data={data}",
        f"sft.output_dir={out}",
        "sft.max_steps=1",
        "sft.per_device_batch_size=2",
        "sft.max_length=64",
        "sft.eval_fraction=0",
        "sft.save_steps=null",
        "sft.precision=fp32",
        *extra,
    ]


CONVERSATION_FILES = [case for case in FIRST_PROBLEM if case[1] == "conversations"]


@pytest.mark.parametrize(
    ("name", "fmt", "line", "field", "problem"), CONVERSATION_FILES, ids=[c[0] for c in CONVERSATION_FILES]
)
def test_sft_stops_at_the_first_bad_record(
    capsys, corpus, tiny_model_dir, tmp_path, name, fmt, line, field, problem
):
    path = corpus / name
    code, _, err = run(capsys, *sft_args(tiny_model_dir, path, tmp_path / "out"))
    assert code == 2
    assert error_line(err).startswith(f"error: {path}:{line}: {field}: {problem}")
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.slow
def test_sft_skip_policy_trains_on_the_rest_and_counts(
    capsys, caplog, corpus, tiny_model_dir, tmp_path, one_thread
):
    # every bad conversation of the corpus, between good records, in one file
    bad_lines = []
    for name, *_ in CONVERSATION_FILES:
        bad_lines.append((corpus / name).read_bytes().splitlines()[1])
    good = TINY_CHAT.read_bytes().splitlines()[:4]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join([*good, *bad_lines]) + b"\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, *sft_args(tiny_model_dir, mixed, out_dir, "sft.on_bad_record=skip"))
    assert code == 0, err
    assert f"4 conversations ({len(bad_lines)} bad records skipped" in out
    assert f"skipped {len(bad_lines)} of {len(bad_lines) + 4} records" in caplog.text  # a warning on stderr
    assert (out_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_prompts_over_max_length_are_truncated_and_counted(
    capsys, corpus, tiny_model_dir, tmp_path, one_thread
):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, *sft_args(tiny_model_dir, corpus / "long_prompts.jsonl", out_dir))
    assert code == 0, err
    assert "3 conversations (0 bad records skipped, 2 truncated to 64 tokens" in out


PAIR_FILES = [case for case in FIRST_PROBLEM if case[1] == "pairs"]


@pytest.mark.parametrize(
    ("name", "fmt", "line", "field", "problem"), PAIR_FILES, ids=[c[0] for c in PAIR_FILES]
)
def test_dpo_stops_at_the_first_bad_pair(
    capsys, corpus, tiny_model_dir, tmp_path, name, fmt, line, field, problem
):
    path = corpus / name
    code, _, err = run(
        capsys,
        "dpo",
        "recipes/smollm2/dpo.yaml",
        f"dpo.model={tiny_model_dir}",
        f"dpo.train_data={path}",
        f"dpo.output_dir={tmp_path / 'out'}",
    )
    assert code == 2
    assert error_line(err).startswith(f"error: {path}:{line}: {field}: {problem}")


def test_eval_mc_names_the_bad_item(capsys, corpus, tiny_model_dir, tmp_path):
    path = corpus / "mc.jsonl"
    code, _, err = run(
        capsys, "eval", "mc", "--model", str(tiny_model_dir), "--data", str(path), "--out", str(tmp_path)
    )
    assert code == 2
    assert error_line(err) == f"error: {path}:2: gold: 2 is out of range for 2 choices"


def test_curate_skips_and_counts_bad_records(capsys, caplog, corpus, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    lines = [(corpus / n).read_bytes().splitlines()[1] for n, *_ in CONVERSATION_FILES]
    mixed.write_bytes(b"\n".join([*TINY_CHAT.read_bytes().splitlines()[:6], *lines]) + b"\n")
    out = tmp_path / "curated"
    code, _, err = run(
        capsys,
        "curate",
        "recipes/smollm2/curate.yaml",
        f"curate.input={mixed}",
        f"curate.output_dir={out}",
        "curate.decontaminate=[]",
    )
    assert code == 0, err
    assert f"skipped {len(lines)} of {len(lines) + 6} records" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def tokenizer_without_template(tmp_path_factory, smollm_dir):
    folder = tmp_path_factory.mktemp("no-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm_dir) / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_tokenizer_without_a_chat_template_gets_zephyrs(capsys, tokenizer_without_template):
    code, out, _ = run(
        capsys,
        "data",
        "show",
        "tests/data/good/conversations.jsonl",
        "--tokenizer",
        str(tokenizer_without_template),
        "--limit",
        "1",
        "--no-color",
    )
    assert code == 0
    assert "<|user|>\nWhat is the capital of France?<|im_end|>\n<|assistant|>\n" in out


def test_a_template_the_tokenizer_cannot_end_is_refused(capsys, mistral_tokenizer_dir):
    code, _, err = run(
        capsys,
        "data",
        "show",
        "tests/data/good/conversations.jsonl",
        "--tokenizer",
        str(mistral_tokenizer_dir),
        "--chat-template",
        "chatml",
    )
    assert code == 2
    assert "no special token of the tokenizer ends the turn" in error_line(err)


def test_a_missing_template_file_is_named(capsys, tokenizer_without_template, tmp_path):
    missing = tmp_path / "nope.jinja"
    code, _, err = run(
        capsys,
        "data",
        "show",
        "tests/data/good/conversations.jsonl",
        "--tokenizer",
        str(tokenizer_without_template),
        "--chat-template",
        str(missing),
    )
    assert code == 2
    assert error_line(err) == f"error: chat template file {missing}: No such file or directory"


def test_a_folder_without_tokenizer_files_is_a_clear_error(capsys, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, _, err = run(
        capsys, "data", "show", "tests/data/good/conversations.jsonl", "--tokenizer", str(empty)
    )
    assert code == 2
    assert f"cannot load a tokenizer from {str(empty)!r}" in error_line(err)
