"""The training benchmarks (benchmarks/dpo.py, sft.py): their arithmetic, shapes and workloads, and a CPU
smoke run of each on the tiny shape that must print one table with a zephyr row, a TRL row and speed-ups."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import measure  # noqa: E402
import shapes  # noqa: E402


def test_result_arithmetic_golden():
    r = measure.Result(
        engine="zephyr",
        config="",
        parameters=1_000_000_000,
        step_seconds=[9.0, 2.0, 3.0],  # the first step is the warm-up: not timed
        step_tokens=[999, 4000, 6000],
        units_per_step=8,
        warmup=1,
        reference_seconds=5.0,
        total_units=24,
    )
    assert r.tokens_per_s() == 2000.0  # 10,000 tokens in 5 s
    assert r.units_per_s() == pytest.approx(16 / 5)
    assert r.mfu(12.0) == pytest.approx(2000 * 6e9 / 12e12)  # 6N FLOPs per token: 100%
    assert r.mfu(None) is None
    # 24 pairs = 3 steps of 2.5 s at steady state, after a 5 s reference pass
    assert r.epoch_units_per_s() == pytest.approx(24 / (5.0 + 7.5))
    assert measure.ratio(3.0, 2.0) == "1.50×"
    assert measure.ratio(3.0, None) == "–"


def test_shapes_have_the_published_sizes():
    import torch

    sizes = {
        name: shapes.count_parameters(
            shapes.build_model(name, device="meta", dtype=torch.bfloat16, attn_implementation="sdpa")
        )
        for name in ("mistral-7b", "1b")
    }
    assert sizes == {"mistral-7b": 7_241_732_096, "1b": 1_100_048_384}


def test_synthetic_pairs_follow_their_length_distribution():
    lengths = shapes.PAIRS["full"]
    pairs = shapes.synthetic_pairs(2000, lengths, 32000, seed=1)
    assert pairs == shapes.synthetic_pairs(2000, lengths, 32000, seed=1)  # reproducible
    for prompt, chosen, rejected in pairs:
        assert 32 <= len(prompt) <= 384 and 32 <= len(chosen) <= 640 and 32 <= len(rejected) <= 640
        assert len(prompt) + max(len(chosen), len(rejected)) <= lengths.max_length == 1024
        assert min(prompt + chosen + rejected) >= 4  # never a special token
    mean = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs) / len(pairs)
    assert mean == pytest.approx(1088, rel=0.03)


def test_synthetic_conversations_are_cut_and_masked():
    lengths = shapes.CONVERSATIONS["full"]
    docs = shapes.synthetic_conversations(200_000, lengths, 32000, seed=2)
    assert sum(len(ids) for ids, _ in docs) >= 200_000
    assert all(len(ids) == len(mask) <= 2048 for ids, mask in docs)
    assert all(mask[0] == 0 and any(mask) for _, mask in docs)  # a user turn first, answers trained
    trained = sum(sum(mask) for _, mask in docs) / sum(len(ids) for ids, _ in docs)
    assert 0.6 < trained < 0.75


def test_both_benchmarks_take_the_flags_gpu_sh_passes():
    import dpo
    import sft

    flags = ["--shape", "mistral-7b", "--warmup", "2", "--steps", "6", "--engines", "zephyr,zephyr-ckpt,trl"]
    flags += ["--timeout", "100", "--table-out", "out.md"]
    for module in (dpo, sft):
        args = module.parse_args(flags)
        assert (args.shape, args.warmup, args.steps) == ("mistral-7b", 2, 6)
        assert (args.timeout, args.table_out, args.isolate) == (100.0, "out.md", "auto")
        assert measure.trl_checkpointing(args)  # auto: on at 7B
        assert not measure.trl_checkpointing(module.parse_args(["--shape", "1b"]))
        assert module.parse_args([]).engines == "zephyr,zephyr-ckpt,trl"
    assert (dpo.parse_args([]).pairs_per_step, dpo.parse_args([]).ref_batch_size) == (8, 32)
    assert sft.parse_args([]).bins_per_step == 4


def test_an_isolated_engine_gets_every_flag_but_the_engines():
    argv = ["--shape", "tiny", "--engines", "zephyr,trl", "--steps", "2", "--engines=trl", "--seed", "3"]
    assert measure._without_engines(argv) == ["--shape", "tiny", "--steps", "2", "--seed", "3"]


def test_step_clock_marks_the_first_start_and_every_end(monkeypatch):
    ticks = iter([10.0, 11.5, 14.0, 99.0])
    monkeypatch.setattr(measure, "now", lambda: next(ticks))
    marks: list[float] = []
    clock = measure.step_clock(marks)
    for _ in range(2):
        clock.on_step_begin(None, None, None)  # only the first step's start is read
        clock.on_step_end(None, None, None)
    assert marks == [10.0, 11.5, 14.0]  # steps of 1.5 s and 2.5 s


def run_script(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / name),
            "--shape",
            "tiny",
            "--steps",
            "2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(stdout: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under `title`, by engine."""
    lines = stdout.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    rows = [line.strip("|").split("|") for line in block if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


@pytest.mark.slow
def test_dpo_benchmark_smoke_on_cpu():
    out = run_script("dpo.py")
    rows = table_rows(out, "DPO training")
    assert {"zephyr", "zephyr-ckpt", "trl"} <= set(rows)
    for engine, cells in rows.items():
        assert float(cells[2].replace(",", "")) > 0, engine  # tokens/s
        assert re.fullmatch(r"\d+\.\d\d×", cells[7]), cells  # speed-up vs TRL
        assert float(cells[6]) == pytest.approx(math.log(2), abs=1e-5), engine  # step 0: policy = reference
    assert rows["trl"][7] == "1.00×"
    for worst in re.findall(r"max rel diff (\S+) \(limit 1e-05\)", out):
        assert float(worst) <= 1e-5
    epoch = table_rows(out, "Reference pass + one epoch")
    assert {"zephyr", "trl"} <= set(epoch) and epoch["trl"][3] == "1.00×"


@pytest.mark.slow
def test_sft_benchmark_smoke_on_cpu():
    out = run_script("sft.py")
    rows = table_rows(out, "SFT training")
    assert {"zephyr", "zephyr-ckpt", "trl"} <= set(rows)
    for cells in rows.values():
        assert float(cells[2].replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d\d×", cells[7]), cells
    # the same first bins in both engines: the same step-0 loss, near ln(vocab) for a random model
    assert float(rows["zephyr"][6]) == pytest.approx(float(rows["trl"][6]), abs=1e-4)
    assert float(rows["zephyr"][6]) == pytest.approx(math.log(512), abs=0.1)
    assert re.findall(r"max rel diff (\S+) \(limit 1e-05\)", out)


@pytest.mark.slow
def test_optimizer_benchmark_smoke_on_cpu():
    rows = table_rows(run_script("optimizer.py"), "AdamW step")
    assert set(rows) == {"torch-fused", "zephyr", "zephyr-eager"}
    assert rows["torch-fused"][3] == "1.00×"
    for cells in rows.values():
        assert float(cells[1].replace(",", "")) > 0  # ms/step
        assert re.fullmatch(r"\d+\.\d\d×", cells[3]), cells
