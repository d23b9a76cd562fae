"""Training options that trade memory for speed: bf16 master weights (StochasticAdamW), checkpointing a share
of the decoder layers, and compiled decoder layers. Each must train the same model as the plain loop."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from rounding import PATHS, tolerance
from test_loop import sft_config as loop_sft_config
from zephyr.core.config import SFTConfig, load_recipe
from zephyr.core.errors import ConfigError
from zephyr.stages.sft.run import SFTTask
from zephyr.training.loop import train
from zephyr.training.prepare import checkpointed_layers, decoder_layers, enable_checkpointing
from zephyr.training.tracking import read_metrics

PAIRS = Path(__file__).parents[1] / "recipes" / "data" / "tiny_pairs.jsonl"


def sft_config(model_dir: Path, out: Path, **overrides) -> SFTConfig:
    """test_loop's tiny SFT run, 12 conversations, no warmup, precision auto (fp32 on the CPU)."""
    defaults = {"max_samples": 12, "warmup_ratio": 0.0, "precision": "auto"}
    return loop_sft_config(model_dir, out, **{**defaults, **overrides})


def train_losses(cfg: SFTConfig) -> list[float]:
    result = train(SFTTask(cfg), cfg)
    return [m["loss"] for m in read_metrics(result.metrics_path) if "loss" in m]


# --- selective checkpointing -----------------------------------------------------------------------------


def test_checkpointed_layers_by_hand():
    assert checkpointed_layers(4, 1.0) == [True] * 4
    assert checkpointed_layers(6, 0.5) == [False, True] * 3
    assert checkpointed_layers(8, 0.25) == [False, False, False, True] * 2
    assert checkpointed_layers(3, 1 / 3) == [False, False, True]
    assert checkpointed_layers(5, 0.4) == [False, False, True, False, True]  # floor(i·0.4): 0,0,0,1,1,2
    assert sum(checkpointed_layers(32, 0.75)) == 24


def _saved_elements(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Elements the forward keeps for backward: a checkpointed layer keeps only its input."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return saved[0]


def test_a_share_of_layers_recomputes_and_the_gradients_are_unchanged():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    saved, grads = {}, {}
    for ratio in (None, 0.5, 1.0):
        model = make_tiny_llama(64, num_hidden_layers=4).train()
        if ratio is not None:
            enable_checkpointing(model, ratio)
        saved[ratio] = _saved_elements(model, ids)
        grads[ratio] = [p.grad.clone() for p in model.parameters()]
        flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
        assert flags == {None: [False] * 4, 0.5: [False, True] * 2, 1.0: [True] * 4}[ratio]
    # identical layers: checkpointing half of them keeps exactly halfway between none and all
    assert saved[1.0] < saved[0.5] < saved[None]
    assert saved[0.5] * 2 == saved[None] + saved[1.0]
    for ratio in (0.5, 1.0):  # a recomputed layer runs the same ops on the same shapes: bit-identical
        for a, b in zip(grads[None], grads[ratio], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpointing_ratio_trains_the_same_model(tiny_model_dir, tmp_path):
    plain = train_losses(sft_config(tiny_model_dir, tmp_path / "plain", max_steps=3))
    half = train_losses(
        sft_config(
            tiny_model_dir,
            tmp_path / "half",
            max_steps=3,
            gradient_checkpointing=True,
            gradient_checkpointing_ratio=0.5,
        )
    )
    assert half == plain  # the same gradients (above), so the same steps: bit-identical in one process


# --- bf16 master weights ---------------------------------------------------------------------------------


def test_bf16_master_weights_contradict_fp32_precision(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft:\n  precision: fp32\n  master_weights: bf16\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sft\.master_weights: bf16 weights contradict precision fp32"):
        load_recipe(recipe)


def test_bf16_master_weights_train_save_bf16_and_resume_exactly(tiny_model_dir, tmp_path):
    cfg = sft_config(tiny_model_dir, tmp_path / "whole", max_steps=4, save_steps=2, master_weights="bf16")
    losses = train_losses(cfg)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    final = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    moved = [k for k in final if not torch.equal(final[k], start[k].to(torch.bfloat16))]
    assert len(moved) == len(final)  # every tensor took its updates
    umask = os.umask(0)
    os.umask(umask)
    written = [tmp_path / "whole" / "final" / "model.safetensors"]
    written += sorted((tmp_path / "whole" / "checkpoint-2").rglob("*.safetensors"))
    assert len(written) >= 3 and {p.stat().st_mode & 0o777 for p in written} == {0o666 & ~umask}

    # a run that stopped at its step-2 checkpoint, resumed: the same rounding, the same weights
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed_cfg = sft_config(
        tiny_model_dir, tmp_path / "resumed", max_steps=4, save_steps=2, master_weights="bf16"
    )
    train(SFTTask(resumed_cfg), resumed_cfg, resume=True)
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for key, value in final.items():
        assert torch.equal(again[key], value), key


def test_bf16_master_weights_dpo_starts_at_ln2(tiny_model_dir, tmp_path):
    from zephyr.core.config import DPOConfig
    from zephyr.stages.dpo.run import DPOTask

    cfg = DPOConfig(
        model=str(tiny_model_dir),
        train_data=str(PAIRS),
        max_samples=6,
        per_device_batch_size=3,
        max_steps=1,
        output_dir=str(tmp_path / "dpo"),
        master_weights="bf16",
    )
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    result = train(task, cfg)
    first = next(m for m in read_metrics(result.metrics_path) if "loss" in m)
    # policy and reference are the same bf16 weights: log-ratios 0 up to bf16 reductions in other batch shapes
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    plain = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace())
    assert task._load_reference(plain).dtype == torch.bfloat16


def test_a_loaded_reference_has_whole_weights_under_zero3_sharded_loading(
    tiny_model_dir, tmp_path, monkeypatch
):
    """With `zero3_init_flag: true` a model loaded in the process comes out partitioned; the reference, which
    no DeepSpeed engine wraps, is loaded with that switched off, for its loading only."""
    import contextlib

    import zephyr.models.load
    from zephyr.core.config import DPOConfig
    from zephyr.stages.dpo.run import DPOTask

    class Plugin:  # accelerate's DeepSpeedPlugin, as far as the loading uses it
        zero3_init_flag = True

        @contextlib.contextmanager
        def zero3_init_context_manager(self, enable):
            self.zero3_init_flag = enable
            yield
            self.zero3_init_flag = True

    plugin = Plugin()
    flags = []
    real = zephyr.models.load.load_model
    monkeypatch.setattr(
        zephyr.models.load,
        "load_model",
        lambda *a, **k: flags.append(plugin.zero3_init_flag) or real(*a, **k),
    )
    cfg = DPOConfig(model=str(tiny_model_dir), train_data=str(PAIRS), output_dir=str(tmp_path / "dpo"))
    accelerator = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=plugin))
    model = DPOTask(cfg, cache_dir=tmp_path / "cache")._load_reference(accelerator)
    assert flags == [False] and plugin.zero3_init_flag  # off while loading, on again after
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# --- compiled decoder layers -----------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_layers_train_the_same_model(tiny_model_dir, tmp_path):
    plain = train_losses(sft_config(tiny_model_dir, tmp_path / "plain", max_steps=2))
    compiled = train_losses(sft_config(tiny_model_dir, tmp_path / "compiled", max_steps=2, compile=True))
    # fused kernels round differently: 2 steps through two paths (tests/rounding.py)
    assert compiled == pytest.approx(plain, abs=tolerance(plain, roundings=2 * PATHS))
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    assert a.keys() == b.keys()  # compiled in place: no wrapper prefix in the saved names
    allowed = tolerance(list(a.values()), roundings=2 * PATHS)  # the model's largest weight
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=allowed)


def test_the_options_come_from_overrides_and_bad_values_name_the_key(capsys):
    from zephyr.cli import main

    dpo = "recipes/smollm2/dpo.yaml"
    ok = ["dpo.master_weights=bf16", "dpo.gradient_checkpointing_ratio=0.5", "dpo.compile=true"]
    assert main(["check", dpo, *ok]) == 0
    recipe = load_recipe(dpo, ok)
    assert (recipe.dpo.master_weights, recipe.dpo.gradient_checkpointing_ratio, recipe.dpo.compile) == (
        "bf16",
        0.5,
        True,
    )
    capsys.readouterr()
    assert main(["check", dpo, "dpo.gradient_checkpointing_ratio=0"]) == 2
    assert capsys.readouterr().err.strip().endswith("dpo.gradient_checkpointing_ratio: must be > 0, got 0.0")
    assert main(["check", dpo, "dpo.master_weights=fp16"]) == 2
    assert "dpo.master_weights: must be one of 'fp32' | 'bf16', got 'fp16'" in capsys.readouterr().err


def test_a_training_state_one_gpu_cannot_hold_is_refused_with_the_way_out():
    from zephyr.training.prepare import state_too_big

    mistral, gib = 7_241_732_096, 2**30  # Mistral-7B's parameters
    # fp32 masters: 4 + 4 (gradient) + 8 (moments) = 16 bytes a parameter = 115,867,713,536 B = 107.9 GiB
    message = state_too_big(mistral, mistral, 4, 80 * gib, "NVIDIA A100-SXM4-80GB")
    assert message == (
        "training 7.24B parameters with fp32 master weights holds 107.9 GiB of weights, gradients and AdamW "
        "moments on each device, more than the 80.0 GiB of NVIDIA A100-SXM4-80GB; set master_weights: bf16 "
        "(8 bytes a parameter), train LoRA adapters (lora:), or shard the state over several GPUs (FSDP or "
        "DeepSpeed ZeRO-3, docs/training.md)"
    )
    assert state_too_big(mistral, mistral, 4, 139 * gib, "H200") is None  # 107.9 GiB fit an H200
    assert state_too_big(mistral, mistral, 2, 80 * gib, "A100") is None  # bf16: 54.0 GiB
    assert state_too_big(mistral, 20_000_000, 4, 80 * gib, "A100") is None  # LoRA: the base is frozen
    small = state_too_big(mistral, mistral, 2, 24 * gib, "RTX 4090")
    assert small is not None and "with bf16 master weights holds 54.0 GiB" in small
    assert "set master_weights" not in small


@pytest.mark.gpu
def test_the_preflight_reads_this_cards_memory():
    """The preflight's CUDA call on a real card: a 30B-parameter fp32 state (480 GB, on the meta device) is
    refused naming the card; a tiny one passes."""
    from zephyr.core.errors import ZephyrError
    from zephyr.training.prepare import _check_fits

    accelerator = SimpleNamespace(device=torch.device("cuda"), distributed_type=SimpleNamespace(value="NO"))
    huge = torch.nn.Linear(100_000, 300_000, bias=False, device="meta")  # 3e10 parameters
    with pytest.raises(ZephyrError, match=re.escape(torch.cuda.get_device_name())):
        _check_fits(huge, accelerator)
    _check_fits(torch.nn.Linear(8, 8, device="cuda"), accelerator)


def test_bf16_master_weights_under_fsdp_go_without_mixed_precision(tiny_model_dir, tmp_path, monkeypatch):
    """accelerate's FSDP upcasts bf16 weights to fp32 under mixed precision (tests/scripts/
    fsdp_accelerate_head.py shows it): an FSDP launch with bf16 weights builds its accelerator without."""
    from zephyr.training.prepare import make_accelerator

    bf16 = sft_config(tiny_model_dir, tmp_path / "a", precision="bf16", master_weights="bf16")
    fp32 = sft_config(tiny_model_dir, tmp_path / "b", precision="bf16")
    assert make_accelerator(bf16, "bf16").mixed_precision == "bf16"  # one GPU or DDP: autocast
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert make_accelerator(bf16, "bf16").mixed_precision == "no"
    assert make_accelerator(fp32, "bf16").mixed_precision == "bf16"  # fp32 masters keep their autocast


def test_a_preparation_that_upcasts_bf16_master_weights_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from zephyr.core.errors import ZephyrError

    real = Accelerator.prepare

    def upcasting(self, model, optimizer):
        return real(self, model.float(), optimizer)

    monkeypatch.setattr(Accelerator, "prepare", upcasting)
    cfg = sft_config(tiny_model_dir, tmp_path / "out", max_steps=1, master_weights="bf16", precision="bf16")
    with pytest.raises(ZephyrError, match=r"^master_weights: bf16, but accelerate's preparation turned the "
                       r"trained weights from bfloat16 into float32"):  # fmt: skip
        train(SFTTask(cfg), cfg)


def test_a_checkpoint_of_tied_embeddings_saves_without_accelerates_note(smollm_dir, tmp_path, caplog):
    """accelerate notes at every save that tied weights are stored once; they load tied again, so zephyr
    keeps the note out of the run's output."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model_dir = tmp_path / "tied"
    make_tiny_llama(len(tokenizer), tie_word_embeddings=True).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = sft_config(model_dir, tmp_path / "out", max_steps=2, save_steps=1)
    with caplog.at_level("WARNING"):
        train(SFTTask(cfg), cfg)
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
