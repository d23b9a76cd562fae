"""Reading a run folder into the report dict: manifest, recipe, training metrics, eval results, sample
answers and data statistics. A missing or unreadable file is an entry of `missing`, never an error."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from zephyr.core.config import ReportConfig, build
from zephyr.core.errors import ConfigError, DataError
from zephyr.core.specs import STAGE_REF
from zephyr.stages import Stage, evaluations, pipeline_stages, present_stages, stage
from zephyr.stages.report.comparison import comparison_table
from zephyr.stages.report.references import PAPER_ZEPHYR_7B_BETA, ReferenceRow, parse_references
from zephyr.stages.report.regression import REGRESSION_FILE
from zephyr.stages.report.values import _get, _mapping, _number

REPORT_VERSION = 1
# The file names below are the stage table's (`zephyr.stages.STAGES`), where each stage declares its outputs.
_TRAINED = [s.name for s in pipeline_stages() if s.trains and s.plan == "section"]  # sft, dpo
# The run's own models, in the order a reader compares them; ablations follow in recipe order.
RUN_MODELS = ("base", *_TRAINED)
MODEL_LABELS = {"base": "base", "sft": "SFT only", "dpo": "full"}
# The files a stage must leave for the report to show it (its summary); their absence is listed in `missing`.
EXPECTED_FILES = {
    s.name: f"{s.name}/{s.outputs['summary']}" for s in pipeline_stages() if "summary" in s.outputs
}
# files of the run embedded in the HTML page
IMAGES = {"feedback_ratings": f"feedback/{stage('feedback').output('ratings_plot')}"}
_MC = stage("mc")
# the evaluations made once per model (MT-Bench, AlpacaEval): their folders under eval/MODEL/
_EVAL_FOLDERS = {e.name: str(e.command) for e in evaluations() if e is not _MC}
_RESULTS = _MC.output("results")  # every evaluation's results.json
_SAMPLES = stage("eval").output("samples")


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
        "comparison": comparison_table(models, evals, training, _collect_references(reader, recipe)),
        "training": training,
        "eval": evals,
        "samples": samples,
        "data": _collect_data(reader, plan),
        "regression": reader.json(REGRESSION_FILE, None),
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
    if status == "stale":
        return f"stage {stage_id} is out of date ({entry.get('error') or 'a stage it reads was redone'})"
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
        present = present_stages(lambda name: recipe.get(name) is not None, bool(ablations))
        stages = _strings(run_section.get("stages")) or present
    else:
        stages = list(dict.fromkeys(sid.split("/")[0] for sid in manifest_stages))
    eval_section = _mapping(recipe.get("eval"))
    expected = []
    if "eval" in stages:
        expected.append("base")
    expected += [m for m in _TRAINED if m in stages]
    if "ablations" in stages:
        expected += list(ablations)
    found = [sid.split("/")[1] for sid in manifest_stages if sid.count("/") >= 1]
    found += [name for folder in ("eval", "ablations") for name in _subdirs(run / folder)]
    found += [m for m in _TRAINED if (run / m / stage(m).output("metrics")).is_file()]
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
        return f"{_training_folder(name)}/{_training_stage(name).output('model')}"
    recipe = recipe or {}
    candidates = [
        _get(recipe, "run", "base_model"),
        _get(recipe, "sft", "model"),
        _get(recipe, "dpo", "model"),
    ]
    # "stage:NAME" points at another stage's output, not at the base model
    return next((c for c in candidates if isinstance(c, str) and not c.startswith(STAGE_REF)), None)


def _training_stage(model: str) -> Stage:
    """The stage that trains a model of the run: its own (sft, dpo), else the ablations."""
    return stage(model if model in _TRAINED else "ablations")


def _training_folder(model: str) -> str:
    return model if model in _TRAINED else f"{stage('ablations').name}/{model}"


def _collect_training(reader: _Reader, plan: _Plan) -> dict[str, Any]:
    training = {}
    for model in plan.models:
        if model == "base":
            continue
        folder = _training_folder(model)
        lines = reader.jsonl(
            f"{folder}/{_training_stage(model).output('metrics')}",
            reader.why(folder) if model in plan.expected else None,
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
    prefix = f"{_MC.command}-"
    found_mc = [d.removeprefix(prefix) for d in _subdirs(reader.run / folder) if d.startswith(prefix)]
    result: dict[str, Any] = {}
    mc = {}
    for name in dict.fromkeys([*plan.mc_sets, *found_mc]):
        sub = f"{prefix}{name}"
        why = reader.why(f"{folder}/{sub}", folder) if expected and name in plan.mc_sets else None
        if (data := reader.json(f"{folder}/{sub}/{_RESULTS}", why)) is not None:
            mc[name] = data
    if mc:
        result["mc"] = mc
    for key, sub in _EVAL_FOLDERS.items():
        why = reader.why(f"{folder}/{sub}", folder) if expected and key in plan.evals else None
        if (data := reader.json(f"{folder}/{sub}/{_RESULTS}", why)) is not None:
            result[key] = data
    return result


def _collect_references(reader: _Reader, recipe: Mapping[str, Any] | None) -> list[ReferenceRow]:
    """The reference rows the recipe's `report` section asks for: the paper's, then each file's. A file is
    read like every path of a recipe (relative to the working folder); one that is absent or invalid is
    an entry of `missing`."""
    section = _mapping(recipe).get("report")
    if section is None:
        return []
    try:
        config = build(ReportConfig, section, "report")
    except ConfigError as exc:
        reader.lack("recipe.yaml", f"unreadable: {exc}")
        return []
    rows = [PAPER_ZEPHYR_7B_BETA] if config.paper_reference else []
    for path in config.references:
        try:
            rows += parse_references(Path(path).expanduser().read_text(encoding="utf-8"), path)
        except (OSError, ValueError, DataError) as exc:  # absent, not UTF-8, not rows
            reader.lack(path, f"reference rows (report.references) not read: {exc}")
    return rows


def _collect_samples(reader: _Reader, plan: _Plan) -> list[dict[str, Any]]:
    """Sample answers side by side: one entry per prompt (recipe order first), each model's answer or None."""
    answers: dict[str, dict[str, str]] = {}
    for model in plan.models:
        expected = plan.sample_prompts and model in plan.expected
        why = reader.why(f"eval/{model}/samples", f"eval/{model}") if expected else None
        for line in reader.jsonl(f"eval/{model}/{_SAMPLES}", why):
            if isinstance(line.get("prompt"), str):
                answers.setdefault(line["prompt"], {})[model] = str(line.get("answer", ""))
    prompts = list(dict.fromkeys([*plan.sample_prompts, *answers]))
    return [{"prompt": p, "answers": {m: answers.get(p, {}).get(m) for m in plan.models}} for p in prompts]


def _collect_data(reader: _Reader, plan: _Plan) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, rel in EXPECTED_FILES.items():
        value = reader.json(rel, reader.why(name) if name in plan.stages else None)
        if value is not None:
            data[name] = value
    dpo_data = {}
    for model in plan.models:
        if model == "base" or "data" not in _training_stage(model).outputs:  # dpo_data.json: DPO runs only
            continue
        folder = _training_folder(model)
        rel = f"{folder}/{_training_stage(model).output('data')}"
        value = reader.json(rel, reader.why(folder) if model in plan.expected else None)
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
