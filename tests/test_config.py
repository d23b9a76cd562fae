"""Recipes: typed configs, dotted overrides, strict validation with messages naming file and key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from zephyr.cli import main
from zephyr.core.config import DPOConfig, SFTConfig, load_recipe, parse_overrides, save_resolved
from zephyr.core.errors import ConfigError


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "sft:\n  learning_rate: 2e-5  # PyYAML reads this as a string\n  max_length: 512\n"
        "dpo:\n  beta: 0.1\n  loss: ipo\n",
        encoding="utf-8",
    )
    return path


def test_sections_are_typed_and_defaults_hold(recipe):
    r = load_recipe(recipe)
    assert isinstance(r.sft, SFTConfig) and isinstance(r.dpo, DPOConfig)
    assert r.sft.learning_rate == 2e-5 and isinstance(r.sft.learning_rate, float)
    assert r.sft.max_length == 512
    assert r.sft.packing is True and r.sft.lr_scheduler == "cosine"
    # dDPO defaults are the paper's: beta 0.1, lr 5e-7, linear, 10% warmup, 1024 / 512
    assert (r.dpo.beta, r.dpo.learning_rate, r.dpo.lr_scheduler, r.dpo.warmup_ratio) == (
        0.1,
        5e-7,
        "linear",
        0.1,
    )
    assert (r.dpo.max_length, r.dpo.max_prompt_length) == (1024, 512)


def test_overrides_are_parsed_as_yaml_scalars(recipe):
    r = load_recipe(
        recipe, ["dpo.beta=0.01", "sft.packing=false", "sft.trackers=[tensorboard]", "dpo.max_steps=3"]
    )
    assert r.dpo.beta == 0.01
    assert r.sft.packing is False
    assert r.sft.trackers == ["tensorboard"]
    assert r.dpo.max_steps == 3


def test_override_can_create_a_section(tmp_path):
    r = load_recipe(None, ["dpo.beta=0.5"])
    assert r.dpo.beta == 0.5 and r.sft is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("no.such=1", "unknown key 'no'"),
        ("dpo.bta=1", "unknown key 'dpo.bta' (did you mean 'dpo.beta'?)"),
        ("dpo.beta=-1", "dpo.beta: must be > 0, got -1.0"),
        ("dpo.beta=abc", "dpo.beta: expected a number, got 'abc'"),
        ("sft.packing=3", "sft.packing: expected true or false, got 3"),
        ("sft.max_length=2.5", "sft.max_length: expected an integer, got 2.5"),
        ("dpo.loss=ipp", "dpo.loss: must be one of"),
        ("dpo.max_length=256", "dpo.max_prompt_length: must be < max_length (256)"),
        ("dpo.label_smoothing=0.1", "only used by loss 'cdpo'"),
        ("sft.lora.r=0", "sft.lora.r: must be >= 1, got 0"),
        ("sft.lora.rnak=8", "unknown key 'sft.lora.rnak' (valid keys: r, alpha, dropout"),
        ("sft.lora.alpah=8", "unknown key 'sft.lora.alpah' (did you mean 'sft.lora.alpha'?)"),
        ("dpo", "expected KEY.SUB=VALUE"),
    ],
)
def test_bad_values_name_the_file_and_key(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe, [override])
    assert re.match(rf"{re.escape(str(recipe))}(:\d+)?: ", str(err.value))  # a key from the file: its line
    assert message in str(err.value)


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("sft:\n  learning_rat: 1e-5\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=r"typo.yaml:2: unknown key 'sft.learning_rat' \(did you mean 'sft.learning_rate'\?\)",
    ):
        load_recipe(path)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(path)
    path.write_text("sft: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_parse_overrides_values():
    assert parse_overrides(["a.b=1", "a.c=x", "a.d=", "a.e=[1, 2]"]) == [
        (["a", "b"], 1),
        (["a", "c"], "x"),
        (["a", "d"], ""),
        (["a", "e"], [1, 2]),
    ]


def test_resolved_config_is_saved_and_reloads(tmp_path, recipe):
    cfg = load_recipe(recipe).sft
    path = save_resolved(cfg, tmp_path / "out")
    text = path.read_text(encoding="utf-8")
    assert "learning_rate: 2.0e-05" in text
    again = load_recipe(None, [f"sft.{k}={v}" for k, v in [("learning_rate", cfg.learning_rate)]])
    assert again.sft.learning_rate == cfg.learning_rate


def test_cli_check_ok_and_bad(recipe, capsys):
    assert main(["check", str(recipe)]) == 0
    assert "ok (sft, dpo)" in capsys.readouterr().out
    assert main(["check", str(recipe), "no.such=1"]) == 2
    assert "no.such" in capsys.readouterr().err


def test_cli_check_imports_no_torch_in_a_fresh_process(recipe):
    """`zephyr check` must not import torch or transformers (seconds of start-up): `-X importtime` lists
    every module the process imported, on stderr."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "zephyr", "check", str(recipe), "no.such=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no.such" in proc.stderr and "Traceback" not in proc.stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    }
    assert "zephyr.core.config" in imported  # the listing is there
    assert not {"torch", "transformers"} & imported


def test_partial_nested_section_keeps_the_factory_defaults():
    """The judge samples greedily by default; setting only its model keeps temperature 0 and 512 tokens."""
    r = load_recipe(None, ["feedback.judge.model.model=openai:gpt-4@http://127.0.0.1:1/v1"])
    judge = r.feedback.judge.model
    assert judge.model == "openai:gpt-4@http://127.0.0.1:1/v1"
    assert (judge.temperature, judge.max_tokens) == (0.0, 512)


def test_feedback_pool_must_cover_completions_per_prompt():
    with pytest.raises(ConfigError, match=r"feedback\.generators: 2 generators for completions_per_prompt 4"):
        load_recipe(None, ["feedback.generators=[{model: a}, {model: b}]"])


def test_errors_name_the_line_of_the_key_in_the_file_it_was_written(tmp_path):
    (tmp_path / "base.yaml").write_text("sft:\n  train_data: a.jsonl\n  lora:\n    r: 0\n")
    (tmp_path / "top.yaml").write_text(
        "include: [base.yaml]\nrun:\n  ablations:\n    - name: ok\n    - name: 'bad name'\ndpo:\n  beta: 0.1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "top.yaml")
    assert str(err.value) == f"{tmp_path / 'base.yaml'}:4: sft.lora.r: must be >= 1, got 0"
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "top.yaml", ["sft.lora.r=4"])
    assert str(err.value).startswith(f"{tmp_path / 'top.yaml'}:5: run.ablations[1].name: letters, digits")
    with pytest.raises(ConfigError) as err:  # a value given on the command line has no line
        load_recipe(tmp_path / "top.yaml", ["sft.lora.r=-1"])
    assert str(err.value) == f"{tmp_path / 'top.yaml'}: sft.lora.r: must be >= 1, got -1"


# --- global batch: one number for every launch -------------------------------------------------------------


def test_global_batch_size_derives_the_accumulation_from_the_process_count():
    from zephyr.core.config import BatchPlan, batch_plan, resolve_batch

    paper_sft = SFTConfig(global_batch_size=512, per_device_batch_size=8)
    # 512 / (8 × P): the paper's 16 A100s, an 8-GPU box, one GPU
    assert batch_plan(paper_sft, 16, "sft") == BatchPlan(processes=16, per_device=8, accumulation=4)
    assert batch_plan(paper_sft, 8, "sft") == BatchPlan(processes=8, per_device=8, accumulation=8)
    assert batch_plan(paper_sft, 1, "sft") == BatchPlan(processes=1, per_device=8, accumulation=64)
    paper_dpo = DPOConfig(global_batch_size=32, per_device_batch_size=2)
    assert [batch_plan(paper_dpo, p, "dpo").accumulation for p in (1, 8, 16)] == [16, 2, 1]
    assert (
        str(batch_plan(paper_dpo, 16, "dpo"))
        == "global batch 32 = 16 processes × 2 per device × 1 accumulation"
    )
    resolved = resolve_batch(paper_dpo, 8, "dpo")
    assert (resolved.global_batch_size, resolved.gradient_accumulation_steps) == (32, 2)
    # without a global batch: per device × accumulation (1 when unset) × processes, as before
    assert batch_plan(DPOConfig(per_device_batch_size=2), 16, "dpo").global_batch == 32
    assert (
        batch_plan(DPOConfig(per_device_batch_size=2, gradient_accumulation_steps=3), 4, "dpo").global_batch
        == 24
    )


def test_an_indivisible_global_batch_is_an_error_naming_the_numbers():
    from zephyr.core.config import batch_plan

    with pytest.raises(ConfigError) as err:
        batch_plan(SFTConfig(global_batch_size=512, per_device_batch_size=8), 6, "sft")
    assert str(err.value) == (
        "sft.global_batch_size: 512 is not divisible by per_device_batch_size 8 × 6 processes = 48; "
        "process counts that fit: 1, 2, 4, 8, 16, 32, 64 (or change per_device_batch_size)"
    )
    # set both, they must agree on the launch: 8 × 4 × 8 GPUs = 256, not 512
    both = DPOConfig(global_batch_size=512, per_device_batch_size=8, gradient_accumulation_steps=4)
    assert batch_plan(both, 16, "dpo").accumulation == 4
    with pytest.raises(
        ConfigError,
        match=r"dpo.global_batch_size: 512 ≠ per_device_batch_size 8 × "
        r"gradient_accumulation_steps 4 × 8 processes = 256; set only global_batch_size",
    ):
        batch_plan(both, 8, "dpo")


def test_a_global_batch_no_launch_can_make_is_refused_when_the_recipe_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  per_device_batch_size: 8\n  global_batch_size: 100\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}:3: sft.global_batch_size: 100 is not a multiple of per_device_batch_size 8 = 8"
    )
    with pytest.raises(
        ConfigError,
        match=r"not a multiple of per_device_batch_size 8 × "
        r"gradient_accumulation_steps 3 = 24",
    ):
        load_recipe(path, ["sft.global_batch_size=64", "sft.gradient_accumulation_steps=3"])


def test_cli_check_validates_the_batches_for_a_stated_process_count(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("dpo:\n  per_device_batch_size: 2\n  global_batch_size: 32\n", encoding="utf-8")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dpo: global batch 32 = 1 process × 2 per device × 16 accumulation (1 process assumed" in out
    assert main(["check", str(path), "--num-processes", "16"]) == 0
    assert (
        "  dpo: global batch 32 = 16 processes × 2 per device × 1 accumulation\n" in capsys.readouterr().out
    )
    assert main(["check", str(path), "--num-processes", "6"]) == 2
    assert "dpo.global_batch_size: 32 is not divisible by per_device_batch_size 2 × 6 processes = 12" in (
        capsys.readouterr().err
    )


def test_loss_on_is_assistant_by_default_and_checked(recipe):
    assert load_recipe(recipe).sft.loss_on == "assistant"
    assert load_recipe(recipe, ["sft.loss_on=all"]).sft.loss_on == "all"
    with pytest.raises(ConfigError, match=r"sft.loss_on: must be one of 'assistant' \| 'all', got 'answers'"):
        load_recipe(recipe, ["sft.loss_on=answers"])


# ---------------------------------------------------------------------------------------------------------
# Specs parsed where the config is built; paths typed; help written once, with the field


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.model=hf:org/model", "sft.model: model spec 'hf:org/model': unknown backend 'hf'"),
        ("dpo.ref_model='openai:'", "dpo.ref_model: model spec 'openai:': expected openai:MODEL@BASE_URL"),
        (
            "sft.train_data=hf:org/prefs@",
            "sft.train_data: hf:org/prefs@: expected hf:NAME[@REVISION][:SPLIT]",
        ),
        (
            "feedback.generators=[{model: 'foo:bar'}, {}]",
            "feedback.generators[0].model: model spec 'foo:bar': unknown backend 'foo'",
        ),
        ("eval.alpaca_eval.lc_data=hf:a:b:c", "eval.alpaca_eval.lc_data: hf:a:b:c: expected hf:NAME"),
        (
            "curate.decontaminate=[asset:mt-bench, 'hf:x@']",
            "curate.decontaminate[1]: hf:x@: expected hf:NAME",
        ),
    ],
)
def test_model_and_hub_specs_are_parsed_when_the_recipe_loads(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [override, "feedback.completions_per_prompt=2"])
    assert str(err.value).startswith(f"<command line>: {message}")


def test_spec_values_lists_every_typed_field_with_its_kind():
    from zephyr.core.config import spec_values

    recipe = load_recipe(
        None,
        [
            "eval.alpaca_eval.lc_data=gamed.csv",
            "eval.mc=[{name: a, data: a.jsonl, fewshot_data: hf:x/y:dev}]",
            "report.references=[refs.yaml]",
            "run.base_model=./base",
        ],
    )
    assert spec_values(recipe.eval, "eval") == [
        ("eval.mc[0].data", "data", "a.jsonl"),
        ("eval.mc[0].fewshot_data", "data", "hf:x/y:dev"),
        ("eval.alpaca_eval.judge", "model", "asset:smollm2-135m-instruct"),
        ("eval.alpaca_eval.instructions", "data", "hf:tatsu-lab/alpaca_eval:eval"),
        ("eval.alpaca_eval.lc_data", "data", "gamed.csv"),
    ]
    assert spec_values(recipe.report, "report") == [("report.references[0]", "path", "refs.yaml")]
    assert spec_values(recipe.run, "run") == [("run.base_model", "model", "./base")]
    # another stage's output and an input left empty are the pipeline's to resolve, not specs to parse
    recipe = load_recipe(None, ["dpo.model=stage:sft", "dpo.train_data=stage:feedback:test"])
    assert (recipe.dpo.model, recipe.dpo.train_data, recipe.dpo.eval_data) == (
        "stage:sft",
        "stage:feedback:test",
        None,
    )
    assert spec_values(recipe.dpo, "dpo")[:2] == [
        ("dpo.model", "model", "stage:sft"),
        ("dpo.train_data", "data", "stage:feedback:test"),
    ]


@dataclasses.dataclass
class _Described:
    """A config whose fields carry their help in the three ways `field_help` reads."""

    # the comment block right above a field,
    # over two lines
    above: int = 1
    trailing: str = "x"  # a comment on the field's line
    given: bool = dataclasses.field(default=False, metadata={"help": "metadata wins"})  # not this
    bare: float = 0.5


def test_field_help_is_the_comment_written_with_the_field():
    from zephyr.core.config import LogpsConfig, field_help

    assert field_help(_Described) == {
        "above": "the comment block right above a field, over two lines",
        "trailing": "a comment on the field's line",
        "given": "metadata wins",
        "bare": "",
    }
    assert field_help(LogpsConfig)["batch_size"] == "pairs per forward pass"


def test_eval_configs_and_their_runners_agree():
    """One set of options: the recipe's mc sets take max_length like the command; logps checks its lengths."""
    from zephyr.core.config import LogpsConfig, build

    assert (
        load_recipe(None, ["eval.mc=[{name: a, data: a.jsonl, max_length: 256}]"]).eval.mc[0].max_length
        == 256
    )
    with pytest.raises(ConfigError, match=r"^logps\.max_prompt_length: must be < max_length \(64\)"):
        build(
            LogpsConfig,
            {"model": "m", "data": "p", "out": "o", "max_length": 64, "max_prompt_length": 64},
            "logps",
        )
    with pytest.raises(ConfigError, match=r"^logps\.data, logps\.out: required"):
        build(LogpsConfig, {"model": "m"}, "logps")
