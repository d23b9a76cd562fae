"""The stages of zephyr, one package each (`zephyr.stages.NAME`, entered through its `run` module), and the one
table of them that the command line, the pipeline plan, `zephyr check` and the report read.

An entry gives a stage's name (its recipe section, its folder in a run, `stage:NAME`), its config dataclass,
its run function (named as "module:function" and imported when the stage runs, so reading the table
imports no torch), the files it writes (`stage:NAME:PART` points at them; the first part is the default),
the input fields that an empty value wires to another stage's main output, whether it trains (it runs
through `run.launcher` and its command takes `--resume`), how the pipeline makes its steps, and its
command. Adding a stage is one entry here plus its package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from zephyr.core.config import (
    AblationConfig,
    AlpacaEvalEvalConfig,
    CurateConfig,
    DPOConfig,
    EvalConfig,
    FeedbackConfig,
    GenerateConfig,
    LogpsConfig,
    McEvalConfig,
    MtBenchEvalConfig,
    ReportConfig,
    SFTConfig,
)

# How `zephyr run` makes a stage's steps: `section`, one step in RUN/NAME from the recipe section NAME;
# `ablations`, one per `run.ablations` entry (the dpo section varied) in RUN/ablations/ABLATION;
# `evals`, one per model and evaluation in RUN/eval/MODEL/; `report`, the report of the run folder, always
# last; `evaluation`, an evaluation made by the `evals` stage; None, a command outside the pipeline.
Plan = Literal["section", "ablations", "evals", "report", "evaluation"] | None

# What the training loop writes (`training.checkpoint.FINAL_DIR`, `training.tracking.METRICS_FILE`: the table
# cannot import the loop, which imports torch; tests/test_pipeline.py holds them equal).
_TRAINED = {"model": "final", "metrics": "metrics.jsonl"}
# What every evaluation writes (the report reads results.json).
_EVALUATED = {"results": "results.json", "markdown": "results.md"}


@dataclass(frozen=True)
class Stage:
    """One entry of the stage table (module docstring)."""

    name: str
    config: type  # its dataclass (the recipe section's, or the command's options)
    run: str  # "module:function", called with the config (see `run_function`)
    outputs: Mapping[str, str] = field(default_factory=dict)  # part -> path in the stage's folder
    inputs: Mapping[str, str] = field(default_factory=dict)  # input field -> stage wired to it when empty
    trains: bool = False
    plan: Plan = "section"
    command: str | None = None  # `zephyr COMMAND` (an evaluation: `zephyr eval COMMAND`)
    help: str = ""

    def run_function(self) -> Callable[..., Any]:
        """The stage's run function, imported now."""
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def output(self, part: str | None = None) -> str:
        """The path of an output in the stage's folder (the main one by default)."""
        return self.outputs[part or next(iter(self.outputs))]


STAGES: tuple[Stage, ...] = (
    Stage(
        "generate",
        GenerateConfig,
        "zephyr.stages.generate.run:run_generate",
        outputs={"dialogues": "dialogues.jsonl", "summary": "summary.json"},
        command="generate",
        help="teacher-written dialogues for dSFT (self-instruct, UltraChat)",
    ),
    Stage(
        "curate",
        CurateConfig,
        "zephyr.stages.curate.run:run_curate",
        outputs={"train": "train.jsonl", "test": "test.jsonl", "summary": "curation_report.json"},
        inputs={"input": "generate"},
        command="curate",
        help="curate teacher dialogues into the dSFT set",
    ),
    Stage(
        "sft",
        SFTConfig,
        "zephyr.stages.sft.run:run_sft",
        outputs=_TRAINED,
        inputs={"train_data": "curate"},
        trains=True,
        command="sft",
        help="supervised fine-tuning (dSFT)",
    ),
    Stage(
        "feedback",
        FeedbackConfig,
        "zephyr.stages.feedback.run:run_feedback",
        outputs={
            "pairs": "pairs.jsonl",
            "test": "pairs_test.jsonl",  # only with eval_fraction > 0
            "rated": "rated.jsonl",
            "summary": "feedback_stats.json",
            "ratings_plot": "ratings.png",
        },
        inputs={"prompts": "curate"},
        command="feedback",
        help="AI feedback: completions from several models, a judge, pairs",
    ),
    Stage(
        "dpo",
        DPOConfig,
        "zephyr.stages.dpo.run:run_dpo",
        outputs={**_TRAINED, "data": "dpo_data.json"},
        inputs={"train_data": "feedback"},
        trains=True,
        command="dpo",
        help="direct preference optimisation (dDPO)",
    ),
    Stage(
        "ablations",
        AblationConfig,
        "zephyr.stages.dpo.run:run_dpo",
        outputs={**_TRAINED, "data": "dpo_data.json"},
        trains=True,
        plan="ablations",
    ),
    Stage(
        "logps",
        LogpsConfig,
        "zephyr.stages.logps.run:run_logps",
        plan=None,
        command="logps",
        help="per-pair sequence log-probs of a model on a preference file",
    ),
    Stage(
        "eval",
        EvalConfig,
        "zephyr.stages.eval.run:run_samples",  # its own step, after the evaluations: the sample answers
        outputs={"samples": "samples.jsonl"},
        plan="evals",
        command="eval",
        help="evaluate a model: MT-Bench, AlpacaEval, multiple choice",
    ),
    # The evaluations, in the order `zephyr eval --help` lists them and a run makes their steps. Each
    # writes into RUN/eval/MODEL/COMMAND (one of a list, as `eval.mc`: RUN/eval/MODEL/COMMAND-NAME).
    Stage(
        "mc",
        McEvalConfig,
        "zephyr.stages.mc.run:run_mc",
        outputs={**_EVALUATED, "items": "items.jsonl"},
        plan="evaluation",
        command="mc",
        help="log-likelihood multiple choice (lm-evaluation-harness semantics)",
    ),
    Stage(
        "mt_bench",
        MtBenchEvalConfig,
        "zephyr.stages.mt_bench.run:run_mt_bench",
        outputs={
            **_EVALUATED,
            "answers": "answers.jsonl",
            "judgments": "judgments.jsonl",  # single-answer grading
            "categories_plot": "categories.png",  # single-answer grading, three categories or more
            "pairwise": "pairwise.jsonl",  # pairwise mode (a baseline)
            "baseline_answers": "baseline_answers.jsonl",  # pairwise mode, a baseline model
        },
        plan="evaluation",
        command="mt-bench",
        help="MT-Bench: two-turn answers graded 1-10 by a judge",
    ),
    Stage(
        "alpaca_eval",
        AlpacaEvalEvalConfig,
        "zephyr.stages.alpaca_eval.run:run_alpaca_eval",
        outputs={
            **_EVALUATED,
            "outputs": "outputs.jsonl",
            "annotations": "annotations.jsonl",
            "audit": "judge_audit.jsonl",
        },
        plan="evaluation",
        command="alpaca-eval",
        help="AlpacaEval: pairwise win rate against reference outputs",
    ),
    Stage(
        "report",
        ReportConfig,
        "zephyr.stages.report.run:write_report",
        outputs={"html": "report.html", "json": "report.json", "markdown": "report.md"},  # in RUN itself
        plan="report",
        command="report",
        help="report.json, report.md and a self-contained report.html of a run",
    ),
)

BY_NAME: Mapping[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def pipeline_stages() -> list[Stage]:
    """The stages `zephyr run` can run (`run.stages` names them), in pipeline order."""
    return [s for s in STAGES if s.plan not in (None, "evaluation")]


def present_stages(has_section: Callable[[str], bool], has_ablations: bool) -> list[str]:
    """The pipeline stages a recipe has, in order: each stage whose section it has, the ablations when it
    lists some and has the dpo section they vary, and the report always (the run's `zephyr run` plan and the
    report's idea of what a run should hold)."""
    present = {"report": True, "ablations": has_ablations and has_section("dpo")}
    return [s.name for s in pipeline_stages() if present.get(s.plan or "", has_section(s.name))]


def evaluations() -> list[Stage]:
    """The evaluations of the `eval` stage, each named like its field of `EvalConfig`."""
    return [s for s in STAGES if s.plan == "evaluation"]


def evaluation_folder(evaluation: Stage, cfg: Any) -> str:
    """An evaluation's folder under RUN/eval/MODEL: its command, and its config's name when a recipe may
    list several (`mc-arc`)."""
    name = getattr(cfg, "name", None)
    return f"{evaluation.command}-{name}" if name else str(evaluation.command)
