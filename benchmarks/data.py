"""dSFT data preparation at the paper's scale: zephyr's tokenized-data cache against TRL 1.16's SFTTrainer
dataset preparation, on a synthetic ultrachat_200k-like set, in one run.

The set (`synthesize`, written once into the work folder and reused): `--dialogues` conversations (default
200,000; ultrachat_200k's train_sft has 207,865) in the conversations format of ultrachat_200k. Turns per
dialogue: 1 + Poisson(2.85), at most 10 (mean 3.85, UltraChat's reported mean). Each user message has
lognormal(ln 43, 0.8) words (median 43), each answer lognormal(ln 216, 0.6) words (median 216); words are
drawn by frequency from the vocabulary of MT-Bench's questions and reference answers (the `mt-bench` asset),
in sentences of 6 to 21 words, four sentences a paragraph. With Mistral-7B's tokenizer and the Zephyr
template that is ~1,470 tokens a dialogue (UltraChat reports 1,467), ~290M tokens at 200,000 dialogues.

All engines prepare the same file with the same tokenizer (Mistral-7B-v0.1's: the `mistral-7b-tokenizer`
asset) and chat template (Zephyr's), packing best-fit-decreasing into bins of 2048 tokens:
- `zephyr`: `stages.sft.data.load_sft_data` into a fresh cache folder with `loss_on: all` (the loss TRL
  computes here, and the paper's recipe's): the file streamed, conversations rendered and tokenized by one
  worker process per core, documents and the bin plan written as flat arrays, sealed.
- `zephyr-assistant`: the same with `loss_on: assistant` (zephyr's default), which also finds every
  answer's characters (two renders of the template per answer) and tokenizes with character offsets.
- `zephyr-cached`: a new process starting a run on `zephyr`'s data: the tokenizer loaded, the entry found,
  checked against its seal (sizes and CRC-32 of every file) and mapped. That process then reads every token
  of the mapped arrays once (what an epoch does) and reports its anonymous memory (the heap: what the
  process owns and cannot give back) next to the file-backed pages it has resident (the mapped arrays: page
  cache, shared by every process that maps the entry, dropped by the kernel under pressure). USS would count
  the mapped pages as well, as long as one process alone maps them.
- `trl`: `datasets.load_dataset("json")` of the file (its `prompt` column dropped: with it SFTTrainer would
  take the rows as prompt-completion pairs), then `SFTTrainer(..., args=SFTConfig(packing=True,
  packing_strategy="bfd", max_length=2048, dataset_num_proc=CORES))` on a tiny random model, which prepares
  the dataset (render + tokenize per row with the chat template, labels, BFD packing) before it returns.
  Its loss covers every token (TRL's conversational default: assistant-only masks need a template with
  `{% generation %}` markers, which Zephyr's has not).

Each engine runs in a process of its own; its time is the preparation call's, measured inside it; its peak
memory is sampled every 0.2 s over its process tree (workers included): the sum of RSS (every resident page
of every process, shared or not) and of PSS (shared pages divided among their sharers). Cache folders
(`datasets`' included) are fresh for every run.

    python benchmarks/data.py                         # 200,000 dialogues (~10 min on 2 cores, ~3 more to write the set once)
    python benchmarks/data.py --dialogues 3000        # a quick run
    python benchmarks/data.py --pairs 61135           # dDPO's pairs instead (below)

`--pairs N`: a preference set shaped like UltraFeedback's binarized pairs (61,135 in train_prefs): a prompt
of lognormal(ln 43, 0.8) words and two answers of lognormal(ln 216, 0.6) words each, as `chosen` and
`rejected` conversations. `zephyr-pairs` is `training.pairs.load_pairs` into a fresh cache (prompt, chosen
and rejected ids; max_length 1024, max_prompt_length 512: the handbook's dDPO), `trl-pairs` TRL 1.16's
`DPOTrainer(..., args=DPOConfig(max_length=1024, dataset_num_proc=CORES))` preparing the dataset (its
conversational prompt extraction, chat template and tokenizing; TRL 1.16 has no prompt length limit).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # runs from a checkout without installing zephyr

MAX_LENGTH = 2048
PAIR_MAX_LENGTH, PAIR_MAX_PROMPT_LENGTH = 1024, 512  # the handbook's dDPO
TOKENIZER = "asset:mistral-7b-tokenizer"
TEMPLATE = "zephyr"


# ---------------------------------------------------------------------------------------------------------
# The data


def _vocabulary():
    import numpy as np

    from zephyr.models import assets

    folder = Path(assets.fetch("mt-bench"))
    files = [folder / "question.jsonl", *sorted((folder / "reference_answer").glob("*.jsonl"))]
    counts = Counter(
        w.lower() for f in files for w in re.findall(r"[A-Za-z]+", f.read_text(encoding="utf-8"))
    )
    words = sorted(counts)
    weights = np.array([counts[w] for w in words], dtype=float)
    return np.array(words, dtype=object), weights / weights.sum()


def _passages(rng):
    """A function of n: n words drawn by frequency, in sentences of 6 to 21 words, four a paragraph."""
    words, weights = _vocabulary()

    def passage(n: int) -> str:
        drawn = words[rng.choice(len(words), size=n, p=weights)].tolist()
        sentences, i = [], 0
        while i < n:
            k = int(rng.integers(6, 22))
            sentence = drawn[i : i + k]
            sentence[0] = sentence[0].capitalize()
            sentences.append(" ".join(sentence) + ".")
            i += k
        return "\n\n".join(" ".join(sentences[j : j + 4]) for j in range(0, len(sentences), 4))

    return passage


def _write_once(path: Path, params: dict, records) -> None:
    """Write `records()` (an iterator of dicts) to `path` as JSONL, unless a file made with the same `params`
    is there (they are stamped beside it once the file is complete)."""
    stamp = path.with_suffix(".json")
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    started = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records():
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    stamp.write_text(json.dumps(params))
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s")


def _words(rng, median: int, sigma: float) -> int:
    import numpy as np

    return max(3, int(rng.lognormal(np.log(median), sigma)))


def synthesize_pairs(path: Path, pairs: int, seed: int = 1) -> None:
    """Write a synthetic preference set (`--pairs`, module docstring) to `path`, unless it is there."""
    import numpy as np

    def records():
        rng = np.random.default_rng(seed)
        passage = _passages(rng)
        for d in range(pairs):
            prompt = passage(_words(rng, 43, 0.8))
            chosen, rejected = (
                [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": passage(_words(rng, 216, 0.6))},
                ]
                for _ in range(2)
            )
            yield {"prompt_id": f"{d:08d}", "prompt": prompt, "chosen": chosen, "rejected": rejected}

    _write_once(path, {"pairs": pairs, "seed": seed, "version": 1}, records)


def synthesize(path: Path, dialogues: int, seed: int = 0) -> None:
    """Write the synthetic set (module docstring) to `path`, unless a file of the same parameters is there."""
    import numpy as np

    def records():
        rng = np.random.default_rng(seed)
        passage = _passages(rng)
        for d in range(dialogues):
            messages = []
            for _ in range(min(1 + int(rng.poisson(2.85)), 10)):
                messages.append({"role": "user", "content": passage(_words(rng, 43, 0.8))})
                messages.append({"role": "assistant", "content": passage(_words(rng, 216, 0.6))})
            yield {"prompt": messages[0]["content"], "prompt_id": f"{d:08d}", "messages": messages}

    _write_once(path, {"dialogues": dialogues, "seed": seed, "version": 2}, records)


# ---------------------------------------------------------------------------------------------------------
# The engines (each in a process of its own)


def _tokenizer():
    from zephyr.models.load import load_tokenizer

    return load_tokenizer(TOKENIZER, chat_template=TEMPLATE)


def _config(data: Path, loss_on: str = "all"):
    from zephyr.core.config import SFTConfig

    return SFTConfig(
        model=TOKENIZER, train_data=str(data), chat_template=TEMPLATE, max_length=MAX_LENGTH, loss_on=loss_on
    )


def zephyr_prepare(data: Path, work: Path, loss_on: str = "all") -> dict:
    from zephyr.stages.sft.data import load_sft_data

    tokenizer = _tokenizer()
    started = time.perf_counter()
    entry = load_sft_data(_config(data, loss_on), tokenizer, cache_dir=work / "zephyr-cache")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": entry.stats["tokens"],
        "bins": entry.stats["train"]["examples"],
        "cache_bytes": entry.nbytes,
    }


def zephyr_cached(data: Path, work: Path) -> dict:
    import numpy as np

    from zephyr.stages.sft.data import Examples, load_sft_data

    started = time.perf_counter()
    entry = load_sft_data(_config(data), _tokenizer(), cache_dir=work / "zephyr-cache")
    examples = Examples(entry, "train", packed=True)
    seconds = time.perf_counter() - started
    before = _resident()
    checksum = 0
    for name in ("input_ids", "loss_mask"):  # every page read once, a slice at a time (an epoch's reads)
        values = entry.array(name)
        for start in range(0, len(values), 1 << 24):
            checksum += int(values[start : start + (1 << 24)].sum(dtype=np.int64) % 97)
    after = _resident()
    return {
        "seconds": seconds,
        "tokens": entry.stats["tokens"],
        "bins": len(examples),
        "anon_mapped": before["Anonymous"],
        "anon_read": after["Anonymous"],
        "file_read": after["Rss"] - after["Anonymous"],
        "checksum": checksum,
    }


def _resident() -> dict[str, int]:
    """This process's resident memory in bytes by kind (Linux's smaps_rollup: Rss, Anonymous, ...)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields


def _tiny_model(tokenizer):
    """A one-layer random model: TRL's trainers want one; its size does not touch the preparation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def trl_prepare(data: Path, work: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # fresh: nothing of an earlier run reused
    import datasets
    from trl import SFTConfig, SFTTrainer

    tokenizer = _tokenizer()
    model = _tiny_model(tokenizer)
    args = SFTConfig(packing=True, packing_strategy="bfd", max_length=MAX_LENGTH, **_trl_args(work))
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train").remove_columns(["prompt"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    prepared = trainer.train_dataset
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": sum(len(ids) for ids in prepared["input_ids"]),
        "bins": len(prepared),
    }


def _trl_args(work: Path) -> dict:
    """What both TRL trainers are given besides their lengths: every core for `datasets.map`, no saving,
    no tracking, the CPU."""
    return {
        "output_dir": str(work / "trl-out"),
        "dataset_num_proc": _cores(),
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
    }


def zephyr_assistant(data: Path, work: Path) -> dict:
    return zephyr_prepare(data, work, loss_on="assistant")


def zephyr_pairs(data: Path, work: Path) -> dict:
    from zephyr.training.pairs import PairOptions, load_pairs

    tokenizer = _tokenizer()
    started = time.perf_counter()
    options = PairOptions(max_length=PAIR_MAX_LENGTH, max_prompt_length=PAIR_MAX_PROMPT_LENGTH)
    pairs = load_pairs(tokenizer, str(data), options=options, cache_dir=work / "zephyr-cache")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": pairs.entry.stats["tokens"],
        "bins": len(pairs.train),
        "cache_bytes": pairs.entry.nbytes,
    }


def trl_pairs(data: Path, work: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    import datasets
    from trl import DPOConfig, DPOTrainer

    tokenizer = _tokenizer()
    args = DPOConfig(max_length=PAIR_MAX_LENGTH, **_trl_args(work))
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train").remove_columns(["prompt"])
    model, reference = _tiny_model(tokenizer), _tiny_model(tokenizer)  # (a random model has no path to load)
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    prepared = trainer.train_dataset
    seconds = time.perf_counter() - started
    columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in prepared.column_names]
    return {
        "seconds": seconds,
        "tokens": sum(len(ids) for c in columns for ids in prepared[c]),
        "bins": len(prepared),
    }


ENGINES = {
    "zephyr": zephyr_prepare,
    "zephyr-cached": zephyr_cached,
    "zephyr-assistant": zephyr_assistant,
    "trl": trl_prepare,
    "zephyr-pairs": zephyr_pairs,
    "trl-pairs": trl_pairs,
}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _child(name: str, data: str, work: str, queue) -> None:
    queue.put(ENGINES[name](Path(data), Path(work)))


def measure(name: str, data: Path, work: Path) -> dict:
    """Run an engine in a process of its own; its result with the tree's peak RSS and PSS sums."""
    import psutil

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    load = os.getloadavg()[0]
    child = context.Process(target=_child, args=(name, str(data), str(work), queue))
    started = time.perf_counter()
    child.start()
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    result = None
    while result is None:
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        try:
            result = queue.get(timeout=0.2)
        except Exception:  # queue.Empty: still running
            if not child.is_alive():
                raise RuntimeError(f"{name}: the process ended with code {child.exitcode}") from None
    child.join()
    return {
        **result,
        "wall": time.perf_counter() - started,
        "peak_rss": peak_rss,
        "peak_pss": peak_pss,
        "load": (load, os.getloadavg()[0]),
    }


# ---------------------------------------------------------------------------------------------------------
# The run


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: dict[str, dict], what: str) -> str:
    lines = [
        f"{what}, {_cores()} cores; load average before / after each engine in brackets",
        "",
        "| engine | seconds | tokens | bins | peak RSS (tree) | peak PSS (tree) | load |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['tokens']:,} | {r['bins']:,} | {_gib(r['peak_rss'])} | "
            f"{_gib(r['peak_pss'])} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    ours = results.get("zephyr") or results.get("zephyr-pairs")
    lines.append("")
    for name, peer in (("zephyr", "trl"), ("zephyr-assistant", "trl"), ("zephyr-pairs", "trl-pairs")):
        r, theirs = results.get(name), results.get(peer)
        if r and theirs:
            lines.append(
                f"{name} / {peer}: {theirs['seconds'] / r['seconds']:.2f}× as fast, "
                f"{r['peak_rss'] / theirs['peak_rss']:.2f}× the peak RSS, "
                f"{r['peak_pss'] / theirs['peak_pss']:.2f}× the peak PSS"
            )
    if ours:
        lines.append(f"zephyr cache entry: {_gib(ours['cache_bytes'])}")
    cached = results.get("zephyr-cached")
    if cached:
        lines.append(
            f"zephyr cached start: {cached['seconds']:.1f} s (process wall {cached['wall']:.1f} s); after reading "
            f"every token: anonymous memory {_gib(cached['anon_read'])} (at start {_gib(cached['anon_mapped'])}), "
            f"file-backed (the mapped entry) {_gib(cached['file_read'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dialogues", type=int, default=200_000)
    p.add_argument("--work", default="/tmp/zephyr-bench-data", help="folder for the data and the caches")
    p.add_argument(
        "--pairs", type=int, help="a preference set of this many pairs instead (61,135: ultrafeedback)"
    )
    p.add_argument(
        "--engines",
        help="default: zephyr,zephyr-cached,zephyr-assistant,trl (--pairs: zephyr-pairs,trl-pairs)",
    )
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.pairs:
        data, what = work / f"ultrafeedback-like-{args.pairs}.jsonl", f"{args.pairs:,} pairs"
        synthesize_pairs(data, args.pairs)
        engines = args.engines or "zephyr-pairs,trl-pairs"
    else:
        data, what = work / f"ultrachat-like-{args.dialogues}.jsonl", f"{args.dialogues:,} dialogues"
        synthesize(data, args.dialogues)
        engines = args.engines or "zephyr,zephyr-cached,zephyr-assistant,trl"
    for stale in ("zephyr-cache", "hf-datasets", "trl-out"):
        shutil.rmtree(work / stale, ignore_errors=True)
    results = {}
    for name in engines.split(","):
        results[name] = measure(name, data, work)
        print(f"{name}: {results[name]}", flush=True)
    text = table(results, what)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
