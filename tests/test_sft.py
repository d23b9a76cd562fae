"""SFT: the loss against a hand-written reference, packed = padded, the final folder, counting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rounding import tolerance
from zephyr.core.config import SFTConfig
from zephyr.data.packing import collate_packed, collate_padded
from zephyr.stages.sft.data import (
    DocumentStats,
    fit_documents,
    pack_documents,
    packing_efficiency,
    trained_mask,
)
from zephyr.stages.sft.run import SFTTask, run_sft
from zephyr.training.tracking import read_metrics

TINY_CHAT = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"

# --- documents (pure) ------------------------------------------------------------------------------------


def test_fit_documents_truncates_keeping_the_start_and_drops_untrained():
    rendered = [
        ([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 1, 1, 1, 1, 1]),  # too long: cut to 5, targets 3 and 4 remain
        ([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 1]),  # too long: its answer is cut away → dropped
        ([9, 8, 7], [1, 0, 0]),  # only the first token is masked: nothing predicts it → dropped
        ([4, 5, 6], [0, 1, 1]),  # fits
    ]
    docs, stats = fit_documents(rendered, max_length=5)
    assert [(ids.tolist(), mask.tolist()) for ids, mask in docs] == [
        ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]),
        ([4, 5, 6], [0, 1, 1]),
    ]
    assert stats == DocumentStats(conversations=4, truncated=2, dropped=2)


def test_trained_mask_is_the_assistant_mask_or_every_token():
    assistant = [0, 0, 1, 1, 0, 0, 1]  # a user turn, an answer, a user turn, an answer
    assert trained_mask(assistant, "assistant").tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert trained_mask(assistant, "all").tolist() == [1, 1, 1, 1, 1, 1, 1]
    # fitted, every token but the first is a target (nothing in its document precedes the first)
    ((ids, mask),), _ = fit_documents(
        [([5, 6, 7, 8, 9, 10, 11], trained_mask(assistant, "all"))], max_length=5
    )
    assert (ids.tolist(), mask.tolist()) == ([5, 6, 7, 8, 9], [1, 1, 1, 1, 1])


def test_packing_efficiency_by_hand():
    docs = [([1] * 5, [1] * 5), ([1] * 3, [1] * 3), ([1] * 4, [1] * 4), ([1] * 2, [1] * 2)]
    bins = pack_documents(docs, max_length=8)
    # best-fit-decreasing: 5 → bin 0 (room 3), 4 → bin 1 (room 4), 3 → bin 0 (room 0), 2 → bin 1 (room 2)
    assert [[len(ids) for ids, _ in group] for group in bins] == [[5, 3], [4, 2]]
    assert packing_efficiency(14, len(bins), 8) == pytest.approx(14 / 16)


# --- the loss ---------------------------------------------------------------------------------------------


def sft_config(model_dir: Path, out: Path, **overrides) -> SFTConfig:
    values = dict(
        model=str(model_dir),
        train_data=str(TINY_CHAT),
        output_dir=str(out),
        max_length=256,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        precision="fp32",
    )
    values.update(overrides)
    return SFTConfig(**values)


def reference_loss(model_dir: Path, conversations: int, loss_on: str = "assistant") -> float:
    """Plain transformers forward, full logits, cross-entropy over assistant tokens of every conversation
    (`all`: over every token after each conversation's first), divided by the number of those tokens (what
    one optimizer step over all the data must report)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zephyr.data.chat import render_conversation

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in TINY_CHAT.read_text().splitlines()[:conversations]:
            rendered = render_conversation(tokenizer, json.loads(line)["messages"])
            ids = torch.tensor([rendered.input_ids])
            logits = model(ids).logits[0, :-1]
            mask = torch.tensor(rendered.loss_mask[1:], dtype=torch.bool)  # token t+1 is predicted at t
            if loss_on == "all":
                mask = torch.ones_like(mask)
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(nll[mask].sum())
            count += int(mask.sum())
    return total / count


def test_sft_loss_equals_a_hand_written_reference(tiny_model_dir, tmp_path, capsys):
    task_cfg = sft_config(tiny_model_dir, tmp_path / "probe", max_samples=16)
    bins = len(SFTTask(task_cfg).train_examples())
    per_device = math.ceil(bins / 2)
    # one optimizer step over all the data, in two micro-batches of different token counts
    cfg = sft_config(
        tiny_model_dir,
        tmp_path / "run",
        max_samples=16,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=2,
    )
    result = run_sft(cfg)
    printed = capsys.readouterr().out
    assert "sft: 16 conversations (0 bad records skipped, 0 truncated to 256 tokens, 0 dropped" in printed
    assert f"{bins} bins of 256 (packing efficiency" in printed and "1 optimizer steps" in printed
    (first,) = [m for m in read_metrics(result.metrics_path) if "loss" in m]
    expected = reference_loss(tiny_model_dir, 16)
    assert first["loss"] == pytest.approx(expected, abs=tolerance(expected))


def test_loss_on_all_trains_every_token_of_each_conversation(tiny_model_dir, tmp_path, capsys):
    from zephyr.data.chat import render_conversation
    from zephyr.models.load import load_tokenizer

    probe = SFTTask(sft_config(tiny_model_dir, tmp_path / "probe", max_samples=16, loss_on="all"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = [
        len(render_conversation(tokenizer, json.loads(line)["messages"]).input_ids)
        for line in TINY_CHAT.read_text().splitlines()[:16]
    ]
    batch = probe.collate(list(probe.train_examples()))
    assert probe.units(batch) == sum(n - 1 for n in lengths)  # every token but each conversation's first
    # one optimizer step over all the data: the mean over those tokens
    cfg = sft_config(
        tiny_model_dir, tmp_path / "run", max_samples=16, loss_on="all", per_device_batch_size=len(lengths)
    )
    result = run_sft(cfg)
    assert ", loss on every token;" in capsys.readouterr().out
    (first,) = [m for m in read_metrics(result.metrics_path) if "loss" in m]
    expected = reference_loss(tiny_model_dir, 16, loss_on="all")
    assert expected != pytest.approx(
        reference_loss(tiny_model_dir, 16), abs=1e-3
    )  # another loss than the default
    assert first["loss"] == pytest.approx(expected, abs=1e-5)


def test_packed_and_padded_batches_give_the_same_token_losses(tiny_model_dir):
    from zephyr.models.load import load_model
    from zephyr.scoring.attention import register_packed_attention
    from zephyr.scoring.forward import token_logps

    task = SFTTask(sft_config(tiny_model_dir, Path("unused"), packing=False))
    docs = list(task.train_examples())[:6]
    packed_model = load_model(str(tiny_model_dir), attn_implementation=register_packed_attention())
    plain_model = load_model(str(tiny_model_dir), attn_implementation="eager")
    with torch.no_grad():
        packed = token_logps(packed_model, collate_packed(docs))
        padded = token_logps(plain_model, collate_padded(docs, pad_id=task.pad_id))
    assert packed.shape == padded.shape and packed.numel() == sum(sum(m[1:]) for _, m in docs)
    torch.testing.assert_close(packed, padded, atol=tolerance(padded), rtol=0)


def test_packed_and_unpacked_runs_report_the_same_loss(tiny_model_dir, tmp_path):
    losses = {}
    for packing in (True, False):
        cfg = sft_config(
            tiny_model_dir,
            tmp_path / f"packing-{packing}",
            packing=packing,
            max_samples=12,
            per_device_batch_size=12,
        )
        result = run_sft(cfg)  # one step over all the data: bins or single conversations
        losses[packing] = [m["loss"] for m in read_metrics(result.metrics_path) if "loss" in m]
    assert len(losses[True]) == len(losses[False]) == 1
    assert losses[True][0] == pytest.approx(losses[False][0], abs=tolerance(losses[False]))


# --- the final folder -------------------------------------------------------------------------------------


def test_two_steps_write_a_final_folder_that_loads_and_renders_the_training_template(
    tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the zephyr template is not SmolLM2's own: the folder must carry the one trained with
    cfg = sft_config(tiny_model_dir, tmp_path / "run", chat_template="zephyr", max_steps=2, max_length=96)
    task = SFTTask(cfg)
    result = run_sft(cfg)
    final = result.final_dir
    assert final == tmp_path / "run" / "final"
    assert {"config.json", "generation_config.json", "model.safetensors", "resolved_config.yaml"} <= {
        p.name for p in final.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    for generation_prompt in (False, True):
        assert tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        ) == task.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False).startswith("<|system|>\nBe brief.")
    # generation stops at the template's end of turn (SmolLM2's eos, written after every zephyr turn)
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    eos = model.generation_config.eos_token_id
    assert eot == (eos if isinstance(eos, int) else eos[0])
    # the trained weights, not the initial ones
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.norm.weight, initial.model.norm.weight)


def test_bad_records_and_truncation_are_reported(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    lines = TINY_CHAT.read_text().splitlines()[:6]
    data.write_text("\n".join([*lines, '{"prompt_id": "x", "messages": []}']) + "\n")
    cfg = sft_config(
        tiny_model_dir,
        tmp_path / "run",
        train_data=str(data),
        on_bad_record="skip",
        max_length=24,
        max_steps=1,
    )
    task = SFTTask(cfg)
    assert task.bad_records == 1
    assert task.stats.conversations == 6 and task.stats.truncated > 0
    assert all(len(ids) <= 24 for group in task.train_examples() for ids, _ in group)
    assert (
        f"6 conversations (1 bad records skipped, {task.stats.truncated} truncated to 24 tokens"
        in task.summary()
    )
