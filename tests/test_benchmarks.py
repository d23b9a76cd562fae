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
from types import SimpleNamespace

import pytest

from rounding import preference_tolerance, tolerance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import measure  # noqa: E402
import plan  # noqa: E402
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
    flags += ["--timeout", "100", "--budget", "200", "--table-out", "out.md"]
    for module in (dpo, sft):
        args = module.parse_args(flags)
        assert (args.shape, args.warmup, args.steps) == ("mistral-7b", 2, 6)
        assert (args.timeout, args.budget, args.table_out, args.isolate) == (100.0, 200.0, "out.md", "auto")
        assert set(plan.plan_for(79.2).dpo_engines.split(",")) <= set(module.ENGINES) | {"trl"}
        assert measure.trl_checkpointing(args)  # auto: on at 7B
        assert not measure.trl_checkpointing(module.parse_args(["--shape", "1b"]))
        assert module.parse_args([]).engines == "zephyr,zephyr-ckpt,trl"
    assert (dpo.parse_args([]).pairs_per_step, dpo.parse_args([]).ref_batch_size) == (8, 32)
    assert sft.parse_args([]).bins_per_step == 4


def test_the_plan_fits_the_card():
    h200, h100, small = plan.plan_for(139.8), plan.plan_for(79.2), plan.plan_for(44.4)
    assert (h200.shape, h200.dpo_engines, h200.sft_engines) == (
        "mistral-7b",
        "zephyr,zephyr-ckpt,trl",
        "zephyr,zephyr-ckpt,trl",
    )
    # 80 GB: the checkpointed 7B engines (~58 GiB) and three layers in four checkpointed (~68 GiB)
    assert (h100.shape, h100.dpo_engines) == ("mistral-7b", "zephyr-ckpt75,zephyr-ckpt,trl")
    assert (small.shape, small.dpo_engines) == ("1b", "zephyr,zephyr-ckpt,trl")
    assert measure.ENGINES["zephyr-ckpt75"].checkpointing == 0.75
    lines = plan.shell_lines("NVIDIA H100 80GB HBM3", 79.18, h100).splitlines()
    assert lines[:3] == ["CARD='NVIDIA H100 80GB HBM3'", "CARD_GIB=79.2", "SHAPE=mistral-7b"]


def test_a_dense_fallback_on_cuda_is_a_failed_row():
    varlen = ("varlen", "bfloat16")
    dense = ("dense", "float32 without half-precision autocast")
    assert measure.attention_problem([varlen], cuda=True) is None
    assert measure.attention_problem([dense], cuda=False) is None  # the CPU has no varlen kernel
    problem = measure.attention_problem([varlen, dense], cuda=True)
    assert problem == "attention fell back: dense (float32 without half-precision autocast)"

    def fell_back():
        raise measure.BenchmarkError(problem)

    row = measure.run_guarded(fell_back, "zephyr")
    assert row.error == f"failed: {problem}"


def _fake_result(engine: str) -> measure.Result:
    return measure.Result(engine, "fake", 10**9, [1.0, 2.0], [100, 400], units_per_step=4, warmup=1)


def test_each_engines_row_is_written_as_it_finishes(tmp_path):
    table_out = tmp_path / "dpo.md"
    seen = []

    def run_zephyr(args, engine):
        seen.append(table_out.read_text(encoding="utf-8") if table_out.exists() else "")
        return _fake_result(engine)

    table = measure.Table("DPO training", "pairs", lambda args, n: "fake workload")
    argv = ["--engines", "zephyr,zephyr-ckpt,trl", "--isolate", "off", "--table-out", str(table_out)]
    run_trl = lambda args: run_zephyr(args, "trl")  # noqa: E731
    measure.main(argv, "dpo.py", _parse, ("zephyr", "zephyr-ckpt", "trl"), run_zephyr, run_trl, table)
    assert seen[0] == ""
    assert set(table_rows(seen[1], "DPO training")) == {"zephyr"}
    assert "(1 of 3 engines done; still to run: zephyr-ckpt, trl)" in seen[1]
    final = table_out.read_text(encoding="utf-8")
    assert set(table_rows(final, "DPO training")) == {"zephyr", "zephyr-ckpt", "trl"}
    assert "engines done" not in final


def _parse(argv):
    p = measure.parser("test")
    measure.add_run_arguments(p, ("zephyr", "zephyr-ckpt", "trl"))
    return p.parse_args(argv)


def test_isolated_engines_share_the_budget(monkeypatch, tmp_path):
    # engines that take 70 s, 25 s and (never run) under a budget of 100 s and 60 s each at most
    clock = iter([0.0, 0.0, 70.0, 95.0, 95.0])
    monkeypatch.setattr(measure, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    limits = []

    def run_isolated(script, engine, argv, timeout):
        limits.append((engine, timeout))
        return _fake_result(engine)

    monkeypatch.setattr(measure, "run_isolated", run_isolated)
    table = measure.Table("SFT training", "bins", lambda args, n: "fake workload")
    argv = ["--engines", "zephyr,zephyr-ckpt,trl", "--isolate", "on", "--timeout", "60", "--budget", "100"]
    argv += ["--table-out", str(tmp_path / "sft.md")]
    measure.main(argv, "sft.py", _parse, ("zephyr", "zephyr-ckpt", "trl"), None, None, table)
    assert limits == [("zephyr", 60.0), ("zephyr-ckpt", 30.0)]  # 100 − 70 s left
    rows = table_rows((tmp_path / "sft.md").read_text(encoding="utf-8"), "SFT training")
    assert rows["trl"][2] == "not run: time budget spent"  # 5 s left: less than an engine needs


def test_a_compiled_step_that_fell_back_shows_in_the_row(monkeypatch):
    import sft
    import zephyr.training.optim as optim

    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(optim.torch, "compile", broken)
    monkeypatch.setattr(optim, "compiles_by_default", lambda device: True)  # as on CUDA
    result = sft.run_zephyr(sft.parse_args(["--steps", "1", "--warmup", "0"]), "zephyr")
    assert result.config.endswith(", optimizer step eager (compiling failed: RuntimeError: no compiler here)")
    assert not result.error and result.step_seconds


def test_the_optimizer_benchmark_frees_an_engines_tensors_before_the_next(monkeypatch):
    """At 7B an engine's tensors are 58 GB, as much as the next one allocates: freed on return even when
    the optimizer sits in a reference cycle (as hooks and schedulers make), which only a collection frees."""
    import gc
    import weakref

    import optimizer as bench

    refs = []
    real = bench.make_optimizer

    def in_a_cycle(engine, params):
        refs.extend(weakref.ref(p) for p in params)
        made = real(engine, params)
        made.itself = made
        return made

    monkeypatch.setattr(bench, "make_optimizer", in_a_cycle)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--warmup", "0"])
    gc.disable()
    try:
        seconds, note = bench.time_engine("torch-fused", bench.parameter_shapes("tiny"), args)
        alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    assert (len(refs), alive, len(seconds), note) == (21, 0, 1, "")


@pytest.mark.slow
def test_gpu_sh_stops_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith(
        "no CUDA device: stopping before the GPU steps (DRY_RUN=1 runs them on the CPU at the tiny shape)"
    )
    assert "Traceback" not in proc.stdout
    versions = (tmp_path / "versions.txt").read_text(encoding="utf-8")
    assert versions.startswith("no CUDA; torch ") and "torch.nn.attention.varlen: " in versions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["versions.txt"]


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
    # step 0, policy = reference: ln 2 up to the rounding of four answer sums of at most 40 tokens of a random
    # model (|log p| ≈ ln 512 each) at β = 0.1 (benchmarks/dpo.py), printed to 5 decimals
    answer = shapes.PAIRS["tiny"].answer_max * math.log(shapes.SHAPES["tiny"][0])
    step_zero = preference_tolerance(0.1, answer, answer, answer, answer) + 5e-6
    for engine, cells in rows.items():
        assert float(cells[2].replace(",", "")) > 0, engine  # tokens/s
        assert re.fullmatch(r"\d+\.\d\d×", cells[7]), cells  # speed-up vs TRL
        assert float(cells[6]) == pytest.approx(math.log(2), abs=step_zero), engine
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
    step_zero = tolerance(math.log(512)) + 1e-5  # two paths, and each printed to 5 decimals
    assert float(rows["zephyr"][6]) == pytest.approx(float(rows["trl"][6]), abs=step_zero)
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
