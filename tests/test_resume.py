"""Exact resume: a run killed with SIGKILL and continued with --resume ends with the weights of a run
that was never interrupted (same data order, optimizer state, schedule and RNG: the model has dropout)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tiny_llama
from rounding import PATHS, tolerance
from zephyr.cli import main
from zephyr.training.tracking import read_metrics

TINY_CHAT = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"


def write_recipe(path: Path, model_dir: Path) -> Path:
    recipe = {
        "sft": {
            "model": str(model_dir),
            "train_data": str(TINY_CHAT),
            "max_samples": 16,
            "max_length": 96,
            "per_device_batch_size": 2,
            "num_epochs": 2,  # the kill lands in the first epoch; the second is reshuffled
            "learning_rate": 5e-3,
            "warmup_ratio": 0.2,
            "precision": "fp32",
            "save_steps": 2,
            "save_total_limit": 2,
            "seed": 7,
        }
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def zephyr_sft(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zephyr", "sft", str(recipe), f"sft.output_dir={out}", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, smollm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer), attention_dropout=0.1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dir)

    straight = tmp_path / "straight"  # in process: the same code without another interpreter start-up
    assert main(["sft", str(recipe), f"sft.output_dir={straight}"]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(zephyr_sft(recipe, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it was killed: nothing was tested"

    resumed = subprocess.run(
        zephyr_sft(recipe, killed, "--resume"), check=True, capture_output=True, text=True
    )
    assert "resuming from" in resumed.stdout

    # Two processes: equal up to the rounding of as many steps (tests/rounding.py). A resume that lost the
    # optimizer state, the data order, the schedule or the dropout RNG moves the weights by a share of the
    # learning rate (5e-3).
    straight_losses = [(m["step"], m["loss"]) for m in read_metrics(straight / "metrics.jsonl")]
    rounds = PATHS * len(straight_losses)
    expected = load_file(straight / "final" / "model.safetensors")
    got = load_file(killed / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    allowed = tolerance(list(expected.values()), roundings=rounds)  # the model's largest weight
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=allowed, rtol=0, msg=key)
    # the metrics file reads as one run: every step once, the same losses
    resumed_losses = [(m["step"], m["loss"]) for m in read_metrics(killed / "metrics.jsonl")]
    assert [s for s, _ in resumed_losses] == [s for s, _ in straight_losses]
    losses = [loss for _, loss in straight_losses]
    assert [loss for _, loss in resumed_losses] == pytest.approx(
        losses, abs=tolerance(losses, roundings=rounds)
    )


def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumed(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    sft = {
        "model": str(tiny_model_dir),
        "train_data": str(TINY_CHAT),
        "max_samples": 8,
        "max_length": 96,
        "per_device_batch_size": 1,
        "max_steps": 6,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "save_steps": 2,
        "seed": 3,
    }
    recipe.write_text(yaml.safe_dump({"sft": sft}))
    straight = tmp_path / "straight"
    assert main(["sft", str(recipe), f"sft.output_dir={straight}"]) == 0
    # what a crash after the checkpoint of step 4 leaves, then a damaged file in that checkpoint
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "final")
    weights = run / "checkpoint-4" / "training_state" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()

    assert main(["sft", str(recipe), f"sft.output_dir={run}", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint-4 is damaged ({weights}: {size // 2} bytes, sealed with {size})" in captured.err
    assert "resuming from checkpoint-2, the newest intact checkpoint, instead of checkpoint-4" in captured.err
    assert "resuming from " + str(run / "checkpoint-2") in captured.out

    # continued from step 2: the steps after it are the uninterrupted run's (in process: the same rounding)
    def curve(folder):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(folder / "metrics.jsonl")]

    assert curve(run) == curve(straight) and len(curve(run)) == 6
    expected = load_file(straight / "final" / "model.safetensors")
    got = load_file(run / "final" / "model.safetensors")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
