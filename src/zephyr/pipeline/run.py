"""`zephyr run RECIPE`: every stage of a pipeline recipe into one run folder, resumable.

The recipe's sections become a plan of steps, in pipeline order: generate -> curate -> sft -> feedback ->
dpo -> ablations/NAME -> eval/MODEL/EVAL -> report. A stage reads another's output through a reference
`stage:NAME[:PART]` in any of its top-level fields (`sft.train_data: stage:curate`, `dpo.model: stage:sft`,
`sft.eval_data: stage:curate:test`); an empty input field is wired to the stage before it. Each stage writes
into `RUN/NAME/` whatever `output_dir` the section names.

State lives in `RUN/manifest.json` (`zephyr.pipeline.manifest`). A rerun skips steps that are done with the same
fingerprint, resumes steps left `running` or `failed` (training from its last checkpoint, generation and
feedback from their last written record) and redoes from scratch a step whose inputs changed. `--from STAGE`
redoes STAGE and every step after it; `--only STAGE` runs just that stage's steps, whose inputs must be done.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from zephyr import __version__
from zephyr.core.config import (
    AblationConfig,
    EvalConfig,
    Recipe,
    ablation_config,
    batch_plan,
    spec_values,
    to_dict,
)
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.core.specs import STAGE_REF, is_local, parse_model_spec, parse_stage_ref
from zephyr.io import check_output_dir
from zephyr.pipeline.manifest import (
    Manifest,
    StageRecord,
    fingerprint,
    hub_datasets,
    input_parts,
    load_manifest,
    now,
    package_versions,
    path_fingerprint,
    redo_reason,
    save_manifest,
)
from zephyr.stages import Stage, evaluation_folder, evaluations, pipeline_stages, present_stages, stage


@dataclass
class Step:
    """One unit of the plan: its id in the manifest, what it hashes, how it runs and what it writes."""

    id: str
    kind: str
    folder: Path | None  # removed before a fresh start (a folder or a file); None for the report
    config: Any  # hashed into the fingerprint (a config dataclass or plain values)
    action: Callable[[bool], None]  # called with resume=True when continuing an interrupted attempt
    upstream: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # the stage table's outputs: a done step has them


def _referable() -> dict[str, Stage]:
    """The stages whose outputs `stage:NAME[:PART]` names: those with a folder RUN/NAME of their own."""
    return {s.name: s for s in pipeline_stages() if s.plan == "section" and s.outputs}


# ---------------------------------------------------------------------------------------------------------
# Stage references


def parse_ref(value: str, where: str) -> tuple[str, str]:
    """`stage:NAME[:PART]` -> (NAME, PART); an unknown stage or part names the field."""
    name, part = parse_stage_ref(value)
    referable = _referable()
    if name not in referable:
        raise ConfigError(
            f"{where}: {value!r}: no stage {name!r} writes files (one of {', '.join(referable)})"
        )
    parts = referable[name].outputs
    part = part or next(iter(parts))
    if part not in parts:
        raise ConfigError(
            f"{where}: {value!r}: stage {name} has no output {part!r} (one of {', '.join(parts)})"
        )
    return name, part


def resolve_refs(cfg: Any, section: str, run_dir: Path, available: set[str]) -> tuple[Any, list[str]]:
    """The config with every `stage:` reference replaced by its path, and the stages it reads from."""
    changes, upstream = {}, []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not (isinstance(value, str) and value.startswith(STAGE_REF)):
            continue
        where = f"{section}.{f.name}"
        name, part = parse_ref(value, where)
        if name not in available:
            raise ConfigError(f"{where}: {value!r} reads stage {name!r}, which this run does not have")
        changes[f.name] = str(run_dir / name / stage(name).output(part))
        upstream.append(name)
    return dataclasses.replace(cfg, **changes), upstream


def auto_wire(cfg: Any, section: str, available: set[str]) -> Any:
    """Fill each empty input field with a reference to the stage the table wires to it (e.g.
    sft.train_data: stage:curate)."""
    wired = {
        name: STAGE_REF + source
        for name, source in stage(section).inputs.items()
        if not getattr(cfg, name) and source in available
    }
    return dataclasses.replace(cfg, **wired) if wired else cfg


def local_inputs(cfg: Any, run_dir: Path) -> dict[str, str]:
    """Fingerprints of the local files and folders a config's top-level fields name (outside the run)."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "output_dir" or not isinstance(value, str) or not is_local(value):
            continue
        path = Path(value)
        if path.exists() and run_dir.resolve() not in path.resolve().parents:
            found[f.name] = path_fingerprint(path)
    return found


def missing_inputs(recipe: Recipe) -> list[str]:
    """`KEY: no such file or folder: PATH` for each local input of the recipe's stages that does not exist:
    a pipeline checks them all before its first stage, rather than fail in one after hours of training.
    The inputs are the config fields typed as paths, data or models (`zephyr.core.config.spec_field`)."""
    if recipe.run is not None:  # the run section (base_model) and the sections of the stages it runs
        sections = ["run", *(n for n in stage_names(recipe) if getattr(recipe, n, None) is not None)]
    else:
        sections = [n for n, v in vars(recipe).items() if v is not None]
    found = []
    for name in sections:  # (ablations vary the dpo section, checked as such)
        for key, kind, value in spec_values(getattr(recipe, name), name):
            path = _local_path(kind, value)
            if path is not None and not Path(path).expanduser().exists():
                found.append(f"{key}: no such file or folder: {path}")
    return sorted(set(found))


def _local_path(kind: str, value: str) -> str | None:
    """The local file or folder a spec value must name here; None for hub ids, assets, remote models and
    other stages' outputs."""
    if value.startswith(STAGE_REF):
        return None
    if kind == "model":
        return parse_model_spec(value).written_path
    return value if is_local(value) else None


def check_inputs(recipe: Recipe) -> None:
    if missing := missing_inputs(recipe):
        where = f"relative paths are read from {Path.cwd()}"
        raise ConfigError(f"{len(missing)} input(s) missing ({where}):\n  " + "\n  ".join(missing))


# ---------------------------------------------------------------------------------------------------------
# The plan


def stage_names(recipe: Recipe) -> list[str]:
    """The stages to run: run.stages, or every stage the recipe has a section for, in pipeline order."""
    present = present_stages(
        lambda name: getattr(recipe, name, None) is not None, bool(recipe.run and recipe.run.ablations)
    )
    chosen = recipe.run.stages if recipe.run and recipe.run.stages else None
    if chosen is None:
        return present
    # (every name in `chosen` is a pipeline stage: `load_recipe` checked it, naming the recipe line)
    known = [s.name for s in pipeline_stages()]
    missing = [name for name in known if name in chosen and name not in present]
    if missing:
        raise ConfigError(f"run.stages: {', '.join(missing)} listed but the recipe has no section for it")
    return [name for name in known if name in chosen]


def build_plan(recipe: Recipe, run_dir: Path) -> list[Step]:
    """Every step of the run, in order, with `stage:` references resolved to paths in `run_dir`."""
    names = stage_names(recipe)
    check_launch_batches(recipe)
    available = set(names) & set(_referable())
    steps: list[Step] = []
    for s in pipeline_stages():
        if s.name not in names:
            continue
        if s.plan == "section":
            steps.append(_stage_step(s, getattr(recipe, s.name), run_dir, available, recipe))
        elif s.plan == "ablations":
            assert recipe.run is not None  # present: the run section lists ablations
            steps += [_ablation_step(s, a, recipe, run_dir, available) for a in recipe.run.ablations]
        elif s.plan == "evals":
            models = _models(recipe, names, run_dir)
            steps += [
                step
                for model, (spec, up) in models.items()
                for step in _eval_steps(recipe.eval, model, spec, up, run_dir)
            ]
        elif s.plan == "report":
            steps.append(_report_step(s, recipe, run_dir, [step.id for step in steps]))
    return steps


def _stage_step(s: Stage, cfg: Any, run_dir: Path, available: set[str], recipe: Recipe) -> Step:
    cfg = auto_wire(cfg, s.name, available)
    folder = run_dir / s.name
    cfg, upstream = resolve_refs(dataclasses.replace(cfg, output_dir=str(folder)), s.name, run_dir, available)
    if s.trains:
        action = partial(_run_training, s, cfg, launcher=_launcher(recipe))
    else:
        action = partial(_run_stage, s, cfg)
    outputs = [folder / rel for rel in s.outputs.values()]
    return Step(s.name, s.name, folder, cfg, action, upstream, outputs)


def _ablation_step(
    s: Stage, ablation: AblationConfig, recipe: Recipe, run_dir: Path, available: set[str]
) -> Step:
    assert recipe.dpo is not None  # present: ablations vary the dpo section
    cfg = ablation_config(recipe.dpo, ablation, f"run.ablations ({ablation.name})")
    cfg = auto_wire(cfg, "dpo", available)
    if ablation.start == "base":  # DPO without dSFT: the base model is the policy's start and its reference
        cfg = dataclasses.replace(cfg, model=base_model(recipe), ref_model=None)
    folder = run_dir / s.name / ablation.name
    cfg, upstream = resolve_refs(dataclasses.replace(cfg, output_dir=str(folder)), "dpo", run_dir, available)
    action = partial(_run_training, s, cfg, launcher=_launcher(recipe))
    outputs = [folder / rel for rel in s.outputs.values()]
    return Step(f"{s.name}/{ablation.name}", "ablation", folder, cfg, action, upstream, outputs)


def _launcher(recipe: Recipe) -> str | None:
    return recipe.run.launcher if recipe.run else None


def launch_processes(launcher: str | None) -> int | None:
    """The process count a launcher command names (`--num_processes N`, `--num-processes=N`); else None."""
    words = shlex.split(launcher or "")
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag not in ("--num_processes", "--num-processes"):
            continue
        value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"run.launcher: {flag}: expected a number of processes, got {value!r}")
        return int(value)
    return None


def check_launch_batches(recipe: Recipe) -> None:
    """When `run.launcher` names its process count, each training section's global batch must split over it:
    checked before the first stage, not when the launcher starts training hours into the run."""
    processes = launch_processes(_launcher(recipe))
    if processes is None:
        return
    for s in pipeline_stages():
        cfg = getattr(recipe, s.name, None)
        if s.trains and cfg is not None:
            batch_plan(cfg, processes, s.name)
    if recipe.run and recipe.dpo is not None:
        for i, ablation in enumerate(recipe.run.ablations):
            cfg = ablation_config(recipe.dpo, ablation, f"run.ablations[{i}]")
            batch_plan(cfg, processes, f"run.ablations[{i}] ({ablation.name}): dpo")


def base_model(recipe: Recipe) -> str:
    """The model before any training: run.base_model, else the dSFT start, else the dDPO start."""
    if recipe.run and recipe.run.base_model:
        return recipe.run.base_model
    for cfg in (recipe.sft, recipe.dpo):
        if cfg is not None and not cfg.model.startswith(STAGE_REF):
            return cfg.model
    raise ConfigError("run.base_model: set it (neither sft.model nor dpo.model names a model)")


def _models(recipe: Recipe, names: list[str], run_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """The models to evaluate: name -> (model spec, steps it comes from): the base model, the model of each
    training stage of the run, and each ablation's."""
    models: dict[str, tuple[str, list[str]]] = {"base": (base_model(recipe), [])}
    for s in pipeline_stages():
        if s.trains and s.plan == "section" and s.name in names:
            models[s.name] = (str(run_dir / s.name / s.output("model")), [s.name])
    if "ablations" in names and recipe.run is not None:
        ablations = stage("ablations")
        for a in recipe.run.ablations:
            folder = run_dir / ablations.name / a.name
            models[a.name] = (str(folder / ablations.output("model")), [f"{ablations.name}/{a.name}"])
    return models


def _eval_steps(
    cfg: EvalConfig | None, model: str, spec: str, upstream: list[str], run_dir: Path
) -> list[Step]:
    """One step per evaluation of `model` (in the table's order), then its sample answers."""
    if cfg is None:
        return []
    folder = run_dir / "eval" / model
    steps = []
    for evaluation in evaluations():
        value = getattr(cfg, evaluation.name)
        for item in value if isinstance(value, list) else [value] if value is not None else []:
            out = folder / evaluation_folder(evaluation, item)
            action = partial(_run_evaluation, evaluation, item, spec, out)
            config = {"model": spec, **to_dict(item)}
            outputs = [out / rel for rel in evaluation.outputs.values()]
            steps.append(
                Step(f"eval/{model}/{out.name}", evaluation.name, out, config, action, upstream, outputs)
            )
    if cfg.sample_prompts:
        samples = folder / stage("eval").output("samples")
        config = {"model": spec, "prompts": cfg.sample_prompts, "max_new_tokens": cfg.sample_max_new_tokens}
        action = partial(_run_samples, cfg, spec, model, folder)
        steps.append(Step(f"eval/{model}/samples", "samples", samples, config, action, upstream, [samples]))
    return steps


def _report_step(s: Stage, recipe: Recipe, run_dir: Path, upstream: list[str]) -> Step:
    def action(resume: bool) -> None:
        paths = s.run_function()(run_dir)
        print(f"report: {paths.html}")

    # The report reads every step: its fingerprint follows theirs, so it is rewritten when any is redone;
    # and its own section (reference rows), so that changing it rewrites the report.
    config = to_dict(recipe.report) if recipe.report is not None else {}
    outputs = [run_dir / rel for rel in s.outputs.values()]
    return Step(s.name, s.name, None, config, action, upstream, outputs)


# ---------------------------------------------------------------------------------------------------------
# Stage actions (the table's run functions are imported when the stage runs)


def _run_stage(s: Stage, cfg: Any, resume: bool = False) -> None:
    """A stage that resumes by itself (generation and feedback keep what they have written)."""
    s.run_function()(cfg)


def _run_training(s: Stage, cfg: Any, resume: bool, launcher: str | None) -> None:
    """A training stage in this process, or through `launcher` (e.g. accelerate launch) for several devices."""
    # imported here: the checkpoint module imports torch, and `zephyr check` builds plans with this module
    from zephyr.training.checkpoint import latest_checkpoint

    out = Path(cfg.output_dir)
    final_written = (out / s.output("model") / "config.json").is_file()
    resume = resume and (final_written or latest_checkpoint(out) is not None)
    if not resume and out.exists():
        shutil.rmtree(out)  # an attempt that left no checkpoint: nothing to continue from
    if launcher:
        _launch(_command(s), cfg, resume, launcher)
        return
    s.run_function()(cfg, resume=resume)


def _command(s: Stage) -> str:
    """The command that trains like `s` (an ablation is a dpo run)."""
    return s.command or next(t.command for t in pipeline_stages() if t.run == s.run and t.command)


def _launch(kind: str, cfg: Any, resume: bool, launcher: str) -> None:
    recipe_path = Path(cfg.output_dir) / "launch_recipe.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump({kind: to_dict(cfg)}, sort_keys=False), encoding="utf-8")
    command = [
        *shlex.split(launcher),
        "-m",
        "zephyr",
        kind,
        str(recipe_path),
        *(["--resume"] if resume else []),
    ]
    print("$ " + shlex.join(command), flush=True)
    code = subprocess.call(command)
    if code != 0:
        raise ZephyrError(f"{kind}: `{shlex.join(command)}` exited with {code}")


def _run_evaluation(evaluation: Stage, cfg: Any, spec: str, out: Path, resume: bool = False) -> None:
    # Resuming keeps the folder: MT-Bench reuses the answers already written and redoes only the judging.
    evaluation.run_function()(cfg, spec, out)


def _run_samples(cfg: EvalConfig, spec: str, model: str, folder: Path, resume: bool = False) -> None:
    """Greedy answers of one model to the sample prompts: the report shows them side by side."""
    stage("eval").run_function()(cfg, spec, folder, label=model)


# ---------------------------------------------------------------------------------------------------------
# Running the plan


def _matches(step_id: str, stage: str) -> bool:
    return step_id == stage or step_id.startswith(stage + "/")


def _check_stage_name(stage: str | None, plan: list[Step], flag: str) -> None:
    if stage is not None and not any(_matches(s.id, stage) for s in plan):
        known = sorted({s.id.split("/")[0] for s in plan})
        raise ConfigError(f"{flag} {stage}: no such stage in this run (stages: {', '.join(known)})")


def _step_fingerprint(step: Step, manifest: Manifest, run_dir: Path) -> tuple[str, dict[str, str]]:
    """The step's fingerprint, and a digest per part of its inputs (which say what changed on a redo)."""
    config = to_dict(step.config) if dataclasses.is_dataclass(step.config) else step.config
    config = json.loads(
        json.dumps(config, default=str).replace(str(run_dir), "$RUN")
    )  # a moved run stays done
    upstream = {u: manifest.stages[u].fingerprint if u in manifest.stages else "" for u in step.upstream}
    files = local_inputs(step.config, run_dir) if dataclasses.is_dataclass(step.config) else {}
    return fingerprint(step.kind, config, upstream, files), input_parts(config, upstream, files)


def _clear(step: Step, run_dir: Path) -> None:
    target = step.folder
    if target is None or not target.exists() or run_dir.resolve() not in target.resolve().parents:
        return
    shutil.rmtree(target) if target.is_dir() else target.unlink()


def _outputs(step: Step, run_dir: Path) -> list[str]:
    """The outputs a finished step left (those the table declares; else its folder), relative to the run:
    the manifest records them, and a rerun redoes a done step that has lost one."""
    written = [p for p in step.outputs if p.exists()]
    if not step.outputs and step.folder is not None and step.folder.exists():
        written = [step.folder]
    return [str(p.relative_to(run_dir)) for p in written]


def _missing_outputs(record: StageRecord, run_dir: Path) -> list[str]:
    return [rel for rel in record.outputs if not (run_dir / rel).exists()]


def run_pipeline(
    recipe: Recipe,
    recipe_path: str | None,
    *,
    start_from: str | None = None,
    only: str | None = None,
    output_dir: str | None = None,
) -> Manifest:
    """Run (or resume) the recipe's pipeline into its run folder; returns the final manifest."""
    run_dir = Path(output_dir or (recipe.run.output_dir if recipe.run else "runs/pipeline"))
    plan = build_plan(recipe, run_dir)
    check_inputs(recipe)
    _check_stage_name(start_from, plan, "--from")
    _check_stage_name(only, plan, "--only")
    check_output_dir(run_dir)  # an unwritable or full disk fails before the first stage
    _quiet_weight_loading()
    manifest = load_manifest(run_dir, str(recipe_path))
    manifest.versions = package_versions()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False), encoding="utf-8")
    forced = False
    for index, step in enumerate(plan, start=1):
        forced = forced or (start_from is not None and _matches(step.id, start_from))
        if only is not None and not _matches(step.id, only):
            continue
        counter = f"[{index}/{len(plan)}]"
        _run_step(step, plan, manifest, run_dir, counter, forced=forced, only=only is not None)
    _print_summary(manifest, plan, run_dir)
    return manifest


def _quiet_weight_loading() -> None:
    # A run loads models dozens of times; transformers' per-load progress bars would bury the stage lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_step(
    step: Step, plan: list[Step], manifest: Manifest, run_dir: Path, counter: str, *, forced: bool, only: bool
) -> None:
    if only:
        pending = [u for u in step.upstream if manifest.stages.get(u, StageRecord()).status != "done"]
        if pending:
            raise ZephyrError(f"--only {step.id}: needs {', '.join(pending)} done first (run without --only)")
    fp, parts = _step_fingerprint(step, manifest, run_dir)
    record = manifest.stages.get(step.id)
    same = record is not None and record.fingerprint == fp and not forced
    lost: list[str] = []
    if same and record is not None and record.status == "done":
        lost = _missing_outputs(record, run_dir)  # done, but what it wrote must still be there
        if not lost:
            print(f"{counter} {step.id}: done, skipped{_made_by_another_version(record, step)}", flush=True)
            return
    resume = same and record is not None and record.status in ("running", "failed")
    why = "" if resume else _why_afresh(record, parts, forced, lost)
    if not resume:
        _clear(step, run_dir)
        _outdate_downstream(step, plan, manifest, run_dir)
    attempts = record.attempts + 1 if resume and record is not None else 1
    record = StageRecord(
        status="running",
        fingerprint=fp,
        started=now(),
        attempts=attempts,
        zephyr=__version__,
        inputs=parts,
        datasets=hub_datasets(step.config),  # each with its revision: the data the run read
    )
    manifest.stages[step.id] = record
    save_manifest(manifest, run_dir)
    print(f"{counter} {step.id}: {'resuming' if resume else 'running'}{why}", flush=True)
    started = time.perf_counter()
    try:
        step.action(resume)
    except BaseException as exc:
        record.status, record.error = "failed", _error_text(exc)
        record.seconds = round(time.perf_counter() - started, 2)
        save_manifest(manifest, run_dir)
        raise
    record.status, record.finished = "done", now()
    record.seconds = round(time.perf_counter() - started, 2)
    record.outputs = _outputs(step, run_dir)
    save_manifest(manifest, run_dir)
    print(f"{counter} {step.id}: done in {record.seconds:.1f} s", flush=True)


def _why_afresh(record: StageRecord | None, parts: dict[str, str], forced: bool, lost: list[str]) -> str:
    """` (config changed)`, ` (--from)`, ` (outputs missing: sft/final)`: why a step that ran before runs
    from the beginning."""
    if record is None:
        return ""
    if forced:
        return " (--from)"
    if lost:  # done with the same inputs, but what it wrote is gone: what reads it would fail
        return f" (outputs missing: {', '.join(lost)})"
    reason = redo_reason(record.inputs, parts)
    return f" ({reason})" if reason else ""


def _outdate_downstream(step: Step, plan: list[Step], manifest: Manifest, run_dir: Path) -> None:
    """A step made afresh outdates every finished step that reads it, directly or not: their outputs are
    removed and they are marked `stale`, so that no report shows an old model's numbers as the new one's.
    (Their fingerprints follow this step's, so the next run redoes them anyway.)"""
    redone = {step.id}
    for later in plan:
        if not redone.intersection(later.upstream):
            continue
        redone.add(later.id)
        record = manifest.stages.get(later.id)
        if record is not None and record.status == "done":
            _clear(later, run_dir)
            record.status, record.outputs = "stale", []
            record.error = f"{step.id} was redone after it"


def _made_by_another_version(record: StageRecord, step: Step) -> str:
    """A note when a kept step was made by another zephyr: its outputs stand, but the user should know."""
    if not record.zephyr or record.zephyr == __version__:
        return ""
    return f" (made by zephyr {record.zephyr}, this is {__version__}: --from {step.id} redoes it)"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ZephyrError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _print_summary(manifest: Manifest, plan: list[Step], run_dir: Path) -> None:
    print(f"\nrun {run_dir}", file=sys.stdout)
    for step in plan:
        record = manifest.stages.get(step.id)
        status = record.status if record else "not run"
        seconds = f"{record.seconds:8.1f} s" if record and record.seconds is not None else ""
        print(f"  {step.id:40s} {status:8s} {seconds}")
    report = run_dir / "report.html"
    record = manifest.stages.get("report")
    if report.exists() and record is not None and record.status == "done":
        print(f"report: {report}")
    elif report.exists():
        print(f"report: {report} is out of date (zephyr report {run_dir} rewrites it)")
