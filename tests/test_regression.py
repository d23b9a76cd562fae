"""The report's regression check: fixed factual prompts answered by every model, drift on held-out dSFT data,
and the quickstart's dDPO settings run on its own kind of pairs (they must not make the model forget).

`tests/data/quickstart_pairs.jsonl` holds 6 of the pairs `recipes/quickstart.yaml` makes (SmolLM2-135M as
generators and judge, 4 balanced repeats): the data the quickstart's dDPO trains on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zephyr.core.config import load_recipe
from zephyr.stages.report.regression import (
    PROMPTS,
    REGRESSION_FILE,
    compute,
    is_right,
    regressions,
    run_models,
    update_regression,
)
from zephyr.stages.report.run import collect_report, report_blocks

ROOT = Path(__file__).parents[1]
BASE = "asset:smollm2-135m-instruct"


def test_an_answer_is_right_when_it_holds_an_expected_word():
    assert is_right("The capital of France is Paris.", ["Paris"])
    assert is_right("PARIS", ["Paris"])
    assert not is_right("Parisian food is good.", ["Paris"])  # whole words only
    assert is_right("2 + 3 = 5", ["5", "five"]) and not is_right("2 + 3 = 15", ["5", "five"])
    assert not is_right(None, ["Paris"]) and not is_right("", ["Paris"])


def test_regressions_are_prompts_the_start_got_right_and_the_model_gets_wrong():
    right = {"base": [True, True, False], "sft": [True, False, True], "dpo": [False, False, True]}
    starts = {"sft": "base", "dpo": "sft", "dpo_only": "base"}  # dpo_only has no answers: left out
    assert regressions(right, starts) == {"sft": [1], "dpo": [0]}


def test_the_models_of_a_run_and_where_each_started(tmp_path):
    run = tmp_path / "run"
    for folder in ("sft/final", "dpo/final", "ablations/dpo_only/final", "ablations/no_weights/final"):
        (run / folder).mkdir(parents=True)
        (run / folder / "config.json").write_text("{}")
        if "no_weights" not in folder:
            (run / folder / "model.safetensors").write_bytes(b"")
    recipe = {
        "run": {
            "base_model": BASE,
            "ablations": [{"name": "dpo_only", "start": "base"}, {"name": "no_weights"}],
        },
        "dpo": {"model": "stage:sft"},
    }
    models, starts = run_models(run, recipe)
    assert models == {
        "base": BASE,
        "sft": str(run / "sft" / "final"),
        "dpo": str(run / "dpo" / "final"),
        "dpo_only": str(run / "ablations" / "dpo_only" / "final"),
    }
    assert starts == {"sft": "base", "dpo": "sft", "dpo_only": "base"}


def test_the_report_shows_the_check_and_a_run_without_trained_weights_loads_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(f"run: {{base_model: '{BASE}'}}\n")
    assert update_regression(run) is None and not (run / REGRESSION_FILE).exists()
    check = {
        "prompts": [{"prompt": p, "expected": list(w)} for p, w in PROMPTS[:2]],
        "answers": {"base": ["Paris.", "7 days."], "dpo": ["L'Étoile, la Marseillaise", "7 days."]},
        "right": {"base": [True, True], "dpo": [False, True]},
        "regressions": {"dpo": [0]},
        "drift": {"dpo": {"start": "base", "mean_logp": -1.5, "start_mean_logp": -1.25, "change": -0.25}},
        "held_out": "curate/test.jsonl",
    }
    (run / REGRESSION_FILE).write_text(json.dumps(check))
    blocks = report_blocks(collect_report(run))
    text = json.dumps([dataclasses.asdict(b) for b in blocks], default=list, ensure_ascii=False)
    assert (
        "dpo (dpo): REGRESSED on 1 prompt(s) its start model (base) answered right: What is the capital"
        in text
    )
    assert "✗ dpo (dpo)" in text and "✓ base (base)" in text
    assert '["dpo", "base", "-1.5", "-1.25", "-0.25"]' in text  # the drift table


@pytest.mark.slow
def test_the_quickstart_ddpo_keeps_what_the_base_model_answers_right(tmp_path):
    """The quickstart's dDPO settings (learning rate, beta, loss, schedule, epochs) on its kind of pairs, as
    its DPO-without-SFT ablation runs them: 6 pairs in batches of 2 give the quickstart's 3 steps per epoch
    (its 10 pairs in batches of 4) at a third of the cost. With the former learning rate (1e-5) the model
    answered "What is 2 + 3?" without a 5 (and, on the former pairs, France with French words)."""
    from zephyr.stages.dpo.run import run_dpo

    dpo = load_recipe(ROOT / "recipes" / "quickstart.yaml").dpo
    cfg = dataclasses.replace(
        dpo,
        model=BASE,
        train_data=str(ROOT / "tests" / "data" / "quickstart_pairs.jsonl"),
        eval_data=None,
        output_dir=str(tmp_path / "dpo"),
        per_device_batch_size=2,
        save_steps=None,
    )
    run_dpo(cfg)
    check = compute({"base": BASE, "dpo": str(tmp_path / "dpo" / "final")}, {"dpo": "base"}, held=[])
    shown = "\n".join(
        f"{p['prompt']} -> {a!r}" for p, a in zip(check["prompts"], check["answers"]["dpo"], strict=True)
    )
    assert all(check["right"]["base"]), check["answers"]["base"]  # the premise: the base model knows them
    assert check["regressions"] == {"dpo": []}, f"after dDPO:\n{shown}"
