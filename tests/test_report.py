"""`zephyr report`: run folders built by hand with known numbers, checked in report.json, .md and .html."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml

from zephyr.cli import main
from zephyr.core.errors import DataError
from zephyr.stages.report.html import render_html
from zephyr.stages.report.run import (
    collect_report,
    comparison_table,
    fmt,
    render_markdown,
    training_curves,
    write_report,
)

XSS = "<script>alert(1)</script>"
PROMPTS = ["Name three primes.", "What is DPO?"]


def tiny_png(width: int = 2, height: int = 1) -> bytes:
    """A valid RGB PNG made by hand (signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def dpo_lines(acc: list[float], margin: list[float], eval_acc: list[float], eval_margin: list[float]):
    """Two training steps per eval; the last eval line is logged twice (as the training loop does)."""
    lines = []
    for i, (a, m) in enumerate(zip(acc, margin, strict=True), start=1):
        lines.append(
            {
                "step": i,
                "epoch": i / len(acc),
                "loss": 0.7 - 0.05 * i,
                "lr": 1e-5,
                "grad_norm": 3.0,
                "rewards/accuracies": a,
                "rewards/margins": m,
                "rewards/chosen": m / 2,
                "rewards/rejected": -m / 2,
            }
        )
        if i % 2 == 0:
            k = i // 2 - 1
            lines.append(
                {
                    "step": i,
                    "epoch": i / len(acc),
                    "eval/loss": 0.65 - 0.01 * k,
                    "eval/rewards/accuracies": eval_acc[k],
                    "eval/rewards/margins": eval_margin[k],
                }
            )
    return [*lines, lines[-1]]


MANIFEST_STAGES = {
    "generate": {"status": "done", "seconds": 12.5, "attempts": 1},
    "curate": {"status": "done", "seconds": 0.4, "attempts": 1},
    "sft": {"status": "done", "seconds": 30.0, "attempts": 1},
    "feedback": {"status": "done", "seconds": 40.0, "attempts": 2},
    "dpo": {"status": "done", "seconds": 50.0, "attempts": 1},
    "ablations/dpo_only": {"status": "done", "seconds": 50.0, "attempts": 1},
    "ablations/beta_0.01": {"status": "done", "seconds": 50.0, "attempts": 1},
    "eval/dpo_only/alpaca-eval": {
        "status": "failed",
        "seconds": 1.0,
        "attempts": 1,
        "error": "judge timed out",
    },
}


def make_run(root: Path) -> Path:
    """A complete run with two ablations; every number written here is asserted somewhere."""
    run = root / "run"
    write_json(
        run / "manifest.json",
        {
            "recipe": "recipes/pipeline.yaml",
            "created": "2026-01-01T00:00:00+00:00",
            "updated": "2026-01-01T01:00:00+00:00",
            "versions": {"python": "3.11.7", "zephyr": "0.1.0", "torch": "2.13.0", "device": "cpu"},
            "stages": MANIFEST_STAGES,
        },
    )
    recipe = {
        "run": {
            "stages": ["generate", "curate", "sft", "feedback", "dpo", "ablations", "eval"],
            "base_model": "asset:smollm2-135m-instruct",
            "ablations": [
                {"name": "dpo_only", "start": "base", "overrides": []},
                {"name": "beta_0.01", "start": "sft", "overrides": ["beta=0.01"]},
            ],
        },
        "sft": {"model": "stage:base"},
        "dpo": {"beta": 0.1},
        "eval": {
            "mc": [
                {"name": "arc", "preset": "arc"},
                {"name": "hellaswag", "preset": "hellaswag"},
                {"name": "mmlu", "preset": "mmlu"},
                {"name": "truthfulqa", "preset": "truthfulqa"},
            ],
            "mt_bench": {"judge": "asset:smollm2-135m-instruct"},
            "alpaca_eval": {"judge": "asset:smollm2-135m-instruct"},
            "sample_prompts": PROMPTS,
        },
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")

    write_stage_summaries(run)
    write_training_metrics(run)
    write_evaluations(run)
    return run


def write_stage_summaries(run: Path) -> None:
    """What generate, curate and feedback leave for the report."""
    write_json(
        run / "generate" / "summary.json",
        {"strategy": "ultrachat", "selected": 12, "written": 11, "failed": 1},
    )
    write_json(
        run / "curate" / "curation_report.json",
        {
            "records_read": 11,
            "valid_records": 11,
            "steps": [
                {"name": "refusals", "removed": 3, "remaining": 8, "detail": "7 built-in patterns"},
                {"name": "near_duplicates", "removed": 2, "remaining": 6, "detail": "Jaccard >= 0.8"},
            ],
            "remaining": 6,
            "train": 5,
            "test": 1,
            "contamination": {"hits": {"mt-bench:81/1": {"text": "x", "dialogues": ["d1"]}}},
        },
    )
    write_json(
        run / "feedback" / "feedback_stats.json",
        {
            "scale": 5,
            "histograms": {
                "by_aspect": {"helpfulness": {"1": 0, "2": 1, "3": 4, "4": 2, "5": 1}},
                "by_model": {},
            },
            "parse_failures": {"total": 40, "parsed": 37, "failed": {"no_rating": 2, "out_of_range": 1}},
            "binarization": {"total": 10, "kept": 8, "dropped": {"tie": 2}},
            "judges": ["asset:smollm2-135m-instruct"],
        },
    )
    (run / "feedback" / "ratings.png").write_bytes(tiny_png(3, 2))


def write_training_metrics(run: Path) -> None:
    """dSFT's, dDPO's and both ablations' metrics.jsonl and the DPO data summaries."""
    sft = [
        {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 2e-5, "grad_norm": float("nan")},  # -> null
        {"step": 2, "epoch": 1.0, "eval/loss": 1.5},
        {"step": 2, "epoch": 1.0, "loss": 1.0, "lr": 1e-5, "grad_norm": 4.0},
        {"step": 2, "epoch": 1.0, "eval/loss": 1.25},  # the final eval replaces the step-2 one
    ]
    write_lines(run / "sft" / "metrics.jsonl", sft)
    write_lines(
        run / "dpo" / "metrics.jsonl",
        dpo_lines([0.5, 1.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.75], [0.11, 0.22]),
    )
    write_lines(
        run / "ablations" / "dpo_only" / "metrics.jsonl",
        dpo_lines([0.5, 0.5, 0.5, 0.5], [0.0, 0.1, 0.1, 0.1], [0.625, 0.6], [0.05, 0.07]),
    )
    write_lines(
        run / "ablations" / "beta_0.01" / "metrics.jsonl",
        dpo_lines([0.5, 1.0, 1.0, 1.0], [0.01, 0.02, 0.03, 0.04], [0.7, 0.9], [0.02, 0.03]),
    )
    for folder in ("dpo", "ablations/dpo_only", "ablations/beta_0.01"):
        write_json(
            run / folder / "dpo_data.json",
            {"train_pairs": 38, "eval_pairs": 10, "truncated_prompts": 0, "reference": "precomputed"},
        )


def write_mc_results(folder: Path, value: float) -> None:
    """The four Open LLM v1 presets as `zephyr eval mc` writes them: every set has acc and acc_norm (and
    TruthfulQA mc1, mc2); `metric` names the preset's headline one; MMLU's acc is the unweighted mean of
    its subjects, next to the mean over all items (acc_weighted)."""
    write_json(
        folder / "mc-arc" / "results.json",
        {
            "preset": "arc",
            "metric": "acc_norm",
            "score": value,
            "acc": 0.5,
            "acc_stderr": 0.1,
            "acc_norm": value,
            "acc_norm_stderr": 0.11,
            "counts": {"items": 20},
            "num_fewshot": 25,
        },
    )
    write_json(
        folder / "mc-hellaswag" / "results.json",
        {
            "preset": "hellaswag",
            "metric": "acc_norm",
            "score": round(value + 0.3, 2),
            "acc": 0.1,
            "acc_norm": round(value + 0.3, 2),
            "counts": {"items": 10},
            "num_fewshot": 10,
        },
    )
    subjects = {
        "anatomy": {"acc": 0.5, "acc_norm": 0.25, "items": 4},
        "astronomy": {"acc": 0.7, "acc_norm": 0.25, "items": 1},
    }
    write_json(
        folder / "mc-mmlu" / "results.json",
        {
            "preset": "mmlu",
            "metric": "acc",
            "score": 0.6,
            "acc": 0.6,  # (0.5 + 0.7) / 2
            "acc_weighted": 0.54,  # (4 * 0.5 + 0.7) / 5
            "acc_norm": 0.25,
            "subjects": subjects,
            "counts": {"items": 5},
            "num_fewshot": 5,
        },
    )
    write_json(
        folder / "mc-truthfulqa" / "results.json",
        {
            "preset": "truthfulqa",
            "metric": "mc2",
            "score": round(value + 0.1, 2),
            "acc": 0.2,
            "acc_norm": 0.21,
            "mc1": 0.2,
            "mc2": round(value + 0.1, 2),
            "counts": {"items": 10},
            "num_fewshot": 0,
        },
    )


def write_evaluations(run: Path) -> None:
    """Every model's multiple choice, MT-Bench, AlpacaEval (one stage failed) and sample answers."""
    acc_norm = {"base": 0.40, "sft": 0.42, "dpo": 0.48, "dpo_only": 0.45, "beta_0.01": 0.47}
    for model, value in acc_norm.items():
        folder = run / "eval" / model
        write_mc_results(folder, value)
        write_json(
            folder / "mt-bench" / "results.json",
            {
                "judge": "asset:smollm2-135m-instruct",
                "score": 5.0 + acc_norm[model],
                "n_scored": 4,
                "n_failed": 0,
                "turns": {"1": {"score": 6.0}, "2": {"score": 4.0 + 2 * acc_norm[model]}},
                "categories": {"writing": {"score": 6.5}, "math": {"score": 2.0}, "coding": {"score": 3.25}},
            },
        )
        if model != "dpo_only":  # its AlpacaEval stage failed (see the manifest)
            write_json(
                folder / "alpaca-eval" / "results.json",
                {
                    "judge": "j",
                    "win_rate": 100 * acc_norm[model],
                    "standard_error": 4.5,
                    "length_controlled_winrate": 41.0,
                    "lc_standard_error": 1.5,
                    "n_wins": 8,
                    "n_wins_base": 10,
                    "n_draws": 2,
                },
            )
        answers = {
            PROMPTS[0]: f"2, 3, 5 says {model}",
            PROMPTS[1]: XSS if model == "dpo" else f"{model} on DPO",
        }
        if model == "base":
            answers.pop(PROMPTS[1])
        write_lines(
            folder / "samples.jsonl", [{"prompt": p, "answer": a, "model": model} for p, a in answers.items()]
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def written(run, tmp_path_factory):
    """The report of the run, written once for the module: drawing the page's plots takes seconds."""
    return write_report(run, tmp_path_factory.mktemp("out"))


@pytest.fixture
def report(written):
    """report.json as written (a fresh copy per test: some tests change it)."""

    def reject(name):
        raise AssertionError(f"{name} in report.json")

    return json.loads(written.json.read_text(encoding="utf-8"), parse_constant=reject)


def row(report, model):
    return next(r for r in report["comparison"]["rows"] if r["model"] == model)


# ---------------------------------------------------------------------------------------------------------
# Collecting


def test_comparison_table_has_a_row_per_model_and_a_column_per_metric(report):
    table = report["comparison"]
    assert [r["model"] for r in table["rows"]] == ["base", "sft", "dpo", "dpo_only", "beta_0.01"]
    assert [r["label"] for r in table["rows"]] == [
        "base",
        "SFT only",
        "full",
        "DPO without SFT",
        "full, beta=0.01",
    ]
    assert [c["key"] for c in table["columns"]] == [
        "mc/arc/acc_norm",
        "mc/hellaswag/acc_norm",
        "mc/mmlu/acc",  # each preset's own metric, though every set has acc_norm
        "mc/truthfulqa/mc2",
        "open_llm/average",
        "mt_bench/overall",
        "mt_bench/turn_1",
        "mt_bench/turn_2",
        "alpaca_eval/win_rate",
        "alpaca_eval/lc_win_rate",
        "dpo/eval_reward_accuracy",
        "dpo/eval_reward_margin",
        "sft/eval_loss",
    ]
    dpo_only = row(report, "dpo_only")["values"]
    # In percent; float64 products and a mean of four near 100: a few ulps of 1.4e-14
    assert dpo_only["mc/arc/acc_norm"] == pytest.approx(45.0, abs=1e-12)
    assert dpo_only["mc/hellaswag/acc_norm"] == pytest.approx(75.0, abs=1e-12)
    assert dpo_only["mc/mmlu/acc"] == pytest.approx(60.0, abs=1e-12)  # unweighted over subjects, not 54
    assert dpo_only["mc/truthfulqa/mc2"] == pytest.approx(55.0, abs=1e-12)
    assert dpo_only["open_llm/average"] == pytest.approx((45 + 75 + 60 + 55) / 4, abs=1e-12)  # 58.75
    assert dpo_only["mt_bench/overall"] == pytest.approx(5.45)
    assert dpo_only["mt_bench/turn_2"] == pytest.approx(4.9)
    assert dpo_only["alpaca_eval/win_rate"] is None  # its stage failed
    assert dpo_only["dpo/eval_reward_accuracy"] == 0.6  # the last eval line, not the best (0.625)
    assert dpo_only["dpo/eval_reward_margin"] == 0.07
    assert dpo_only["sft/eval_loss"] is None
    assert row(report, "dpo")["values"]["dpo/eval_reward_accuracy"] == 0.75
    assert row(report, "beta_0.01")["values"]["dpo/eval_reward_margin"] == 0.03
    sft = row(report, "sft")
    assert sft["values"]["sft/eval_loss"] == 1.25
    assert sft["values"]["dpo/eval_reward_accuracy"] is None
    assert sft["values"]["alpaca_eval/win_rate"] == 42.0
    assert sft["stderr"]["alpaca_eval/win_rate"] == 4.5
    assert sft["stderr"]["mc/arc/acc_norm"] == pytest.approx(11.0, abs=1e-12)
    assert row(report, "base")["values"]["mt_bench/turn_1"] == 6.0


def test_models_and_their_sources(report):
    models = {m["name"]: m for m in report["models"]}
    assert models["base"]["source"] == "asset:smollm2-135m-instruct"
    assert models["dpo_only"]["source"] == "ablations/dpo_only/final"
    assert models["dpo_only"]["start"] == "base"
    assert models["beta_0.01"]["overrides"] == ["beta=0.01"]


def test_training_curves_by_column_with_one_eval_point_per_step():
    lines = [
        {"step": 1, "loss": 2.0, "lr": 1.0},
        {"step": 2, "eval/loss": 1.5},
        {"step": 2, "loss": 1.0, "lr": 0.5, "grad_norm": 3.0},
        {"step": 2, "eval/loss": 1.25},
        {"step": 4, "eval/loss": 1.0},
    ]
    curves = training_curves(lines)
    assert curves["train"] == {"step": [1, 2], "loss": [2.0, 1.0], "lr": [1.0, 0.5], "grad_norm": [None, 3.0]}
    assert curves["eval"] == {"step": [2, 4], "eval/loss": [1.25, 1.0]}
    assert curves["last_train"] == {"step": 2, "loss": 1.0, "lr": 0.5, "grad_norm": 3.0}
    assert curves["last_eval"] == {"step": 4, "eval/loss": 1.0}
    assert curves["steps"] == 4


def test_training_section_of_a_run(report):
    dpo = report["training"]["dpo"]
    assert dpo["kind"] == "dpo" and dpo["stage"] == "dpo"
    assert dpo["train"]["rewards/margins"] == [0.1, 0.2, 0.3, 0.4]
    assert dpo["eval"]["eval/rewards/accuracies"] == [0.5, 0.75]
    assert report["training"]["beta_0.01"]["stage"] == "ablations/beta_0.01"
    assert "base" not in report["training"]


def test_samples_side_by_side_in_recipe_order(report):
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS
    assert samples[0]["answers"]["dpo_only"] == "2, 3, 5 says dpo_only"
    assert samples[1]["answers"]["base"] is None
    assert samples[1]["answers"]["dpo"] == XSS


def test_data_statistics_stages_config_versions(report):
    data = report["data"]
    assert [s["removed"] for s in data["curate"]["steps"]] == [3, 2]
    assert data["feedback"]["parse_failures"]["failed"] == {"no_rating": 2, "out_of_range": 1}
    assert data["generate"]["written"] == 11
    assert set(data["dpo_data"]) == {"dpo", "dpo_only", "beta_0.01"}
    assert report["images"] == {"feedback_ratings": "feedback/ratings.png"}
    assert report["config"]["recipe"]["run"]["ablations"][0]["name"] == "dpo_only"
    assert report["versions"]["torch"] == "2.13.0"
    feedback = next(s for s in report["stages"] if s["id"] == "feedback")
    assert (feedback["status"], feedback["seconds"], feedback["attempts"]) == ("done", 40.0, 2)


def test_a_failed_stage_is_missing_with_its_error(report):
    assert report["missing"] == [
        {
            "path": "eval/dpo_only/alpaca-eval/results.json",
            "reason": "stage eval/dpo_only/alpaca-eval failed: judge timed out",
        }
    ]


# ---------------------------------------------------------------------------------------------------------
# Markdown


def test_markdown_comparison_row_and_sections(report):
    md = render_markdown(report)
    assert (
        "| dpo_only | DPO without SFT | 45.00 ± 11.00 | 75.00 | 60.00 | 55.00 | 58.75 | 5.45 | 6.00 | 4.90 | – | – "
        "| 0.6000 | 0.0700 | – |" in md
    )
    # the best value of a column is bold: dpo's acc_norm 48%, sft's held-out loss (the only one: not bold)
    assert "| dpo | full | **48.00 ± 11.00** |" in md
    assert "| 1.2500 |" in md and "**1.2500**" not in md
    for heading in ("## Missing", "## Stages", "## Comparison", "## Evaluation", "## Training"):
        assert heading in md
    for heading in ("## Sample answers", "## Data", "## Config", "## Versions"):
        assert heading in md
    assert "| refusals | 3 | 8 | 7 built-in patterns |" in md
    assert "| no_rating | 2 |" in md
    assert (
        "eval/dpo_only/alpaca-eval/results.json: stage eval/dpo_only/alpaca-eval failed: judge timed out"
        in md
    )
    assert "| feedback | done | 40.0 | 2 |  |" in md


def test_markdown_keeps_model_text_inert(report):
    md = render_markdown(report)
    # Answers sit in fenced code blocks, verbatim; everywhere else < and > are entities.
    assert f"```\n{XSS}\n```" in md
    assert md.count("<script>") == 1


def test_fence_is_longer_than_any_backticks_in_the_answer(report):
    report["samples"][0]["answers"]["sft"] = "```python\nprint(1)\n```"
    md = render_markdown(report)
    assert "````\n```python\nprint(1)\n```\n````" in md


def test_fmt():
    assert [fmt(None), fmt(True), fmt(3), fmt(0.123456), fmt(1234.56), fmt(0.5, 2)] == [
        "–",
        "yes",
        "3",
        "0.1235",
        "1234.6",
        "0.50",
    ]


# ---------------------------------------------------------------------------------------------------------
# HTML


def data_images(page: str) -> list[bytes]:
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    return [base64.b64decode(s.removeprefix("data:image/png;base64,"), validate=True) for s in sources]


def assert_png(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.format == "PNG"
    return image.size


def test_html_is_self_contained_escaped_and_has_the_plots(written):
    page = written.html.read_text(encoding="utf-8")
    images = data_images(page)
    # 4 training runs, DPO runs side by side, MC, MT-Bench categories, AlpacaEval, ratings.png
    assert len(images) == 9
    sizes = [assert_png(png) for png in images]
    assert sizes[-1] == (3, 2)  # ratings.png embedded as it is
    assert all(w > 200 and h > 100 for w, h in sizes[:-1])
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)  # nothing to fetch: data URIs and anchors only
    assert "Content-Security-Policy" in page
    assert 'href="#comparison"' in page and 'id="comparison"' in page


def test_a_plot_that_fails_leaves_a_note(report):
    report["training"] = {"dpo": report["training"]["dpo"] | {"train": ["not", "columns"]}}
    report["eval"] = {
        "base": {"mc": {"arc": {"metric": "acc_norm", "acc_norm": "oops"}}},
        "sft": {"mc": {"arc": {"metric": "acc_norm", "acc_norm": 0.5}}},
    }
    report["data"] = {}
    page = render_html(report, {})
    assert len(data_images(page)) == 1  # the MC bars: a value that is not a number is drawn as 0
    assert page.count("plot not drawn") == 1  # the broken training run


# ---------------------------------------------------------------------------------------------------------
# Writing, partial runs, the CLI


def test_written_files_and_strict_json(written, report):
    assert written.json.parent == written.md.parent == written.html.parent
    assert [written.json.name, written.md.name, written.html.name] == [
        "report.json",
        "report.md",
        "report.html",
    ]
    assert report["training"]["sft"]["train"]["grad_norm"] == [
        None,
        4.0,
    ]  # NaN is null (the fixture rejects NaN)
    assert report["comparison"]["rows"][3]["values"]["mc/arc/acc_norm"] == pytest.approx(45.0, abs=1e-12)
    assert written.md.read_text(encoding="utf-8") == render_markdown(report)
    assert sorted(p.name for p in written.json.parent.iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]


def test_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "partial"
    (run / "sft").mkdir(parents=True)
    (run / "recipe.yaml").write_text(
        yaml.safe_dump({"run": {"stages": ["sft", "dpo", "eval"]}, "eval": {"mc": [{"name": "arc"}]}})
    )
    write_json(run / "manifest.json", {"stages": {"sft": {"status": "running", "seconds": None}}})
    # a run still writing: the last line is cut
    (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "lr": 1e-5}\n{"step": 2, "lo')
    paths = write_report(run)
    assert paths.html == run / "report.html"
    report = json.loads(paths.json.read_text())
    missing = {m["path"]: m["reason"] for m in report["missing"]}
    assert missing == {
        "sft/metrics.jsonl": "1 unreadable line(s) skipped (first: line 2)",
        "dpo/metrics.jsonl": "stage dpo has not run",
        "dpo/dpo_data.json": "stage dpo has not run",
        "eval/base/mc-arc/results.json": "stage eval/base/mc-arc has not run",
        "eval/sft/mc-arc/results.json": "stage eval/sft/mc-arc has not run",
        "eval/dpo/mc-arc/results.json": "stage eval/dpo/mc-arc has not run",
    }
    assert report["training"]["sft"]["train"]["loss"] == [2.5]
    assert [r["model"] for r in report["comparison"]["rows"]] == ["base", "sft", "dpo"]
    assert report["comparison"]["columns"] == []
    md = paths.md.read_text()
    assert "This report is partial" in md and "No evaluation or training metrics yet." in md
    assert len(data_images(paths.html.read_text())) == 1  # the SFT curves


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            None,
            [
                "sft/metrics.jsonl",
                "dpo/metrics.jsonl",
                "ablations/a1/metrics.jsonl",
                "dpo/dpo_data.json",
                "ablations/a1/dpo_data.json",
            ],
        ),
        (["sft", "dpo"], ["sft/metrics.jsonl", "dpo/metrics.jsonl", "dpo/dpo_data.json"]),
    ],
)
def test_expected_stages_follow_the_pipeline(tmp_path, stages, expected):
    """Without run.stages every stage with a section runs (ablations with dpo); with it, only those listed."""
    run_section = {"ablations": [{"name": "a1", "start": "base"}]} | ({"stages": stages} if stages else {})
    recipe = {"run": run_section, "sft": {"model": "m"}, "dpo": {"beta": 0.1}, "eval": None}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_json(tmp_path / "manifest.json", {"stages": {}})
    report = collect_report(tmp_path)
    assert [m["path"] for m in report["missing"]] == expected
    assert all(m["reason"].endswith("has not run") for m in report["missing"])


def test_empty_and_broken_folders_still_report(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    report = collect_report(run)
    assert [m["path"] for m in report["missing"]] == ["manifest.json", "recipe.yaml"]
    (run / "manifest.json").write_text("{not json")
    (run / "recipe.yaml").write_text("- a list\n")
    write_json(run / "eval" / "sft" / "mc-arc" / "results.json", [1, 2])
    report = collect_report(run)
    reasons = {m["path"]: m["reason"] for m in report["missing"]}
    assert reasons["manifest.json"].startswith("unreadable: not valid JSON")
    assert reasons["recipe.yaml"] == "unreadable: not a mapping of stage sections"
    assert reasons["eval/sft/mc-arc/results.json"] == "unreadable: not a JSON object"
    assert render_markdown(report).startswith("# zephyr report: empty")
    assert render_html(report).startswith("<!DOCTYPE html>")


def test_no_run_folder_is_a_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match="no such run folder"):
        collect_report(tmp_path / "nope")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "warning" not in capsys.readouterr().err  # the error alone


def test_cli_prints_the_page(tmp_path, capsys):
    run = tmp_path / "run"
    write_lines(run / "dpo" / "metrics.jsonl", dpo_lines([0.5, 1.0], [0.1, 0.2], [0.5], [0.1]))
    assert main(["report", str(run), "--out", str(tmp_path / "site")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "site" / "report.html")
    report = json.loads((tmp_path / "site" / "report.json").read_text())
    assert report["comparison"]["rows"] == [
        {
            "model": "dpo",
            "label": "full",
            "values": {"dpo/eval_reward_accuracy": 0.5, "dpo/eval_reward_margin": 0.1},
            "stderr": {},
        }
    ]


def test_comparison_table_is_pure():
    models = [{"name": "sft", "label": "SFT only"}, {"name": "x", "label": "x"}]
    pairwise = {"mode": "pairwise", "win_rate": 0.7, "turns": {"1": {"win_rate": 0.6}}}  # no MT-Bench score
    hs = {"metric": "acc_norm", "acc": 0.75, "acc_norm": 0.25, "acc_norm_stderr": 0.5}
    evals = {"x": {"mc": {"hs": hs}, "mt_bench": pairwise}}
    training = {
        "sft": {"kind": "sft", "last_eval": {"eval/loss": 2.0}},
        "x": {"kind": "dpo", "last_eval": {}},
    }
    table = comparison_table(models, evals, training)
    assert [c["key"] for c in table["columns"]] == ["mc/hs/acc_norm", "sft/eval_loss"]
    assert table["rows"][0]["values"] == {"mc/hs/acc_norm": None, "sft/eval_loss": 2.0}
    assert table["rows"][1]["values"] == {"mc/hs/acc_norm": 25.0, "sft/eval_loss": None}  # in percent
    assert table["rows"][1]["stderr"] == {"mc/hs/acc_norm": 50.0}


# ---------------------------------------------------------------------------------------------------------
# In a browser


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian's `chromium` package)")
def test_page_renders_in_headless_chromium(written, tmp_path):
    url = written.html.resolve().as_uri()
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    dom = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, profile, "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Console messages (script errors, CSP violations, failed loads) are logged as CONSOLE lines.
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    images = data_images(dom.stdout)
    assert len(images) == 9
    for png in images:
        assert_png(png)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout and "alert(1)</script>" not in dom.stdout

    # The plots are painted: matplotlib's first colour (#1f77b4) is on screen, and the page uses it nowhere else.
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, profile, f"--screenshot={shot}", "--window-size=1400,6000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").tobytes()
    blue = sum(
        1
        for i in range(0, len(pixels), 3)
        if abs(pixels[i] - 0x1F) + abs(pixels[i + 1] - 0x77) + abs(pixels[i + 2] - 0xB4) < 12
    )
    assert blue > 500


def test_pairwise_mt_bench_results_are_not_read_as_scores():
    single = {"score": 7.0, "turns": {"1": {"score": 8.0}}, "categories": {"math": {"score": 6.0}}}
    pairwise = {
        "mode": "pairwise",
        "turns": {"1": {"win_rate": 0.6}},
        "categories": {"math": {"win_rate": 1.0}},
    }
    report = {"name": "r", "models": [{"name": "x", "label": "x"}], "eval": {"x": {"mt_bench": single}}}
    assert "| x | 7.00 | 8.00 | – |" in render_markdown(report)
    report["eval"]["x"]["mt_bench"] = pairwise
    assert "MT-Bench" not in render_markdown(report)


def test_the_report_step_that_writes_the_page_is_not_shown_as_running():
    from zephyr.stages.report.collect import _stage_rows

    rows = _stage_rows({"sft": {"status": "running"}, "report": {"status": "running"}})
    assert [r["status"] for r in rows] == ["running", "writing this report"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("needs >= 5 parsed annotations", "needs >= 5 parsed annotations"),  # readable in the raw file
        ("<script>alert(1)</script>", "&lt;script>alert(1)&lt;/script>"),  # no HTML
        ("Q&A, &amp; and &#60;", "Q&A, &amp;amp; and &amp;#60;"),  # an entity shows as written
        ("> not a quote", "\\> not a quote"),
        ("a | b\n c", "a \\| b c"),  # one table cell, one line
    ],
)
def test_markdown_text_by_hand(text, expected):
    from zephyr.stages.report.markdown import md_text

    assert md_text(text) == expected


def test_zephyr_report_warns_about_a_folder_that_is_not_a_run(tmp_path, capsys):
    from zephyr.cli import main

    (tmp_path / "sft").mkdir()
    assert main(["report", str(tmp_path / "sft")]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"warning: {tmp_path / 'sft'} has no manifest.json: not a `zephyr run` folder; the report lists what it "
        "lacks\n"
    )
    assert captured.out.splitlines()[-1] == str(tmp_path / "sft" / "report.html")


def test_feedback_section_shows_the_judges_position_bias_and_the_tokens():
    feedback = {
        "position_effect": {
            "first": {"0": 1.9, "1": 3.4},
            "final": {"0": 2.6, "1": 2.65},
            "first_spread": 1.5,
            "final_spread": 0.05,
            "removed": 0.9667,
        },
        "chosen_position": {"pairs": 2, "shown_first": 0.25, "shown_last": 0.75, "expected": 0.5},
        "usage": {
            "generators": {
                "g": {"completions": 2, "prompt_tokens": 200, "completion_tokens": 20, "cost": 0.01}
            },
            "judge": {"j": {"calls": 2, "prompt_tokens": 900, "completion_tokens": 0, "cost": None}},
            "total_cost": 0.01,
        },
    }
    text = render_markdown({"name": "r", "data": {"feedback": feedback}})
    assert "spread of the mean rating by position 1.5 for one judgment, 0.05 for the kept rating" in text
    assert "| Output 2 | 3.4 | 2.65 |" in text
    assert "shown first in 0.25 and last in 0.75 of its judgments (a judge blind to position: 0.5)" in text
    assert "| g | generator | 200 | 20 | 0.01 |" in text and "| j | judge | 900 | 0 | – |" in text
