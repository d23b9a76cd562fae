"""Checkpoints: a Hugging Face model folder plus the training state that resumes a run exactly.

```
output_dir/checkpoint-STEP/
    config.json  generation_config.json  model.safetensors      the model (in the training precision)
    tokenizer.json  tokenizer_config.json  chat_template.jinja  the tokenizer with the template trained on
    resolved_config.yaml                                         the run's config
    trainer_state.json                                           step, epoch, position in the data order
    training_state/                                              accelerate's state: fp32 weights,
                                                                 optimizer, RNG of python/numpy/torch
    zephyr-seal.json                                             every file's size and CRC-32 (the seal)
output_dir/final/                                                the same model folder, no training state
```

Every folder is written into `output_dir/.tmp-NAME`, synced to disk and renamed into place once complete, so
a run killed while saving leaves the previous checkpoint intact and never a half-written one under its final
name. A save that fails for want of space (or permission) removes its temporary folder and stops the run with
a ZephyrError naming the last complete checkpoint, which `--resume` continues from.

A checkpoint is sealed when complete: the sizes and CRC-32s of its files are recorded (`io.seal`). Files
still get damaged afterwards (a disk error, a copy cut short, a file truncated by hand); `--resume` checks
the newest checkpoint against its seal, names the damaged file, and continues from the newest intact one.
Ranks: every process takes part in gathering weights and in `save_state`; only the main process writes
the model folder, renames and deletes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zephyr import io
from zephyr.core.config import save_resolved
from zephyr.core.errors import ZephyrError

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
STATE_DIR = "training_state"
FINAL_DIR = "final"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where a run stands after an optimizer step: enough, with the RNG and optimizer, to continue it."""

    step: int  # optimizer steps done
    epoch: int  # epoch the next step belongs to
    step_in_epoch: int  # steps of that epoch already done (batches to skip on resume)
    steps_per_epoch: int
    total_steps: int
    global_batch: (
        int  # examples per optimizer step over all processes (per device × accumulation × processes)
    )
    num_processes: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"checkpoint-{step}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out_dir`, oldest first (a folder without its state file is not one)."""
    if not out_dir.is_dir():
        return []
    found = []
    for child in out_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _write_model_folder(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    target: Path,
    dtype: torch.dtype,
    merge: bool,
) -> None:
    """The deployable Hugging Face folder. A LoRA model is saved as its adapters, or merged when `merge`."""
    unwrapped = accelerator.unwrap_model(model)
    if merge and _is_peft(unwrapped):
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict() if accelerator.is_main_process else None
    else:
        # a collective under ZeRO-3 / FSDP (the full weights are gathered): every process calls it
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    unwrapped.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    if not _is_peft(unwrapped):
        # save_pretrained records the in-memory dtype (fp32 master weights); record the dtype written
        config = copy.deepcopy(unwrapped.config)
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _replace(tmp: Path, target: Path) -> None:
    io.follow_umask(tmp)
    io.sync_tree(tmp)
    if target.exists():
        shutil.rmtree(target)
    io.rename_into_place(tmp, target)


def _write_or_stop(accelerator: Accelerator, out_dir: Path, tmp: Path, write: Callable[[], None]) -> None:
    """Run `write` (which fills `tmp`); a full disk or an unwritable folder removes `tmp`, to give the space
    back, and stops the run with the last complete checkpoint named."""
    try:
        write()
    except OSError as exc:
        error = io.storage_error(tmp.parent / tmp.name.removeprefix(".tmp-"), exc)
        if error is None:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out_dir)
        if last is None:
            resume = "no checkpoint was saved yet"
        else:
            resume = f"the last complete checkpoint is {last}; free space and rerun with --resume"
        raise ZephyrError(f"{error}; {resume}") from exc


def _fresh_tmp(accelerator: Accelerator, out_dir: Path, name: str) -> Path:
    tmp = out_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return tmp


class _TiedWeightsNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def _without_tied_weights_note() -> Iterator[None]:
    """accelerate notes at every save that it stores tied weights (embeddings and LM head) once; they are
    tied again on loading (the resume tests check it), so the note is noise in a run's output."""
    note = _TiedWeightsNote()
    source = logging.getLogger("accelerate.utils.other")
    source.addFilter(note)
    try:
        yield
    finally:
        source.removeFilter(note)


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Any,
    state: TrainerState,
    out_dir: Path,
    *,
    dtype: torch.dtype,
) -> Path:
    """Write `checkpoint-STEP` atomically: model folder, config, trainer state and accelerate's state."""
    target = checkpoint_dir(out_dir, state.step)
    tmp = _fresh_tmp(accelerator, out_dir, target.name)

    def write() -> None:
        _write_model_folder(accelerator, model, tokenizer, tmp, dtype, merge=False)
        with _without_tied_weights_note():
            accelerator.save_state(str(tmp / STATE_DIR))
        if accelerator.is_main_process:
            save_resolved(cfg, tmp)
            # its presence marks the checkpoint complete
            (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            io.seal(tmp)  # after every process wrote its part
            _replace(tmp, target)

    _write_or_stop(accelerator, out_dir, tmp, write)
    accelerator.wait_for_everyone()
    return target


def save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Any,
    out_dir: Path,
    *,
    dtype: torch.dtype,
) -> Path:
    """Write `final/` atomically: the model folder (LoRA adapters merged) and the resolved config."""
    target = out_dir / FINAL_DIR
    tmp = _fresh_tmp(accelerator, out_dir, target.name)

    def write() -> None:
        _write_model_folder(accelerator, model, tokenizer, tmp, dtype, merge=True)
        if accelerator.is_main_process:
            save_resolved(cfg, tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _replace(tmp, target)

    _write_or_stop(accelerator, out_dir, tmp, write)
    accelerator.wait_for_everyone()
    return target


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, naming its first damaged file; None when every file has the
    size and CRC-32 it was sealed with (or when it has no seal: an older zephyr wrote it)."""
    return io.seal_problem(path) if io.is_sealed(path) else None


def newest_intact_checkpoint(out_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem`; `say` hears of each damaged one skipped and
    of the one chosen instead."""
    skipped: list[str] = []
    for _, path in reversed(list_checkpoints(out_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                say(
                    f"resuming from {path.name}, the newest intact checkpoint, instead of {', '.join(skipped)}"
                )
            return path
        say(f"{path.name} is damaged ({problem}): not resuming from it")
        skipped.append(path.name)
    if skipped:
        say(f"no intact checkpoint in {out_dir}: starting from the beginning")
    return None


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore weights, optimizer and RNG states from `path` into the prepared objects; return the state."""
    accelerator.load_state(str(path / STATE_DIR))
    return TrainerState.from_file(path / STATE_FILE)


def prune_checkpoints(accelerator: Accelerator, out_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (main process); returns the folders deleted."""
    if keep is None or not accelerator.is_main_process:
        return []
    doomed = [path for _, path in list_checkpoints(out_dir)[:-keep]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
