"""The regression check: what a model answered right before training must stay right after it.

Benchmarks averaged over many items can stay flat while a model forgets plain facts (a dDPO run on noisy
preferences that answers "What is the capital of France?" with a string of French words). Two measures a
reader can trust, for every model of a run:

- Fixed factual prompts (`PROMPTS`), answered greedily by every model side by side. An answer is right when
  it holds one of the prompt's expected words (whole words, any case). A trained model that gets a prompt
  wrong that its start model got right has regressed on it.
- Drift: the mean log-probability per answer token of the held-out dSFT conversations (the sft stage's
  eval split, taken again from the curated data with the sft section's `eval_fraction` and `seed`; else
  curate's test split) under each trained model, minus the same under the model it started from (dSFT:
  the base model; dDPO: the dSFT model, or the base for an ablation that starts there). Near 0: the model
  still writes the dSFT data as it did; strongly negative: it has moved away from it.

`update_regression(run_dir)` computes both (each model loaded once, one at a time) into
`RUN/regression.json`, keyed by a fingerprint of the models' files, the prompts and the held-out data: a
report of an unchanged run reads it again instead of loading the models. `regressions` is pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from zephyr import io
from zephyr.core.errors import ZephyrError
from zephyr.core.specs import STAGE_REF
from zephyr.data import chat
from zephyr.data.packing import collate_packed
from zephyr.generation.base import SamplingParams
from zephyr.generation.local import LocalGenerator
from zephyr.models import load as models
from zephyr.scoring.forward import token_logps

logger = logging.getLogger(__name__)

REGRESSION_FILE = "regression.json"
VERSION = 1
MAX_NEW_TOKENS = 32
# (prompt, words any of which makes the answer right): facts SmolLM2-135M-Instruct states correctly
PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("What is 2 + 3?", ("5", "five")),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
)


# ---------------------------------------------------------------------------------------------------------
# Pure


def is_right(answer: str | None, expected: Sequence[str]) -> bool:
    """Whether the answer holds one of the expected words (as a whole word, any case)."""
    if not answer:
        return False
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in expected)


def regressions(right: Mapping[str, Sequence[bool]], starts: Mapping[str, str]) -> dict[str, list[int]]:
    """Per trained model, the prompts (indices) its start model answered right and it answers wrong."""
    found = {}
    for model, start in starts.items():
        if model in right and start in right:
            found[model] = [
                i
                for i, (now, before) in enumerate(zip(right[model], right[start], strict=True))
                if before and not now
            ]
    return found


# ---------------------------------------------------------------------------------------------------------
# The run's models


def run_models(run: Path, recipe: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The models to check, name -> spec (the base model's spec, the trained ones' final folders that
    hold weights), and each trained model's start model, name -> name."""
    models: dict[str, str] = {}
    base = _base_spec(recipe)
    if base is not None:
        models["base"] = base
    starts: dict[str, str] = {}
    trained = {"sft": run / "sft" / "final", "dpo": run / "dpo" / "final"}
    ablations = [a for a in _get(recipe, "run", "ablations") or [] if isinstance(a, Mapping)]
    for ablation in ablations:
        if isinstance(ablation.get("name"), str):
            trained[ablation["name"]] = run / "ablations" / ablation["name"] / "final"
    for name, folder in trained.items():
        if not _has_weights(folder):
            continue
        models[name] = str(folder)
        starts[name] = _start_of(name, recipe, ablations)
    return models, {m: s for m, s in starts.items() if s in models}


def _start_of(name: str, recipe: Mapping[str, Any], ablations: Sequence[Mapping[str, Any]]) -> str:
    if name == "sft":
        return "base"
    if name == "dpo":
        model = _get(recipe, "dpo", "model")
        return "sft" if isinstance(model, str) and model.startswith(f"{STAGE_REF}sft") else "base"
    start = next((a.get("start", "sft") for a in ablations if a.get("name") == name), "sft")
    return "base" if start == "base" else "sft"


def _base_spec(recipe: Mapping[str, Any]) -> str | None:
    for value in (
        _get(recipe, "run", "base_model"),
        _get(recipe, "sft", "model"),
        _get(recipe, "dpo", "model"),
    ):
        if isinstance(value, str) and value and not value.startswith(STAGE_REF):
            return value
    return None


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data


def held_out_conversations(run: Path, recipe: Mapping[str, Any]) -> tuple[list[dict], str | None]:
    """The held-out dSFT conversations (module docstring) and where they come from."""
    sft = _get(recipe, "sft") or {}
    fraction, seed = sft.get("eval_fraction") or 0.0, sft.get("seed", 42)
    eval_data = sft.get("eval_data")
    if isinstance(eval_data, str) and eval_data and not eval_data.startswith(STAGE_REF):
        return _conversations(Path(eval_data)), eval_data
    train = run / "curate" / "train.jsonl"
    if fraction > 0 and train.is_file():
        _, held = io.train_eval_split(_conversations(train), float(fraction), int(seed))
        return held, f"curate/train.jsonl (sft eval split: {fraction}, seed {seed})"
    test = run / "curate" / "test.jsonl"
    if test.is_file():
        return _conversations(test), "curate/test.jsonl"
    return [], None


def _conversations(path: Path) -> list[dict]:
    return io.read_records(path, "conversations", on_bad_record="skip").records


# ---------------------------------------------------------------------------------------------------------
# Computing and caching


def update_regression(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Compute the check into `RUN/regression.json` unless it is there for the same models and data;
    returns it (None when the run has no trained model with weights, or the recipe turns it off)."""
    run = Path(run_dir)
    recipe = _recipe(run)
    if _get(recipe, "report", "regression") is False:
        return None
    models, starts = run_models(run, recipe)
    if not starts:
        return None
    held, source = held_out_conversations(run, recipe)
    fingerprint = _fingerprint(models, held)
    path = run / REGRESSION_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            return saved
    result = compute(models, starts, held) | {"fingerprint": fingerprint, "held_out": source}
    io.write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def compute(
    models: Mapping[str, str], starts: Mapping[str, str], held: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Answers, right / wrong, mean held-out log-probs and drift of every model (loaded one at a time)."""
    answers: dict[str, list[str]] = {}
    logps: dict[str, dict[str, Any]] = {}
    for name, spec in models.items():
        logger.info("regression check: %s (%s)", name, spec)
        answers[name], logps[name] = _measure(spec, held)
    right = {
        m: [is_right(a, words) for a, (_, words) in zip(texts, PROMPTS, strict=True)]
        for m, texts in answers.items()
    }
    drift = {}
    for model, start in starts.items():
        now, before = logps[model]["mean_logp"], logps[start]["mean_logp"]
        drift[model] = {
            "start": start,
            "mean_logp": now,
            "start_mean_logp": before,
            "change": None if now is None or before is None else now - before,
            "tokens": logps[model]["tokens"],
            "conversations": logps[model]["conversations"],
        }
    return {
        "version": VERSION,
        "prompts": [{"prompt": p, "expected": list(words)} for p, words in PROMPTS],
        "models": dict(models),
        "answers": answers,
        "right": right,
        "regressions": regressions(right, starts),
        "drift": drift,
    }


def _measure(spec: str, held: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Greedy answers to `PROMPTS` and the mean log-prob per answer token of `held` under one model (in
    float32: the drift compares numbers across models)."""
    tokenizer = models.load_tokenizer(spec)
    model = models.load_model(spec, dtype=torch.float32).eval()
    total, tokens, counted = 0.0, 0, 0
    with torch.inference_mode():
        for record in held:
            try:
                rendered = chat.render_conversation(tokenizer, record["messages"])
            except ZephyrError:
                continue  # a conversation this template cannot render: the sft stage left it out too
            if not rendered.num_trained:
                continue
            batch = collate_packed([(rendered.input_ids, rendered.loss_mask)]).to(model.device)
            values = token_logps(model, batch)
            total += float(values.sum())
            tokens += int(values.numel())
            counted += 1
    conversations = [[{"role": "user", "content": p}] for p, _ in PROMPTS]
    with LocalGenerator(model, tokenizer, model_id=spec, batch_size=len(PROMPTS)) as generator:
        completions = generator.generate(conversations, SamplingParams(max_tokens=MAX_NEW_TOKENS))
    del model
    logps = {"mean_logp": total / tokens if tokens else None, "tokens": tokens, "conversations": counted}
    return [c.text for c in completions], logps


def _fingerprint(models: Mapping[str, str], held: Sequence[Mapping[str, Any]]) -> str:
    files: dict[str, Any] = {}
    for name, spec in models.items():
        folder = Path(spec)
        if folder.is_dir():
            files[name] = sorted(
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
            )
        else:
            files[name] = spec
    payload = {
        "version": VERSION,
        "prompts": PROMPTS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "models": files,
        "held_out": [r.get("prompt_id") for r in held],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recipe(run: Path) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}
