"""dSFT then dDPO on the real SmolLM2-135M-Instruct with the shipped tiny recipes (CPU, fp32).

The claim: DPO from the dSFT model (its own reference) raises the reward accuracy on held-out pairs, pairs
never trained on, above chance. At step 0 every reward is 0 (policy = reference), so the accuracy
(chosen reward > rejected reward) is 0; after training it must exceed 0.5.

The recipes' sizes are cut to what the claim needs (the shipped recipes take a few times longer): one dSFT
step (bins of 256 tokens) still writes the checkpoint that dDPO loads as policy and reference; dDPO trains
one epoch over 16 of the recipe's 38 training pairs (4 steps) at twice its learning rate without warm-up
(the recipe's first step has lr 0), with each prompt run once for both answers (`prefix_sharing`: the
same log-probs, a third fewer tokens), and is measured on the recipe's whole held-out set: the split hashes
each prompt_id, so the shortened file splits the same way. One torch thread, as in the tiny-model tests:
on cores busy with other work a second, spinning thread made this test five times slower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rounding import step_zero_tolerance
from zephyr import io
from zephyr.core.config import load_recipe


@pytest.mark.slow
def test_sft_then_dpo_raises_held_out_reward_accuracy(tmp_path, smollm_dir, one_thread):
    from zephyr.stages.dpo.run import DPOTask
    from zephyr.stages.sft.run import run_sft
    from zephyr.training.loop import train

    sft_overrides = [f"sft.output_dir={tmp_path / 'sft'}", "sft.max_steps=1", "sft.max_length=256"]
    sft_cfg = load_recipe("recipes/smollm2/sft.yaml", sft_overrides).sft
    sft = run_sft(sft_cfg)

    recipe = load_recipe("recipes/smollm2/dpo.yaml").dpo
    pairs = [json.loads(line) for line in Path(recipe.train_data).read_text(encoding="utf-8").splitlines()]
    train_side, held_out_side = io.train_eval_split(pairs, recipe.eval_fraction, recipe.seed)
    kept = {p["prompt_id"] for p in train_side[:16] + held_out_side}
    io.write_jsonl(tmp_path / "pairs.jsonl", [p for p in pairs if p["prompt_id"] in kept])

    dpo_overrides = [f"dpo.model={sft.final_dir}", f"dpo.output_dir={tmp_path / 'dpo'}"]
    dpo_overrides += [
        f"dpo.train_data={tmp_path / 'pairs.jsonl'}",
        "dpo.learning_rate=2e-5",
        "dpo.warmup_ratio=0",
        "dpo.prefix_sharing=true",
    ]
    dpo_cfg = load_recipe("recipes/smollm2/dpo.yaml", dpo_overrides).dpo
    task = DPOTask(dpo_cfg, cache_dir=tmp_path / "ref_cache")
    train_ids = {e.pair.prompt_id for e in task.train_examples()}
    held_out = {e.pair.prompt_id for e in task.eval_examples()}
    assert held_out == {p["prompt_id"] for p in held_out_side}  # the recipe's held-out pairs, all of them
    assert len(held_out) >= 8 and not train_ids & held_out  # held-out pairs are never trained on

    result = train(task, dpo_cfg)
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    allowed = step_zero_tolerance(dpo_cfg.beta, lines[0])
    assert lines[0]["loss"] == pytest.approx(0.6931471805599453, abs=allowed)  # step 0: policy = reference
    accuracy = result.eval_metrics["eval/rewards/accuracies"]
    margin = result.eval_metrics["eval/rewards/margins"]
    print(f"held-out reward accuracy {accuracy:.3f} on {len(held_out)} pairs, margin {margin:.4f}")
    assert accuracy > 0.5
    assert margin > 0
