"""The `eval` stage's own step: greedy answers of one model to the recipe's sample prompts, which the report
shows side by side. The evaluations proper (multiple choice, MT-Bench, AlpacaEval) are stages of their own
(`zephyr.stages.mc`, `mt_bench`, `alpaca_eval`), run by the pipeline once per model."""

from __future__ import annotations

import os
from pathlib import Path

from zephyr.core.config import EvalConfig
from zephyr.generation import SamplingParams, make_generator
from zephyr.io import write_jsonl
from zephyr.stages import stage


def run_samples(cfg: EvalConfig, model: str, out: str | os.PathLike, *, label: str | None = None) -> Path:
    """Write `out/samples.jsonl`: one line per sample prompt with the answer of `model` (a spec), labelled
    `label` (the run's name for the model; default the spec). Returns the file."""
    generator = make_generator(model)
    params = SamplingParams(max_tokens=cfg.sample_max_new_tokens, temperature=0.0)
    completions = generator.generate([[{"role": "user", "content": p}] for p in cfg.sample_prompts], params)
    records = [
        {"prompt": p, "answer": c.text, "model": label or model, "finish_reason": c.finish_reason}
        for p, c in zip(cfg.sample_prompts, completions, strict=True)
    ]
    path = Path(out) / stage("eval").output("samples")
    write_jsonl(path, records)
    return path
