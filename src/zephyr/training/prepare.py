"""What a training run starts from: the precision, the accelerator, the model (checkpointed, compiled, with
LoRA) and its optimizer, prepared by accelerate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from zephyr import io
from zephyr.core.config import TrainingConfig
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.models import load as models
from zephyr.models.generation_config import configure_generation
from zephyr.training.optim import StochasticAdamW
from zephyr.training.task import TrainingTask

if TYPE_CHECKING:
    from accelerate import Accelerator


def resolve_precision(precision: str) -> Literal["fp32", "bf16"]:
    """`auto` is bf16 on a CUDA device that supports it, else fp32."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision  # type: ignore[return-value]


def make_accelerator(cfg: TrainingConfig, precision: str) -> Accelerator:
    """The run's accelerator, accumulating the config's gradient_accumulation_steps (unset: 1) until
    `set_accumulation` gives it the one resolved from the global batch and the process count it joined."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its state as a process-wide singleton that refuses a second, different configuration;
    # one process may train several times (a pipeline: dSFT then dDPO), so each run starts from a fresh one.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # bf16 precision is autocast: over fp32 master weights by default (as DeepSpeed's bf16 mode keeps them),
    # or over bf16 weights that `StochasticAdamW` updates without losing small steps (master_weights: bf16).
    # FSDP is the exception: under mixed precision it upcasts bf16 weights to fp32 masters, so bf16 weights
    # go without it there (they compute in bf16 all the same).
    mixed = precision == "bf16" and not (cfg.master_weights == "bf16" and _fsdp_launch())
    accelerator = Accelerator(mixed_precision="bf16" if mixed else "no")
    _check_joined(accelerator)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and cfg.master_weights == "bf16":
        raise ConfigError(
            "master_weights: bf16 weights are for one GPU, DDP and FSDP; DeepSpeed keeps its own fp32 master "
            "weights (set master_weights: fp32)"
        )
    if plugin is not None:
        # the recipe, not the launch config, decides the micro-batch and the clipping
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm or 0.0
    set_accumulation(accelerator, cfg.gradient_accumulation_steps or 1)
    return accelerator


def set_accumulation(accelerator: Accelerator, steps: int) -> None:
    """The micro-batches per optimizer step, as the recipe resolves them: not the launch's
    (`accelerate launch --gradient_accumulation_steps` or a DeepSpeed config would otherwise win)."""
    accelerator.gradient_accumulation_steps = steps
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["gradient_accumulation_steps"] = steps


def _fsdp_launch() -> bool:
    """Whether `accelerate launch` asked for FSDP (its config's `distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_joined(accelerator: Accelerator) -> None:
    """Refuse processes that a launcher started together but accelerate left apart: each would train alone and
    overwrite the others' checkpoints (e.g. an FSDP or DeepSpeed launch config on a machine without GPUs)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > accelerator.num_processes:
        raise ZephyrError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate joined "
            f"{accelerator.num_processes} ({accelerator.distributed_type.value}): each would train alone and "
            "overwrite the others' output. FSDP and DeepSpeed need GPUs; on CPUs launch DDP with "
            "ACCELERATE_USE_CPU=true"
        )


def apply_lora(model: torch.nn.Module, cfg: TrainingConfig) -> torch.nn.Module:
    lora = cfg.lora
    assert lora is not None
    if lora.load_in_4bit:
        raise ConfigError("lora.load_in_4bit: 4-bit (QLoRA) loading is not supported by the training loop")
    try:
        import peft
    except ImportError:
        raise ConfigError("lora: LoRA needs the peft package: pip install 'zephyr[peft]'") from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_config)


def checkpointed_layers(n_layers: int, ratio: float) -> list[bool]:
    """Which of `n_layers` decoder layers recompute their activations: `ratio` of them, evenly spaced (layer i
    when floor((i + 1)·ratio) > floor(i·ratio)), e.g. every second layer for 0.5, all for 1."""
    return [int((i + 1) * ratio + 1e-9) > int(i * ratio + 1e-9) for i in range(n_layers)]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, in order: the modules transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: torch.nn.Module, ratio: float) -> None:
    """Activation checkpointing of `ratio` of the decoder layers (non-reentrant: works with frozen inputs and
    LoRA)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for layer, on in zip(layers, checkpointed_layers(len(layers), ratio), strict=True):
        layer.gradient_checkpointing = on  # transformers' per-layer switch


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (regional compilation: one layer's graph, compiled once and
    reused by all, instead of the whole model's). Dynamic shapes: every step's packed length differs."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"compile: {type(model).__name__} has no transformers decoder layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)


def weights_dtype(cfg: TrainingConfig) -> torch.dtype:
    """The dtype the policy (and a loaded reference) is held in: fp32 master weights take bf16 compute from
    autocast; bf16 weights go with `StochasticAdamW`."""
    return torch.bfloat16 if cfg.master_weights == "bf16" else torch.float32


def load_trainable_model(task: TrainingTask[Any, Any], cfg: TrainingConfig) -> torch.nn.Module:
    """`cfg.model` ready to train: in the weights' dtype, with the task's attention, the template's end of turn
    as eos, and the configured gradient checkpointing, compiled layers and LoRA adapters; in train mode."""
    model = models.load_model(
        cfg.model,
        dtype=weights_dtype(cfg),
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=task.attn_implementation,
    )
    configure_generation(model, task.tokenizer)  # eos = the template's end of turn, saved with it
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.gradient_checkpointing_ratio)
    if cfg.compile:
        compile_layers(model)
    if cfg.lora is not None:
        model = apply_lora(model, cfg)
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW (with bf16 master weights, its stochastically rounded form); with weight decay, biases and norm
    weights (1-d tensors) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.master_weights == "bf16":
        return StochasticAdamW(
            [g for g in groups if g["params"]],
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            seed=cfg.seed,
        )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
    )


def checkpoint_bytes(model: torch.nn.Module, save_dtype: torch.dtype) -> int:
    """Bytes one checkpoint takes: the model folder in `save_dtype`, accelerate's copy of the weights and
    AdamW's two moments of the trainable parameters, both in the weights' dtype (the preflight's free-space
    floor)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight = next(model.parameters()).element_size()
    return total * (save_dtype.itemsize + weight) + trainable * 2 * weight


def state_too_big(
    total: int, trainable: int, weight_bytes: int, device_bytes: int, device: str
) -> str | None:
    """Why the training state cannot fit one device, or None: the weights, and for the trainable ones their
    gradients and AdamW's two moments, all in the weights' dtype. Activations come on top, so this is a
    floor: a state over it fails for certain, after minutes of loading and reference passes."""
    need = total * weight_bytes + trainable * 3 * weight_bytes
    if need <= device_bytes:
        return None
    masters = {4: "fp32", 2: "bf16"}.get(weight_bytes, f"{weight_bytes}-byte")
    hint = "set master_weights: bf16 (8 bytes a parameter), " if weight_bytes > 2 else ""
    return (
        f"training {total / 1e9:.2f}B parameters with {masters} master weights holds {need / 2**30:.1f} GiB of "
        f"weights, gradients and AdamW moments on each device, more than the {device_bytes / 2**30:.1f} GiB "
        f"of {device}; {hint}train LoRA adapters (lora:), or shard the state over several GPUs (FSDP or "
        "DeepSpeed ZeRO-3, docs/training.md)"
    )


def _check_fits(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Refuse, before any work, a training state that one GPU cannot hold (one process or DDP: each holds
    all of it; FSDP and ZeRO-3 shard it)."""
    if accelerator.device.type != "cuda" or accelerator.distributed_type.value not in ("NO", "MULTI_GPU"):
        return
    params = list(model.parameters())
    problem = state_too_big(
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
        params[0].element_size(),
        torch.cuda.get_device_properties(accelerator.device).total_memory,
        torch.cuda.get_device_name(accelerator.device),
    )
    if problem:
        raise ZephyrError(problem)


def prepare_model(
    accelerator: Accelerator,
    task: TrainingTask[Any, Any],
    cfg: TrainingConfig,
    out_dir: Path,
    save_dtype: torch.dtype,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its optimizer, prepared by accelerate; refuses a disk without room for a checkpoint and
    a GPU without room for the training state."""
    model = load_trainable_model(task, cfg)
    io.check_output_dir(out_dir, min_free_bytes=checkpoint_bytes(model, save_dtype))
    _check_fits(model, accelerator)
    fused = accelerator.device.type == "cuda" and accelerator.distributed_type.value != "FSDP"
    optimizer = make_optimizer(model, cfg, fused=fused)
    loaded = _trained_dtypes(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.master_weights == "bf16" and _trained_dtypes(model) != loaded:
        # (DeepSpeed's bf16 mode casts fp32 weights down by design; it is refused with bf16 master weights)
        raise ZephyrError(
            f"master_weights: bf16, but accelerate's preparation turned the trained weights from "
            f"{_names(loaded)} into {_names(_trained_dtypes(model))}, which would double their memory and train "
            "another recipe; launch without mixed precision, or set master_weights: fp32"
        )
    return model, optimizer


def _trained_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def _names(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
