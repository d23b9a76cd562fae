"""The comparison table's multiple-choice columns (each preset's own metric, in percent; the Open LLM v1
average) and its reference rows (the paper's Zephyr-7B-β numbers; rows from a user's file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from zephyr.core.config import load_recipe, to_dict
from zephyr.core.errors import ConfigError, DataError
from zephyr.stages.mc.presets import PRESETS, open_llm_average
from zephyr.stages.report.references import parse_references
from zephyr.stages.report.run import collect_report, comparison_table, render_markdown

# float64 values near 100 after a product and a mean of four: a few ulps of 1.4e-14
TOL = 1e-12
PAPER_LABEL = "reference: paper (arXiv:2310.16944) / model card (HuggingFaceH4/zephyr-7b-beta)"


def mc_result(preset: str | None, metric: str, **values: float) -> dict:
    """A results.json of `zephyr eval mc`: acc and acc_norm always there, `metric` the headline one."""
    shots = PRESETS[preset].num_fewshot if preset else 0
    return {"preset": preset, "metric": metric, "score": values[metric], "num_fewshot": shots, **values}


def open_llm_results(arc: float, hellaswag: float, mmlu: float, truthfulqa: float) -> dict:
    return {
        "arc": mc_result("arc", "acc_norm", acc=0.1, acc_norm=arc),
        "hellaswag": mc_result("hellaswag", "acc_norm", acc=0.1, acc_norm=hellaswag),
        "mmlu": mc_result("mmlu", "acc", acc=mmlu, acc_norm=0.1, acc_weighted=0.1),
        "truthfulqa": mc_result("truthfulqa", "mc2", acc=0.1, acc_norm=0.1, mc1=0.1, mc2=truthfulqa),
    }


def test_open_llm_average_is_the_plain_mean_of_the_four_in_percent():
    paper = {"arc": 62.03, "hellaswag": 84.36, "mmlu": 61.07, "truthfulqa": 57.45}
    assert open_llm_average(paper) == pytest.approx(264.91 / 4, abs=TOL)  # 66.2275
    assert open_llm_average({**paper, "truthfulqa": None}) is None
    assert open_llm_average({"arc": 50.0, "hellaswag": 50.0, "mmlu": 50.0}) is None


def test_each_set_shows_its_own_metric_in_percent_with_the_open_llm_average():
    models = [{"name": "sft", "label": "SFT only"}, {"name": "dpo", "label": "full"}]
    evals = {
        "sft": {"mc": open_llm_results(0.5, 0.75, 0.625, 0.375)},
        # dpo lacks TruthfulQA: no average, the other columns stay
        "dpo": {"mc": {k: v for k, v in open_llm_results(0.25, 0.5, 0.5, 0.5).items() if k != "truthfulqa"}},
    }
    table = comparison_table(models, evals, {})
    assert [c["key"] for c in table["columns"]] == [
        "mc/arc/acc_norm",
        "mc/hellaswag/acc_norm",
        "mc/mmlu/acc",
        "mc/truthfulqa/mc2",
        "open_llm/average",
    ]
    assert [c["label"] for c in table["columns"]][-2:] == ["truthfulqa mc2 (%)", "Open LLM v1 average (%)"]
    sft, dpo = (r["values"] for r in table["rows"])
    assert sft == pytest.approx(
        {
            "mc/arc/acc_norm": 50.0,
            "mc/hellaswag/acc_norm": 75.0,
            "mc/mmlu/acc": 62.5,
            "mc/truthfulqa/mc2": 37.5,
            "open_llm/average": (50 + 75 + 62.5 + 37.5) / 4,  # 56.25
        },
        abs=TOL,
    )
    assert dpo["mc/truthfulqa/mc2"] is None and dpo["open_llm/average"] is None
    assert dpo["mc/mmlu/acc"] == pytest.approx(50.0, abs=TOL)


def test_a_preset_run_with_other_shots_is_not_the_leaderboards():
    results = open_llm_results(0.5, 0.5, 0.5, 0.5)
    results["arc"]["num_fewshot"] = 0  # not ARC-25
    table = comparison_table([{"name": "m", "label": "m"}], {"m": {"mc": results}}, {})
    arc = next(c for c in table["columns"] if c["key"] == "mc/arc/acc_norm")
    assert arc["benchmark"] is None
    assert "open_llm/average" not in [c["key"] for c in table["columns"]]


def test_a_plain_file_shows_the_metric_its_results_name():
    gold_lists = {"metric": "mc2", "acc": 0.5, "acc_norm": 0.25, "mc1": 0.5, "mc2": 0.125}
    table = comparison_table([{"name": "m", "label": "m"}], {"m": {"mc": {"tqa_sample": gold_lists}}}, {})
    assert table["rows"][0]["values"] == {"mc/tqa_sample/mc2": 12.5}


# ---------------------------------------------------------------------------------------------------------
# Reference rows


def write_run(run: Path, recipe: dict, mc: dict) -> Path:
    (run / "eval" / "dpo").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    (run / "manifest.json").write_text(json.dumps({"stages": {}}), encoding="utf-8")
    for name, result in mc.items():
        (run / "eval" / "dpo" / f"mc-{name}").mkdir()
        (run / "eval" / "dpo" / f"mc-{name}" / "results.json").write_text(
            json.dumps(result), encoding="utf-8"
        )
    mt_bench = run / "eval" / "dpo" / "mt-bench"
    mt_bench.mkdir()
    (mt_bench / "results.json").write_text(json.dumps({"score": 6.5}), encoding="utf-8")
    return run


@pytest.mark.parametrize(
    "recipe", ["recipes/zephyr-7b-beta/pipeline.yaml", "recipes/zephyr-7b-beta-handbook/pipeline.yaml"]
)
def test_the_paper_recipe_shows_the_papers_numbers_beside_the_run(tmp_path, recipe):
    resolved = to_dict(load_recipe(recipe))  # as `zephyr run` saves it into the run folder
    run = write_run(tmp_path / "run", resolved, open_llm_results(0.6, 0.8, 0.58, 0.5))
    report = collect_report(run)
    rows = report["comparison"]["rows"]
    assert [r["model"] for r in rows] == ["base", "sft", "dpo", "dpo_only", rows[4]["model"], "Zephyr-7B-β"]
    paper = rows[-1]
    assert paper["reference"] is True and paper["label"] == PAPER_LABEL
    assert paper["values"] == pytest.approx(
        {
            "mc/arc/acc_norm": 62.03,
            "mc/hellaswag/acc_norm": 84.36,
            "mc/mmlu/acc": 61.07,
            "mc/truthfulqa/mc2": 57.45,
            "open_llm/average": 66.2275,  # (62.03 + 84.36 + 61.07 + 57.45) / 4
            "mt_bench/overall": 7.34,
        },
        abs=TOL,
    )
    dpo = next(r for r in rows if r["model"] == "dpo")["values"]
    assert dpo["open_llm/average"] == pytest.approx((60 + 80 + 58 + 50) / 4, abs=TOL)  # 62.0
    md = render_markdown(report)
    # The paper's row is not bold: bold marks the best of the run's models (dpo's, the only ones).
    assert f"| Zephyr-7B-β | {PAPER_LABEL} | 62.03 | 84.36 | 61.07 | 57.45 | 66.23 | 7.34 |" in md
    assert "| dpo | full | 60.00 | 80.00 | 58.00 | 50.00 | 62.00 | 6.50 |" in md


def test_no_reference_row_unless_the_recipe_asks(tmp_path):
    run = write_run(
        tmp_path / "run", {"eval": {"mc": [{"name": "arc"}]}}, open_llm_results(0.6, 0.8, 0.58, 0.5)
    )
    assert [r["model"] for r in collect_report(run)["comparison"]["rows"]] == ["base", "dpo"]


def test_reference_rows_from_a_users_yaml_and_json_files(tmp_path):
    rows_yaml = tmp_path / "refs.yaml"
    rows_yaml.write_text(
        "- label: earlier model\n"
        "  source: an earlier run\n"
        "  values: {arc: 54.52, hellaswag: 75.63, mmlu: 55.38, truthfulqa: 56.28, mt_bench/overall: 6.84}\n",
        encoding="utf-8",
    )
    rows_json = tmp_path / "refs.json"
    rows_json.write_text(
        json.dumps(
            [
                {
                    "label": "mine",
                    "source": "a notebook",
                    "values": {"mc/sample/acc": 40, "open_llm/average": 50},
                }
            ]
        ),
        encoding="utf-8",
    )
    recipe = {"report": {"references": [str(rows_yaml), str(rows_json)]}}
    mc = {**open_llm_results(0.6, 0.8, 0.58, 0.5), "sample": mc_result(None, "acc", acc=0.25, acc_norm=0.5)}
    rows = collect_report(write_run(tmp_path / "run", recipe, mc))["comparison"]["rows"]
    assert [r["model"] for r in rows] == ["dpo", "earlier model", "mine"]
    assert rows[1]["label"] == "reference: an earlier run"
    assert rows[1]["values"] == pytest.approx(
        {
            "mc/arc/acc_norm": 54.52,
            "mc/hellaswag/acc_norm": 75.63,
            "mc/mmlu/acc": 55.38,
            "mc/truthfulqa/mc2": 56.28,
            "mc/sample/acc": None,
            "open_llm/average": 60.4525,  # (54.52 + 75.63 + 55.38 + 56.28) / 4, derived
            "mt_bench/overall": 6.84,
        },
        abs=TOL,
    )
    assert rows[2]["values"]["mc/sample/acc"] == 40 and rows[2]["values"]["open_llm/average"] == 50
    assert rows[2]["values"]["mc/arc/acc_norm"] is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- label: x\n  source: y\n  values:\n    arc: 0.6203\n",
            "refs.yaml:4: [0].values.arc: expected a percentage (62.03, not 0.6203), got 0.6203",
        ),
        (
            "- label: x\n  source: y\n  values: {mt_bench: 7.3}\n",
            "refs.yaml:3: [0].values.mt_bench: unknown key (expected one of arc, hellaswag",
        ),
        ("- label: x\n  values: {arc: 60}\n", "refs.yaml:1: [0].source: expected a non-empty string"),
        ("- label: x\n  source: y\n  value: {arc: 60}\n", "refs.yaml:1: [0].value: unknown field"),
        ("- label: x\n  source: y\n  values: {arc: yes}\n", "refs.yaml:3: [0].values.arc: expected a number"),
        ("label: x\n", "refs.yaml:1: expected a list of rows, each with label, source, values"),
    ],
)
def test_a_bad_reference_file_names_file_line_and_field(text, message):
    with pytest.raises(DataError) as err:
        parse_references(text, "refs.yaml")
    assert str(err.value).startswith(message)


def test_an_unreadable_reference_file_is_listed_as_missing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- label: x\n  source: y\n  values: {arc: 0.5}\n", encoding="utf-8")
    absent = tmp_path / "absent.yaml"
    recipe = {"report": {"paper_reference": True, "references": [str(bad), str(absent)]}}
    report = collect_report(write_run(tmp_path / "run", recipe, open_llm_results(0.6, 0.8, 0.58, 0.5)))
    assert [r["model"] for r in report["comparison"]["rows"]] == ["dpo", "Zephyr-7B-β"]
    reasons = {m["path"]: m["reason"] for m in report["missing"]}
    assert reasons[str(bad)] == (
        f"reference rows (report.references) not read: {bad}:3: [0].values.arc: expected a percentage "
        "(62.03, not 0.6203), got 0.5"
    )
    assert reasons[str(absent)].startswith("reference rows (report.references) not read: [Errno 2]")


def test_the_report_section_is_validated_with_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("report:\n  references: [rows.txt]\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"report.references\[0\]: a .yaml, .yml or .json file, got 'rows.txt'"
    ):
        load_recipe(recipe)
    recipe.write_text("report:\n  paper_references: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("r.yaml:2: unknown key 'report.paper_references' (did")):
        load_recipe(recipe)
