"""`zephyr eval mc`: contexts, tokenization, shared-context scoring and the output contract (tiny models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from rounding import BUG_FACTOR, tolerance
from zephyr import io
from zephyr.cli import main
from zephyr.core.config import McEvalConfig
from zephyr.core.errors import ConfigError, DataError
from zephyr.stages.mc import metrics
from zephyr.stages.mc import run as mc

DATA = Path(__file__).parent / "data" / "mc"
ARC = DATA / "arc_like.jsonl"
TRUTHFUL = DATA / "truthful_like.jsonl"
FEWSHOT = DATA / "fewshot.jsonl"
MMLU = DATA / "mmlu_like.jsonl"
MMLU_DEV = DATA / "mmlu_like_dev.jsonl"


def records(path: Path) -> list[dict]:
    return io.read_records(path, "mc").records


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_tokenizer):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-mc")
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peaky_model(smollm_tokenizer):
    # Large random weights make sharp distributions, so that a wrong mask or position moves the numbers.
    return make_tiny_llama(len(smollm_tokenizer), initializer_range=0.5)


# ---------------------------------------------------------------------------------------------------------
# Contexts


def test_fewshot_context_golden_string():
    shots = records(FEWSHOT)
    context = mc.build_context("Question: Why?\nAnswer:", [shots[7], shots[0]])
    assert context == (
        "Question: Which animal lays eggs?\nAnswer: a chicken\n\n"
        "Question: What is the freezing point of water in Fahrenheit?\nAnswer: 32 degrees\n\n"
        "Question: Why?\nAnswer:"
    )
    assert mc.build_context("Q", [], "About X.\n\n") == "About X.\n\nQ"
    # Several gold indices: the example shows the first one.
    example = {"id": 1, "query": "Q:", "choices": ["no", "yes", "maybe"], "gold": [1, 2]}
    assert mc.fewshot_example(example) == "Q: yes\n\n"


def test_random_sampler_follows_lm_eval_seed_and_carries_its_state():
    pool = records(FEWSHOT)
    items = records(ARC)
    sampler = mc.FewshotSampler(pool, 2, "random", exclude_self=False)
    # random.Random(1234).sample(range(8), 2) gives [7, 0], then [0, 7] from the same generator.
    assert [s["id"] for s in sampler.sample(items[0])] == ["shot-8", "shot-1"]
    assert [s["id"] for s in sampler.sample(items[1])] == ["shot-1", "shot-8"]


def test_sampler_never_uses_an_item_as_its_own_example():
    items = records(ARC)
    first = mc.FewshotSampler(items, 3, "random", exclude_self=True)
    again = mc.FewshotSampler(items, 3, "random", exclude_self=True)
    for item in items:
        shots = first.sample(item)
        assert len(shots) == 3 and item["id"] not in {s["id"] for s in shots}
        assert shots == again.sample(item)  # deterministic
    first_n = mc.FewshotSampler(items, 2, "first_n", exclude_self=True)
    assert [s["id"] for s in first_n.sample(items[0])] == ["arc-02", "arc-03"]
    assert [s["id"] for s in first_n.sample(items[5])] == ["arc-01", "arc-02"]


def test_sampler_needs_a_large_enough_pool():
    with pytest.raises(DataError, match="pool holds 8"):
        mc.FewshotSampler(records(FEWSHOT), 8, "random", exclude_self=True)


def test_mmlu_preset_offline_groups_by_subject_with_descriptions():
    task = mc.load_task(data=str(MMLU), fewshot_data=str(MMLU_DEV), num_fewshot=2, limit=None, preset="mmlu")
    contexts = mc.build_contexts(task)
    assert task.sampler == "first_n" and task.metric == "acc"
    assert contexts[0] == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet has rings?\nA. Mercury\nB. Venus\nC. Saturn\nD. Mars\nAnswer: C\n\n"
        "The Moon orbits\nA. the Sun\nB. Mars\nC. Earth\nD. Jupiter\nAnswer: C\n\n"
        "What is the closest star to Earth?\nA. Sirius\nB. The Sun\nC. Proxima Centauri\nD. Vega\nAnswer:"
    )
    assert contexts[1].startswith(
        "The following are multiple choice questions (with answers) about virology.\n\n"
    )
    limited = mc.load_task(data=str(MMLU), fewshot_data=str(MMLU_DEV), num_fewshot=2, limit=1, preset="mmlu")
    assert [r["id"] for r in limited.records] == ["astronomy/0", "virology/0"]  # --limit is per subject


def test_preset_with_a_file_needs_the_fewshot_file():
    with pytest.raises(ConfigError, match="--fewshot-data"):
        mc.load_task(data=str(ARC), fewshot_data=None, num_fewshot=None, limit=None, preset="arc")
    task = mc.load_task(data=str(ARC), fewshot_data=str(FEWSHOT), num_fewshot=None, limit=3, preset="arc")
    assert task.num_fewshot == 25 and task.metric == "acc_norm" and len(task.records) == 3


# ---------------------------------------------------------------------------------------------------------
# Tokenization


def test_pairs_are_split_the_way_lm_eval_splits_them(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = mc.LmEvalTokenization(tok)
    context, continuation = enc.encode_pair("Question: Which?\nAnswer:", " carbon dioxide")
    whole = tok.encode("Question: Which?\nAnswer: carbon dioxide")
    assert context == tok.encode("Question: Which?\nAnswer:")
    assert continuation == whole[len(context) :]
    # Trailing spaces of the context move to the continuation.
    context, continuation = enc.encode_pair("The capital of France is ", " Paris.")
    assert context == tok.encode("The capital of France is")
    assert tok.decode(continuation) == "  Paris."
    # An empty context is the BOS token (<|im_start|>, id 1 for SmolLM2).
    assert enc.encode_pair("", " Paris.") == ([1], tok.encode(" Paris.", add_special_tokens=False))


def test_no_second_bos_when_the_text_starts_with_it(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    enc = mc.LmEvalTokenization(tok)
    assert enc.encode("Hello")[0] == tok.bos_token_id  # this tokenizer adds BOS by default
    assert enc.encode("<s>Hello") == tok.encode("<s>Hello", add_special_tokens=False)
    assert enc.encode("<s>Hello").count(tok.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------------------
# Rows, masks, truncation


def test_request_window_truncates_from_the_left():
    context = list(range(1, 11))
    # max_length 8: context + continuation keep 9 tokens -> the last 7 of the context.
    assert mc.request_window(context, [11, 12], 8) == (4, 5, 6, 7, 8, 9, 10)
    assert mc.request_window(context, [11, 12], 11) == tuple(context)  # 12 tokens = max_length + 1 fit
    assert mc.is_truncated((context, [11, 12]), 10) and not mc.is_truncated((context, [11, 12]), 11)
    with pytest.raises(DataError, match="does not fit max_length 1"):
        mc.request_window(context, [11, 12], 1)


def test_truncated_choices_get_rows_of_their_own():
    pairs = [([1, 2, 3, 4, 5], [6]), ([1, 2, 3, 4, 5], [7, 8]), ([1, 2, 3, 4, 5], [9])]
    assert mc.plan_rows(0, pairs, 10) == [mc.Row(0, (0, 1, 2), (1, 2, 3, 4, 5), ((6,), (7, 8), (9,)))]
    # max_length 5: one-token choices keep 5 context tokens, the two-token choice 4.
    assert mc.plan_rows(3, pairs, 5) == [
        mc.Row(3, (0, 2), (1, 2, 3, 4, 5), ((6,), (9,))),
        mc.Row(3, (1,), (2, 3, 4, 5), ((7, 8),)),
    ]


def test_a_batch_is_no_larger_than_an_lm_eval_batch(smollm_tokenizer):
    # lm-eval's batch of 4 requests holds at most 4 × its longest request (context + choice − 1) tokens;
    # ours at most 4 items and as many tokens. 3-shot ARC-like items, whole contexts (no truncation).
    from zephyr.scoring.continuations import group_tokens, longest_request, plan_batches

    rows = [
        row
        for i, item in enumerate(encoded_items(smollm_tokenizer, 3))
        for row in mc.plan_rows(i, item, 2048)
    ]
    groups = [(row.context, row.continuations) for row in rows]
    batches = plan_batches(groups, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(rows))) and len(batches) < len(rows)
    for batch in batches:
        assert len(batch) <= 4
        assert sum(group_tokens(groups[i]) for i in batch) <= 4 * max(
            longest_request(groups[i]) for i in batch
        )


# ---------------------------------------------------------------------------------------------------------
# Scoring: shared context equals one forward per choice


def naive_loglikelihoods(model, items, max_length):
    """lm-eval's way: one sequence per choice, (context + continuation)[-(L + 1):][:-1]."""
    out = []
    with torch.no_grad():
        for pairs in items:
            lls = []
            for context, continuation in pairs:
                inputs = (context + continuation)[-(max_length + 1) :][:-1]
                logits = model(torch.tensor([inputs])).logits[0, -len(continuation) :].float()
                logprobs = F.log_softmax(logits, dim=-1)
                lls.append(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
            out.append(lls)
    return out


def encoded_items(tokenizer, n_shots=1):
    task = mc.load_task(data=str(ARC), fewshot_data=str(FEWSHOT), num_fewshot=n_shots, limit=8, preset=None)
    enc = mc.LmEvalTokenization(tokenizer)
    return [
        enc.encode_choices(ctx, r["choices"])
        for ctx, r in zip(mc.build_contexts(task), task.records, strict=True)
    ]


@pytest.mark.parametrize("batch_size", [1, 6, 64])
def test_shared_context_scoring_equals_naive_scoring(peaky_model, smollm_tokenizer, batch_size):
    items = encoded_items(smollm_tokenizer)
    expected = naive_loglikelihoods(peaky_model, items, 2048)
    got = mc.score_items(peaky_model, items, batch_size=batch_size, max_length=2048, progress=False)
    for got_item, expected_item in zip(got, expected, strict=True):
        assert got_item == pytest.approx(expected_item, abs=tolerance(expected_item), rel=0)


def test_scoring_with_truncation_equals_naive_scoring(peaky_model, smollm_tokenizer):
    items = encoded_items(smollm_tokenizer, n_shots=2)
    max_length = 24
    assert any(mc.is_truncated(pair, max_length) for item in items for pair in item)
    expected = naive_loglikelihoods(peaky_model, items, max_length)
    got = mc.score_items(peaky_model, items, batch_size=8, max_length=max_length, progress=False)
    for got_item, expected_item in zip(got, expected, strict=True):
        assert got_item == pytest.approx(expected_item, abs=tolerance(expected_item), rel=0)


def test_a_leaking_mask_would_be_caught(peaky_model, smollm_tokenizer, monkeypatch):
    """The comparison above is sensitive: letting choices see each other moves the numbers."""
    import dataclasses

    from zephyr.scoring import attention

    items = encoded_items(smollm_tokenizer)
    expected = naive_loglikelihoods(peaky_model, items, 2048)
    blocks_of = attention.segment_blocks

    def causal_only(segments, total, window=None):  # every earlier token of the item: choices see choices
        blocks = blocks_of(segments, total, window)
        width = blocks.mask.shape[-1]
        return dataclasses.replace(
            blocks, mask=blocks.mask | torch.ones(width, width, dtype=torch.bool).tril()
        )

    monkeypatch.setattr(attention, "segment_blocks", causal_only)
    got = mc.score_items(peaky_model, items, batch_size=64, max_length=2048, progress=False)
    worst = max(abs(g - e) for gi, ei in zip(got, expected, strict=True) for g, e in zip(gi, ei, strict=True))
    assert worst > BUG_FACTOR * tolerance(expected)  # seen: 5.3 against a tolerance of 3.6e-4


# ---------------------------------------------------------------------------------------------------------
# The command and its files


def read_out(out: Path) -> tuple[dict, list[dict]]:
    results = json.loads((out / "results.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    return results, items


def test_cli_writes_results_items_and_markdown(tiny_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(
        ["eval", "mc", "--model", str(tiny_dir), "--data", str(ARC), "--out", str(out), "--batch-size", "5"]
    )
    assert rc == 0
    results, items = read_out(out)
    source = records(ARC)
    assert [item["id"] for item in items] == [r["id"] for r in source]  # input order
    for item, record in zip(items, source, strict=True):
        lls = item["loglikelihoods"]
        assert len(lls) == len(record["choices"]) and all(math.isfinite(x) and x < 0 for x in lls)
        assert item["acc"] == metrics.acc(lls, record["gold"])
        assert item["acc_norm"] == metrics.acc_norm(lls, record["choices"], record["gold"])
        assert "mc2" not in item
    assert results["model"] == str(tiny_dir)
    assert results["num_fewshot"] == 0
    assert results["counts"] == {"items": 20, "requests": 80, "truncated_requests": 0}
    assert results["acc"] == pytest.approx(sum(i["acc"] for i in items) / 20)
    assert results["acc_norm"] == pytest.approx(sum(i["acc_norm"] for i in items) / 20)
    assert results["acc_stderr"] == pytest.approx(metrics.mean_stderr([i["acc"] for i in items]))
    assert results["metric"] == "acc" and results["score"] == results["acc"]
    assert "| acc **(score)** |" in (out / "results.md").read_text()


def test_cli_reports_mc1_mc2_for_gold_lists_and_fewshot(tiny_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "mc", "--model", str(tiny_dir), "--data", str(TRUTHFUL), "--out", str(out)]
    assert main([*argv, "--fewshot-data", str(FEWSHOT), "--num-fewshot", "2", "--limit", "4"]) == 0
    results, items = read_out(out)
    assert len(items) == 4 and results["num_fewshot"] == 2 and results["fewshot_data"] == str(FEWSHOT)
    source = records(TRUTHFUL)[:4]
    for item, record in zip(items, source, strict=True):
        assert item["mc1"] == metrics.mc1(item["loglikelihoods"], record["gold"])
        assert item["mc2"] == pytest.approx(metrics.mc2(item["loglikelihoods"], record["gold"]))
    assert results["metric"] == "mc2"
    assert results["mc2"] == pytest.approx(sum(i["mc2"] for i in items) / 4)
    assert {"mc1", "mc1_stderr", "mc2_stderr"} <= results.keys()


def test_run_mc_mmlu_is_the_unweighted_mean_of_subjects(tiny_dir, tmp_path):
    def run(data, out):
        cfg = McEvalConfig(
            data=str(data), fewshot_data=str(MMLU_DEV), num_fewshot=2, batch_size=8, preset="mmlu"
        )
        return mc.run_mc(cfg, str(tiny_dir), out), read_out(out)[1]

    # Set the golds from a first run so that the subjects score differently: astronomy 1/3, virology 0.
    _, first = run(MMLU, tmp_path / "first")
    source = records(MMLU)
    for record, item in zip(source, first, strict=True):
        right = record["id"] == "astronomy/0"
        record["gold"] = item["pred"] if right else (item["pred"] + 1) % 4
    data = tmp_path / "mmlu.jsonl"
    io.write_jsonl(data, source)
    results, items = run(data, tmp_path / "out")

    subjects = results["subjects"]
    assert {s: g["items"] for s, g in subjects.items()} == {"astronomy": 3, "virology": 2}
    assert subjects["astronomy"]["acc"] == pytest.approx(1 / 3) and subjects["virology"]["acc"] == 0.0
    assert results["acc"] == results["score"] == pytest.approx((1 / 3 + 0) / 2)  # not 1/5
    assert results["acc_weighted"] == pytest.approx(1 / 5)
    assert results["acc_stderr"] == pytest.approx(
        metrics.unweighted_mean_stderr(
            [subjects["astronomy"]["acc_stderr"], subjects["virology"]["acc_stderr"]]
        )
    )
    assert [i["subject"] for i in items] == ["astronomy", "virology", "astronomy", "virology", "astronomy"]
    assert "| astronomy | 3 | 0.3333 |" in (tmp_path / "out" / "results.md").read_text()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "mc", "--model", "unused", "--out", str(tmp_path)]) == 2
    assert "--data FILE" in capsys.readouterr().err
    # The hub is not reachable in tests (HF_DATASETS_OFFLINE): a preset without --data says what to do.
    assert main(["eval", "mc", "--model", "unused", "--preset", "arc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hf:allenai/ai2_arc" in err and "not reachable" in err and "--data FILE" in err
    assert main(["eval", "mc", "--model", "unused", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
