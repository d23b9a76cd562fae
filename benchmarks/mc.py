"""Multiple-choice scoring speed: zephyr against lm-evaluation-harness's `hf` model (HFLM), same requests.

Both engines score the same (context, " " + choice) requests — the contexts built once by zephyr with
lm-eval's few-shot format — with the same model, device and batch size (lm-eval's unit: requests per
forward). The script checks that the results are identical (every log-likelihood within 1e-4, the same
acc and acc_norm for every item), then prints one table. Runs alternate between the engines and each
engine's fastest run is reported, so that load from other processes on the machine disturbs the ratio less.

    python benchmarks/mc.py                      # SmolLM2-135M-Instruct, the test fixtures, 3-shot, CPU
    python benchmarks/mc.py --num-fewshot 5 --repeats 3 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "mc"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--data", default=str(FIXTURES / "arc_like.jsonl"))
    p.add_argument("--fewshot-data", default=str(FIXTURES / "fewshot.jsonl"))
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine (the fastest is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def time_lm_eval(hflm, contexts, records) -> tuple[float, list[list[float]]]:
    from lm_eval.api.instance import Instance

    requests = [
        Instance("loglikelihood", record, (context, " " + choice), j)
        for context, record in zip(contexts, records, strict=True)
        for j, choice in enumerate(record["choices"])
    ]
    started = time.perf_counter()
    flat = [ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True)]
    seconds = time.perf_counter() - started
    lls, start = [], 0
    for record in records:
        lls.append(flat[start : start + len(record["choices"])])
        start += len(record["choices"])
    return seconds, lls


def time_zephyr(
    model, tokenizer, contexts, records, batch_size, max_length
) -> tuple[float, list[list[float]]]:
    from zephyr.stages.mc import run as mc

    started = time.perf_counter()  # tokenization counts, as it does in lm-eval's loglikelihood
    encoder = mc.LmEvalTokenization(tokenizer)
    items = [encoder.encode_choices(c, r["choices"]) for c, r in zip(contexts, records, strict=True)]
    lls = mc.score_items(model, items, batch_size=batch_size, max_length=max_length, progress=False)
    return time.perf_counter() - started, lls


def token_counts(tokenizer, contexts, records, max_length) -> tuple[int, int]:
    """Tokens each engine feeds the model: one sequence per choice (lm-eval), one group per item (zephyr)."""
    from zephyr.scoring.continuations import group_tokens
    from zephyr.stages.mc import run as mc

    encoder = mc.LmEvalTokenization(tokenizer)
    per_choice = shared = 0
    for i, (context, record) in enumerate(zip(contexts, records, strict=True)):
        pairs = encoder.encode_choices(context, record["choices"])
        per_choice += sum(min(len(c) + len(x) - 1, max_length) for c, x in pairs)
        shared += sum(
            group_tokens((row.context, row.continuations)) for row in mc.plan_rows(i, pairs, max_length)
        )
    return per_choice, shared


def check_identical(ours, theirs, records) -> float:
    from zephyr.stages.mc import metrics

    worst = 0.0
    for record, a, b in zip(records, ours, theirs, strict=True):
        worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
        for name in ("acc", "acc_norm"):
            ours_metric = metrics.item_metrics(a, record["choices"], record["gold"], truthful=False)[name]
            theirs_metric = metrics.item_metrics(b, record["choices"], record["gold"], truthful=False)[name]
            if ours_metric != theirs_metric:
                sys.exit(
                    f"item {record['id']!r}: {name} differs (zephyr {ours_metric}, lm-eval {theirs_metric})"
                )
    if worst > 1e-4:
        sys.exit(f"log-likelihoods differ by up to {worst:.2e} (> 1e-4)")
    return worst


def main(argv: list[str] | None = None) -> None:
    import torch
    from lm_eval.models.huggingface import HFLM

    from zephyr.models.load import load_model, load_tokenizer, resolve_model_path
    from zephyr.stages.mc import run as mc

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = mc.load_task(
        data=args.data, fewshot_data=args.fewshot_data, num_fewshot=args.num_fewshot, limit=None, preset=None
    )
    contexts = mc.build_contexts(task)
    path = resolve_model_path(args.model)
    hflm = HFLM(pretrained=path, batch_size=args.batch_size, device=args.device, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval().to(args.device)
    max_length = mc.model_max_length(model.config, tokenizer)

    times: dict[str, list[float]] = {"lm-eval": [], "zephyr": []}
    for _ in range(args.repeats):
        seconds, theirs = time_lm_eval(hflm, contexts, task.records)
        times["lm-eval"].append(seconds)
        seconds, ours = time_zephyr(model, tokenizer, contexts, task.records, args.batch_size, max_length)
        times["zephyr"].append(seconds)
    worst = check_identical(ours, theirs, task.records)

    n_items = len(task.records)
    n_requests = sum(len(r["choices"]) for r in task.records)
    tokens = dict(
        zip(("lm-eval", "zephyr"), token_counts(tokenizer, contexts, task.records, max_length), strict=True)
    )
    best = {engine: min(runs) for engine, runs in times.items()}
    print(
        f"\n{Path(args.data).name}: {n_items} items, {n_requests} requests, {args.num_fewshot}-shot, "
        f"batch size {args.batch_size}, {args.device}, torch threads {torch.get_num_threads()}, "
        f"best of {args.repeats}; identical acc/acc_norm, max |Δ log-likelihood| {worst:.1e}\n"
    )
    print("| engine | tokens fed | seconds | items/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for engine in ("lm-eval", "zephyr"):
        speedup = best["lm-eval"] / best[engine]
        print(
            f"| {engine} | {tokens[engine]:,} | {best[engine]:.2f} | {n_items / best[engine]:.2f} | {speedup:.2f}× |"
        )


if __name__ == "__main__":
    main()
