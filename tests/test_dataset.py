"""The tokenized-data cache: built once, reused, rebuilt when an input changes or a file is damaged, built
by one process of several; its arrays equal the in-memory tokenization (conversations and pairs), whether
the workers run here or in processes of their own."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from zephyr import io
from zephyr.core.config import SFTConfig
from zephyr.core.errors import DataError, ZephyrError
from zephyr.data.chat import render_conversation, render_prompt_answer
from zephyr.data.packing import pack_bfd
from zephyr.stages.sft.data import Examples, fit_document, load_sft_data
from zephyr.training import dataset
from zephyr.training.pairs import (
    PARTS,
    PairOptions,
    _start_worker,
    load_pairs,
    tokenize_pair_records,
    tokenize_pairs,
)

ROOT = Path(__file__).parents[1]
TINY_CHAT = ROOT / "recipes" / "data" / "tiny_chat.jsonl"
TINY_PAIRS = ROOT / "recipes" / "data" / "tiny_pairs.jsonl"


def sft_cfg(data: Path, **overrides) -> SFTConfig:
    values = dict(model="unused", train_data=str(data), max_length=96, eval_fraction=0.25, seed=4)
    values.update(overrides)
    return SFTConfig(**values)


def bins_of(examples: Examples) -> list[list[list[int]]]:
    return [[ids.tolist() for ids, _ in examples.group(i)] for i in range(len(examples))]


# --- what the arrays hold ----------------------------------------------------------------------------------


def test_cached_documents_and_bins_equal_the_in_memory_tokenization(smollm_tokenizer, tmp_path):
    cfg = sft_cfg(TINY_CHAT, max_length=48)
    entry = load_sft_data(cfg, smollm_tokenizer, cache_dir=tmp_path / "cache")
    records = io.read_records(TINY_CHAT, "conversations").records
    train, held = io.train_eval_split(records, 0.25, 4)
    for split, part in (("train", train), ("eval", held)):
        docs = []
        for record in part:
            rendered = render_conversation(smollm_tokenizer, record["messages"])
            doc = fit_document(rendered.input_ids, rendered.loss_mask, 48)
            if doc is not None:
                docs.append((doc[0].tolist(), doc[1].tolist()))
        # the bins: best-fit-decreasing over the documents' lengths, each document whole, ids and mask
        expected = [[docs[i] for i in group] for group in pack_bfd([len(ids) for ids, _ in docs], 48)]
        examples = Examples(entry, split, packed=True)
        got = [
            [(ids.tolist(), mask.tolist()) for ids, mask in examples.group(i)] for i in range(len(examples))
        ]
        assert got == expected, split
        assert entry.stats[split]["conversations"] == len(part)
        assert entry.stats[split]["truncated"] == sum(
            len(render_conversation(smollm_tokenizer, r["messages"]).input_ids) > 48 for r in part
        )
    assert entry.stats["train"]["truncated"] > 0 and len(held) > 0  # both paths are exercised
    # the arrays are mapped read-only, not held by the process
    assert isinstance(entry.array("input_ids"), np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        entry.array("input_ids")[0] = 1


def test_loss_on_all_documents_are_the_whole_renders_with_every_token_trained(smollm_tokenizer, tmp_path):
    cfg = sft_cfg(TINY_CHAT, eval_fraction=0.0, packing=False, loss_on="all", max_length=48)
    examples = Examples(load_sft_data(cfg, smollm_tokenizer, cache_dir=tmp_path), "train", packed=False)
    records = io.read_records(TINY_CHAT, "conversations").records
    expected = [render_conversation(smollm_tokenizer, r["messages"]).input_ids[:48] for r in records]
    assert [ids.tolist() for ids, _ in examples] == expected
    assert [mask.tolist() for _, mask in examples] == [[1] * len(ids) for ids in expected]


def test_worker_processes_write_the_same_bytes_as_one_process(smollm_tokenizer, tmp_path):
    cfg = sft_cfg(TINY_CHAT, max_length=64)
    here = load_sft_data(cfg, smollm_tokenizer, cache_dir=tmp_path / "a", workers=1)
    pooled = load_sft_data(cfg, smollm_tokenizer, cache_dir=tmp_path / "b", workers=2, chunk_records=5)
    assert here.meta["arrays"] == pooled.meta["arrays"] and here.stats == pooled.stats
    for name in here.meta["arrays"]:
        assert (here.folder / f"{name}.bin").read_bytes() == (pooled.folder / f"{name}.bin").read_bytes(), (
            name
        )


def test_cached_pairs_equal_tokenize_pairs(smollm_tokenizer, tmp_path):
    options = PairOptions(max_length=96, max_prompt_length=48, eval_fraction=0.25, seed=2)
    data = load_pairs(
        smollm_tokenizer, str(TINY_PAIRS), options=options, cache_dir=tmp_path, workers=2, chunk_records=7
    )
    records = io.read_records(TINY_PAIRS, "pairs").records
    train, held = io.train_eval_split(records, 0.25, 2)
    total = 0
    for pairs, part in ((data.train, train), (data.eval, held)):
        expected, stats = tokenize_pairs(smollm_tokenizer, part, max_length=96, max_prompt_length=48)
        assert list(pairs) == expected
        assert pairs.prompt_ids == [p.prompt_id for p in expected]
        total += stats.truncated_prompts
    assert data.stats.truncated_prompts == total > 0 and data.stats.pairs == len(records)


def test_a_chunk_of_pairs_is_tokenized_in_one_batch_as_one_pair_at_a_time(smollm_tokenizer):
    """The worker's batch path: a pair the template cannot render and a pair with no room for its answer
    are problems at their own indices (in order); the others equal `render_prompt_answer` of each side."""
    records = io.read_records(TINY_PAIRS, "pairs").records[:4]
    unrenderable = json.loads(json.dumps(records[1]))
    unrenderable["chosen"][-1]["content"] += " <|im_end|> and more"
    too_long = json.loads(json.dumps(records[2]))
    for side in ("chosen", "rejected"):
        too_long[side][0]["content"] = "word " * 200  # the prompt alone fills max_length
    chunk_records = [records[0], unrenderable, too_long, records[3]]
    _start_worker(smollm_tokenizer, 96, None)
    chunk = tokenize_pair_records(chunk_records)
    assert chunk.kept.tolist() == [True, False, False, True]
    assert [i for i, _ in chunk.problems] == [1, 2]
    assert "contains the end-of-turn token" in chunk.problems[0][1]
    assert "leave no room for the answer within max_length 96" in chunk.problems[1][1]
    expected: dict[str, list[int]] = {part: [] for part in PARTS}
    for record in (records[0], records[3]):
        prompt, chosen, rejected = record["chosen"][:-1], record["chosen"][-1], record["rejected"][-1]
        prompt_ids, chosen_ids = render_prompt_answer(smollm_tokenizer, prompt, chosen["content"])
        assert render_prompt_answer(smollm_tokenizer, prompt, rejected["content"])[0] == prompt_ids
        _, rejected_ids = render_prompt_answer(smollm_tokenizer, prompt, rejected["content"])
        assert len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= 96  # (nothing cut here)
        for part, ids in zip(PARTS, (prompt_ids, chosen_ids, rejected_ids), strict=True):
            expected[part] += ids
    for part, ids in expected.items():
        assert chunk.values[part].dtype == np.int32 and chunk.values[part].tolist() == ids, part


def test_a_record_the_template_cannot_render_follows_the_bad_record_policy(smollm_tokenizer, tmp_path):
    lines = TINY_CHAT.read_text(encoding="utf-8").splitlines()[:4]
    bad = json.loads(lines[2])
    bad["messages"][1]["content"] += " <|im_end|> and more"  # the end-of-turn token's text inside an answer
    lines[2] = json.dumps(bad)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = f"{data}:3: prompt_id {bad['prompt_id']!r}: messages[1].content contains the end-of-turn token"
    with pytest.raises(DataError) as raised:
        load_sft_data(sft_cfg(data, eval_fraction=0.0), smollm_tokenizer, cache_dir=tmp_path / "c")
    assert str(raised.value).startswith(message)
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]  # nothing kept of the failed build
    entry = load_sft_data(
        sft_cfg(data, eval_fraction=0.0, on_bad_record="skip"), smollm_tokenizer, cache_dir=tmp_path / "c"
    )
    assert entry.stats["bad_records"] == 1 and entry.stats["bad_examples"][0].startswith(message)
    assert entry.stats["train"]["conversations"] == 3 and entry.stats["documents"] == 3


# --- built once, reused, rebuilt ---------------------------------------------------------------------------


def counting_build(calls: list[int], values=(1, 2, 3)):
    def build(folder: Path) -> dict:
        calls.append(1)
        writer = dataset.ArrayWriter(folder)
        writer.write("values", list(values), np.int32)
        return {"arrays": writer.close(), "stats": {"tokens": len(values)}}

    return build


def test_a_second_run_reuses_the_entry_and_a_changed_input_makes_a_new_one(tmp_path, capsys):
    calls: list[int] = []
    first = dataset.load_or_build("toy", {"n": 1}, counting_build(calls), cache_dir=tmp_path)
    out = capsys.readouterr().out
    assert f"toy data: built {first.folder} (3 tokens, " in out
    size = sum(f.stat().st_size for f in first.folder.iterdir())  # 12 bytes of values, meta.json, the seal
    assert f"{tmp_path} holds {size} B in 1 entry (`zephyr cache list`, `zephyr cache prune`)" in out
    again = dataset.load_or_build("toy", {"n": 1}, counting_build(calls), cache_dir=tmp_path)
    assert again.folder == first.folder and len(calls) == 1
    assert f"toy data: reusing {first.folder}" in capsys.readouterr().out
    assert again.array("values").tolist() == [1, 2, 3]
    other = dataset.load_or_build("toy", {"n": 2}, counting_build(calls, (4, 5)), cache_dir=tmp_path)
    assert other.folder != first.folder and len(calls) == 2 and other.array("values").tolist() == [4, 5]


def test_the_data_files_content_and_the_options_key_the_sft_entry(smollm_tokenizer, tmp_path):
    data = tmp_path / "chat.jsonl"
    lines = TINY_CHAT.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    first = load_sft_data(sft_cfg(data, eval_fraction=0.0), smollm_tokenizer, cache_dir=cache)
    assert (
        load_sft_data(sft_cfg(data, eval_fraction=0.0), smollm_tokenizer, cache_dir=cache).folder
        == first.folder
    )
    for changed in ({"max_length": 80}, {"loss_on": "all"}, {"packing": False}, {"eval_fraction": 0.5}):
        assert (
            load_sft_data(
                sft_cfg(data, **{"eval_fraction": 0.0, **changed}), smollm_tokenizer, cache_dir=cache
            ).folder
            != first.folder
        ), changed
    data.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")  # other content, same path
    fewer = load_sft_data(sft_cfg(data, eval_fraction=0.0), smollm_tokenizer, cache_dir=cache)
    assert fewer.folder != first.folder and fewer.stats["documents"] == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "seal"])
def test_a_damaged_entry_is_rebuilt_never_read(tmp_path, capsys, damage):
    calls: list[int] = []
    entry = dataset.load_or_build("toy", {"n": 1}, counting_build(calls), cache_dir=tmp_path)
    values = entry.folder / "values.bin"
    if damage == "truncate":
        values.write_bytes(values.read_bytes()[:-4])
        reason = f"{values}: 8 bytes, sealed with 12"
    elif damage == "flip":
        raw = bytearray(values.read_bytes())
        raw[4] ^= 1  # the same size: only the checksum tells
        values.write_bytes(bytes(raw))
        reason = f"{values}: its bytes changed since it was sealed"
    else:
        (entry.folder / io.SEAL_FILE).unlink()
        reason = f"{entry.folder / io.SEAL_FILE}: missing"
    capsys.readouterr()
    again = dataset.load_or_build("toy", {"n": 1}, counting_build(calls), cache_dir=tmp_path)
    captured = capsys.readouterr()
    assert f"toy data: {reason}" in captured.err and "the entry is damaged; rebuilding it" in captured.err
    assert len(calls) == 2 and again.array("values").tolist() == [1, 2, 3]
    assert f"toy data: built {again.folder}" in captured.out


def test_a_build_that_fails_leaves_no_entry(tmp_path):
    def failing(folder: Path) -> dict:
        dataset.ArrayWriter(folder).write("values", [1], np.int32)
        raise KeyboardInterrupt  # a run stopped while it builds

    with pytest.raises(KeyboardInterrupt):
        dataset.load_or_build("toy", {"n": 1}, failing, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    (tmp_path / f"toy-{dataset.fingerprint({'n': 1})}").mkdir()  # a folder without a seal is no entry
    calls: list[int] = []
    entry = dataset.load_or_build("toy", {"n": 1}, counting_build(calls), cache_dir=tmp_path)
    assert len(calls) == 1 and entry.array("values").tolist() == [1, 2, 3]


def slow_build_in_a_process(cache: str, log: str, out: multiprocessing.Queue) -> None:
    def build(folder: Path) -> dict:
        with open(log, "a") as f:
            f.write("build\n")
        time.sleep(1.0)  # long enough for the other processes to arrive and wait
        writer = dataset.ArrayWriter(folder)
        writer.write("values", [7, 8], np.int32)
        return {"arrays": writer.close(), "stats": {"tokens": 2}}

    entry = dataset.load_or_build("toy", {"n": 1}, build, cache_dir=Path(cache))
    out.put((str(entry.folder), entry.array("values").tolist()))


def test_processes_of_one_machine_build_the_entry_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    log = tmp_path / "builds.log"
    processes = [
        context.Process(target=slow_build_in_a_process, args=(str(tmp_path / "cache"), str(log), out))
        for _ in range(3)
    ]
    for p in processes:
        p.start()
    results = [out.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert log.read_text().splitlines() == ["build"]
    assert len({folder for folder, _ in results}) == 1 and all(values == [7, 8] for _, values in results)


def _ready(tokenizer) -> None:
    assert tokenizer.chat_template  # the worker's tokenizer, loaded from the folder the parent saved


def _die(chunk) -> None:
    os._exit(3)  # as a worker killed for memory


def test_a_worker_that_dies_stops_the_build_with_an_error(smollm_tokenizer):
    results = dataset.map_chunks(
        _die, [[1], [2], [3]], initializer=_ready, tokenizer=smollm_tokenizer, initargs=(), workers=2
    )
    with pytest.raises(ZephyrError, match="a tokenizing worker process died"):
        list(results)
