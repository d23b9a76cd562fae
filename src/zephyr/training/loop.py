"""The training loop: written once, driven by a `TrainingTask` (SFT, DPO).

The loop owns devices and distribution (all through accelerate: one process, DDP, FSDP2, DeepSpeed ZeRO-3),
the model and optimizer, the learning-rate schedule, gradient accumulation, clipping, evaluation, logging
and checkpoints. The task owns data, collation and the loss.

Loss normalisation. A task returns, per micro-batch, the SUM of its per-unit losses (units: target tokens
for SFT, pairs for DPO). Before any backward of an optimizer step the loop sums `task.units` over every
micro-batch of the step and over all processes (U), then back-propagates `loss_sum / U × P` on each micro-batch,
P the number of processes: DDP (and FSDP, ZeRO) average gradients over processes, so the factor P turns that
average back into the sum, and the step's gradient is exactly that of the mean loss per unit over the global
batch — the same whatever the split into processes and accumulation steps.

Data order. Each epoch visits the training examples in a permutation fixed by (seed, epoch); the data loader
yields one optimizer step at a time (a list of micro-batches), so a resumed run skips exactly the steps
already done and meets the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zephyr import io
from zephyr.core.config import BatchPlan, TrainingConfig, resolve_batch, save_resolved, to_dict
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.training.checkpoint import (
    FINAL_DIR,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_final,
)
from zephyr.training.prepare import make_accelerator, prepare_model, resolve_precision, set_accumulation
from zephyr.training.schedule import Schedule, count_total_steps, epoch_order, lr_at, make_schedule
from zephyr.training.task import Batch, StepOutput, TrainingTask
from zephyr.training.tracking import METRICS_FILE, Trackers, open_trackers, read_metrics

if TYPE_CHECKING:
    from accelerate import Accelerator

Task = TrainingTask[Any, Any]


class TrainingDiverged(ZephyrError):
    """The loss or the gradient norm stopped being a finite number."""


# ---------------------------------------------------------------------------------------------------------
# Results and metrics


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path  # output_dir/final: the trained model as a Hugging Face folder
    metrics_path: Path  # output_dir/metrics.jsonl
    metrics: dict[str, Any]  # the last training line written to metrics.jsonl
    eval_metrics: dict[str, Any]  # the last evaluation line ({} without evaluation data)
    steps: int  # optimizer steps done


@dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and all processes."""

    loss_sum: float
    units: float
    tokens: float
    metric_sums: dict[str, float]
    grad_norm: float


@dataclass
class _Window:
    """Steps since the last log line: losses weighted by units, grad norm averaged, tokens per second."""

    loss_sum: float = 0.0
    units: float = 0.0
    tokens: float = 0.0
    grad_norm_sum: float = 0.0
    steps: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss_sum
        self.units += stats.units
        self.tokens += stats.tokens
        self.grad_norm_sum += stats.grad_norm
        self.steps += 1
        for key, value in stats.metric_sums.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def line(self, step: int, epoch: float, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        line = {
            "step": step,
            "epoch": round(epoch, 6),
            "loss": self.loss_sum / self.units,
            "lr": lr,
            "grad_norm": self.grad_norm_sum / self.steps,
            "tokens_per_s": self.tokens / elapsed,
            "peak_mem_gib": peak_memory_gib(),
        }
        line.update({key: value / self.units for key, value in sorted(self.metric_sums.items())})
        return line


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process (CUDA), else its peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class _Ordered(torch.utils.data.Dataset):
    """The examples in one epoch's order."""

    def __init__(self, examples: Sequence[Any], order: list[int]):
        self.examples = examples
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Any:
        return self.examples[self.order[i]]


class _StepCollator:
    """One optimizer step's examples (of this process) into its micro-batches."""

    def __init__(self, collate: Callable[[list[Any]], Batch], micro_batch_size: int):
        self.collate = collate
        self.micro_batch_size = micro_batch_size

    def __call__(self, examples: list[Any]) -> list[Batch]:
        size = self.micro_batch_size
        return [self.collate(examples[i : i + size]) for i in range(0, len(examples), size)]


def _epoch_loader(
    accelerator: Accelerator, task: Task, examples: Sequence[Any], cfg: TrainingConfig, epoch: int
):
    loader = torch.utils.data.DataLoader(
        _Ordered(examples, epoch_order(len(examples), cfg.seed, epoch)),
        batch_size=cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
        shuffle=False,
        collate_fn=_StepCollator(task.collate, cfg.per_device_batch_size),
        # a loader's own generator: iterating it must not draw from the global RNG, or a resumed run
        # (which starts iterating mid-epoch) would see different dropout than an uninterrupted one
        generator=torch.Generator(),
    )
    return accelerator.prepare_data_loader(loader)


# ---------------------------------------------------------------------------------------------------------
# Steps


def _reduce_sum(accelerator: Accelerator, values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _micro_step(
    accelerator: Accelerator, model: Any, task: Task, batch: Batch, scale: float, sync: bool
) -> StepOutput:
    """Forward and backward of one micro-batch; gradients sync across processes only on the step's last."""
    accelerator.sync_gradients = sync  # DeepSpeed steps its engine on the micro-batch that syncs
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        with accelerator.autocast():
            out: StepOutput = task.loss(model, batch)
        # accelerate divides by gradient_accumulation_steps (DeepSpeed likewise): multiply it back in
        accelerator.backward(out.loss_sum * (scale * accelerator.gradient_accumulation_steps))
    return out


def train_step(
    accelerator: Accelerator,
    model: Any,
    optimizer: Any,
    task: Task,
    micro_batches: list[Batch],
    *,
    step: int,
    max_grad_norm: float | None,
) -> StepStats:
    """One optimizer step over this process's micro-batches, normalised by the step's global unit count."""
    local_units = float(sum(task.units(batch) for batch in micro_batches))
    (units,) = _reduce_sum(accelerator, [local_units])
    if units <= 0:
        raise TrainingDiverged(f"step {step + 1}: the batch holds no loss units (nothing to train on)")
    scale = accelerator.num_processes / units
    # sums stay on the device until the step's one reduction: no host sync between micro-batches
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = 0
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        out = _micro_step(accelerator, model, task, batch, scale, sync=i == len(micro_batches) - 1)
        loss_sum += out.loss_sum.detach().double()
        tokens += task.tokens(batch)
        for key, value in out.metric_sums.items():
            metric_sums[key] = metric_sums.get(key, 0) + value.detach().double()
    names = sorted(metric_sums)
    local = torch.stack([loss_sum, loss_sum.new_tensor(float(tokens)), *(metric_sums[k] for k in names)])
    reduced = accelerator.reduce(local, reduction="sum").tolist()
    if not math.isfinite(reduced[0]):
        raise TrainingDiverged(f"step {step + 1}: loss is {reduced[0]}; stopped, nothing of this step saved")
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = float(norm) if norm is not None else float("nan")
    if norm is not None and not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"step {step + 1}: gradient norm is {grad_norm}; stopped, nothing of this step saved"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(reduced[0], units, reduced[1], dict(zip(names, reduced[2:], strict=True)), grad_norm)


def evaluate(
    accelerator: Accelerator, model: Any, task: Task, examples: Sequence[Any], batch_size: int
) -> dict:
    """Mean loss and metrics per unit over `examples`, each example counted once across processes.

    Batches are dealt to processes round-robin; a process with fewer batches runs a weightless copy of
    one so that every process takes part in every forward (ZeRO-3 and FSDP gather weights collectively).
    """
    from accelerate.utils import send_to_device

    starts = range(0, len(examples), batch_size)
    batches = [[examples[j] for j in range(s, min(s + batch_size, len(examples)))] for s in starts]
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    rounds = math.ceil(len(batches) / accelerator.num_processes)
    sums: dict[str, float] = {}
    loss_sum = units = 0.0
    model.eval()
    with torch.no_grad():
        for k in range(rounds):
            real = k < len(mine)
            batch = send_to_device(task.collate(mine[k] if real else batches[0]), accelerator.device)
            with accelerator.autocast():
                out = task.loss(model, batch)
            if real:
                loss_sum += float(out.loss_sum)
                units += task.units(batch)
                for key, value in out.metric_sums.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
    model.train()
    names = sorted(sums)
    reduced = _reduce_sum(accelerator, [loss_sum, units, *(sums[k] for k in names)])
    total_units = max(reduced[1], 1e-12)
    metrics = {"eval/loss": reduced[0] / total_units}
    metrics.update({f"eval/{k}": v / total_units for k, v in zip(names, reduced[2:], strict=True)})
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The run


def _resume_point(accelerator: Accelerator, out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: the newest intact one (checked against its seal by the main process,
    which tells the others); refuses to start a fresh run over an earlier one."""
    if resume:
        if not list_checkpoints(out_dir):
            print(f"no checkpoint in {out_dir}: starting from the beginning", file=sys.stderr)
            return None
        chosen: list[Path | None] = [None]
        if accelerator.is_main_process:
            chosen[0] = newest_intact_checkpoint(
                out_dir, lambda text: print(text, file=sys.stderr, flush=True)
            )
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen, from_process=0)
        return chosen[0]
    found = list_checkpoints(out_dir)
    if found or (out_dir / FINAL_DIR).exists():
        what = found[-1][1].name if found else FINAL_DIR
        raise ConfigError(
            f"output_dir: {out_dir} already holds a run ({what}); pass --resume to continue it "
            "or choose another output_dir"
        )
    return None


def _finished_run(out_dir: Path) -> TrainResult | None:
    """The result of a run that already wrote `final/` (resuming it has nothing left to do)."""
    final = out_dir / FINAL_DIR
    if not (final / "config.json").is_file():
        return None
    metrics_path = out_dir / METRICS_FILE
    lines = read_metrics(metrics_path) if metrics_path.is_file() else []
    train_lines = [line for line in lines if "loss" in line]
    eval_lines = [line for line in lines if "eval/loss" in line]
    metrics = train_lines[-1] if train_lines else {}
    return TrainResult(
        out_dir, final, metrics_path, metrics, eval_lines[-1] if eval_lines else {}, metrics.get("step", 0)
    )


def _check_same_plan(saved: TrainerState, fresh: TrainerState, ckpt: Path) -> None:
    for name in ("steps_per_epoch", "total_steps", "global_batch"):
        if getattr(saved, name) != getattr(fresh, name):
            raise ConfigError(
                f"{ckpt}: cannot resume: {name} was {getattr(saved, name)}, the config now gives "
                f"{getattr(fresh, name)} (resume with the data, batch sizes and processes of the run)"
            )


def _batch_text(task: Task, cfg: TrainingConfig, processes: int) -> str:
    """What an optimizer step of a config resolved by `resolve_batch` holds, and what one example of it is:
    `global batch 512 = 16 processes × 8 per device × 4 accumulation (packed sequences of ≤ 2048 tokens)`."""
    plan = BatchPlan(processes, cfg.per_device_batch_size, cfg.gradient_accumulation_steps or 1)
    return f"{plan}" + (f" ({task.batch_unit})" if task.batch_unit else "")


def _plan_line(
    task: Task, state: TrainerState, schedule: Schedule, cfg: TrainingConfig, precision: str
) -> str:
    head = f"{task.name}: {task.summary()}; "
    epochs = state.total_steps / state.steps_per_epoch
    return (
        f"{head}{state.total_steps} optimizer steps ({epochs:.3g} epochs × {state.steps_per_epoch} steps; "
        f"{_batch_text(task, cfg, state.num_processes)}), "
        f"{schedule.kind} schedule, warmup {schedule.warmup_steps} steps, precision {precision}"
    )


def _remaining_steps(
    accelerator: Accelerator, task: Task, examples: Sequence[Any], cfg: TrainingConfig, state: TrainerState
) -> Iterator[list[Batch]]:
    """The micro-batches of every optimizer step left, epoch after epoch, from the state's position on.

    The caller advances `state` after each step; a resumed run skips the steps of its epoch already done.
    """
    while state.step < state.total_steps:
        epoch = state.epoch
        loader = _epoch_loader(accelerator, task, examples, cfg, epoch)
        if state.step_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.step_in_epoch)
        for micro_batches in loader:
            yield micro_batches
            if state.step >= state.total_steps:
                return
        if state.epoch == epoch:
            raise RuntimeError(
                f"epoch {epoch} ended after {state.step_in_epoch} of {state.steps_per_epoch} steps"
            )


def _diverged(exc: TrainingDiverged, out_dir: Path) -> TrainingDiverged:
    last = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    return TrainingDiverged(f"{exc}; {kept}")


def _advance(state: TrainerState) -> None:
    state.step += 1
    state.step_in_epoch += 1
    if state.step_in_epoch == state.steps_per_epoch:
        state.epoch += 1
        state.step_in_epoch = 0


@dataclass
class _Run:
    """What the steps of one run share: built by `_set_up`, its state replaced by `_resume`, its trackers
    opened by `_open_log` and its state advanced by `_train_epochs`."""

    task: Task
    cfg: TrainingConfig
    out_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_examples: Sequence[Any]
    eval_examples: Sequence[Any]
    state: TrainerState
    schedule: Schedule
    precision: str
    save_dtype: torch.dtype
    trackers: Trackers | None = None  # the main process's only

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, line: dict[str, Any]) -> None:
        if self.trackers is not None:
            self.trackers.log(line, line["step"])

    def run_eval(self) -> dict[str, Any]:
        state = self.state
        line = {"step": state.step, "epoch": round(state.step / state.steps_per_epoch, 6)}
        line.update(
            evaluate(
                self.accelerator, self.model, self.task, self.eval_examples, self.cfg.per_device_batch_size
            )
        )
        self.log(line)
        return line

    def checkpoint(self) -> None:
        save_checkpoint(
            self.accelerator,
            self.model,
            self.task.tokenizer,
            self.cfg,
            self.state,
            self.out_dir,
            dtype=self.save_dtype,
        )
        prune_checkpoints(self.accelerator, self.out_dir, self.cfg.save_total_limit)

    def save_final_dir(self) -> Path:
        return save_final(
            self.accelerator, self.model, self.task.tokenizer, self.cfg, self.out_dir, dtype=self.save_dtype
        )


def _fresh_state(
    accelerator: Accelerator, task: Task, examples: Sequence[Any], cfg: TrainingConfig
) -> TrainerState:
    """Step 0 of the plan: steps per epoch (as the data loader batches them), total steps, global batch."""
    steps_per_epoch = len(_epoch_loader(accelerator, task, examples, cfg, 0))
    total_steps = count_total_steps(steps_per_epoch, cfg.num_epochs, cfg.max_steps)
    global_batch = (
        cfg.per_device_batch_size * (cfg.gradient_accumulation_steps or 1) * accelerator.num_processes
    )
    return TrainerState(0, 0, 0, steps_per_epoch, total_steps, global_batch, accelerator.num_processes)


def _set_up(task: Task, cfg: TrainingConfig, out_dir: Path, resume: bool) -> tuple[_Run, Path | None]:
    """Devices, model, optimizer, data and the plan of a run at step 0; and the checkpoint to resume from."""
    from accelerate.utils import set_seed

    io.check_output_dir(out_dir)  # before the model loads: an unwritable folder fails in a second
    precision = resolve_precision(cfg.precision)
    save_dtype = torch.bfloat16 if "bf16" in (precision, cfg.master_weights) else torch.float32
    accelerator = make_accelerator(cfg, precision)
    # the global batch divided over the processes joined: an indivisible one fails here, before any work
    cfg = resolve_batch(cfg, accelerator.num_processes, task.name)
    set_accumulation(accelerator, cfg.gradient_accumulation_steps)
    ckpt = _resume_point(accelerator, out_dir, resume)
    set_seed(cfg.seed)
    model, optimizer = prepare_model(accelerator, task, cfg, out_dir, save_dtype)
    train_examples = task.train_examples()
    eval_examples = task.eval_examples()
    if len(train_examples) == 0:
        raise ConfigError("train_data: no training examples left")
    state = _fresh_state(accelerator, task, train_examples, cfg)
    schedule = make_schedule(cfg.lr_scheduler, cfg.learning_rate, state.total_steps, cfg.warmup_ratio)
    task.prepare(model, accelerator)
    run = _Run(
        task=task,
        cfg=cfg,
        out_dir=out_dir,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        train_examples=train_examples,
        eval_examples=eval_examples,
        state=state,
        schedule=schedule,
        precision=precision,
        save_dtype=save_dtype,
    )
    return run, ckpt


def _resume(run: _Run, ckpt: Path) -> None:
    """Continue from `ckpt`: its weights, optimizer, RNG and position, when its plan is the run's."""
    saved = load_checkpoint(run.accelerator, ckpt)  # weights, optimizer, RNG: after any RNG use in set-up
    _check_same_plan(saved, run.state, ckpt)
    run.state = saved
    if run.main:
        print(
            f"resuming from {ckpt} (step {saved.step} of {saved.total_steps}, epoch {saved.epoch})",
            flush=True,
        )


def _open_log(run: _Run, resumed: bool) -> None:
    """The main process saves the resolved config, prints the plan, opens `metrics.jsonl` and the trackers."""
    if not run.main:
        return
    save_resolved(run.cfg, run.out_dir, comment=_batch_text(run.task, run.cfg, run.state.num_processes))
    print(_plan_line(run.task, run.state, run.schedule, run.cfg, run.precision), flush=True)
    if resumed:
        io.read_jsonl_resumable(run.out_dir / METRICS_FILE)  # repairs a line cut short by the crash
    run.trackers = open_trackers(
        run.out_dir,
        list(run.cfg.trackers),
        to_dict(run.cfg),
        run_name=f"{run.task.name}-{run.out_dir.name}",
        resume_step=run.state.step if resumed else None,
    )


def _train_epochs(run: _Run, progress: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every optimizer step left, logging, evaluating and saving checkpoints on the config's schedule, then
    an evaluation of the last step when none was made there. Returns the last train and eval metrics."""
    cfg, state = run.cfg, run.state
    metrics: dict[str, Any] = {}
    eval_metrics: dict[str, Any] = {}
    window = _Window()
    last_eval_step = -1
    for micro_batches in _remaining_steps(run.accelerator, run.task, run.train_examples, cfg, state):
        lr = lr_at(run.schedule, state.step)
        _set_lr(run.optimizer, lr)
        stats = train_step(
            run.accelerator,
            run.model,
            run.optimizer,
            run.task,
            micro_batches,
            step=state.step,
            max_grad_norm=cfg.max_grad_norm,
        )
        _advance(state)
        window.add(stats)
        progress.update(1)
        done = state.step >= state.total_steps
        if state.step % cfg.logging_steps == 0 or done:
            metrics = window.line(state.step, state.step / state.steps_per_epoch, lr)
            run.log(metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            window = _Window()
        if run.eval_examples and cfg.eval_steps and state.step % cfg.eval_steps == 0:
            eval_metrics, last_eval_step = run.run_eval(), state.step
            window.started = time.perf_counter()  # tokens/s measures training only
        if cfg.save_steps and state.step % cfg.save_steps == 0 and not done:
            run.checkpoint()
            window.started = time.perf_counter()
    if run.eval_examples and last_eval_step != state.step:
        eval_metrics = run.run_eval()
    return metrics, eval_metrics


def train(task: Task, cfg: TrainingConfig, *, resume: bool = False) -> TrainResult:
    """Train `cfg.model` on `task`; write checkpoints, `metrics.jsonl` and `final/` under `cfg.output_dir`."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    if resume and (finished := _finished_run(out_dir)) is not None:
        print(f"{out_dir} holds a finished run ({finished.final_dir}): nothing to resume", flush=True)
        return finished
    run, ckpt = _set_up(task, cfg, out_dir, resume)
    if ckpt is not None:
        _resume(run, ckpt)
    _open_log(run, resumed=ckpt is not None)
    state = run.state
    progress = tqdm(
        total=state.total_steps, initial=state.step, disable=not run.main, desc=task.name, unit="step"
    )
    try:
        metrics, eval_metrics = _train_epochs(run, progress)
        final_dir = run.save_final_dir()
    except TrainingDiverged as exc:
        raise _diverged(exc, out_dir) from None
    finally:
        progress.close()
        if run.trackers is not None:
            run.trackers.close()
    run.accelerator.wait_for_everyone()
    if run.main:
        print(f"{task.name}: {state.step} steps; final model in {final_dir}", flush=True)
    return TrainResult(out_dir, final_dir, out_dir / METRICS_FILE, metrics, eval_metrics, state.step)
