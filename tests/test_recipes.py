"""Every shipped recipe loads and validates; the launch configs parse; the Zephyr recipes hold the paper's
(and the handbook's) numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zephyr.core.config import batch_plan, load_recipe

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
    # the paper's global batch on any launch: the accumulation follows from the process count
    assert (sft.global_batch_size, sft.gradient_accumulation_steps) == (512, None)
    assert [batch_plan(sft, n, "sft").accumulation for n in (1, 8, 16)] == [64, 8, 4]
    assert (sft.packing, sft.max_length, sft.weight_decay, sft.precision) == (True, 2048, 0.0, "bf16")
    assert sft.chat_template == "zephyr"
    assert sft.loss_on == "all"  # SFTTrainer with packing trained every token (the recipe's comment)


def test_handbook_sft_recipe():
    sft = load_recipe(RECIPES / "zephyr-7b-beta-handbook" / "sft.yaml").sft
    assert (sft.global_batch_size, batch_plan(sft, 8, "sft").accumulation) == (128, 1)  # 16 × 1 × 8 GPUs
    assert sft.packing is False and sft.loss_on == "all"
    assert (sft.num_epochs, sft.lr_scheduler, sft.learning_rate, sft.warmup_ratio) == (1, "cosine", 2e-5, 0.1)


def provenance(path: Path, key: str) -> str:
    """The comment that labels a recipe key: its own line's, else the comment lines right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
    _, _, comment = lines[i].partition("#")
    above = []
    while not comment and lines[i - 1 - len(above)].strip().startswith("#"):
        above.insert(0, lines[i - 1 - len(above)].strip().lstrip("# "))
    return comment.strip() or " ".join(above)


@pytest.mark.parametrize(
    ("name", "key", "source"),
    [
        # the paper's text (REFERENCE.md): lr, schedule, warmup, epochs, global batches, beta, bf16, packing
        ("sft", "learning_rate", "paper"),
        ("sft", "warmup_ratio", "paper"),
        ("sft", "num_epochs", "paper"),
        ("sft", "global_batch_size", "paper"),
        ("sft", "max_length", "paper"),
        ("dpo", "beta", "paper"),
        ("dpo", "num_epochs", "paper"),
        ("dpo", "global_batch_size", "paper"),
        ("dpo", "warmup_ratio", "model card"),
        # not in the paper: the alignment-handbook's values, said so
        ("dpo", "max_length", "handbook"),
        ("dpo", "max_prompt_length", "handbook"),
        ("dpo", "weight_decay", "handbook"),
        ("dpo", "max_grad_norm", "handbook"),
        ("sft", "adam_beta1", "handbook"),
        ("sft", "max_grad_norm", "handbook"),
        ("sft", "loss_on", "handbook"),
        ("sft", "per_device_batch_size", "zephyr"),
    ],
)
def test_paper_recipe_values_name_where_they_come_from(name, key, source):
    label = provenance(RECIPES / "zephyr-7b-beta" / f"{name}.yaml", key)
    assert re.match(rf"{source}\b", label), label  # the label starts with its source


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


def test_quickstart_pipeline_has_every_stage(tmp_path):
    from zephyr.pipeline.run import build_plan

    recipe = load_recipe(RECIPES / "quickstart.yaml")
    ids = [s.id for s in build_plan(recipe, tmp_path)]
    assert ids[:6] == ["generate", "curate", "sft", "feedback", "dpo", "ablations/dpo_only"]
    assert ids[-1] == "report"
    models = {i.split("/")[1] for i in ids if i.startswith("eval/")}
    assert models == {"base", "sft", "dpo", "dpo_only"}
    for model in models:  # every model is measured the same way
        assert {i for i in ids if i.startswith(f"eval/{model}/")} == {
            f"eval/{model}/{e}" for e in ("mc-arc_sample", "samples", "mt-bench", "alpaca-eval")
        }
    plan = {s.id: s for s in build_plan(recipe, tmp_path)}
    assert plan["dpo"].config.model == str(tmp_path / "sft" / "final")
    assert plan["dpo"].config.eval_data == str(tmp_path / "feedback" / "pairs_test.jsonl")
    assert plan["feedback"].config.completions_per_prompt == 4  # the paper's K


@pytest.mark.parametrize("name", ["zephyr-7b-beta", "zephyr-7b-beta-handbook"])
def test_7b_pipelines_wire_the_training_recipes_next_to_them(name, tmp_path):
    from zephyr.pipeline.run import build_plan

    pipeline = load_recipe(RECIPES / name / "pipeline.yaml")
    sft = load_recipe(RECIPES / name / "sft.yaml").sft
    dpo = load_recipe(RECIPES / name / "dpo.yaml").dpo
    assert pipeline.sft == sft  # included as is
    assert {k: v for k, v in vars(pipeline.dpo).items() if k != "model"} == {
        k: v for k, v in vars(dpo).items() if k != "model"
    }
    assert pipeline.dpo.model == "stage:sft"
    plan = {s.id: s for s in build_plan(pipeline, tmp_path)}
    assert plan["ablations/dpo_only"].config.model == "transformers:mistralai/Mistral-7B-v0.1"
    assert [m.preset for m in pipeline.eval.mc] == ["arc", "hellaswag", "mmlu", "truthfulqa"]
    assert pipeline.eval.mt_bench.judge.startswith("openai:gpt-4@")


def test_include_merges_sections_and_refuses_cycles(tmp_path):
    from zephyr.core.errors import ConfigError

    (tmp_path / "base.yaml").write_text("sft:\n  train_data: a.jsonl\n  learning_rate: 1.0e-4\n")
    (tmp_path / "top.yaml").write_text("include: [base.yaml]\nsft:\n  learning_rate: 3.0e-4\n")
    sft = load_recipe(tmp_path / "top.yaml").sft
    assert (sft.train_data, sft.learning_rate) == ("a.jsonl", 3e-4)
    (tmp_path / "loop.yaml").write_text("include: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_recipe(tmp_path / "loop.yaml")
