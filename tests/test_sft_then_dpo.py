"""dSFT then dDPO on the real SmolLM2-135M-Instruct with the shipped tiny recipes (CPU, fp32).

The claim: DPO from the dSFT model (its own reference) raises the reward accuracy on held-out pairs, pairs
never trained on, above chance. At step 0 every reward is 0 (policy = reference), so the accuracy
(chosen reward > rejected reward) is 0; after training it must exceed 0.5.
"""

from __future__ import annotations

import json

import pytest

from rounding import step_zero_tolerance
from zephyr.core.config import load_recipe


@pytest.mark.slow
def test_sft_then_dpo_raises_held_out_reward_accuracy(tmp_path, smollm_dir):
    from zephyr.stages.dpo.run import DPOTask
    from zephyr.stages.sft.run import run_sft
    from zephyr.training.loop import train

    sft_cfg = load_recipe("recipes/smollm2/sft.yaml", [f"sft.output_dir={tmp_path / 'sft'}"]).sft
    sft = run_sft(sft_cfg)

    dpo_cfg = load_recipe(
        "recipes/smollm2/dpo.yaml", [f"dpo.model={sft.final_dir}", f"dpo.output_dir={tmp_path / 'dpo'}"]
    ).dpo
    task = DPOTask(dpo_cfg, cache_dir=tmp_path / "ref_cache")
    train_ids = {e.pair.prompt_id for e in task.train_examples()}
    held_out = {e.pair.prompt_id for e in task.eval_examples()}
    assert len(held_out) >= 8 and not train_ids & held_out  # held-out pairs are never trained on

    result = train(task, dpo_cfg)
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    allowed = step_zero_tolerance(dpo_cfg.beta, lines[0])
    assert lines[0]["loss"] == pytest.approx(0.6931471805599453, abs=allowed)  # step 0: policy = reference
    accuracy = result.eval_metrics["eval/rewards/accuracies"]
    margin = result.eval_metrics["eval/rewards/margins"]
    print(f"held-out reward accuracy {accuracy:.3f} on {len(held_out)} pairs, margin {margin:.4f}")
    assert accuracy > 0.5
    assert margin > 0
