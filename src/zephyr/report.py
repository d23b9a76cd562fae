"""`zephyr report RUN`: a run folder as `report.json`, `report.md` and one self-contained `report.html`.

Three steps, I/O at the edges:

1. `collect_report(run_dir)` reads what the run folder holds (manifest, recipe, training metrics, eval
   results, sample answers, data statistics) into one JSON-ready dict and lists what is missing, and why.
   A missing or unreadable file is an entry of `missing`, never an error: a partial run still has a report.
2. `report_blocks(report)` lays the report out as blocks (headings, tables, figures, answers side by side).
   `render_markdown` and `zephyr.report_html.render_html` render the same blocks, so the two files always
   say the same thing. Both are pure: the report dict in, text out.
3. `write_report(run_dir, out_dir)` writes the three files.

The run folder layout and the report's keys are described in docs/report.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from zephyr.config import STAGES
from zephyr.errors import DataError

REPORT_VERSION = 1
# The run's own models, in the order a reader compares them; ablations follow in recipe order.
RUN_MODELS = ("base", "sft", "dpo")
MODEL_LABELS = {"base": "base", "sft": "SFT only", "dpo": "full"}
# The files a stage must leave for the report to show it; their absence is listed in `missing`.
EXPECTED_FILES = {
    "generate": "generate/summary.json",
    "curate": "curate/curation_report.json",
    "feedback": "feedback/feedback_stats.json",
}
IMAGES = {"feedback_ratings": "feedback/ratings.png"}  # files of the run embedded in the HTML page
_EVAL_FOLDERS = {"mt_bench": "mt-bench", "alpaca_eval": "alpaca-eval"}


@dataclass(frozen=True)
class ReportPaths:
    """The three files `write_report` wrote."""

    json: Path
    md: Path
    html: Path


# ---------------------------------------------------------------------------------------------------------
# Collecting


def collect_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the report shows, read from the run folder `run_dir` (JSON-ready: NaN becomes None)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run}: no such run folder")
    reader = _Reader(run)
    manifest = reader.json("manifest.json", "written by `zephyr run`: no stage table and no versions")
    recipe_text = reader.text("recipe.yaml", "written by `zephyr run`: no config section")
    recipe = _parse_recipe(recipe_text, reader)
    reader.stages = _mapping(_mapping(manifest).get("stages"))
    plan = _plan(recipe, reader.stages, run)

    models = [
        {"name": m, **_describe_model(m, plan.ablations.get(m)), "source": _model_source(m, recipe)}
        for m in plan.models
    ]
    training = _collect_training(reader, plan)
    evals = {m: _collect_evals(reader, m, plan) for m in plan.models}
    evals = {m: e for m, e in evals.items() if e}
    samples = _collect_samples(reader, plan)
    report = {
        "report_version": REPORT_VERSION,
        "name": run.resolve().name,
        "run_dir": str(run.resolve()),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_path": _mapping(manifest).get("recipe"),
        "created": _mapping(manifest).get("created"),
        "updated": _mapping(manifest).get("updated"),
        "models": models,
        "stages": _stage_rows(reader.stages),
        "comparison": comparison_table(models, evals, training),
        "training": training,
        "eval": evals,
        "samples": samples,
        "data": _collect_data(reader, plan),
        "images": {key: rel for key, rel in IMAGES.items() if (run / rel).is_file()},
        "config": {"recipe": recipe, "recipe_text": recipe_text},
        "versions": _mapping(manifest).get("versions") or {},
        "missing": reader.missing,
    }
    return json_safe(report)


class _Reader:
    """Reads the files of a run folder. A file that is absent or unreadable becomes an entry of `missing`
    (with the reason: the state of the stage that should have written it), never an exception."""

    def __init__(self, run: Path):
        self.run = run
        self.stages: dict[str, Any] = {}
        self.missing: list[dict[str, str]] = []

    def lack(self, rel: str, reason: str) -> None:
        if not any(m["path"] == rel for m in self.missing):
            self.missing.append({"path": rel, "reason": reason})

    def why(self, *stage_ids: str) -> str:
        """Why a stage's output is absent, from the manifest entry of the first stage id it has."""
        for stage_id in stage_ids:
            entry = self.stages.get(stage_id)
            if isinstance(entry, Mapping):
                return _stage_state(stage_id, entry)
        return f"stage {stage_ids[0]} has not run"

    def text(self, rel: str, why: str | None) -> str | None:
        path = self.run / rel
        if not path.is_file():
            if why is not None:
                self.lack(rel, why)
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            self.lack(rel, f"unreadable: {exc}")
            return None

    def json(self, rel: str, why: str | None) -> dict[str, Any] | None:
        """A JSON object file; None when absent (listed in `missing` when `why` is given) or unreadable."""
        text = self.text(rel, why)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            self.lack(rel, f"unreadable: not valid JSON ({exc})")
            return None
        if not isinstance(value, dict):
            self.lack(rel, "unreadable: not a JSON object")
            return None
        return value

    def jsonl(self, rel: str, why: str | None) -> list[dict[str, Any]]:
        """The JSON object lines of a file. Lines that are not (a line cut by a run still writing) are
        skipped and counted in `missing`."""
        text = self.text(rel, why)
        records, bad = [], []
        for number, line in enumerate((text or "").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if isinstance(value, dict):
                records.append(value)
            else:
                bad.append(number)
        if bad:
            self.lack(rel, f"{len(bad)} unreadable line(s) skipped (first: line {bad[0]})")
        return records


def _stage_state(stage_id: str, entry: Mapping[str, Any]) -> str:
    status = entry.get("status")
    if status == "failed":
        return f"stage {stage_id} failed: {entry.get('error') or 'no error recorded'}"
    if status == "running":
        return f"stage {stage_id} is running (or stopped without recording it)"
    if status == "skipped":
        return f"stage {stage_id} was skipped"
    return f"stage {stage_id} is {status} but did not write it"


def _parse_recipe(text: str | None, reader: _Reader) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reader.lack("recipe.yaml", f"unreadable: not valid YAML ({exc})")
        return None
    if not isinstance(recipe, dict):
        reader.lack("recipe.yaml", "unreadable: not a mapping of stage sections")
        return None
    return recipe


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@dataclass
class _Plan:
    """What the run should hold: its stages, models and evaluations (from the recipe, else the manifest,
    else the folders present)."""

    stages: list[str]
    models: list[str]  # every model the run has or should have
    expected: list[str]  # the models the recipe (or manifest) asks for: their missing outputs are listed
    ablations: dict[str, dict[str, Any]]  # name -> {"start", "overrides"}
    mc_sets: list[str]
    evals: list[str]  # mt_bench, alpaca_eval: the ones the recipe asks for
    sample_prompts: list[str]


def _plan(recipe: dict[str, Any] | None, manifest_stages: Mapping[str, Any], run: Path) -> _Plan:
    recipe = recipe or {}
    run_section = _mapping(recipe.get("run"))
    ablations = {
        a["name"]: {"start": a.get("start", "sft"), "overrides": _strings(a.get("overrides"))}
        for a in run_section.get("ablations") or []
        if isinstance(a, dict) and isinstance(a.get("name"), str)
    }
    if recipe:
        # as `pipeline.stage_names`: run.stages, else every stage the recipe has a section for
        present = {s: recipe.get(s) is not None for s in STAGES}
        present["ablations"] = bool(ablations) and present["dpo"]
        stages = _strings(run_section.get("stages")) or [s for s in STAGES if present[s]]
    else:
        stages = list(dict.fromkeys(sid.split("/")[0] for sid in manifest_stages))
    eval_section = _mapping(recipe.get("eval"))
    expected = []
    if "eval" in stages:
        expected.append("base")
    expected += [m for m in ("sft", "dpo") if m in stages]
    if "ablations" in stages:
        expected += list(ablations)
    found = [sid.split("/")[1] for sid in manifest_stages if sid.count("/") >= 1]
    found += [name for folder in ("eval", "ablations") for name in _subdirs(run / folder)]
    found += [m for m in ("sft", "dpo") if (run / m / "metrics.jsonl").is_file()]
    return _Plan(
        stages=stages,
        models=_ordered_models([*expected, *found], list(ablations)),
        expected=expected,
        ablations=ablations,
        mc_sets=[m["name"] for m in eval_section.get("mc") or [] if isinstance(m, dict) and "name" in m],
        evals=[k for k in _EVAL_FOLDERS if eval_section.get(k) is not None] if "eval" in stages else [],
        sample_prompts=_strings(eval_section.get("sample_prompts")) if "eval" in stages else [],
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _ordered_models(names: Iterable[str], ablations: Sequence[str]) -> list[str]:
    unique = list(dict.fromkeys(n for n in names if n and n != "report"))
    first = [m for m in (*RUN_MODELS, *ablations) if m in unique]
    return first + sorted(set(unique) - set(first))


def _describe_model(name: str, ablation: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's label in the comparison table (the paper's words: SFT only, full, DPO without SFT)."""
    if name in MODEL_LABELS:
        return {"label": MODEL_LABELS[name], "kind": name}
    if ablation is None:
        return {"label": name, "kind": "ablation"}
    start, overrides = ablation["start"], ablation["overrides"]
    label = "DPO without SFT" if start == "base" else "full"
    if overrides:
        label += ", " + ", ".join(overrides)
    elif start != "base":
        label = name
    return {"label": label, "kind": "ablation", "start": start, "overrides": overrides}


def _model_source(name: str, recipe: Mapping[str, Any] | None) -> str | None:
    """Where a model comes from: the base model's spec, else its checkpoint folder in the run."""
    if name != "base":
        return f"{_training_folder(name)}/final"
    recipe = recipe or {}
    candidates = [
        _get(recipe, "run", "base_model"),
        _get(recipe, "sft", "model"),
        _get(recipe, "dpo", "model"),
    ]
    # "stage:NAME" points at another stage's output, not at the base model
    return next((c for c in candidates if isinstance(c, str) and not c.startswith("stage:")), None)


def _training_folder(model: str) -> str:
    return model if model in ("sft", "dpo") else f"ablations/{model}"


def _collect_training(reader: _Reader, plan: _Plan) -> dict[str, Any]:
    training = {}
    for model in plan.models:
        if model == "base":
            continue
        folder = _training_folder(model)
        lines = reader.jsonl(
            f"{folder}/metrics.jsonl", reader.why(folder) if model in plan.expected else None
        )
        if lines:
            kind = "sft" if model == "sft" else "dpo"
            training[model] = {"stage": folder, "kind": kind, **training_curves(lines)}
    return training


def training_curves(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Training and eval curves of a `metrics.jsonl` file, by column (`{"step": [...], "loss": [...]}`,
    None where a line lacks the key), with the last training line and the last eval line.

    An eval line that repeats a step (the final evaluation is logged again after the last step) replaces
    the earlier one, so each step has one eval point.
    """
    train = [line for line in lines if "loss" in line]
    by_step: dict[Any, Mapping[str, Any]] = {}
    for line in lines:
        if any(k.startswith("eval/") for k in line):
            by_step.pop(line.get("step"), None)
            by_step[line.get("step")] = line
    evals = list(by_step.values())
    return {
        "train": _columns(train),
        "eval": _columns(evals),
        "last_train": dict(train[-1]) if train else None,
        "last_eval": dict(evals[-1]) if evals else None,
        "steps": max((line["step"] for line in lines if _number(line.get("step")) is not None), default=0),
    }


def _columns(lines: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for line in lines for k in line))
    return {k: [line.get(k) for line in lines] for k in keys}


def _collect_evals(reader: _Reader, model: str, plan: _Plan) -> dict[str, Any]:
    folder = f"eval/{model}"
    expected = "eval" in plan.stages and model in plan.expected
    found_mc = [d.removeprefix("mc-") for d in _subdirs(reader.run / folder) if d.startswith("mc-")]
    result: dict[str, Any] = {}
    mc = {}
    for name in dict.fromkeys([*plan.mc_sets, *found_mc]):
        sub = f"mc-{name}"
        why = reader.why(f"{folder}/{sub}", folder) if expected and name in plan.mc_sets else None
        if (data := reader.json(f"{folder}/{sub}/results.json", why)) is not None:
            mc[name] = data
    if mc:
        result["mc"] = mc
    for key, sub in _EVAL_FOLDERS.items():
        why = reader.why(f"{folder}/{sub}", folder) if expected and key in plan.evals else None
        if (data := reader.json(f"{folder}/{sub}/results.json", why)) is not None:
            result[key] = data
    return result


def _collect_samples(reader: _Reader, plan: _Plan) -> list[dict[str, Any]]:
    """Sample answers side by side: one entry per prompt (recipe order first), each model's answer or None."""
    answers: dict[str, dict[str, str]] = {}
    for model in plan.models:
        expected = plan.sample_prompts and model in plan.expected
        why = reader.why(f"eval/{model}/samples", f"eval/{model}") if expected else None
        for line in reader.jsonl(f"eval/{model}/samples.jsonl", why):
            if isinstance(line.get("prompt"), str):
                answers.setdefault(line["prompt"], {})[model] = str(line.get("answer", ""))
    prompts = list(dict.fromkeys([*plan.sample_prompts, *answers]))
    return [{"prompt": p, "answers": {m: answers.get(p, {}).get(m) for m in plan.models}} for p in prompts]


def _collect_data(reader: _Reader, plan: _Plan) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for stage, rel in EXPECTED_FILES.items():
        value = reader.json(rel, reader.why(stage) if stage in plan.stages else None)
        if value is not None:
            data[stage] = value
    dpo_data = {}
    for model in plan.models:
        if model in ("base", "sft"):
            continue
        folder = _training_folder(model)
        value = reader.json(f"{folder}/dpo_data.json", reader.why(folder) if model in plan.expected else None)
        if value is not None:
            dpo_data[model] = value
    if dpo_data:
        data["dpo_data"] = dpo_data
    return data


def _stage_rows(stages: Mapping[str, Any]) -> list[dict[str, Any]]:
    keys = ("status", "seconds", "attempts", "started", "finished", "error")
    rows = [
        {"id": sid, **{k: entry.get(k) for k in keys}}
        for sid, entry in stages.items()
        if isinstance(entry, Mapping)
    ]
    for row in rows:  # `zephyr run` writes the report during its own step: that step is this page
        if row["id"] == "report" and row["status"] == "running":
            row["status"] = "writing this report"
    return rows


def json_safe(value: Any) -> Any:
    """`value` with only JSON types: NaN and infinities become None, tuples lists, keys strings, and
    anything else its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# The comparison table (the paper's ablations: one row per model, one column per metric)


@dataclass(frozen=True)
class _Metric:
    key: str
    label: str
    group: str
    digits: int
    higher_is_better: bool = True
    stderr: str | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _mt_bench(evals: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    """A model's MT-Bench scores: single-answer grading only (pairwise results hold win rates, no score)."""
    result = _get(evals, model, "mt_bench")
    return result if isinstance(result, dict) and result.get("mode", "single") == "single" else None


def _mc_metric(evals: Mapping[str, Any], name: str) -> str:
    """The column of an MC set: acc_norm (the Open LLM Leaderboard's for ARC, HellaSwag), else the set's
    headline metric (TruthfulQA: mc2)."""
    results = [_get(e, "mc", name) for e in evals.values()]
    if any(_number(_get(r, "acc_norm")) is not None for r in results):
        return "acc_norm"
    return next((r["metric"] for r in results if isinstance(_get(r, "metric"), str)), "score")


def _metrics(evals: Mapping[str, Any]) -> list[tuple[_Metric, Callable[[str], tuple[Any, Any]]]]:
    """The table's columns, each with a function model -> (value, standard error)."""
    columns: list[tuple[_Metric, Callable[[str], tuple[Any, Any]]]] = []
    sets = dict.fromkeys(name for e in evals.values() for name in _mapping(e.get("mc")))
    for name in sets:
        metric = _mc_metric(evals, name)

        def mc(model: str, name=name, metric=metric) -> tuple[Any, Any]:
            result = _get(evals, model, "mc", name)
            return _get(result, metric), _get(result, f"{metric}_stderr")

        columns.append((_Metric(f"mc/{name}/{metric}", f"{name} {metric}", "multiple choice", 4), mc))
    for key, label, path in (
        ("overall", "MT-Bench", ("score",)),
        ("turn_1", "MT-Bench turn 1", ("turns", "1", "score")),
        ("turn_2", "MT-Bench turn 2", ("turns", "2", "score")),
    ):
        columns.append(
            (
                _Metric(f"mt_bench/{key}", label, "MT-Bench", 2),
                lambda model, path=path: (_get(_mt_bench(evals, model), *path), None),
            )
        )
    for key, label, value_key, se_key in (
        ("win_rate", "AlpacaEval win rate (%)", "win_rate", "standard_error"),
        ("lc_win_rate", "AlpacaEval LC win rate (%)", "length_controlled_winrate", "lc_standard_error"),
    ):
        metric = _Metric(f"alpaca_eval/{key}", label, "AlpacaEval", 2, stderr=f"alpaca_eval/{key}_se")
        columns.append(
            (
                metric,
                lambda model, v=value_key, s=se_key: (
                    _get(evals, model, "alpaca_eval", v),
                    _get(evals, model, "alpaca_eval", s),
                ),
            )
        )
    return columns


def comparison_table(
    models: Sequence[Mapping[str, Any]], evals: Mapping[str, Any], training: Mapping[str, Any]
) -> dict[str, Any]:
    """One row per model, one column per metric that any model has.

    Columns: MC (acc_norm, or the set's headline metric) per set; MT-Bench overall, turn 1, turn 2;
    AlpacaEval win rate and length-controlled win rate (with standard errors); the reward accuracy and
    margin of the last held-out eval of each DPO run; the held-out loss of the SFT run. Returns
    `{"columns": [{key, label, group, digits, higher_is_better, stderr}], "rows": [{model, label, values,
    stderr}]}`; a value is None where a model lacks it.
    """
    columns = _metrics(evals)
    training_columns = (
        (
            _Metric("dpo/eval_reward_accuracy", "held-out reward accuracy", "DPO training", 4),
            "dpo",
            "eval/rewards/accuracies",
        ),
        (
            _Metric("dpo/eval_reward_margin", "held-out reward margin", "DPO training", 4),
            "dpo",
            "eval/rewards/margins",
        ),
        (
            _Metric("sft/eval_loss", "SFT held-out loss", "SFT training", 4, higher_is_better=False),
            "sft",
            "eval/loss",
        ),
    )
    for metric, kind, key in training_columns:
        columns.append(
            (
                metric,
                lambda model, kind=kind, key=key: (
                    _get(training, model, "last_eval", key)
                    if _get(training, model, "kind") == kind
                    else None,
                    None,
                ),
            )
        )
    rows = []
    for model in models:
        values, stderr = {}, {}
        for metric, read in columns:
            value, se = read(model["name"])
            values[metric.key] = _number(value)
            if metric.stderr or _number(se) is not None:
                stderr[metric.key] = _number(se)
        rows.append({"model": model["name"], "label": model["label"], "values": values, "stderr": stderr})
    kept = [m for m, _ in columns if any(r["values"][m.key] is not None for r in rows)]
    for row in rows:
        row["values"] = {m.key: row["values"][m.key] for m in kept}
        row["stderr"] = {m.key: row["stderr"][m.key] for m in kept if m.key in row["stderr"]}
    return {"columns": [asdict(m) for m in kept], "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Layout: the blocks both renderers draw


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Text:
    text: str


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    """Cells are display strings; `strong` marks (row, column) cells to emphasize (the best of a column)."""

    header: list[str]
    rows: list[list[str]]
    strong: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Figure:
    """A plot drawn by the HTML renderer (`kind` names the plot, `data` is what it draws); the Markdown
    report leaves figures out."""

    kind: str
    caption: str
    data: Any


@dataclass
class Answers:
    """One prompt and each model's answer (None: the model has none), shown side by side."""

    prompt: str
    answers: list[tuple[str, str | None]]
    number: int = 1


Block = Heading | Text | Items | Table | Code | Figure | Answers


_NUMERIC = re.compile(r"^(?:[-+]?[\d.]+(?:e[-+]?\d+)?(?: ± [\d.]+)?|–)$")


def is_numeric(cell: str) -> bool:
    """A table cell that holds a number (or the "–" of a missing one): aligned right."""
    return bool(_NUMERIC.match(cell))


def fmt(value: Any, digits: int | None = None) -> str:
    """A value as table text: `digits` decimals for a number when given, else a short form."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if digits is not None:
            return f"{value:.{digits}f}"
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _key_values(data: Mapping[str, Any], keys: Sequence[str] | None = None) -> Table:
    keys = [k for k in (keys or data) if k in data and not isinstance(data[k], (dict, list))]
    return Table(["", "value"], [[k, fmt(data[k])] for k in keys])


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _section(title: str) -> Heading:
    return Heading(title, 2, _anchor(title))


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
        values = [(row[j], i) for i, row in enumerate(rows) if row[j] is not None]
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
    numbers = [[row["values"].get(c["key"]) for c in columns] for row in rows]
    strong = _best_cells(numbers, [c["higher_is_better"] for c in columns], 2)
    return [
        _section("Comparison"),
        Text("One row per model of the run, one column per metric; the best value of a column is bold."),
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


def _mc_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    sets = list(dict.fromkeys(name for e in evals.values() for name in e.get("mc", {})))
    if not sets:
        return []
    rows = []
    for name in sets:
        for model, e in evals.items():
            if (r := e.get("mc", {}).get(name)) is None:
                continue
            rows.append(
                [
                    name,
                    model,
                    *(_with_se(r, m) for m in ("acc", "acc_norm", "mc1", "mc2")),
                    fmt(_get(r, "counts", "items") or r.get("n_items")),
                    fmt(r.get("num_fewshot")),
                ]
            )
    header = ["set", "model", "acc", "acc_norm", "mc1", "mc2", "items", "shots"]
    bars = {
        "sets": [f"{name} {_mc_metric(evals, name)}" for name in sets],
        "models": [labels.get(m, m) for m in evals],
        "values": [[_number(_get(e, "mc", n, _mc_metric(evals, n))) for n in sets] for e in evals.values()],
        "stderr": [
            [_number(_get(e, "mc", n, _mc_metric(evals, n) + "_stderr")) for n in sets]
            for e in evals.values()
        ],
    }
    return [
        Heading("Multiple choice", 3, "multiple-choice"),
        Table(header, rows),
        Figure("mc", "Multiple choice: each set's metric per model (error bars: standard error)", bars),
    ]


def _with_se(result: Mapping[str, Any], metric: str) -> str:
    value = _number(result.get(metric))
    if value is None:
        return "–"
    se = _number(result.get(f"{metric}_stderr"))
    return fmt(value, 4) + (f" ± {fmt(se, 4)}" if se is not None else "")


def _mt_bench_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    results = {m: r for m in evals if (r := _mt_bench(evals, m)) is not None}
    if not results:
        return []
    rows = [
        [
            model,
            fmt(_number(r.get("score")), 2),
            fmt(_number(_get(r, "turns", "1", "score")), 2),
            fmt(_number(_get(r, "turns", "2", "score")), 2),
            fmt(r.get("n_scored")),
            fmt(r.get("n_failed")),
            fmt(len(r.get("missing") or [])),
            fmt(r.get("judge")),
        ]
        for model, r in results.items()
    ]
    header = ["model", "overall", "turn 1", "turn 2", "scored", "parse failures", "unjudged", "judge"]
    blocks: list[Block] = [Heading("MT-Bench", 3, "mt-bench"), Table(header, rows)]
    categories = _mt_bench_categories(results)
    if categories:
        blocks.append(
            Table(
                ["category", *results],
                [
                    [c, *(fmt(_number(_get(r, "categories", c, "score")), 2) for r in results.values())]
                    for c in categories
                ],
            )
        )
        scores = {
            labels.get(m, m): {c: _number(_get(r, "categories", c, "score")) for c in categories}
            for m, r in results.items()
        }
        blocks.append(
            Figure(
                "mt_bench", "MT-Bench score per category (1–10)", {"categories": categories, "models": scores}
            )
        )
    return blocks


def _mt_bench_categories(results: Mapping[str, Any]) -> list[str]:
    from zephyr.evaluation.plots import MT_BENCH_CATEGORIES

    present = {c for r in results.values() for c in _mapping(r.get("categories"))}
    ordered = [c for c in MT_BENCH_CATEGORIES if c in present]
    return ordered + sorted(present - set(ordered))


def _alpaca_eval_blocks(evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[Block]:
    results = {m: e["alpaca_eval"] for m, e in evals.items() if isinstance(e.get("alpaca_eval"), dict)}
    if not results:
        return []
    rows = []
    for model, r in results.items():
        rows.append(
            [
                model,
                _pm(r.get("win_rate"), r.get("standard_error")),
                _pm(r.get("length_controlled_winrate"), r.get("lc_standard_error")),
                fmt(_number(r.get("discrete_win_rate")), 2),
                f"{fmt(r.get('n_wins'))} / {fmt(r.get('n_wins_base'))} / {fmt(r.get('n_draws'))}",
                f"{fmt(r.get('n_annotations'))} ({fmt(r.get('n_failed'))})",
                fmt(_number(r.get("avg_length")), 0),
                fmt(r.get("judge")),
            ]
        )
    header = ["model", "win rate (%)", "LC win rate (%)", "discrete (%)", "wins / losses / draws"]
    header += ["annotations (failed)", "avg length", "judge"]
    bars = {
        "models": [labels.get(m, m) for m in results],
        "win_rate": [_number(r.get("win_rate")) for r in results.values()],
        "standard_error": [_number(r.get("standard_error")) for r in results.values()],
        "lc_win_rate": [_number(r.get("length_controlled_winrate")) for r in results.values()],
        "lc_standard_error": [_number(r.get("lc_standard_error")) for r in results.values()],
    }
    notes = [
        f"{m}: {r['length_controlled_note']}" for m, r in results.items() if r.get("length_controlled_note")
    ]
    blocks: list[Block] = [Heading("AlpacaEval", 3, "alpacaeval"), Table(header, rows)]
    if notes:
        blocks.append(Text("Length-controlled win rate not computed: " + "; ".join(notes)))
    blocks.append(Figure("alpaca_eval", "AlpacaEval win rates (error bars: standard error)", bars))
    return blocks


def _pm(value: Any, se: Any) -> str:
    if _number(value) is None:
        return "–"
    return fmt(_number(value), 2) + (f" ± {fmt(_number(se), 2)}" if _number(se) is not None else "")


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
    if has_image:
        blocks.append(Figure("image", "Rating histograms (feedback/ratings.png)", IMAGES["feedback_ratings"]))
    elif _get(stats, "histograms", "by_aspect") is not None:
        blocks.append(Figure("ratings", "Rating histograms", stats["histograms"]))
    return blocks


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


# ---------------------------------------------------------------------------------------------------------
# Markdown


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (tables and text; the plots are in report.html)."""
    lines: list[str] = []
    for block in report_blocks(report):
        if isinstance(block, Figure):  # drawn in the HTML page only
            continue
        lines += [*_markdown(block), ""]
        if isinstance(block, Heading) and block.level == 1:
            lines += ["Plots are in report.html, next to this file.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_text(text: str) -> str:
    """Text safe in a Markdown line: no raw HTML, no table breaks."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.replace("|", "\\|").split())


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _markdown(block: Block) -> list[str]:
    match block:
        case Heading(text, level, _):
            return ["#" * level + " " + _md_text(text)]
        case Text(text):
            return [_md_text(text)]
        case Items(items):
            return [f"- {_md_text(item)}" for item in items]
        case Table(header, rows, strong):
            out = ["| " + " | ".join(_md_text(h) or " " for h in header) + " |"]
            numeric = [j > 0 and all(is_numeric(r[j]) for r in rows) for j in range(len(header))]
            out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            for i, row in enumerate(rows):
                cells = [_md_text(c) for c in row]
                cells = [f"**{c}**" if (i, j) in strong else c for j, c in enumerate(cells)]
                out.append("| " + " | ".join(cells) + " |")
            return out
        case Code(text, lang):
            fence = _fence(text)
            return [fence + lang, text.rstrip("\n"), fence]
        case Answers(prompt, answers, number):
            fence = _fence(prompt)
            out = [f"**Prompt {number}**", "", fence, prompt, fence]
            for label, answer in answers:
                fence = _fence(answer or "")
                body = [fence, answer, fence] if answer is not None else ["(no answer)"]
                out += ["", f"**{_md_text(label)}**", "", *body]
            return out
        case _:
            raise TypeError(f"not a Markdown block: {block!r}")


# ---------------------------------------------------------------------------------------------------------
# Writing


def read_images(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> dict[str, bytes]:
    """The PNG files of the run the page embeds (`report["images"]`), by path relative to the run."""
    images = {}
    for rel in report.get("images", {}).values():
        path = Path(run_dir) / rel
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            images[rel] = data
    return images


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> ReportPaths:
    """Write `report.json`, `report.md` and `report.html` of the run folder `run_dir` into `out_dir`
    (default: the run folder) and return their paths."""
    # Imported here: report_html draws the blocks defined above (it imports this module).
    from zephyr.report_html import render_html

    report = collect_report(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out / "report.json", out / "report.md", out / "report.html")
    _write_atomic(paths.json, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _write_atomic(paths.md, render_markdown(report))
    _write_atomic(paths.html, render_html(report, read_images(run_dir, report)))
    return paths
