"""The report laid out as blocks, in reading order: `report_blocks(report)` is pure, the report dict in,
blocks out; `render_markdown` and `render_html` draw the same blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zephyr.stages.report.blocks import (
    Answers,
    Block,
    Code,
    Figure,
    Heading,
    Items,
    Table,
    Text,
    _key_values,
    _section,
    fmt,
)
from zephyr.stages.report.collect import IMAGES
from zephyr.stages.report.eval_layout import _alpaca_eval_blocks, _mc_blocks, _mt_bench_blocks
from zephyr.stages.report.values import _get, _mapping, _number


def report_blocks(report: Mapping[str, Any]) -> list[Block]:
    """The report as blocks, in reading order: summary, what is missing, stages, the comparison table,
    evaluations, training curves, sample answers, data statistics, config and versions."""
    blocks: list[Block] = [Heading(f"zephyr report: {report.get('name', '')}", 1)]
    blocks += _summary_blocks(report)
    for part in (
        _missing_blocks,
        _stage_blocks,
        _comparison_blocks,
        _eval_blocks,
        _training_blocks,
        _regression_blocks,
        _sample_blocks,
        _data_blocks,
        _config_blocks,
    ):
        blocks += part(report)
    return blocks


def _labels(report: Mapping[str, Any]) -> dict[str, str]:
    return {m["name"]: m["label"] for m in report.get("models", [])}


def _summary_blocks(report: Mapping[str, Any]) -> list[Block]:
    facts = [
        f"Run folder: {report.get('run_dir')}",
        f"Recipe: {report.get('recipe_path') or '–'}",
        f"Created {report.get('created') or '–'}, updated {report.get('updated') or '–'}; "
        f"report generated {report.get('generated')}.",
    ]
    models = report.get("models", [])
    if models:
        described = [
            f"{m['name']} ({m['label']}{': ' + m['source'] if m.get('source') else ''})" for m in models
        ]
        facts.append("Models: " + "; ".join(described) + ".")
    return [Items(facts)]


def _missing_blocks(report: Mapping[str, Any]) -> list[Block]:
    missing = report.get("missing", [])
    if not missing:
        return []
    return [
        _section("Missing"),
        Text("This report is partial: these files are absent or unreadable."),
        Items([f"{m['path']}: {m['reason']}" for m in missing]),
    ]


def _stage_blocks(report: Mapping[str, Any]) -> list[Block]:
    stages = report.get("stages", [])
    if not stages:
        return []
    rows = [
        [s["id"], fmt(s["status"]), fmt(_number(s["seconds"]), 1), fmt(s["attempts"]), _short(s["error"])]
        for s in stages
    ]
    return [_section("Stages"), Table(["stage", "status", "seconds", "attempts", "error"], rows)]


def _short(text: Any, limit: int = 240) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _best_cells(rows: Sequence[Sequence[float | None]], higher: Sequence[bool], offset: int) -> set:
    """(row, column) of the best value of every column that has two or more different values."""
    strong = set()
    for j, better_high in enumerate(higher):
        values = [(value, i) for i, row in enumerate(rows) if (value := row[j]) is not None]
        if len({v for v, _ in values}) >= 2:  # a tie of every value marks nothing
            best = (max if better_high else min)(v for v, _ in values)
            strong |= {(i, j + offset) for v, i in values if v == best}
    return strong


def _comparison_blocks(report: Mapping[str, Any]) -> list[Block]:
    table = report.get("comparison") or {}
    columns, rows = table.get("columns", []), table.get("rows", [])
    if not columns or not rows:
        return [_section("Comparison"), Text("No evaluation or training metrics yet.")]
    cells = []
    for row in rows:
        line = [row["model"], row["label"]]
        for c in columns:
            text = fmt(row["values"].get(c["key"]), c["digits"])
            se = row["stderr"].get(c["key"])
            if se is not None and row["values"].get(c["key"]) is not None:
                text += f" ± {fmt(se, c['digits'])}"
            line.append(text)
        cells.append(line)
    # The best of the run's own models is bold; reference rows (listed last) are there to compare against.
    numbers = [[row["values"].get(c["key"]) for c in columns] for row in rows if not row.get("reference")]
    strong = _best_cells(numbers, [c["higher_is_better"] for c in columns], 2)
    text = "One row per model of the run, one column per metric; the best value of the run's models is bold."
    if any(row.get("reference") for row in rows):
        text += " Reference rows (published numbers, with their source) follow the run's models."
    if any(c["group"] == "multiple choice" for c in columns):
        text += (
            " Multiple choice: each set's headline metric in percent (ARC and HellaSwag acc_norm, MMLU acc as"
            " the unweighted mean of its subjects, TruthfulQA mc2); the Open LLM v1 average is the mean of"
            " the four."
        )
    return [
        _section("Comparison"),
        Text(text),
        Table(["model", "what it is", *(c["label"] for c in columns)], cells, strong),
    ]


def _eval_blocks(report: Mapping[str, Any]) -> list[Block]:
    evals, labels = report.get("eval", {}), _labels(report)
    if not evals:
        return []
    blocks: list[Block] = [_section("Evaluation")]
    blocks += _mc_blocks(evals, labels)
    blocks += _mt_bench_blocks(evals, labels)
    blocks += _alpaca_eval_blocks(evals, labels)
    return blocks


_TRAINING_SUMMARY = (
    "loss",
    "lr",
    "grad_norm",
    "rewards/accuracies",
    "rewards/margins",
    "tokens_per_s",
    "peak_mem_gib",
)


def _training_blocks(report: Mapping[str, Any]) -> list[Block]:
    training, labels = report.get("training", {}), _labels(report)
    if not training:
        return []
    blocks: list[Block] = [_section("Training")]
    keys = [
        k for k in _TRAINING_SUMMARY if any(k in _mapping(t.get("last_train")) for t in training.values())
    ]
    eval_keys = list(dict.fromkeys(k for t in training.values() for k in _mapping(t.get("last_eval"))))
    eval_keys = [k for k in eval_keys if k.startswith("eval/")]
    rows = [
        [
            model,
            t["stage"],
            fmt(t.get("steps")),
            *(fmt(_number(_get(t, "last_train", k))) for k in keys),
            *(fmt(_number(_get(t, "last_eval", k))) for k in eval_keys),
        ]
        for model, t in training.items()
    ]
    blocks.append(Text("Last training line and last held-out eval of each run."))
    blocks.append(Table(["model", "folder", "steps", *keys, *eval_keys], rows))
    for model, t in training.items():
        caption = f"{model} ({labels.get(model, model)}): {t['stage']}/metrics.jsonl"
        blocks.append(Figure("training", caption, {"model": model, **t}))
    dpo_runs = {labels.get(m, m): t for m, t in training.items() if t.get("kind") == "dpo"}
    if len(dpo_runs) > 1:
        blocks.append(Figure("dpo_runs", "DPO runs side by side", dpo_runs))
    return blocks


def _regression_blocks(report: Mapping[str, Any]) -> list[Block]:
    """The regression check (`zephyr.stages.report.regression`): fixed factual prompts, every model's greedy
    answer side by side, and each trained model's drift on the held-out dSFT data."""
    check, labels = _mapping(report.get("regression")), _labels(report)
    prompts, answers = check.get("prompts") or [], _mapping(check.get("answers"))
    if not prompts or not answers:
        return []
    right, lost = _mapping(check.get("right")), _mapping(check.get("regressions"))
    verdicts = []
    for model, indices in lost.items():
        wrong = [str(prompts[i]["prompt"]) for i in indices if isinstance(i, int) and i < len(prompts)]
        start = _get(check, "drift", model, "start")
        verdicts.append(
            f"{model} ({labels.get(model, model)}): REGRESSED on {len(wrong)} prompt(s) its start model "
            f"({start}) answered right: {'; '.join(wrong)}"
            if wrong
            else f"{model} ({labels.get(model, model)}): every prompt its start model ({start}) answered right "
            "is still right"
        )
    blocks: list[Block] = [
        _section("Regression check"),
        Text(
            "Fixed factual prompts answered greedily by every model; an answer is right (✓) when it holds an "
            "expected word. A trained model must keep what the model it started from got right."
        ),
    ]
    if verdicts:
        blocks.append(Items(verdicts))
    for number, item in enumerate(prompts, start=1):
        expected = ", ".join(str(w) for w in item.get("expected") or [])
        shown = []
        for model, texts in answers.items():
            ok = _get(right, model)
            mark = "✓" if isinstance(ok, list) and number - 1 < len(ok) and ok[number - 1] else "✗"
            text = texts[number - 1] if isinstance(texts, list) and number - 1 < len(texts) else None
            shown.append((f"{mark} {model} ({labels.get(model, model)})", text))
        blocks.append(Answers(f"{item.get('prompt')} (expected: {expected})", shown, number))
    if drift := _mapping(check.get("drift")):
        rows = [
            [
                m,
                fmt(d.get("start")),
                fmt(d.get("mean_logp")),
                fmt(d.get("start_mean_logp")),
                fmt(d.get("change")),
            ]
            for m, d in drift.items()
            if isinstance(d, Mapping)
        ]
        blocks += [
            Text(
                f"Drift on the held-out dSFT data ({fmt(check.get('held_out'))}): mean log-prob per answer "
                "token under each trained model and under the model it started from. Near 0: it still writes "
                "the dSFT data as before; strongly negative: it has moved away from it."
            ),
            Table(["model", "start", "mean log-prob", "start's", "change"], rows),
        ]
    return blocks


def _sample_blocks(report: Mapping[str, Any]) -> list[Block]:
    samples, labels = report.get("samples", []), _labels(report)
    if not samples:
        return []
    blocks: list[Block] = [_section("Sample answers"), Text("The same prompts answered by every model.")]
    for number, sample in enumerate(samples, start=1):
        answers = [(f"{m} ({labels.get(m, m)})", a) for m, a in sample["answers"].items()]
        blocks.append(Answers(sample["prompt"], answers, number))
    return blocks


def _data_blocks(report: Mapping[str, Any]) -> list[Block]:
    data = report.get("data", {})
    if not data:
        return []
    blocks: list[Block] = [_section("Data")]
    if summary := data.get("generate"):
        blocks += [Heading("dSFT data generation", 3, "generation"), _key_values(summary)]
    if curation := data.get("curate"):
        blocks += _curation_blocks(curation)
    if feedback := data.get("feedback"):
        blocks += _feedback_blocks(feedback, "feedback_ratings" in report.get("images", {}))
    if dpo_data := data.get("dpo_data"):
        keys = list(
            dict.fromkeys(k for d in dpo_data.values() for k in d if not isinstance(d[k], (dict, list)))
        )
        rows = [[model, *(fmt(d.get(k)) for k in keys)] for model, d in dpo_data.items()]
        rows_status = [[model, fmt(d.get("reference_status"))] for model, d in dpo_data.items()]
        blocks += [Heading("DPO data", 3, "dpo-data"), Table(["model", *keys], rows)]
        if any(d.get("reference_status") for d in dpo_data.values()):
            blocks.append(Table(["model", "reference log-probs"], rows_status))
    return blocks


def _curation_blocks(curation: Mapping[str, Any]) -> list[Block]:
    steps = [s for s in curation.get("steps") or [] if isinstance(s, Mapping)]
    blocks: list[Block] = [
        Heading("Curation", 3, "curation"),
        _key_values(
            curation, ["input", "records_read", "bad_records", "valid_records", "remaining", "train", "test"]
        ),
    ]
    if steps:
        rows = [
            [fmt(s.get("name")), fmt(s.get("removed")), fmt(s.get("remaining")), fmt(s.get("detail"))]
            for s in steps
        ]
        blocks += [
            Text("Rows removed by each filter, in order:"),
            Table(["filter", "removed", "remaining", "detail"], rows),
        ]
    if hits := _get(curation, "contamination", "hits"):
        blocks.append(Text(f"Decontamination: {len(hits)} eval prompt(s) found in the dialogues."))
    return blocks


def _feedback_blocks(stats: Mapping[str, Any], has_image: bool) -> list[Block]:
    blocks: list[Block] = [Heading("AI feedback", 3, "ai-feedback")]
    if judges := stats.get("judges"):
        blocks.append(Text("Judge: " + ", ".join(str(j) for j in judges)))
    if failures := _mapping(stats.get("parse_failures")):
        blocks.append(
            Text(f"Judge ratings read: {fmt(failures.get('parsed'))} of {fmt(failures.get('total'))}.")
        )
        blocks.append(
            Table(
                ["parse failure", "count"], [[k, fmt(v)] for k, v in _mapping(failures.get("failed")).items()]
            )
        )
    histograms = _mapping(_get(stats, "histograms", "by_aspect"))
    if histograms:
        buckets = list(dict.fromkeys(b for h in histograms.values() for b in _mapping(h)))
        rows = [[b, *(fmt(_get(histograms, a, b)) for a in histograms)] for b in buckets]
        blocks += [Text("Ratings per aspect:"), Table(["rating", *histograms], rows)]
    if models := _mapping(stats.get("models")):
        rows = [
            [m, fmt(_get(v, "completions")), fmt(_get(v, "rated")), fmt(_get(v, "mean_rating"))]
            for m, v in models.items()
        ]
        blocks.append(Table(["generator", "completions", "rated", "mean rating"], rows))
    if binarization := _mapping(stats.get("binarization")):
        blocks.append(
            Text(
                f"Binarization: {fmt(binarization.get('kept'))} pairs from {fmt(binarization.get('total'))} prompts."
            )
        )
        blocks.append(
            Table(
                ["dropped because", "prompts"],
                [[k, fmt(v)] for k, v in _mapping(binarization.get("dropped")).items()],
            )
        )
    for key, title in (
        ("pairs", "Pairs"),
        ("split", "Split"),
        ("ties", "Ties"),
        ("agreement", "Agreement of repeated judgments"),
    ):
        if part := _mapping(stats.get(key)):
            blocks += [Text(f"{title}:"), _key_values(part)]
    if gen_failures := _mapping(stats.get("generation_failures")):
        blocks.append(Text(f"Completions that could not be generated: {fmt(gen_failures.get('total'))}."))
    blocks += _position_blocks(stats) + _usage_blocks(stats)
    if has_image:
        blocks.append(Figure("image", "Rating histograms (feedback/ratings.png)", IMAGES["feedback_ratings"]))
    elif _get(stats, "histograms", "by_aspect") is not None:
        blocks.append(Figure("ratings", "Rating histograms", stats["histograms"]))
    return blocks


def _position_blocks(stats: Mapping[str, Any]) -> list[Block]:
    """The judge's position bias, before and after the repeats, and where the chosen answers were shown."""
    effect, chosen = _mapping(stats.get("position_effect")), _mapping(stats.get("chosen_position"))
    first, final = _mapping(effect.get("first")), _mapping(effect.get("final"))
    if not first:
        return []
    rows = [[f"Output {int(p) + 1}", fmt(first.get(p)), fmt(final.get(p))] for p in first if str(p).isdigit()]
    blocks: list[Block] = [
        Text(
            f"Position bias of the judge: spread of the mean rating by position {fmt(effect.get('first_spread'))} "
            f"for one judgment, {fmt(effect.get('final_spread'))} for the kept rating (share removed by the "
            f"repeats: {fmt(effect.get('removed'))})."
        ),
        Table(["shown at (first repeat)", "one judgment", "kept rating"], rows),
    ]
    if chosen:
        blocks.append(
            Text(
                f"The chosen answer was shown first in {fmt(chosen.get('shown_first'))} and last in "
                f"{fmt(chosen.get('shown_last'))} of its judgments (a judge blind to position: "
                f"{fmt(chosen.get('expected'))})."
            )
        )
    return blocks


def _usage_blocks(stats: Mapping[str, Any]) -> list[Block]:
    """Tokens (and cost) per generator and for the judge."""
    usage = _mapping(stats.get("usage"))
    rows = [
        [name, role, fmt(_get(e, "prompt_tokens")), fmt(_get(e, "completion_tokens")), fmt(_get(e, "cost"))]
        for role, group in (("generator", usage.get("generators")), ("judge", usage.get("judge")))
        for name, e in _mapping(group).items()
    ]
    if not rows:
        return []
    total = usage.get("total_cost")
    return [
        Text("Tokens and cost" + ("" if total is None else f" (total ${fmt(total)})") + ":"),
        Table(["model", "role", "prompt tokens", "completion tokens", "cost (USD)"], rows),
    ]


def _config_blocks(report: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    text = _get(report, "config", "recipe_text")
    if text:
        blocks += [
            _section("Config"),
            Text("recipe.yaml, the resolved recipe of the run:"),
            Code(text, "yaml"),
        ]
    versions = report.get("versions") or {}
    if versions:
        blocks += [_section("Versions"), _key_values(versions)]
    return blocks
