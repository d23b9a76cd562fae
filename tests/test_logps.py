"""Pair tokenization and truncation, packed pair batches, per-pair log-probs and `zephyr logps`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rounding import tolerance
from zephyr.cli import main
from zephyr.core.errors import DataError
from zephyr.scoring.attention import register_packed_attention
from zephyr.training.logps import compute_logps, pack_pairs, pair_logps
from zephyr.training.pairs import TokenizedPair, Truncation, read_pairs, tokenize_pairs, truncate_pair

PAIRS_FILE = "recipes/data/tiny_pairs.jsonl"


def pair_record(prompt_id, prompt, chosen, rejected, history=(), **extra):
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": prompt})
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "chosen": [*messages, {"role": "assistant", "content": chosen}],
        "rejected": [*messages, {"role": "assistant", "content": rejected}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
        **extra,
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- truncation (pure, golden values by hand) ------------------------------------------------------------


def test_truncation_leaves_pairs_that_fit_alone():
    # 4 + max(3, 5) = 9 ≤ 9: nothing is cut, even though the prompt is longer than max_prompt_length 2
    p, c, r, cut = truncate_pair(
        [1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], max_length=9, max_prompt_length=2
    )
    assert (p, c, r, cut) == ([1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], Truncation())


def test_truncation_keeps_prompt_end_and_answer_start():
    # 6 + 5 = 11 > 8: the prompt keeps its last 3 tokens [4, 5, 6]; room 8 − 3 = 5: chosen (4) fits,
    # rejected (5) fits exactly
    p, c, r, cut = truncate_pair([1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14, 15], 8, 3)
    assert (p, c, r) == ([4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14, 15])
    assert cut == Truncation(prompt=True, chosen=False, rejected=False)
    # a longer rejected answer is cut to the room left, keeping its start
    p, c, r, cut = truncate_pair([1, 2, 3, 4, 5, 6], [7, 8], [11, 12, 13, 14, 15, 16, 17], 8, 3)
    assert (p, c, r) == ([4, 5, 6], [7, 8], [11, 12, 13, 14, 15])
    assert cut == Truncation(prompt=True, chosen=False, rejected=True)


def test_truncation_of_answers_only_when_the_prompt_is_short():
    # prompt 2 ≤ max_prompt_length 4 stays whole; the room is 6 − 2 = 4 (not max_length − max_prompt_length = 2)
    p, c, r, cut = truncate_pair([1, 2], [3, 4, 5, 6, 7, 8], [9], 6, 4)
    assert (p, c, r, cut) == ([1, 2], [3, 4, 5, 6], [9], Truncation(chosen=True))


def test_truncation_without_a_prompt_limit_can_leave_no_room():
    p, c, r, _ = truncate_pair([1, 2, 3, 4, 5], [6], [7], max_length=5, max_prompt_length=None)
    assert (p, c, r) == ([1, 2, 3, 4, 5], [], [])
    assert truncate_pair([1], [2], [3], None, None)[:3] == ([1], [2], [3])


# --- tokenization with the chat template -----------------------------------------------------------------


def test_pairs_render_with_the_template_and_end_at_end_of_turn(smollm_tokenizer):
    tok = smollm_tokenizer
    records = [
        pair_record("a", "Capital of France?", "Paris.", "Berlin."),
        pair_record(
            "b", "And Italy?", "Rome.", "Milan, I think.", history=[("Capital of France?", "Paris.")]
        ),
    ]
    pairs, stats = tokenize_pairs(tok, records, max_length=None, max_prompt_length=None)
    assert stats.pairs == 2 and not stats.bad
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for pair, record in zip(pairs, records, strict=True):
        assert pair.chosen_ids[-1] == eot and pair.rejected_ids[-1] == eot
        assert tok.decode(pair.chosen_ids) == record["chosen"][-1]["content"] + "<|im_end|>"
        assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    # the multi-turn prompt holds the earlier answer and its end of turn
    assert "Paris.<|im_end|>\n<|im_start|>user\nAnd Italy?" in tok.decode(pairs[1].prompt_ids)


def test_truncation_counts_through_tokenize_pairs(smollm_tokenizer):
    tok = smollm_tokenizer
    long_answer = " ".join(["word"] * 60)
    records = [
        pair_record("fits", "Hi?", "Hello.", "Go away."),
        pair_record("long-answer", "Hi?", long_answer, "Go away."),
        pair_record("long-prompt", " ".join(["question"] * 80), "Yes.", "No."),
    ]
    prompt_len = len(
        tokenize_pairs(tok, records[:1], max_length=None, max_prompt_length=None)[0][0].prompt_ids
    )
    pairs, stats = tokenize_pairs(tok, records, max_length=prompt_len + 20, max_prompt_length=prompt_len)
    assert [p.prompt_id for p in pairs] == ["fits", "long-answer", "long-prompt"]
    assert (stats.truncated_prompts, stats.truncated_chosen, stats.truncated_rejected) == (1, 1, 0)
    assert all(
        len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= prompt_len + 20 for p in pairs
    )
    assert len(pairs[1].chosen_ids) == 20  # answer keeps its first 20 tokens
    assert tok.decode(pairs[1].chosen_ids).startswith("word word")
    assert len(pairs[2].prompt_ids) == prompt_len  # prompt keeps its end: the generation prompt survives
    assert tok.decode(pairs[2].prompt_ids).endswith("question<|im_end|>\n<|im_start|>assistant\n")


def test_a_pair_without_room_for_its_answer_is_bad(smollm_tokenizer, tmp_path):
    records = [
        pair_record("ok", "Hi?", "Hello.", "Bye."),
        pair_record("huge", " ".join(["why"] * 100), "Yes.", "No."),
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pairs, stats = read_pairs(
        smollm_tokenizer, str(path), max_length=64, max_prompt_length=None, on_bad_record="skip"
    )
    assert [p.prompt_id for p in pairs] == ["ok"]
    assert len(stats.bad) == 1 and "'huge'" in stats.bad[0] and "no room for the answer" in stats.bad[0]
    with pytest.raises(DataError, match=r"p\.jsonl:2: prompt_id 'huge': prompt: \d+ tokens .* no room"):
        read_pairs(smollm_tokenizer, str(path), max_length=64, max_prompt_length=None, on_bad_record="error")


def test_record_problems_and_pair_problems_share_the_policy(smollm_tokenizer, tmp_path):
    records = [
        pair_record("ok", "Hi?", "Hello.", "Bye."),
        pair_record("same", "Hi?", "Hello.", "Hello."),  # chosen == rejected
        pair_record("empty", "Hi?", "   ", "Bye."),  # empty answer
        pair_record("nan", "Hi?", "Hello.", "Bye.", score_chosen=float("nan")),  # NaN score
        pair_record("huge", " ".join(["why"] * 100), "Yes.", "No."),  # no room within max_length
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    assert "NaN" in path.read_text()  # Python's json writes the NaN literal that broken pipelines produce
    pairs, stats = read_pairs(
        smollm_tokenizer, str(path), max_length=64, max_prompt_length=None, on_bad_record="skip"
    )
    assert [p.prompt_id for p in pairs] == ["ok"]
    assert len(stats.bad) == 4
    assert any(":2: rejected[-1].content: identical" in b for b in stats.bad)
    assert any(":3: chosen[-1].content: is empty" in b for b in stats.bad)
    assert any(":4: score_chosen: must be a finite number, got nan" in b for b in stats.bad)
    assert any("'huge'" in b for b in stats.bad)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: rejected\[-1\]\.content: identical"):
        read_pairs(smollm_tokenizer, str(path), max_length=64, max_prompt_length=None, on_bad_record="error")


# --- packed batches --------------------------------------------------------------------------------------


def test_pack_pairs_layout_by_hand():
    pairs = [TokenizedPair("a", (1, 2), (3, 4), (5,)), TokenizedPair("b", (6,), (7,), (8, 9))]
    batch = pack_pairs(pairs)
    # documents: [1 2 3 4] [1 2 5] [6 7] [6 8 9]
    rows = batch.rows
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 1, 2, 5, 6, 7, 6, 8, 9]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]]
    # labels[t] = the answer token predicted at t, never across a document boundary
    x = -100
    assert rows.labels.tolist() == [[x, 3, 4, x, x, 5, x, 7, x, 8, 9, x]]
    assert rows.cu_seqlens.tolist() == [0, 4, 7, 9, 12]
    assert rows.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]]
    assert batch.num_pairs == 2 and rows.max_seqlen == 4 and rows.num_docs == 4
    assert batch.num_tokens == 12 and rows.shared is None and batch.reference is None


def naive_answer_logps(model, prompt, answer):
    """Sum of answer-token log-probs from full logits of the unpacked sequence (no zephyr code)."""
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1 :].sum())


@pytest.fixture(scope="module")
def tiny(smollm_tokenizer):
    model = make_tiny_llama(len(smollm_tokenizer))
    reference = make_tiny_llama(len(smollm_tokenizer))  # same weights, transformers' default attention
    model.set_attn_implementation(register_packed_attention())
    pairs, _ = read_pairs(
        smollm_tokenizer, PAIRS_FILE, max_length=None, max_prompt_length=None, on_bad_record="error"
    )
    return model, reference, pairs


def test_pair_logps_equal_unpacked_full_logits(tiny):
    model, reference, pairs = tiny
    chosen = pairs[:3] + pairs[-2:]  # single- and multi-turn
    with torch.no_grad():
        out = pair_logps(model, pack_pairs(chosen))
    for k, pair in enumerate(chosen):
        want = naive_answer_logps(reference, pair.prompt_ids, pair.chosen_ids)
        assert float(out.chosen[k]) == pytest.approx(want, abs=tolerance(want))
        want = naive_answer_logps(reference, pair.prompt_ids, pair.rejected_ids)
        assert float(out.rejected[k]) == pytest.approx(want, abs=tolerance(want))
        assert int(out.chosen_tokens[k]) == len(pair.chosen_ids)
        assert int(out.rejected_tokens[k]) == len(pair.rejected_ids)


def test_compute_logps_does_not_depend_on_batching_and_keeps_order(tiny):
    model, _, pairs = tiny
    subset = pairs[:10] + pairs[-4:]
    model.train()
    one = compute_logps(model, subset, batch_size=1)
    many = compute_logps(model, subset, batch_size=6)
    torch.testing.assert_close(one.chosen, many.chosen, atol=tolerance(one.chosen), rtol=0)
    torch.testing.assert_close(one.rejected, many.rejected, atol=tolerance(one.rejected), rtol=0)
    assert one.chosen_tokens.tolist() == [len(p.chosen_ids) for p in subset]
    assert model.training  # the pass runs in eval mode and restores the mode it found
    model.eval()
    assert not torch.equal(one.chosen, one.rejected)


# --- `zephyr logps` --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


def test_zephyr_logps_command(tiny_folder, tiny, tmp_path, capsys):
    _, reference, pairs = tiny
    records = [json.loads(x) for x in Path(PAIRS_FILE).read_text(encoding="utf-8").splitlines()][:3]
    records.insert(1, pair_record("dup-answer", "Hi?", "Same.", "Same."))
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out.jsonl"
    argv = ["logps", "--model", str(tiny_folder), "--data", str(data), "--out", str(out), "--batch-size", "2"]
    assert main(argv) == 2  # a bad record stops the command under the default policy
    assert "pairs.jsonl:2: rejected[-1].content: identical" in capsys.readouterr().err
    assert main([*argv, "--on-bad-record", "skip"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt_id"] for x in lines] == [
        records[0]["prompt_id"],
        records[2]["prompt_id"],
        records[3]["prompt_id"],
    ]
    assert set(lines[0]) == {
        "prompt_id",
        "chosen_logps",
        "rejected_logps",
        "chosen_tokens",
        "rejected_tokens",
    }
    for line, pair in zip(lines, pairs[:3], strict=True):
        assert line["chosen_tokens"] == len(pair.chosen_ids)
        want = naive_answer_logps(reference, pair.prompt_ids, pair.chosen_ids)
        assert line["chosen_logps"] == pytest.approx(want, abs=tolerance(want))
        want = naive_answer_logps(reference, pair.prompt_ids, pair.rejected_ids)
        assert line["rejected_logps"] == pytest.approx(want, abs=tolerance(want))
    assert "3 pairs (1 left out" in capsys.readouterr().out
