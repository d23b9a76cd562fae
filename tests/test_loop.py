"""The training loop: schedules by hand, step counts after packing, accumulation, divergence, metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rounding import PATHS, tolerance
from zephyr.core.config import SFTConfig
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.stages.sft.run import SFTTask
from zephyr.training.loop import TrainingDiverged, train
from zephyr.training.schedule import Schedule, count_total_steps, epoch_order, lr_at, make_schedule
from zephyr.training.task import StepOutput
from zephyr.training.tracking import read_metrics

TINY_CHAT = Path(__file__).parents[1] / "recipes" / "data" / "tiny_chat.jsonl"

# --- schedules (pure) ------------------------------------------------------------------------------------


def test_cosine_with_warmup_by_hand():
    s = make_schedule("cosine", 1e-3, total_steps=10, warmup_ratio=0.1)
    assert s == Schedule("cosine", 1e-3, 10, 1)  # ceil(10 × 0.1) = 1
    assert lr_at(s, 0) == 0.0  # warmup starts at 0
    assert lr_at(s, 1) == pytest.approx(1e-3)  # peak right after warmup
    # step 5: progress (5 − 1) / 9 = 4/9; 0.5 (1 + cos(80°)) = 0.5 (1 + 0.1736482) = 0.5868241
    assert lr_at(s, 5) == pytest.approx(5.868241e-4, rel=1e-6)
    # step 9 (the last): progress 8/9; 0.5 (1 + cos(160°)) = 0.5 (1 − 0.9396926) = 0.0301537
    assert lr_at(s, 9) == pytest.approx(3.01537e-5, rel=1e-5)


def test_linear_with_warmup_by_hand():
    s = make_schedule("linear", 1.0, total_steps=8, warmup_ratio=0.25)
    assert s.warmup_steps == 2
    expected = [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [lr_at(s, k) for k in range(8)] == pytest.approx(expected)


def test_constant_and_rounding_of_warmup():
    s = make_schedule("constant", 2.0, total_steps=15, warmup_ratio=0.1)
    assert s.warmup_steps == 2  # ceil(1.5)
    assert [lr_at(s, k) for k in range(4)] == [0.0, 1.0, 2.0, 2.0]
    assert make_schedule("cosine", 1.0, 10, 0.0).warmup_steps == 0
    assert lr_at(make_schedule("cosine", 1.0, 10, 0.0), 0) == 1.0


def test_schedules_match_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for kind, make in (
        ("cosine", get_cosine_schedule_with_warmup),
        ("linear", get_linear_schedule_with_warmup),
    ):
        s = make_schedule(kind, 3e-4, total_steps=37, warmup_ratio=0.1)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt, num_warmup_steps=s.warmup_steps, num_training_steps=37)
        for k in range(37):
            assert lr_at(s, k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), (kind, k)
            opt.step()
            sched.step()


def test_total_steps():
    assert count_total_steps(7, 1.0, None) == 7
    assert count_total_steps(7, 2.5, None) == 18  # ceil(17.5)
    assert count_total_steps(7, 1.0, 3) == 3  # max_steps wins
    assert count_total_steps(3, 0.1, None) == 1


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(10, seed=1, epoch=0)
    assert sorted(a) == list(range(10))
    assert a == epoch_order(10, seed=1, epoch=0)
    assert a != epoch_order(10, seed=1, epoch=1)
    assert a != epoch_order(10, seed=2, epoch=0)


# --- runs on a tiny model --------------------------------------------------------------------------------


def sft_config(model_dir: Path, out: Path, **overrides) -> SFTConfig:
    values = dict(
        model=str(model_dir),
        train_data=str(TINY_CHAT),
        output_dir=str(out),
        max_length=96,
        per_device_batch_size=2,
        learning_rate=5e-3,
        warmup_ratio=0.25,
        precision="fp32",
        seed=3,
    )
    values.update(overrides)
    return SFTConfig(**values)


def test_steps_come_from_packed_bins_and_lr_follows_the_schedule(tiny_model_dir, tmp_path):
    cfg = sft_config(
        tiny_model_dir, tmp_path / "run", max_samples=16, gradient_accumulation_steps=2, lr_scheduler="cosine"
    )
    task = SFTTask(cfg)
    bins = len(task.train_examples())
    assert math.ceil(bins / 4) < math.ceil(16 / 4)  # counting conversations would give another step count
    result = train(task, cfg)
    lines = [m for m in read_metrics(result.metrics_path) if "loss" in m]
    steps = math.ceil(bins / 4)  # 2 bins per device × 2 accumulation per optimizer step
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    schedule = make_schedule("cosine", 5e-3, steps, 0.25)
    assert [m["lr"] for m in lines] == pytest.approx([lr_at(schedule, k) for k in range(steps)])
    assert result.steps == steps


def test_metrics_lines_have_the_documented_fields(tiny_model_dir, tmp_path):
    cfg = sft_config(
        tiny_model_dir, tmp_path / "run", max_steps=5, logging_steps=2, eval_fraction=0.2, eval_steps=2
    )
    result = train(SFTTask(cfg), cfg)
    lines = read_metrics(result.metrics_path)
    train_lines = [m for m in lines if "loss" in m]
    eval_lines = [m for m in lines if "eval/loss" in m]
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib"}
    assert all(set(m) == keys for m in train_lines)
    assert [m["step"] for m in train_lines] == [2, 4, 5]  # every 2 steps, and the last
    assert [m["step"] for m in eval_lines] == [2, 4, 5]  # every eval_steps, and at the end
    assert all(set(m) == {"step", "epoch", "eval/loss"} for m in eval_lines)
    for m in train_lines:
        assert m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["peak_mem_gib"] > 0
    assert result.metrics == train_lines[-1] and result.eval_metrics == eval_lines[-1]
    # the loss is ≈ ln(vocab) for a random model: a mean per token, not a sum
    assert abs(train_lines[0]["loss"] - math.log(49152)) < 0.5


def test_accumulation_equals_a_bigger_batch(tiny_model_dir, tmp_path):
    runs = {}
    for name, per_device, accumulation in (("batch", 2, 1), ("accumulated", 1, 2)):
        cfg = sft_config(
            tiny_model_dir,
            tmp_path / name,
            per_device_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
        )
        result = train(SFTTask(cfg), cfg)
        runs[name] = (read_metrics(result.metrics_path), load_file(result.final_dir / "model.safetensors"))
    (lines_a, weights_a), (lines_b, weights_b) = runs["batch"], runs["accumulated"]
    # 3 steps through two paths (tests/rounding.py). Normalising each micro-batch by its own tokens instead
    # moves the grad norm by 6.7e-3 and the weights by 1.0e-2: hundreds of these tolerances.
    rounds = 3 * PATHS  # 3 steps
    losses, norms = [m["loss"] for m in lines_a], [m["grad_norm"] for m in lines_a]
    assert [m["loss"] for m in lines_b] == pytest.approx(losses, abs=tolerance(losses, roundings=rounds))
    assert [m["grad_norm"] for m in lines_b] == pytest.approx(norms, abs=tolerance(norms, roundings=rounds))
    allowed = tolerance(list(weights_a.values()), roundings=rounds)  # the model's largest weight
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, atol=allowed, rtol=0)
    # the runs did move the weights (else equality would prove nothing)
    assert not torch.equal(weights_a["model.norm.weight"], torch.ones_like(weights_a["model.norm.weight"]))


class PoisonedSFT(SFTTask):
    """SFT whose loss turns NaN at one optimizer step (one micro-batch per step, no evaluation)."""

    def __init__(self, cfg: SFTConfig, bad_step: int):
        super().__init__(cfg)
        self.calls = 0
        self.bad_step = bad_step

    def loss(self, model, batch) -> StepOutput:
        self.calls += 1
        out = super().loss(model, batch)
        if self.calls == self.bad_step:
            return StepOutput(loss_sum=out.loss_sum * float("nan"))
        return out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, out, max_steps=6, save_steps=1, save_total_limit=None)
    with pytest.raises(TrainingDiverged, match=r"step 3: loss is nan") as info:
        train(PoisonedSFT(cfg, bad_step=3), cfg)
    assert isinstance(info.value, ZephyrError)  # the CLI prints it and exits 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_save_total_limit_keeps_the_newest(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, out, max_steps=5, save_steps=1, save_total_limit=2)
    result = train(SFTTask(cfg), cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-*"))
    assert (out / "final" / "model.safetensors").is_file()
    # resuming a finished run has nothing to do: it returns the run's result
    again = train(SFTTask(cfg), cfg, resume=True)
    assert (again.final_dir, again.metrics, again.steps) == (result.final_dir, result.metrics, 5)


def test_a_fresh_run_refuses_an_output_dir_with_a_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    cfg = sft_config(tiny_model_dir, out, max_steps=1)
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume"):
        train(SFTTask(cfg), cfg)


def test_bf16_trains_fp32_master_weights_and_saves_bf16_folders(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, out, precision="bf16", max_steps=2, save_steps=1)
    result = train(SFTTask(cfg), cfg)
    assert math.isfinite(result.metrics["loss"])
    checkpoint = out / "checkpoint-1"
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(checkpoint / "model.safetensors").values()} == {torch.bfloat16}
    # the state a resume continues from keeps the fp32 master weights
    master = load_file(checkpoint / "training_state" / "model.safetensors")
    assert {v.dtype for v in master.values()} == {torch.float32}
    assert {v.dtype for v in load_file(result.final_dir / "model.safetensors").values()} == {torch.bfloat16}


def test_global_batch_size_sets_the_accumulation_and_the_run_records_it(tiny_model_dir, tmp_path, capsys):
    import yaml

    cfg = sft_config(
        tiny_model_dir, tmp_path / "run", max_samples=16, per_device_batch_size=1, global_batch_size=3
    )
    task = SFTTask(cfg)
    bins = len(task.train_examples())
    assert bins > 3  # one step per bin (accumulation 1) would give another step count
    result = train(task, cfg)
    steps = math.ceil(bins / 3)  # 1 process × 1 bin per device × 3 accumulation
    assert [m["step"] for m in read_metrics(result.metrics_path) if "loss" in m] == list(range(1, steps + 1))
    plan = "global batch 3 = 1 process × 1 per device × 3 accumulation (packed sequences of ≤ 96 tokens)"
    assert f"{steps} optimizer steps (1 epochs × {steps} steps; {plan})" in capsys.readouterr().out
    text = (tmp_path / "run" / "resolved_config.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# {plan}"
    saved = yaml.safe_load(text)
    assert (
        saved["global_batch_size"],
        saved["per_device_batch_size"],
        saved["gradient_accumulation_steps"],
    ) == (
        3,
        1,
        3,
    )


def test_an_indivisible_global_batch_stops_the_run_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from zephyr.training import loop

    monkeypatch.setattr(loop, "make_accelerator", lambda cfg, precision: SimpleNamespace(num_processes=3))
    monkeypatch.setattr(loop, "prepare_model", lambda *a: pytest.fail("the model loaded"))
    cfg = sft_config(tiny_model_dir, tmp_path / "run", per_device_batch_size=2, global_batch_size=8)
    with pytest.raises(ConfigError) as err:
        train(SFTTask(cfg), cfg)
    assert str(err.value) == (
        "sft.global_batch_size: 8 is not divisible by per_device_batch_size 2 × 3 processes = 6; "
        "process counts that fit: 1, 2, 4 (or change per_device_batch_size)"
    )


def test_the_loop_reads_of_a_task_only_what_its_protocol_declares(tiny_model_dir, tmp_path):
    """A task is a `TrainingTask`: every attribute the loop (and the model loading, the checkpoints) reads of
    it is one the protocol declares, so a task written to the protocol is complete."""
    from zephyr.training.task import TrainingTask

    declared = {name for name in vars(TrainingTask) if not name.startswith("_")}
    read: list[str] = []

    class Recorder:  # every attribute read goes through __getattr__ and is recorded
        def __init__(self, task):
            self._task = task

        def __getattr__(self, name):
            read.append(name)
            return getattr(self._task, name)

    cfg = sft_config(tiny_model_dir, tmp_path / "run", max_steps=2, eval_fraction=0.2, eval_steps=1)
    train(Recorder(SFTTask(cfg)), cfg)
    assert {"attn_implementation", "batch_unit", "summary", "collate", "loss", "tokenizer"} <= set(read)
    assert set(read) <= declared, sorted(set(read) - declared)
