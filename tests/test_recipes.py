"""Every shipped recipe loads and validates; the launch configs parse; the Zephyr recipes hold the paper's
(and the handbook's) numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from zephyr.config import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
NOT_RECIPES = ("accelerate", "data")  # launch configs and data files, not zephyr recipes
RECIPE_FILES = sorted(
    p for p in RECIPES.rglob("*.yaml") if p.relative_to(RECIPES).parts[0] not in NOT_RECIPES
)


def test_recipes_are_found():
    names = {str(p.relative_to(RECIPES)) for p in RECIPE_FILES}
    assert {"smollm2/sft.yaml", "zephyr-7b-beta/sft.yaml", "zephyr-7b-beta-handbook/sft.yaml"} <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert any(value is not None for value in vars(recipe).values()), f"{path}: no stage section"


def test_paper_sft_recipe():
    sft = load_recipe(RECIPES / "zephyr-7b-beta" / "sft.yaml").sft
    assert sft.model == "transformers:mistralai/Mistral-7B-v0.1"
    assert sft.train_data == "hf:HuggingFaceH4/ultrachat_200k:train_sft"
    assert (sft.num_epochs, sft.lr_scheduler, sft.learning_rate, sft.warmup_ratio) == (1, "cosine", 2e-5, 0.1)
    assert sft.per_device_batch_size * sft.gradient_accumulation_steps * 16 == 512  # 16 A100s
    assert (sft.packing, sft.max_length, sft.weight_decay, sft.precision) == (True, 2048, 0.0, "bf16")
    assert sft.chat_template == "zephyr"


def test_handbook_sft_recipe():
    sft = load_recipe(RECIPES / "zephyr-7b-beta-handbook" / "sft.yaml").sft
    assert sft.per_device_batch_size * sft.gradient_accumulation_steps * 8 == 128  # 8 GPUs
    assert sft.packing is False
    assert (sft.num_epochs, sft.lr_scheduler, sft.learning_rate, sft.warmup_ratio) == (1, "cosine", 2e-5, 0.1)


def test_small_sft_recipe_runs_offline():
    sft = load_recipe(RECIPES / "smollm2" / "sft.yaml").sft
    assert sft.model.startswith("asset:")
    assert (RECIPES.parent / sft.train_data).is_file()  # paths are relative to the repository root


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("zero3.yaml", "DEEPSPEED")]
)
def test_launch_configs_parse_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(RECIPES / "accelerate" / name))  # unknown keys raise
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"] is True  # checkpoints gather full weights
