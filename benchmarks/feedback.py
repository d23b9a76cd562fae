"""AI feedback throughput: zephyr's feedback stage against distilabel's UltraFeedback pipeline, one run.

The same work through both: the first N prompts of recipes/data/feedback_prompts.jsonl; four generators,
SmolLM2-135M-Instruct under the quickstart's four settings (two temperatures, two system prompts), each
answering every prompt with at most `--max-tokens` tokens; one judge, SmolLM2-135M-Instruct, greedy, that
reads the prompt and its four answers and writes a helpfulness rating for each (one call per prompt, at
most `--judge-max-tokens` tokens: zephyr's text mode, distilabel's `UltraFeedback(aspect="helpfulness")`).
Both run the models with transformers on this machine, models loaded inside the timed run, each in a fresh
process of its own (distilabel forks a process per step: a parent that has already run torch threads would
leave the children hanging). Printed side by side: wall time, completions/s and ratings/s (over the whole
run: generation and judging), and how many ratings each could read from the judge's text.

distilabel is a benchmark-only dependency (not installed with zephyr). It needs no network once installed:

    pip install --target /tmp/distilabel-pkgs --no-deps distilabel==1.5.3 nest-asyncio==1.6.0 \\
        orjson==3.13.0 pathlib_abc==0.5.2 tblib==3.2.2 universal_pathlib==0.3.11
    PYTHONPATH=/tmp/distilabel-pkgs python benchmarks/feedback.py --prompts 8

Without distilabel the zephyr row is printed alone, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "recipes" / "data" / "feedback_prompts.jsonl"
# the quickstart's pool (recipes/quickstart.yaml): (name, temperature, top_p, system prompt)
POOL = [
    ("smollm2-t0.7", 0.7, 1.0, None),
    ("smollm2-t1.0", 1.0, 0.9, None),
    (
        "smollm2-helpful",
        0.7,
        1.0,
        "You are a helpful assistant. Answer accurately and completely, then stop.",
    ),
    (
        "smollm2-honest",
        0.7,
        1.0,
        "You are an honest assistant. If you are not sure of something, say so plainly.",
    ),
]


def read_prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n]


def run_zephyr(prompts: list[dict], args: argparse.Namespace, work: Path) -> dict:
    from zephyr import io
    from zephyr.core.config import FeedbackConfig, GeneratorConfig, JudgeConfig
    from zephyr.stages.feedback.run import run_feedback

    source = work / "prompts.jsonl"
    io.write_jsonl(source, [{"prompt_id": p["prompt_id"], "prompt": p["prompt"]} for p in prompts])
    generators = [
        GeneratorConfig(
            model=args.model,
            name=name,
            temperature=temperature,
            top_p=top_p,
            system_prompt=system,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
        for name, temperature, top_p, system in POOL
    ]
    judge = JudgeConfig(
        model=GeneratorConfig(
            model=args.model,
            name="judge",
            temperature=0.0,
            max_tokens=args.judge_max_tokens,
            batch_size=args.batch_size,
        ),
        mode="text",
        scale=5,
        layout="per_aspect",
        aspects=["helpfulness"],
    )
    cfg = FeedbackConfig(
        prompts=str(source),
        output_dir=str(work / "zephyr"),
        generators=generators,
        completions_per_prompt=len(POOL),
        judge=judge,
        chunk_prompts=len(prompts),
        seed=42,
    )
    start = time.perf_counter()
    result = run_feedback(cfg)
    seconds = time.perf_counter() - start
    completions = sum(s["completions"] for s in result.stats["models"].values())
    failures = result.stats["parse_failures"]
    return {
        "seconds": seconds,
        "completions": completions,
        "ratings": failures["total"],
        "read": failures["parsed"],
    }


def run_distilabel(prompts: list[dict], args: argparse.Namespace, model_dir: str) -> dict:
    from distilabel.models.llms import TransformersLLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import GroupColumns, LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration, UltraFeedback

    with Pipeline(name="zephyr-benchmark-feedback") as pipeline:
        load = LoadDataFromDicts(
            data=[{"instruction": p["prompt"]} for p in prompts], batch_size=len(prompts)
        )
        generate = [
            TextGeneration(
                name=f"generate-{i}",
                llm=TransformersLLM(
                    model=model_dir,
                    device="cpu",
                    generation_kwargs={
                        "max_new_tokens": args.max_tokens,
                        "temperature": temperature,
                        "top_p": top_p,
                        "do_sample": True,
                    },
                ),
                system_prompt=system,
                input_batch_size=args.batch_size,
            )
            for i, (_, temperature, top_p, system) in enumerate(POOL)
        ]
        group = GroupColumns(
            columns=["generation", "model_name"], output_columns=["generations", "generation_models"]
        )
        rate = UltraFeedback(
            aspect="helpfulness",
            llm=TransformersLLM(
                model=model_dir,
                device="cpu",
                generation_kwargs={"max_new_tokens": args.judge_max_tokens, "do_sample": False},
            ),
            input_batch_size=args.batch_size,
        )
        load >> generate >> group >> rate
    start = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    seconds = time.perf_counter() - start
    rows = list(distiset["default"]["train"])
    completions = sum(len(row.get("generations") or []) for row in rows)
    # each generation is rated once; `ratings` holds a number where the judge's text could be read
    read = sum(isinstance(r, int | float) for row in rows for r in (row.get("ratings") or []))
    return {"seconds": seconds, "completions": completions, "ratings": completions, "read": read}


def row(name: str, r: dict) -> str:
    s = r["seconds"]
    return (
        f"| {name} | {s:.1f} | {r['completions']} | {r['completions'] / s:.3f} | {r['ratings']} | "
        f"{r['ratings'] / s:.3f} | {r['read']} |"
    )


def run_one(engine: str, args: argparse.Namespace) -> dict:
    """One engine's run in this process: {"name", "seconds", "completions", "ratings", "read"}."""
    from zephyr.models.load import resolve_model_path

    prompts = read_prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="zephyr-bench-feedback-"))
    try:
        if engine == "zephyr":
            return {"name": "zephyr", **run_zephyr(prompts, args, work)}
        import distilabel

        result = run_distilabel(prompts, args, resolve_model_path(args.model))
        return {"name": f"distilabel {distilabel.__version__}", **result}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def in_subprocess(engine: str, argv: list[str]) -> dict | str:
    """`engine`'s result from a fresh process, or why it could not run."""
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--only", engine, "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return f"{engine} not run (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ['?']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--judge-max-tokens", type=int, default=96)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="zephyr's batch; distilabel's input_batch_size"
    )
    parser.add_argument(
        "--only", choices=["zephyr", "distilabel"], default=None, help="one engine, in this process"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (with --only)")
    args = parser.parse_args()

    if args.only is not None:
        result = run_one(args.only, args)
        print(json.dumps(result) if args.json else row(result["name"], result))
        return
    argv = [a for a in sys.argv[1:] if a != "--json"]
    results = [in_subprocess(engine, argv) for engine in ("zephyr", "distilabel")]
    print(
        f"\n{args.prompts} prompts x {len(POOL)} generators (max {args.max_tokens} tokens), judge: 1 call per "
        f"prompt (max {args.judge_max_tokens} tokens), model {args.model}"
    )
    print("| run | seconds | completions | completions/s | ratings | ratings/s | ratings read |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(row(result["name"], result) if isinstance(result, dict) else result)


if __name__ == "__main__":
    main()
