"""Typed configs built from YAML recipes of plain values, with strict validation.

A recipe is a YAML mapping whose top-level keys are stage sections (`sft`, `dpo`, ...). Each section is
built into its dataclass; unknown keys, wrong types and out-of-range values fail here, before any heavy
work, with a message naming the file and the dotted key (and the closest valid key for typos).

Nothing heavy is imported by this module: `zephyr check` must answer in well under two seconds.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import re
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.core.specs import STAGE_REF, is_hub_spec, parse_hub_spec, parse_model_spec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# ---------------------------------------------------------------------------------------------------------
# Field constraints


def bounded(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> Any:
    """A dataclass field whose numeric value must lie in a range (checked when the config is built)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None or not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{key}: must be >= {meta['ge']}, got {value}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {value}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{key}: must be <= {meta['le']}, got {value}")


# What a string field names: a model spec (`model`), a data source (`data`: a local file, `hf:NAME[@REV][:SPLIT]`
# or an asset), or a local file or folder (`path`). Model and hub specs are parsed when the config is built;
# a pipeline checks the local files and folders before its first stage (`spec_values`).
SpecKind = Literal["model", "data", "path"]


def spec_field(kind: SpecKind, default: Any, **metadata: Any) -> Any:
    """A string field with a default that names a model, a data source or a local path (a list of them, or
    a field without default: `field` with metadata `kind`). `metadata`: `help`, `flag` and `flag_required`
    (see `field_help`)."""
    return field(default=default, metadata={"kind": kind, **metadata})


def _check_spec(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """Parse a model or hub spec once, here, so a malformed one fails with its recipe key."""
    kind = meta.get("kind")
    values = value if isinstance(value, list) else [value]
    for i, item in enumerate(values):
        if not isinstance(item, str) or not item or item.startswith(STAGE_REF):
            continue  # empty (wired by the pipeline) or another stage's output
        where = f"{key}[{i}]" if isinstance(value, list) else key
        try:
            if kind == "model":
                parse_model_spec(item)
            elif kind == "data" and is_hub_spec(item):
                parse_hub_spec(item)
        except ZephyrError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def spec_values(cfg: Any, key: str) -> list[tuple[str, SpecKind, str]]:
    """(dotted key, kind, value) of every non-empty spec field of a config, in nested configs and lists too."""
    found: list[tuple[str, SpecKind, str]] = []
    if isinstance(cfg, list):
        for i, item in enumerate(cfg):
            found += spec_values(item, f"{key}[{i}]")
        return found
    if not dataclasses.is_dataclass(cfg):
        return found
    for f in dataclasses.fields(cfg):
        value, sub = getattr(cfg, f.name), f"{key}.{f.name}"
        kind = f.metadata.get("kind")
        if kind is None:
            found += spec_values(value, sub)
        elif isinstance(value, list):
            found += [(f"{sub}[{i}]", kind, v) for i, v in enumerate(value) if isinstance(v, str) and v]
        elif isinstance(value, str) and value:
            found.append((sub, kind, value))
    return found


# ---------------------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class LoraConfig:
    """LoRA adapters through peft (the `peft` extra). The DPO reference is the model with adapters disabled."""

    r: int = bounded(16, ge=1)
    alpha: float = bounded(32.0, gt=0)
    dropout: float = bounded(0.05, ge=0, le=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_in_4bit: bool = False  # QLoRA; needs bitsandbytes and CUDA


@dataclass
class TrainingConfig:
    """Fields shared by every training stage: there is one training loop."""

    # model spec: PATH, transformers:ID, asset:NAME
    model: str = spec_field("model", "asset:smollm2-135m-instruct")
    tokenizer: str | None = spec_field("model", None)  # defaults to the model's own
    chat_template: str = (
        "auto"  # auto (the tokenizer's, else zephyr) | zephyr | chatml | path to a .jinja file
    )
    train_data: str = spec_field("data", "")  # JSONL / Parquet path or hf:NAME[@REVISION][:SPLIT]
    eval_data: str | None = spec_field("data", None)
    eval_fraction: float = bounded(0.0, ge=0, le=0.5)  # held out from train_data when eval_data is unset
    max_samples: int | None = bounded(None, ge=1)
    on_bad_record: Literal["error", "skip"] = "error"
    output_dir: str = "runs/train"
    num_epochs: float = bounded(1.0, gt=0)
    max_steps: int | None = bounded(None, ge=1)  # optimizer steps; overrides num_epochs when set
    per_device_batch_size: int = bounded(8, ge=1)
    # examples per optimizer step over all processes (SFT: packed sequences, or conversations unpacked; DPO:
    # pairs). The accumulation is derived from it once the process count is known (`resolve_batch`);
    # null: per_device_batch_size × gradient_accumulation_steps × processes, whatever the launch gives
    global_batch_size: int | None = bounded(None, ge=1)
    gradient_accumulation_steps: int | None = bounded(None, ge=1)  # null: from global_batch_size, else 1
    learning_rate: float = bounded(2e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = bounded(0.1, ge=0, le=1)  # of the true number of optimizer steps
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, le=1)
    adam_beta2: float = bounded(0.999, ge=0, le=1)
    adam_epsilon: float = bounded(1e-8, gt=0)
    max_grad_norm: float | None = bounded(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    # fp32: bf16 compute over fp32 weights and AdamW moments (16 bytes a parameter). bf16: weights, gradients
    # and moments in bf16 (8 bytes), stores stochastically rounded so small updates are not lost (docs/training.md)
    master_weights: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    # share of the decoder layers that recompute their activations when gradient_checkpointing is on (evenly
    # spaced); the others keep them: less recompute where memory allows
    gradient_checkpointing_ratio: float = bounded(1.0, gt=0, le=1)
    compile: bool = False  # torch.compile each decoder layer (dynamic shapes); pays on long runs on a GPU
    seed: int = 42
    logging_steps: int = bounded(1, ge=1)
    eval_steps: int | None = bounded(None, ge=1)
    save_steps: int | None = bounded(None, ge=1)
    save_total_limit: int | None = bounded(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    lora: LoraConfig | None = None
    trust_remote_code: bool = False  # only ever true when a recipe says so

    def validate(self, where: str) -> None:
        if self.master_weights == "bf16" and self.precision == "fp32":
            raise ConfigError(
                f"{where}.master_weights: bf16 weights contradict precision fp32; use auto or bf16"
            )
        if self.global_batch_size is not None:
            per_process = self.per_device_batch_size * (self.gradient_accumulation_steps or 1)
            if self.global_batch_size % per_process:  # no process count can make up the difference
                raise ConfigError(
                    f"{where}.global_batch_size: {self.global_batch_size} is not a multiple of "
                    f"{_per_process_text(self)} = {per_process}"
                )


def _per_process_text(cfg: TrainingConfig) -> str:
    text = f"per_device_batch_size {cfg.per_device_batch_size}"
    if cfg.gradient_accumulation_steps is not None:
        text += f" × gradient_accumulation_steps {cfg.gradient_accumulation_steps}"
    return text


@dataclass(frozen=True)
class BatchPlan:
    """How an optimizer step's examples are split: processes × per device × accumulation = global."""

    processes: int
    per_device: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.per_device * self.accumulation

    def __str__(self) -> str:
        processes = _processes_text(self.processes)
        return (
            f"global batch {self.global_batch} = {processes} × {self.per_device} per device × "
            f"{self.accumulation} accumulation"
        )


def batch_plan(cfg: TrainingConfig, processes: int, where: str) -> BatchPlan:
    """The split of a training section's global batch over `processes` (the launch's world size).

    `global_batch_size` fixes the step (the paper's 512 sequences for dSFT, 32 pairs for dDPO) on any number
    of processes that divides it; `gradient_accumulation_steps` alone fixes the step per process instead.
    Both set must agree; neither set is one micro-batch per process.
    """
    per_device, accumulation, wanted = (
        cfg.per_device_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.global_batch_size,
    )
    if wanted is None:
        return BatchPlan(processes, per_device, accumulation or 1)
    if accumulation is not None:
        plan = BatchPlan(processes, per_device, accumulation)
        if plan.global_batch != wanted:
            raise ConfigError(
                f"{where}.global_batch_size: {wanted} ≠ per_device_batch_size {per_device} × "
                f"gradient_accumulation_steps {accumulation} × {_processes_text(processes)} = "
                f"{plan.global_batch}; set only global_batch_size (the accumulation follows from the process "
                "count)"
            )
        return plan
    per_step = per_device * processes
    if wanted % per_step:
        fits = [n for n in range(1, wanted // per_device + 1) if wanted % (per_device * n) == 0]
        hint = f"process counts that fit: {', '.join(map(str, fits))}" if fits else "no process count fits"
        raise ConfigError(
            f"{where}.global_batch_size: {wanted} is not divisible by per_device_batch_size {per_device} × "
            f"{_processes_text(processes)} = {per_step}; {hint} (or change per_device_batch_size)"
        )
    return BatchPlan(processes, per_device, wanted // per_step)


def _processes_text(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


_Training = typing.TypeVar("_Training", bound=TrainingConfig)


def resolve_batch(cfg: _Training, processes: int, where: str) -> _Training:
    """The training config with its batch resolved for `processes`: both global_batch_size and
    gradient_accumulation_steps filled in (what the run's resolved config records)."""
    plan = batch_plan(cfg, processes, where)
    return dataclasses.replace(
        cfg, global_batch_size=plan.global_batch, gradient_accumulation_steps=plan.accumulation
    )


@dataclass
class SFTConfig(TrainingConfig):
    """dSFT: supervised fine-tuning on dialogues (the assistant's tokens, or every token: `loss_on`)."""

    output_dir: str = "runs/sft"
    max_length: int = bounded(2048, ge=16)  # paper: packed to 2048 tokens
    packing: bool = True  # best-fit-decreasing bins, no attention across documents
    # assistant: the answers and their end-of-turn tokens; all: every token of each conversation, template
    # and user turns too (what SFTTrainer's language-modelling loss trained on; docs/training.md)
    loss_on: Literal["assistant", "all"] = "assistant"
    learning_rate: float = bounded(2e-5, gt=0)  # paper: cosine, peak 2e-5
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class DPOConfig(TrainingConfig):
    """dDPO: preference optimisation from the dSFT model, which is also the reference."""

    output_dir: str = "runs/dpo"
    # defaults to `model` (the dSFT model is its own reference)
    ref_model: str | None = spec_field("model", None)
    loss: Literal["sigmoid", "ipo", "hinge", "cdpo", "rpo", "simpo"] = "sigmoid"
    beta: float = bounded(0.1, gt=0)  # paper: 0.1 (handbook retuned: 0.01)
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)  # cDPO: probability that a label is flipped
    rpo_alpha: float = bounded(1.0, ge=0)
    simpo_gamma: float = bounded(0.5, ge=0)
    reference: Literal["precomputed", "online", "none"] = "precomputed"
    # Each pair's prompt runs once (rejected tokens attend to the chosen side's prompt keys): the same
    # log-probs with less compute. Off by default until its CUDA path is verified on a GPU (docs/dpo.md).
    prefix_sharing: bool = False
    max_length: int = bounded(1024, ge=16)  # paper: 1024
    max_prompt_length: int = bounded(512, ge=1)  # paper: 512
    learning_rate: float = bounded(5e-7, gt=0)  # paper: 5e-7
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"  # paper: linear, 10% warmup

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"{where}.max_prompt_length: must be < max_length ({self.max_length})")
        if self.loss == "simpo" and self.reference != "none":
            raise ConfigError(f"{where}.reference: loss 'simpo' is reference-free; set reference: none")
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ConfigError(f"{where}.label_smoothing: loss 'cdpo' needs label_smoothing > 0")
        if self.label_smoothing > 0 and self.loss != "cdpo":
            # never ignore it silently: label smoothing is what the cdpo loss is
            raise ConfigError(f"{where}.label_smoothing: only used by loss 'cdpo' (loss is '{self.loss}')")


@dataclass
class GeneratorConfig:
    """One teacher / generator: a model spec plus how to sample from it."""

    # PATH, transformers:ID, asset:NAME, openai:MODEL@URL, vllm:PATH
    model: str = spec_field("model", "asset:smollm2-135m-instruct")
    name: str | None = None  # label written into outputs; defaults to the model spec
    system_prompt: str | None = None  # e.g. UltraFeedback's principle prompts (honesty, helpfulness, ...)
    temperature: float = bounded(0.7, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_tokens: int = bounded(256, ge=1)
    batch_size: int = bounded(8, ge=1)  # local backends
    max_concurrency: int = bounded(8, ge=1)  # HTTP backends
    timeout: float = bounded(120.0, gt=0)  # seconds per HTTP request
    max_retries: int = bounded(5, ge=0)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never written anywhere
    # HTTP backends: a client-side limit under the provider's (null: none); a Retry-After pauses every request
    requests_per_minute: int | None = bounded(None, ge=1)
    tokens_per_minute: int | None = bounded(None, ge=1)
    # answers stored and reused for identical requests (model, messages, sampling): HTTP ones in the run's
    # request cache (RUN/cache/requests.sqlite: a paid call is never repeated), local ones in the stage
    # folder (a killed stage continues from them); false asks every request again
    cache: bool = True
    # local backends: the weights' dtype (auto: float32 on CPU, bfloat16 on CUDA; vLLM: the model's own)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # vLLM in this process (one engine alive at a time): GPUs per engine, share of each GPU's memory it
    # takes, longest sequence (null: the model's own)
    tensor_parallel_size: int = bounded(1, ge=1)
    gpu_memory_utilization: float = bounded(0.9, gt=0, le=1)
    max_model_len: int | None = bounded(None, ge=16)

    @property
    def label(self) -> str:
        return self.name or self.model


@dataclass
class GenerateConfig:
    """dSFT data: teacher-written dialogues (self-instruct refinement or UltraChat-style multi-turn)."""

    strategy: Literal["self_instruct", "ultrachat"] = "ultrachat"
    # seed prompts / topics / materials (JSONL)
    seeds: str = spec_field("data", "recipes/data/seeds/questions.jsonl")
    output_dir: str = "runs/generate"
    teacher: GeneratorConfig = field(default_factory=GeneratorConfig)
    user_simulator: GeneratorConfig | None = None  # ultrachat: the user's side; defaults to the teacher
    num_prompts: int | None = bounded(None, ge=1)
    rounds: int = bounded(2, ge=1)  # self_instruct: J refinement rounds
    keep_all_rounds: bool = False  # self_instruct: keep every (x_j, y_j), not only the final pair
    min_turns: int = bounded(3, ge=1)  # ultrachat: user/assistant exchanges per dialogue (paper: 3-7)
    max_turns: int = bounded(7, ge=1)
    seed: int = 42

    def validate(self, where: str) -> None:
        if self.max_turns < self.min_turns:
            raise ConfigError(f"{where}.max_turns: must be >= min_turns ({self.min_turns})")


@dataclass
class JudgeConfig:
    """The AI judge of completions (shared with evaluation)."""

    model: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(temperature=0.0, max_tokens=512))
    mode: Literal["text", "logprobs"] = "text"  # logprobs: expected rating from rating-token probabilities
    scale: int = bounded(10, ge=2)  # ratings 1..scale (UltraFeedback's rubric: 1-5)
    layout: Literal["all_aspects", "per_aspect"] = "all_aspects"  # one call for all aspects, or one each
    aspects: list[str] = field(
        default_factory=lambda: ["instruction_following", "helpfulness", "honesty", "truthfulness"]
    )
    template_dir: str | None = spec_field("path", None)  # overrides the shipped rubric templates by file name
    repeats: int = bounded(1, ge=1)  # judgments per completion; the median is kept
    # the completions' order in each repeat: shuffle (a new random order each repeat), or balanced (a random
    # order, its reverse, then rotations of it and their reverses: 2 repeats cancel a bias that grows with the
    # position; repeats = the completions shown (even) put each at every position once, cancelling any)
    order: Literal["shuffle", "balanced"] = "shuffle"
    audit_log: bool = True  # every request and raw answer, one JSON line each
    # zephyr: zephyr's own rubric (templates/feedback); ultrafeedback: UltraFeedback's published annotation
    # protocol (its rubric text from the ultrafeedback-templates asset, answer format, parser and retries)
    preset: Literal["zephyr", "ultrafeedback"] = "zephyr"

    @staticmethod
    def preset_defaults(data: dict[str, Any]) -> dict[str, Any]:
        """What a preset sets where the recipe does not (`build` merges the recipe's own keys over it)."""
        if data.get("preset") != "ultrafeedback":
            return {}
        # UltraFeedback, src/data_annotation/annotate_preference.py: GPT-4 at temperature 0, top_p 0.6,
        # max_tokens 500; one call per aspect, each rated 1-5
        return {
            "scale": 5,
            "layout": "per_aspect",
            "model": {"temperature": 0.0, "top_p": 0.6, "max_tokens": 500},
        }

    def validate(self, where: str) -> None:
        if self.preset != "ultrafeedback":
            return
        fixed = {"scale": (self.scale, 5), "layout": (self.layout, "per_aspect"), "mode": (self.mode, "text")}
        for key, (value, wanted) in fixed.items():
            if value != wanted:
                raise ConfigError(f"{where}.{key}: the ultrafeedback preset needs {wanted!r}, got {value!r}")
        if self.template_dir is not None:
            raise ConfigError(
                f"{where}.template_dir: the ultrafeedback preset's text is UltraFeedback's (use preset zephyr "
                "for templates of your own)"
            )


@dataclass
class Price:
    """What a model's tokens cost: USD per million prompt tokens and per million completion tokens."""

    prompt: float = bounded(0.0, ge=0)
    completion: float = bounded(0.0, ge=0)


@dataclass
class FeedbackConfig:
    """AI feedback: K completions per prompt from a pool of generators, rated by a judge, binarized."""

    # conversations / pairs / prompt file; the prompt is all but the last assistant turn
    prompts: str = spec_field("data", "")
    output_dir: str = "runs/feedback"
    on_bad_record: Literal["error", "skip"] = "skip"
    num_prompts: int | None = bounded(None, ge=1)
    generators: list[GeneratorConfig] = field(default_factory=list)  # the pool (>= completions_per_prompt)
    completions_per_prompt: int = bounded(4, ge=2)  # paper: 4 models drawn from a pool of 17
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    rejected: Literal["random", "lowest"] = "random"  # paper: a random one of the other three
    min_margin: float = bounded(0.0, ge=0)
    drop_ties: bool = False  # paper: a tie for the top is no reason to drop a prompt
    tie_break: Literal["random", "first"] = "random"  # which of a tie for the top is chosen (H4: first)
    # what binarization ranks by: mean of the aspect ratings (paper), or UltraFeedback's critique
    # overall_score (HuggingFaceH4/ultrafeedback_binarized; imported raw UltraFeedback records only)
    score: Literal["mean", "overall"] = "mean"
    eval_fraction: float = bounded(0.0, ge=0, le=0.5)  # held-out pairs (test_prefs)
    # prompts per generator call and per judge batch, written as each ends: larger batches, or less lost
    # to an interruption
    chunk_prompts: int = bounded(64, ge=1)
    # the cost in feedback_stats: a price per generator name (or model spec) and for the judge's name
    prices: dict[str, Price] = field(default_factory=dict)
    seed: int = 42

    def validate(self, where: str) -> None:
        if self.score == "overall" and self.generators:
            raise ConfigError(
                f"{where}.score: 'overall' ranks by UltraFeedback's overall_score, which only imported raw "
                "UltraFeedback records carry (no generators); judged completions rank by 'mean'"
            )
        if self.generators and len(self.generators) < self.completions_per_prompt:
            raise ConfigError(
                f"{where}.generators: {len(self.generators)} generators for "
                f"completions_per_prompt {self.completions_per_prompt}; add generators or lower it"
            )
        names = {n for g in [*self.generators, self.judge.model] for n in (g.label, g.model)}
        for name in self.prices:
            if name not in names:
                raise ConfigError(
                    f"{where}.prices.{name}: names no generator or judge (their names: "
                    f"{', '.join(sorted(g.label for g in [*self.generators, self.judge.model]))})"
                )

    def price_table(self) -> dict[str, dict[str, float]]:
        """USD per million prompt / completion tokens by generator or judge name (`prices` keyed by name,
        else by model spec); models without a price are left out."""
        table = {}
        for g in [*self.generators, self.judge.model]:
            price = self.prices.get(g.label) or self.prices.get(g.model)
            if price is not None:
                table[g.label] = {"prompt": price.prompt, "completion": price.completion}
        return table


@dataclass
class CurateConfig:
    """Curation of teacher dialogues into the dSFT set; every filter reports how many rows it removed."""

    input: str = spec_field("data", "")  # conversations file (JSONL / Parquet / hf:NAME[:SPLIT])
    output_dir: str = "runs/curate"
    on_bad_record: Literal["error", "skip"] = "skip"
    truecase: bool = True  # capitalise sentence starts (ultrachat_200k was truecased)
    drop_refusals: bool = True  # "As an AI language model", "I don't have emotions", ... (ultrachat_200k)
    refusal_patterns: list[str] | None = None  # regexes; None = the built-in list
    dedup_exact: bool = True
    near_dup_threshold: float | None = bounded(0.9, gt=0, le=1)  # MinHash Jaccard; null disables
    min_turns: int = bounded(1, ge=1)  # user/assistant exchanges
    max_turns: int | None = bounded(None, ge=1)
    min_chars: int = bounded(1, ge=0)  # per assistant message
    max_chars: int | None = bounded(None, ge=1)  # per message
    # eval prompt sources
    decontaminate: list[str] = field(default_factory=lambda: ["asset:mt-bench"], metadata={"kind": "data"})
    ngram: int = bounded(13, ge=1)  # n-gram length for decontamination (words)
    contamination_threshold: float = bounded(0.5, gt=0, le=1)  # share of an eval prompt's n-grams found
    test_fraction: float = bounded(0.05, ge=0, le=0.5)  # deterministic split by prompt_id hash
    seed: int = 42

    def validate(self, where: str) -> None:
        if self.max_turns is not None and self.max_turns < self.min_turns:
            raise ConfigError(f"{where}.max_turns: must be >= min_turns ({self.min_turns})")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"{where}.max_chars: must be >= min_chars ({self.min_chars})")


@dataclass
class McEvalConfig:
    """One multiple-choice set (lm-evaluation-harness semantics): a preset or an MC JSONL file."""

    # label in results and reports; also the folder name under eval/MODEL/ (a recipe key, not a flag)
    name: str = field(default="mc", metadata={"flag": False})
    # MC JSONL file or hf:NAME[@REVISION][:SPLIT]; null with a preset: the preset's hub dataset
    data: str | None = spec_field("data", None)
    preset: str | None = None  # arc | hellaswag | mmlu | truthfulqa | truthfulqa_mc1 (Open LLM v1 settings)
    fewshot_data: str | None = spec_field("data", None)  # file of few-shot examples (MC format)
    num_fewshot: int | None = bounded(None, ge=0)  # few-shot examples per item (null: the preset's, else 0)
    # left-truncate contexts to this many tokens (null: the model's)
    max_length: int | None = bounded(None, ge=1)
    batch_size: int = bounded(16, ge=1)  # continuations scored per forward pass
    limit: int | None = bounded(None, ge=1)  # first N items (of each subject for MMLU)

    def validate(self, where: str) -> None:
        if self.data is None and self.preset is None:
            raise ConfigError(
                f"{where}.data: set data (an MC JSONL file: --data FILE) or preset (--preset NAME)"
            )


@dataclass
class MtBenchEvalConfig:
    """MT-Bench: two-turn answers graded 1-10 by a judge (FastChat llm_judge protocol)."""

    # judge model spec, e.g. openai:gpt-4@https://HOST/v1 (paper: gpt-4); the command line must name one
    judge: str = spec_field("model", "asset:smollm2-135m-instruct", flag_required=True)
    questions: str | None = spec_field(
        "path", None
    )  # FastChat question.jsonl (null: the mt-bench asset, 80 questions)
    limit: int | None = bounded(None, ge=1)  # first N questions
    max_new_tokens: int = bounded(1024, ge=1)  # answer tokens per turn (FastChat: 1024)
    judge_max_tokens: int = bounded(2048, ge=1)  # judge answer tokens (FastChat: 2048)
    # pairwise mode: a baseline model spec or its answers.jsonl; judged in both orders (position swap)
    baseline: str | None = spec_field("model", None)
    # text: parse the judge's answer; logprobs: expected score from its token probabilities (local judges)
    judge_mode: Literal["text", "logprobs"] = "text"


# The paper's AlpacaEval (1) annotator, GPT-4 ranking the two outputs; AlpacaEval 2.0's default is
# weighted_alpaca_eval_gpt4_turbo. The one definition: the recipe key, the CLI flag and the runner read it.
DEFAULT_ALPACA_EVAL_ANNOTATOR = "alpaca_eval_gpt4"


@dataclass
class AlpacaEvalEvalConfig:
    """AlpacaEval: pairwise win rate against reference outputs."""

    # judge model spec (paper: gpt-4, with the alpaca_eval_gpt4 annotator); the command line must name one
    judge: str = spec_field("model", "asset:smollm2-135m-instruct", flag_required=True)
    # JSONL of instruction / output, or hf:NAME[@REVISION][:SPLIT]
    instructions: str = spec_field("data", "hf:tatsu-lab/alpaca_eval:eval")
    limit: int | None = bounded(None, ge=1)  # N instructions, those alpaca_eval's max_instances=N takes
    max_new_tokens: int = bounded(2048, ge=1)  # answer tokens
    # alpaca_eval annotator of the alpaca-eval-templates asset: alpaca_eval_gpt4 (AlpacaEval 1, the paper's),
    # weighted_alpaca_eval_gpt4_turbo (AlpacaEval 2.0), chatgpt
    annotator: str = DEFAULT_ALPACA_EVAL_ANNOTATOR
    # text: the annotator's protocol; logprobs: preference from the judge's token probabilities (local judges)
    judge_mode: Literal["text", "logprobs"] = "text"
    # alpaca_eval's df_gamed.csv (FILE, or hf:tatsu-lab/alpaca_eval[:FILE]): instruction difficulty and gamed
    # baselines for the leaderboard's length_controlled_v1 LC win rate; null: length_controlled_minimal
    lc_data: str | None = spec_field("data", None)


@dataclass
class EvalTarget:
    """What `zephyr eval ...` measures and where it writes (`zephyr run` gives each evaluation its own)."""

    model: str = field(metadata={"kind": "model"})  # the model to evaluate (spec)
    out: str  # the output folder


@dataclass
class LogpsConfig:
    """`zephyr logps`: per-pair sequence log-probs of a model on a preference file (DPO's reference pass)."""

    model: str = field(metadata={"kind": "model"})  # the model (spec) that scores the pairs
    data: str = field(
        metadata={"kind": "data"}
    )  # preference pairs: JSONL / Parquet / hf:NAME[@REVISION][:SPLIT]
    out: str  # the JSONL file written, one line per pair
    # auto (the tokenizer's, else zephyr) | zephyr | chatml | path to a .jinja file
    chat_template: str = "auto"
    batch_size: int = bounded(8, ge=1)  # pairs per forward pass
    max_length: int | None = bounded(None, ge=1)  # truncate pairs longer than this (null: no truncation)
    max_prompt_length: int | None = bounded(None, ge=1)  # prompt tokens kept when a pair is truncated
    on_bad_record: Literal["error", "skip"] = "error"
    prefix_sharing: bool = False  # run each pair's prompt once (the same numbers, less compute)

    def validate(self, where: str) -> None:
        short, long = self.max_prompt_length, self.max_length
        if short is not None and long is not None and short >= long:
            raise ConfigError(f"{where}.max_prompt_length: must be < max_length ({self.max_length})")


@dataclass
class EvalConfig:
    """What `zephyr run` measures for every model of the run (base, dSFT, dDPO, each ablation)."""

    mc: list[McEvalConfig] = field(default_factory=list)
    mt_bench: MtBenchEvalConfig | None = None
    alpaca_eval: AlpacaEvalEvalConfig | None = None
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily by every model, side by side
    sample_max_new_tokens: int = bounded(128, ge=1)

    def validate(self, where: str) -> None:
        names = [m.name for m in self.mc]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}.mc: names must be unique, repeated: {', '.join(dup)}")


@dataclass
class AblationConfig:
    """A dDPO variant trained and evaluated next to the main run: the paper's ablations, runnable."""

    name: str = ""  # folder name under ablations/ and row label in the comparison table
    start: Literal["base", "sft"] = "sft"  # base: DPO without dSFT (the base model is its own reference)
    # dotted dpo keys over the recipe's dpo, e.g. beta=0.01
    overrides: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"{where}.name: letters, digits, '_', '.', '-' only, got {self.name!r}")
        try:
            for path, _ in parse_overrides(self.overrides):
                _check_override_path(DPOConfig, path)
        except ConfigError as exc:
            raise ConfigError(f"{where}.overrides: {exc}") from None


@dataclass
class ReportConfig:
    """What the report shows beside the run's own models: reference rows in the comparison table."""

    paper_reference: bool = False  # the paper's published Zephyr-7B-β numbers (paper / model card) as a row
    # YAML/JSON files of rows: label, source, values
    references: list[str] = field(default_factory=list, metadata={"kind": "path"})
    # the regression check: fixed factual prompts answered greedily by every model, and each trained model's
    # drift on the held-out dSFT data (loads each model once when it changed; off: the report reads files only)
    regression: bool = True

    def validate(self, where: str) -> None:
        for i, path in enumerate(self.references):
            if not path.endswith((".yaml", ".yml", ".json")):
                raise ConfigError(f"{where}.references[{i}]: a .yaml, .yml or .json file, got {path!r}")


@dataclass
class RunConfig:
    """`zephyr run`: the stages of a pipeline recipe into one run folder (stage outputs are placed there)."""

    output_dir: str = "runs/pipeline"
    # pipeline stages to run (`pipeline_stage_names`); null = every stage the recipe has a section for, in
    # pipeline order
    stages: list[str] | None = None
    # the model before dSFT, evaluated as "base"; null = sft.model
    base_model: str | None = spec_field("model", None)
    launcher: str | None = (
        None  # training stages as `LAUNCHER -m zephyr sft|dpo ...`, e.g. "accelerate launch"
    )
    ablations: list[AblationConfig] = field(default_factory=list)

    def validate(self, where: str) -> None:
        known = pipeline_stage_names()
        for i, name in enumerate(self.stages or []):
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(
                    f"{where}.stages[{i}]: must be one of {', '.join(known)}, got {name!r}{extra}"
                )
        names = [a.name for a in self.ablations]
        reserved = {"base", "sft", "dpo"} & set(names)
        if reserved:
            raise ConfigError(
                f"{where}.ablations: {sorted(reserved)} name the run's own models; pick another"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}.ablations: names must be unique, repeated: {', '.join(dup)}")


@dataclass
class Recipe:
    """A recipe file: one optional section per stage (`run` and `eval` are used by `zephyr run`)."""

    run: RunConfig | None = None
    generate: GenerateConfig | None = None
    curate: CurateConfig | None = None
    sft: SFTConfig | None = None
    feedback: FeedbackConfig | None = None
    dpo: DPOConfig | None = None
    eval: EvalConfig | None = None
    report: ReportConfig | None = None

    def validate(self, where: str) -> None:
        if self.run is None or not self.run.ablations:
            return
        if self.dpo is None:
            raise ConfigError(f"{where}: run.ablations vary the dpo section; add `dpo:`")
        for i, ablation in enumerate(self.run.ablations):
            ablation_config(self.dpo, ablation, f"run.ablations[{i}]")


def pipeline_stage_names() -> list[str]:
    """The stages `zephyr run` can run (what `run.stages` may name), in pipeline order: the recipe's sections
    but `run`, and after dpo the ablations (`run.ablations`, dpo trained again with changes).

    Checked here so that a misspelt stage fails when the recipe loads, naming its line; derived from the
    recipe schema, which names every section stage anyway, because the stage table
    (`zephyr.stages.pipeline_stages`) sits above this module. tests/test_pipeline.py holds the two equal.
    """
    names = [f.name for f in dataclasses.fields(Recipe) if f.name != "run"]
    names.insert(names.index("dpo") + 1, "ablations")
    return names


def ablation_config(dpo: DPOConfig, ablation: AblationConfig, where: str = "ablation") -> DPOConfig:
    """The dpo section with an ablation's overrides applied, validated like the section itself."""
    data = to_dict(dpo)
    for path, value in parse_overrides(ablation.overrides):
        _merge(data, path, value)
    try:
        return build(DPOConfig, data, "dpo")
    except ConfigError as exc:
        raise ConfigError(f"{where} ({ablation.name}): {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain values


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(tp: Any, value: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}{extra}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads `2e-5` (no dot) as a string; accept any string that is a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    full = f"{prefix}.{key}" if prefix else key
    if hint:
        close = f"{prefix}.{hint[0]}" if prefix else hint[0]
        return ConfigError(f"unknown key '{full}' (did you mean '{close}'?)")
    return ConfigError(f"unknown key '{full}' (valid keys: {', '.join(names)})")


_Config = typing.TypeVar("_Config", bound="DataclassInstance")


def build(cls: type[_Config], data: Any, prefix: str = "") -> _Config:
    """Build dataclass `cls` from a mapping of plain values, validating every key and value."""
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    preset_defaults = getattr(cls, "preset_defaults", None)
    if preset_defaults is not None:  # values a chosen preset implies, under the mapping's own
        data = _deep_merge(preset_defaults(data), data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, str(key), prefix)
    required = [n for n, f in fields.items() if _is_required(f) and n not in data]
    if required:
        full = [f"{prefix}.{n}" if prefix else n for n in required]
        raise ConfigError(f"{', '.join(full)}: required")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        value = _over_factory_default(fields[name], value)
        values[name] = _coerce(hints[name], value, key)
        _check_range(key, values[name], fields[name].metadata)
        _check_spec(key, values[name], fields[name].metadata)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _over_factory_default(f: dataclasses.Field[Any], value: Any) -> Any:
    """A partial mapping for a section whose default is built by a factory (e.g. a judge that samples at
    temperature 0) overrides that default's values, not the section class's own defaults."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default) or isinstance(default, type) or default == type(default)():
        return value  # the class's own defaults: `build` applies them (and a preset's) itself
    return _deep_merge(dataclasses.asdict(default), value)


def _check_override_path(cls: type, path: list[str]) -> None:
    """Fail on an override whose dotted key names no field, before it is merged into the recipe."""
    prefix = ""
    for part in path:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # inside a dict or list value: checked when built
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            err = _unknown_key(cls, part, prefix)
            raise ConfigError(f"{err} in override '{'.'.join(path)}'")
        cls = _is_optional(typing.get_type_hints(cls)[part])[1]
        prefix = f"{prefix}.{part}" if prefix else part


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings into (path, value); values are parsed as YAML scalars (`true`, `3`, `[a, b]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}': expected KEY.SUB=VALUE")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from None
        parsed.append((key.split("."), value))
    return parsed


def _merge(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


KeyLines = dict[str, tuple[Path, int]]  # dotted key ("sft.lora.r", "run.ablations[0].name") -> (file, line)


def _read_recipe_file(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], KeyLines]:
    """A recipe's mapping, with the files it `include`s (relative to it) merged under its own sections, and
    where each key was written (for errors that name the line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of stage sections")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include: expected a list of recipe files, got {includes!r}")
    merged: dict[str, Any] = {}
    lines: KeyLines = {}
    for name in includes:
        target = (path.parent / name).resolve()
        if target in seen or target == path.resolve():
            raise ConfigError(f"{path}: include: {name} includes itself")
        included, included_lines = _read_recipe_file(target, (*seen, path.resolve()))
        merged = _deep_merge(merged, included)
        lines.update(included_lines)
    lines.update({key: (path, line) for key, line in _key_lines(yaml.compose(text)).items()})
    return _deep_merge(merged, data), lines


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """1-based line of every key of a composed YAML document, by dotted path."""
    found: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            found[path] = key.start_mark.line + 1
            found.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found[f"{prefix}[{i}]"] = item.start_mark.line + 1
            found.update(_key_lines(item, f"{prefix}[{i}]"))
    return found


_ERROR_KEY = re.compile(r"^(?:unknown key '([^']+)'|([A-Za-z_][\w.\[\]-]*)(?: \([^)]*\))?:)")


def _located(exc: ConfigError, source: str, lines: KeyLines, overridden: list[str]) -> ConfigError:
    """`FILE:LINE: message` when the key the message names was written in a recipe file, else `FILE: ...`."""
    match = _ERROR_KEY.match(str(exc))
    key = (match.group(1) or match.group(2)) if match else ""
    if key and not any(key == o or key.startswith((o + ".", o + "[")) for o in overridden):
        while key:
            if key in lines:
                file, line = lines[key]
                return ConfigError(f"{file}:{line}: {exc}")
            key = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return ConfigError(f"{source}: {exc}")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or none), apply dotted overrides and validate; errors name the file, the line
    where the key was written (for keys from a file) and the key."""
    source = str(path) if path else "<command line>"
    data, lines = _read_recipe_file(Path(path), ()) if path is not None else ({}, {})
    try:
        parsed = parse_overrides(overrides or [])
        for key_path, _ in parsed:
            _check_override_path(Recipe, key_path)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for key_path, value in parsed:
        _merge(data, key_path, value)
    try:
        return build(Recipe, data)
    except ConfigError as exc:
        raise _located(exc, source, lines, [".".join(k) for k, _ in parsed]) from None


def section(recipe: Recipe, name: str, source: str) -> Any:
    """The stage section a command needs; a clear error when the recipe lacks it."""
    cfg = getattr(recipe, name)
    if cfg is None:
        raise ConfigError(f"{source}: no '{name}' section (add `{name}:` with its keys to the recipe)")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Field help (the command-line flags generated from a config read it)


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: its metadata `help`, else the comment written with it in the source (on its
    line, or the comment lines right above it). So an option is described once, where it is defined.

    Other field metadata the command line reads: `flag` False (a recipe key only, no flag) and
    `flag_required` True (the flag must be given, whatever the recipe default).
    """
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_field_comments(klass.__module__).get(klass.__qualname__, {}))
    return {f.name: f.metadata.get("help", comments.get(f.name, "")) for f in dataclasses.fields(cls)}


@functools.cache
def _field_comments(module: str) -> dict[str, dict[str, str]]:
    """class name -> field name -> its comment, for every class of a module's source."""
    try:
        source = inspect.getsource(__import__(module, fromlist=["_"]))
    except (OSError, TypeError):  # no source (a frozen or compiled-only install): no help text
        return {}
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            found[node.name] = {
                item.target.id: _comment_of(item, comments, lines)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return found


def _comment_of(node: ast.AnnAssign, comments: dict[int, str], lines: list[str]) -> str:
    """The comment on a field's lines, else the block of comment lines right above it."""
    end = node.end_lineno or node.lineno
    own = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
    if own:
        return " ".join(own)
    above: list[str] = []
    n = node.lineno - 1
    while n in comments and lines[n - 1].lstrip().startswith("#"):
        above.insert(0, comments[n])
        n -= 1
    return " ".join(above)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain values of a config, for saving next to outputs."""
    return dataclasses.asdict(cfg)


def save_resolved(
    cfg: Any, out_dir: str | Path, name: str = "resolved_config.yaml", comment: str | None = None
) -> Path:
    """Write the resolved config into an output folder (every output carries the config that made it);
    `comment` heads the file as a YAML comment (what was resolved at run time, e.g. the batch split)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    head = f"# {comment}\n" if comment else ""
    target.write_text(head + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return target
