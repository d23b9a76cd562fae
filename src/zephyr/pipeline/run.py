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
    STAGES,
    AblationConfig,
    EvalConfig,
    Recipe,
    ablation_config,
    to_dict,
)
from zephyr.core.errors import ConfigError, ZephyrError
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

STAGE_REF = "stage:"

# What `stage:NAME[:PART]` points at, relative to the run folder; the first part is the default.
OUTPUTS: dict[str, dict[str, str]] = {
    "generate": {"dialogues": "generate/dialogues.jsonl"},
    "curate": {"train": "curate/train.jsonl", "test": "curate/test.jsonl"},
    "sft": {"model": "sft/final"},
    "feedback": {
        "pairs": "feedback/pairs.jsonl",
        "test": "feedback/pairs_test.jsonl",
        "rated": "feedback/rated.jsonl",
    },
    "dpo": {"model": "dpo/final"},
}

# An empty input field reads the previous stage's main output.
AUTO_INPUTS: dict[str, tuple[str, str]] = {
    "curate": ("input", "generate"),
    "sft": ("train_data", "curate"),
    "feedback": ("prompts", "curate"),
    "dpo": ("train_data", "feedback"),
}


@dataclass
class Step:
    """One unit of the plan: its id in the manifest, what it hashes, and how it runs."""

    id: str
    kind: str
    folder: Path | None  # removed before a fresh start (a folder or a file); None for the report
    config: Any  # hashed into the fingerprint (a config dataclass or plain values)
    action: Callable[[bool], None]  # called with resume=True when continuing an interrupted attempt
    upstream: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Stage references


def parse_ref(value: str, where: str) -> tuple[str, str]:
    """`stage:NAME[:PART]` -> (NAME, PART); an unknown stage or part names the field."""
    name, _, part = value.removeprefix(STAGE_REF).partition(":")
    if name not in OUTPUTS:
        raise ConfigError(f"{where}: {value!r}: no stage {name!r} writes files (one of {', '.join(OUTPUTS)})")
    parts = OUTPUTS[name]
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
        changes[f.name] = str(run_dir / OUTPUTS[name][part])
        upstream.append(name)
    return dataclasses.replace(cfg, **changes), upstream


def auto_wire(cfg: Any, section: str, available: set[str]) -> Any:
    """Fill an empty input field with a reference to the stage before (e.g. sft.train_data: stage:curate)."""
    field_name, source = AUTO_INPUTS.get(section, ("", ""))
    if field_name and not getattr(cfg, field_name) and source in available:
        return dataclasses.replace(cfg, **{field_name: STAGE_REF + source})
    return cfg


def local_inputs(cfg: Any, run_dir: Path) -> dict[str, str]:
    """Fingerprints of the local files and folders a config's top-level fields name (outside the run)."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "output_dir" or not isinstance(value, str) or not _is_local(value):
            continue
        path = Path(value)
        if path.exists() and run_dir.resolve() not in path.resolve().parents:
            found[f.name] = path_fingerprint(path)
    return found


# Fields that name files or folders a stage reads (a spec with a scheme, `stage:`, `hf:`, `asset:`, is not
# a path), and model fields, which are paths only when they look like one (else they may be hub ids).
INPUT_FIELDS = frozenset(
    {"train_data", "eval_data", "seeds", "prompts", "input", "data", "fewshot_data", "questions",
     "instructions", "template_dir", "decontaminate"}
)  # fmt: skip
MODEL_FIELDS = frozenset({"model", "ref_model", "tokenizer", "judge", "baseline", "base_model"})


def missing_inputs(recipe: Recipe) -> list[str]:
    """`KEY: no such file or folder: PATH` for each local input of the recipe's stages that does not exist:
    a pipeline checks them all before its first stage, rather than fail in one after hours of training."""
    sections = stage_names(recipe) if recipe.run is not None else [n for n, v in vars(recipe).items() if v]
    found = []
    for name in sections:  # (ablations vary the dpo section, checked as such)
        for key, value in _string_fields(getattr(recipe, name, None), name):
            field_name = key.rsplit(".", 1)[-1].split("[")[0]
            if _names_a_path(field_name, value) and not Path(value).expanduser().exists():
                found.append(f"{key}: no such file or folder: {value}")
    return sorted(set(found))


def _string_fields(value: Any, key: str) -> list[tuple[str, str]]:
    """(dotted key, string) for every string a config holds, in nested configs and lists too."""
    if isinstance(value, str):
        return [(key, value)]
    if dataclasses.is_dataclass(value):
        return [
            item
            for f in dataclasses.fields(value)
            for item in _string_fields(getattr(value, f.name), f"{key}.{f.name}")
        ]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _string_fields(v, f"{key}[{i}]")]
    return []


def _is_local(value: str) -> bool:
    """A value that may name a local file: not empty, and no scheme (`stage:`, `hf:`, `asset:`, `openai:`)."""
    return bool(value) and ":" not in value.split("/")[0]


def _names_a_path(field_name: str, value: str) -> bool:
    if not _is_local(value):
        return False
    if field_name in INPUT_FIELDS:
        return True
    return field_name in MODEL_FIELDS and value.startswith(("/", "./", "../", "~"))


def check_inputs(recipe: Recipe) -> None:
    if missing := missing_inputs(recipe):
        where = f"relative paths are read from {Path.cwd()}"
        raise ConfigError(f"{len(missing)} input(s) missing ({where}):\n  " + "\n  ".join(missing))


# ---------------------------------------------------------------------------------------------------------
# The plan


def stage_names(recipe: Recipe) -> list[str]:
    """The stages to run: run.stages, or every stage the recipe has a section for, in pipeline order."""
    chosen = recipe.run.stages if recipe.run and recipe.run.stages else None
    present = {
        "generate": recipe.generate is not None,
        "curate": recipe.curate is not None,
        "sft": recipe.sft is not None,
        "feedback": recipe.feedback is not None,
        "dpo": recipe.dpo is not None,
        "ablations": bool(recipe.run and recipe.run.ablations) and recipe.dpo is not None,
        "eval": recipe.eval is not None,
        "report": True,
    }
    if chosen is None:
        return [s for s in STAGES if present[s]]
    missing = [s for s in chosen if not present[s]]
    if missing:
        raise ConfigError(f"run.stages: {', '.join(missing)} listed but the recipe has no section for it")
    return [s for s in STAGES if s in chosen]


def build_plan(recipe: Recipe, run_dir: Path) -> list[Step]:
    """Every step of the run, in order, with `stage:` references resolved to paths in `run_dir`."""
    names = stage_names(recipe)
    available = set(names) & set(OUTPUTS)
    steps: list[Step] = []
    for name in ("generate", "curate", "sft", "feedback", "dpo"):
        if name in names:
            steps.append(_stage_step(name, getattr(recipe, name), run_dir, available, recipe))
    if "ablations" in names:
        steps += [_ablation_step(a, recipe, run_dir, available) for a in recipe.run.ablations]
    if "eval" in names:
        models = _models(recipe, names, run_dir)
        steps += [
            s
            for model, (spec, up) in models.items()
            for s in _eval_steps(recipe.eval, model, spec, up, run_dir)
        ]
    if "report" in names:
        steps.append(_report_step(run_dir, [s.id for s in steps]))
    return steps


def _stage_step(name: str, cfg: Any, run_dir: Path, available: set[str], recipe: Recipe) -> Step:
    cfg = auto_wire(cfg, name, available)
    folder = run_dir / name
    cfg, upstream = resolve_refs(dataclasses.replace(cfg, output_dir=str(folder)), name, run_dir, available)
    launcher = recipe.run.launcher if recipe.run else None
    actions = {
        "generate": lambda resume: _run_generate(cfg),
        "curate": lambda resume: _run_curate(cfg),
        "feedback": lambda resume: _run_feedback(cfg),
        "sft": lambda resume: _run_training("sft", cfg, resume, launcher),
        "dpo": lambda resume: _run_training("dpo", cfg, resume, launcher),
    }
    return Step(name, name, folder, cfg, actions[name], upstream)


def _ablation_step(ablation: AblationConfig, recipe: Recipe, run_dir: Path, available: set[str]) -> Step:
    cfg = ablation_config(recipe.dpo, ablation, f"run.ablations ({ablation.name})")
    cfg = auto_wire(cfg, "dpo", available)
    if ablation.start == "base":  # DPO without dSFT: the base model is the policy's start and its reference
        cfg = dataclasses.replace(cfg, model=base_model(recipe), ref_model=None)
    folder = run_dir / "ablations" / ablation.name
    cfg, upstream = resolve_refs(dataclasses.replace(cfg, output_dir=str(folder)), "dpo", run_dir, available)
    launcher = recipe.run.launcher if recipe.run else None
    action = partial(_run_training, "dpo", cfg, launcher=launcher)
    return Step(f"ablations/{ablation.name}", "ablation", folder, cfg, action, upstream)


def base_model(recipe: Recipe) -> str:
    """The model before any training: run.base_model, else the dSFT start, else the dDPO start."""
    if recipe.run and recipe.run.base_model:
        return recipe.run.base_model
    for cfg in (recipe.sft, recipe.dpo):
        if cfg is not None and not cfg.model.startswith(STAGE_REF):
            return cfg.model
    raise ConfigError("run.base_model: set it (neither sft.model nor dpo.model names a model)")


def _models(recipe: Recipe, names: list[str], run_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """The models to evaluate: name -> (model spec, steps it comes from)."""
    models = {"base": (base_model(recipe), [])}
    for name in ("sft", "dpo"):
        if name in names:
            models[name] = (str(run_dir / OUTPUTS[name]["model"]), [name])
    if "ablations" in names:
        for a in recipe.run.ablations:
            models[a.name] = (str(run_dir / "ablations" / a.name / "final"), [f"ablations/{a.name}"])
    return models


def _eval_steps(cfg: EvalConfig, model: str, spec: str, upstream: list[str], run_dir: Path) -> list[Step]:
    folder = run_dir / "eval" / model
    base = {"model": spec}
    steps = [
        Step(f"eval/{model}/mc-{mc.name}", "mc", folder / f"mc-{mc.name}", {**base, **to_dict(mc)},
             partial(_run_mc, spec, mc, folder / f"mc-{mc.name}"), upstream)
        for mc in cfg.mc
    ]  # fmt: skip
    if cfg.sample_prompts:
        config = {**base, "prompts": cfg.sample_prompts, "max_new_tokens": cfg.sample_max_new_tokens}
        action = partial(_run_samples, spec, model, cfg, folder / "samples.jsonl")
        steps.append(
            Step(f"eval/{model}/samples", "samples", folder / "samples.jsonl", config, action, upstream)
        )
    if cfg.mt_bench is not None:
        out = folder / "mt-bench"
        action = partial(_run_mt_bench, spec, cfg.mt_bench, out)
        steps.append(
            Step(
                f"eval/{model}/mt-bench", "mt_bench", out, {**base, **to_dict(cfg.mt_bench)}, action, upstream
            )
        )
    if cfg.alpaca_eval is not None:
        out = folder / "alpaca-eval"
        action = partial(_run_alpaca_eval, spec, cfg.alpaca_eval, out)
        config = {**base, **to_dict(cfg.alpaca_eval)}
        steps.append(Step(f"eval/{model}/alpaca-eval", "alpaca_eval", out, config, action, upstream))
    return steps


def _report_step(run_dir: Path, upstream: list[str]) -> Step:
    def action(resume: bool) -> None:
        from zephyr.stages.report.run import write_report

        print(f"report: {write_report(run_dir).html}")

    # The report reads every step: its fingerprint follows theirs, so it is rewritten when any is redone.
    return Step("report", "report", None, {}, action, upstream)


# ---------------------------------------------------------------------------------------------------------
# Stage actions (the stage modules are imported when the stage runs)


def _run_generate(cfg: Any) -> None:
    from zephyr.stages.generate.run import run_generate

    run_generate(cfg)


def _run_curate(cfg: Any) -> None:
    from zephyr.stages.curate.run import run_curate

    run_curate(cfg)


def _run_feedback(cfg: Any) -> None:
    from zephyr.stages.feedback.run import run_feedback

    run_feedback(cfg)


def _run_training(kind: str, cfg: Any, resume: bool, launcher: str | None) -> None:
    """sft / dpo in this process, or through `launcher` (e.g. accelerate launch) for several devices."""
    from zephyr.training.checkpoint import latest_checkpoint

    out = Path(cfg.output_dir)
    final_written = (out / "final" / "config.json").is_file()
    resume = resume and (final_written or latest_checkpoint(out) is not None)
    if not resume and out.exists():
        shutil.rmtree(out)  # an attempt that left no checkpoint: nothing to continue from
    if launcher:
        _launch(kind, cfg, resume, launcher)
        return
    if kind == "sft":
        from zephyr.stages.sft.run import run_sft

        run_sft(cfg, resume=resume)
    else:
        from zephyr.stages.dpo.run import run_dpo

        run_dpo(cfg, resume=resume)


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


# The eval sections' field names are the runners' keyword arguments (a test holds them to it).


def _run_mc(spec: str, mc: Any, out: Path, resume: bool = False) -> None:
    from zephyr.stages.mc.run import run_mc

    settings = to_dict(mc)
    settings.pop("name")  # the folder's name, not a setting
    run_mc(model=spec, out=out, **settings)


def _run_mt_bench(spec: str, mt: Any, out: Path, resume: bool = False) -> None:
    # Resuming keeps the folder: answers already written are reused and only the judging is redone.
    from zephyr.stages.mt_bench.run import run_mt_bench

    run_mt_bench(model=spec, out=out, **to_dict(mt))


def _run_alpaca_eval(spec: str, ae: Any, out: Path, resume: bool = False) -> None:
    from zephyr.stages.alpaca_eval.run import run_alpaca_eval

    run_alpaca_eval(model=spec, out=out, **to_dict(ae))


def _run_samples(spec: str, model: str, cfg: EvalConfig, out: Path, resume: bool = False) -> None:
    """Greedy answers of one model to the sample prompts: the report shows them side by side."""
    from zephyr.generation import SamplingParams, make_generator
    from zephyr.io import write_jsonl

    generator = make_generator(spec)
    params = SamplingParams(max_tokens=cfg.sample_max_new_tokens, temperature=0.0)
    completions = generator.generate([[{"role": "user", "content": p}] for p in cfg.sample_prompts], params)
    records = [
        {"prompt": p, "answer": c.text, "model": model, "finish_reason": c.finish_reason}
        for p, c in zip(cfg.sample_prompts, completions, strict=True)
    ]
    write_jsonl(out, records)


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
    if step.folder is None or not step.folder.exists():
        return []
    return [str(step.folder.relative_to(run_dir))]


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
    if same and record.status == "done":
        print(f"{counter} {step.id}: done, skipped{_made_by_another_version(record, step)}", flush=True)
        return
    resume = same and record.status in ("running", "failed")
    why = "" if resume else _why_afresh(record, parts, forced)
    if not resume:
        _clear(step, run_dir)
        _outdate_downstream(step, plan, manifest, run_dir)
    attempts = record.attempts + 1 if resume else 1
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


def _why_afresh(record: StageRecord | None, parts: dict[str, str], forced: bool) -> str:
    """` (config changed)`, ` (--from)`: why a step that ran before runs from the beginning."""
    if record is None:
        return ""
    if forced:
        return " (--from)"
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
