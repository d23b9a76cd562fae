"""Data parallel through accelerate on CPU (gloo): 2 processes × 1 bin per device give the loss curve and the
weights of 1 process × 2 bins per device. The loss of a step is normalised by the target tokens of the whole
global batch, so the split of the batch over processes does not change a single gradient.

Accumulation (1 bin × 2 micro-batches = 2 bins × 1) is checked in test_loop.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


def torchrun_script(name: str, **env: str) -> list[str]:
    """tests/scripts/NAME under torchrun, 2 CPU processes; its stdout lines (it must succeed)."""
    script = Path(__file__).parent / "scripts" / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    run = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def identical_and_moved(lines: list[str]) -> tuple[int, bool, float]:
    """(processes, bit-identical, share of weights moved) from a script's `processes ... moved M of N`."""
    line = next(x for x in lines if x.startswith("processes"))
    processes, identical, moved, total = re.fullmatch(
        r"processes (\d+) identical (\w+) moved (\d+) of (\d+)", line
    ).groups()
    return int(processes), identical == "True", int(moved) / int(total)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, smollm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    sft = {
        "model": str(model_dir),
        "train_data": str(TINY_CHAT),
        "max_length": 96,
        "max_steps": 4,  # within the first epoch: no step is padded out with repeated bins
        "global_batch_size": 2,  # 2 processes × 1 bin, 1 process × 2 bins: the accumulation is 1 in both
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "seed": 5,
    }
    recipe.write_text(yaml.safe_dump({"sft": sft}))

    two = tmp_path / "two"
    # `accelerate launch --cpu` starts one process without MPI; torchrun starts the ranks and accelerate
    # takes them up (ACCELERATE_USE_CPU → MULTI_CPU with the gloo backend).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "zephyr", "sft", str(recipe), f"sft.output_dir={two}", "sft.per_device_batch_size=1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "global batch 2 = 2 processes × 1 per device × 1 accumulation" in run.stdout

    one = tmp_path / "one"
    assert main(["sft", str(recipe), f"sft.output_dir={one}", "sft.per_device_batch_size=2"]) == 0

    curve_two = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(two / "metrics.jsonl")]
    curve_one = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(one / "metrics.jsonl")]
    assert [s for s, _, _ in curve_two] == [1, 2, 3, 4]
    assert [s for s, _, _ in curve_one] == [1, 2, 3, 4]
    rounds = PATHS * 4  # 4 steps through two paths (tests/rounding.py)
    for (_, loss_two, norm_two), (_, loss_one, norm_one) in zip(curve_two, curve_one, strict=True):
        assert loss_two == pytest.approx(loss_one, abs=tolerance(loss_one, roundings=rounds))
        assert norm_two == pytest.approx(norm_one, abs=tolerance(norm_one, roundings=rounds))
    weights_two = load_file(two / "final" / "model.safetensors")
    weights_one = load_file(one / "final" / "model.safetensors")
    allowed = tolerance(list(weights_one.values()), roundings=rounds)  # the model's largest weight
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, atol=allowed, rtol=0, msg=key)


def test_processes_that_accelerate_leaves_apart_are_refused(monkeypatch):
    """An FSDP launch config on a machine without GPUs: the launcher starts 2 ranks (WORLD_SIZE 2) but
    accelerate makes each a lone process (distributed type NO), which would train alone and overwrite the
    other's checkpoints. (`accelerate launch --config_file fsdp.yaml --num_processes 2` with `use_cpu: true`
    does exactly that.)"""
    from types import SimpleNamespace

    from zephyr.core.errors import ZephyrError
    from zephyr.training.prepare import _check_joined

    lone = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(value="NO"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ZephyrError,
        match=r"^the launcher started 2 processes \(WORLD_SIZE\) but accelerate "
        r"joined 1 \(NO\): each would train alone",
    ):
        _check_joined(lone)
    _check_joined(SimpleNamespace(num_processes=2, distributed_type=SimpleNamespace(value="MULTI_CPU")))
    monkeypatch.delenv("WORLD_SIZE")
    _check_joined(lone)  # a plain single process


@pytest.mark.slow
def test_bf16_master_weights_keep_ddp_replicas_identical():
    """StochasticAdamW's rounding bits are a hash of (seed, step, element), the same in every process: the
    replicas, which all-reduce the same gradients, round alike and stay bit-identical."""
    lines = torchrun_script("ddp_bf16_replicas.py", ACCELERATE_USE_CPU="true")
    processes, identical, moved = identical_and_moved(lines)
    assert (processes, identical) == (2, True)
    assert moved > 0.25  # the steps changed the weights: there was something to round


def test_the_cli_tears_down_the_process_group_it_ran_in(tmp_path, capsys):
    """Left to interpreter exit, a gloo group can abort a process that succeeded (SIGABRT): `main` destroys
    it on the way out, after success and after an error alike."""
    import torch.distributed as dist

    for argv, code in ((["assets", "list"], 0), (["check", str(tmp_path / "missing.yaml")], 2)):
        store = dist.FileStore(str(tmp_path / f"store-{code}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        assert dist.is_initialized()
        assert main(argv) == code
        assert not dist.is_initialized()


@pytest.mark.slow
def test_fsdp_shards_round_as_one_unsharded_tensor():
    """FSDP2 splits each weight by rows over the processes (DTensor shards); StochasticAdamW hashes an
    element's place in the whole tensor, not in its shard, so 2 processes step exactly as one: bit-identical
    bf16 weights after 5 steps on the same batches."""
    lines = torchrun_script("fsdp_bf16_shards.py")
    # Linear(16, 64) then Linear(64, 3): 64 rows split 32 + 32, 3 rows split 2 + 1
    assert "rank 0 shard starts [0, 0, 0, 0]" in lines
    assert "rank 1 shard starts [512, 32, 128, 2]" in lines  # 32 rows × 16, 32, 2 rows × 64, 2
    processes, identical, moved = identical_and_moved(lines)
    assert (processes, identical) == (2, True)
    assert moved > 0.5


@pytest.mark.slow
def test_chunked_log_probs_train_under_accelerates_fsdp2_sharding():
    """accelerate's FSDP2 leaves the final norm and LM head in a group that stays unsharded after the forward;
    the chunked log-probs use the head's weight, not the module, whose hooks would run once per chunk and free
    the gathered weights before the norm's backward (a crash). 2 processes with 4 and 1 head chunks: the
    gradients of one process over both batches. And accelerate's preparation keeps bf16 weights bf16 only
    without mixed precision, which is why an FSDP launch with bf16 master weights goes without it."""
    lines = torchrun_script("fsdp_accelerate_head.py")
    line = next(x for x in lines if x.startswith("max grad difference"))
    worst, largest = map(float, re.fullmatch(r"max grad difference (\S+) largest grad (\S+)", line).groups())
    assert worst <= tolerance(largest)  # sharded and whole: two paths of the same math (tests/rounding.py)
    assert "bf16 weights under mixed precision no ['torch.bfloat16'] bf16 ['torch.float32']" in lines
