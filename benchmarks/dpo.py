"""DPO training speed: zephyr against TRL 1.16's DPOTrainer, same random model, same pairs, same pairs per step.

Both engines train a random Mistral-architecture model of the named shape (benchmarks/shapes.py) on the same
synthetic pairs (UltraFeedback-like lengths: prompt 32–384 tokens, answers 32–640, max_length 1024), 8 pairs
per optimizer step, sigmoid loss β = 0.1, AdamW, gradient clipping at 1.0, reference log-probs precomputed
before training (the reference pass is timed on its own), steps in the same order. On CUDA the weights and
AdamW's states are bf16 in both (the configuration in which TRL fits 7B on one H200); on the CPU, fp32.

Engines:
- `zephyr`: no padding (one packed row per step through the varlen flash kernel), each prompt run once per
  pair (prefix sharing), the LM head only on answer tokens in chunks, no gradient checkpointing, fused AdamW.
- `zephyr-ckpt`: the same with gradient checkpointing (the configuration that stays within TRL's memory).
- `zephyr-noshare`: `zephyr` without prefix sharing (not run by default; for the ablation).
- `trl`: DPOTrainer with `precompute_ref_log_probs`, SDPA attention, padded batches (its `padding_free` is
  disabled in 1.16), fused AdamW, gradient checkpointing on 7B (without it the padded 7B step runs out of
  memory on an H200). TRL takes the pairs as token ids (its text tokenization is not timed) and visits them in
  order; its weight hash for the reference cache key (a sha256 over 29 GB at 7B) is replaced by a random key,
  which is neither timed nor reused.

Tokens/s counts prompt + chosen plus prompt + rejected tokens of the pairs trained (no padding; the prompt
twice, also where it ran once), over the steps after the warm-up. MFU counts 6·N FLOPs per such token.
The second table adds the reference pass: pairs/s over the reference pass plus one epoch of the pairs.

    python benchmarks/dpo.py --shape tiny --steps 2                  # CPU smoke test (seconds)
    python benchmarks/dpo.py --shape mistral-7b --steps 6 --warmup 2 # one H200: see benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))  # runs from a checkout without installing zephyr

import measure  # noqa: E402
import shapes  # noqa: E402

ENGINES = ("zephyr", "zephyr-ckpt", "zephyr-noshare", "trl")
DEFAULT_ENGINES = "zephyr,zephyr-ckpt,trl"
BETA = 0.1
LEARNING_RATE = 5e-7  # the recipe's; a speed benchmark is indifferent to it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(shapes.SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--ref-batch-size", type=int, default=32, help="pairs per forward of the reference pass")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument(
        "--trl-checkpointing", choices=("auto", "on", "off"), default="auto", help="auto: on for mistral-7b"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU's denominator (CUDA default: 783)")
    p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto", help="one process per engine")
    p.add_argument("--timeout", type=float, default=None, help="seconds per isolated engine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-out", default=None, help="also write the tables (Markdown) to this file")
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # an isolated engine's answer
    return p.parse_args(argv)


def device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def make_pairs(args):
    from zephyr.training.logps import TokenizedPair

    lengths = shapes.PAIRS[shapes.workload_scale(args.shape)]
    vocab = shapes.SHAPES[args.shape][0]
    n = (args.warmup + args.steps) * args.pairs_per_step
    raw = shapes.synthetic_pairs(n, lengths, vocab, args.seed)
    return [TokenizedPair(str(i), tuple(p), tuple(c), tuple(r)) for i, (p, c, r) in enumerate(raw)], lengths


# ---------------------------------------------------------------------------------------------------------
# zephyr


def padded_agreement(model, pairs) -> float:
    """Largest relative difference of per-pair log-probs between the fast path (the model's own attention on
    `pack_pairs` rows) and one padded row per sequence through SDPA, on `pairs`."""
    import torch

    from zephyr.data.packing import collate_padded
    from zephyr.training.forward import sequence_logps, target_doc_ids, token_logps
    from zephyr.training.logps import pack_pairs, pair_logps

    implementation = model.config._attn_implementation
    docs = []
    for p in pairs:
        for answer in (p.chosen_ids, p.rejected_ids):
            docs.append((list(p.prompt_ids) + list(answer), [0] * len(p.prompt_ids) + [1] * len(answer)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        fast = pair_logps(model, pack_pairs(pairs, prefix_sharing=True))
        model.set_attn_implementation("sdpa")
        try:
            padded = collate_padded(docs)
            sums, _ = sequence_logps(token_logps(model, padded), target_doc_ids(padded), len(docs))
        finally:
            model.set_attn_implementation(implementation)
    model.train(was_training)
    ours = torch.stack([fast.chosen, fast.rejected], 1).double().cpu()
    theirs = sums.view(-1, 2).double().cpu()
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-12)).max())


def run_zephyr(args, engine: str) -> measure.Result:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    from zephyr.training.attention import register_packed_attention
    from zephyr.training.logps import compute_logps
    from zephyr.training.loop import train_step
    from zephyr.training.reference import PrecomputedReference

    device, dtype = device_and_dtype()
    sharing = engine != "zephyr-noshare"
    checkpointing = engine == "zephyr-ckpt"
    pairs, _ = make_pairs(args)
    measure.reset_peak_memory()
    model = shapes.build_model(
        args.shape, device=device, dtype=dtype, attn_implementation=register_packed_attention()
    )
    result = measure.Result(
        engine=engine,
        config=(
            f"varlen, {'prompt shared' if sharing else 'no sharing'}, "
            f"{'checkpointing' if checkpointing else 'no checkpointing'}, {str(dtype).removeprefix('torch.')}"
        ),
        parameters=shapes.count_parameters(model),
        units_per_step=args.pairs_per_step,
        warmup=args.warmup,
        total_units=len(pairs),
    )
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    worst = padded_agreement(model, pairs[: args.pairs_per_step])
    result.check = f"per-pair log-probs vs padded SDPA, max rel diff {worst:.1e} (limit {tolerance:g})"

    started = measure.now()
    table = compute_logps(model, pairs, batch_size=args.ref_batch_size, device=device, prefix_sharing=sharing)
    result.reference_seconds = measure.now() - started

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda" or None)
    task = BenchTask(PrecomputedReference({"train": table}), sharing)
    accelerator = Accelerator(cpu=device.type == "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the training steps' peak, as TRL's below
    for step in range(args.warmup + args.steps):
        group = list(range(step * args.pairs_per_step, (step + 1) * args.pairs_per_step))
        started = measure.now()
        batch = send_to_device(task.collate([(i, pairs[i]) for i in group]), device)
        stats = train_step(accelerator, model, optimizer, task, [batch], step=step, max_grad_norm=1.0)
        result.step_seconds.append(measure.now() - started)
        result.step_tokens.append(int(stats.tokens))
        if step == 0:
            result.first_loss = stats.loss_sum / stats.units
    result.peak_gib = measure.peak_memory_gib()
    return result


class BenchTask:
    """The DPO task's collate and loss over in-memory pairs (a `TrainingTask` for `loop.train_step`)."""

    name = "dpo"

    def __init__(self, reference, prefix_sharing: bool):
        from zephyr.training.losses import LossParams, get_preference_loss

        self.reference = reference
        self.prefix_sharing = prefix_sharing
        self.loss_fn = get_preference_loss("sigmoid")
        self.params = LossParams(BETA, 0.0, 1.0, 0.0)

    def collate(self, examples):
        from zephyr.training.logps import pack_pairs

        batch = pack_pairs([pair for _, pair in examples], prefix_sharing=self.prefix_sharing)
        batch.update(self.reference.fields([("train", i) for i, _ in examples]))
        return batch

    def units(self, batch) -> int:
        return int(batch["num_pairs"])

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"])

    def loss(self, model, batch):
        from zephyr.training.dpo import preference_step

        return preference_step(model, batch, self.reference, self.loss_fn, self.params)


# ---------------------------------------------------------------------------------------------------------
# TRL


def run_trl(args) -> measure.Result:
    import torch
    import trl.trainer.dpo_trainer as trl_dpo
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device, dtype = device_and_dtype()
    pairs, lengths = make_pairs(args)
    checkpointing = args.trl_checkpointing == "on" or (
        args.trl_checkpointing == "auto" and args.shape == "mistral-7b"
    )
    trl_dpo.hash_module = lambda module: uuid.uuid4().hex  # see the module docstring
    measure.reset_peak_memory()
    model = shapes.build_model(args.shape, device=device, dtype=dtype, attn_implementation="sdpa")
    result = measure.Result(
        engine="trl",
        config=(
            f"DPOTrainer, padded, SDPA, {'checkpointing' if checkpointing else 'no checkpointing'}, "
            f"{str(dtype).removeprefix('torch.')}"
        ),
        parameters=shapes.count_parameters(model),
        units_per_step=args.pairs_per_step,
        warmup=args.warmup,
        total_units=len(pairs),
    )
    data = Dataset.from_dict(
        {
            "prompt_ids": [list(p.prompt_ids) for p in pairs],
            "chosen_ids": [list(p.chosen_ids) for p in pairs],
            "rejected_ids": [list(p.rejected_ids) for p in pairs],
        }
    )
    clock: dict[str, list[float]] = {"begin": [], "end": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if not clock["begin"]:
                clock["begin"].append(measure.now())

        def on_step_end(self, args_, state, control, **kwargs):
            clock["end"].append(measure.now())

    class TimedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset  # already token ids: prompt_ids, chosen_ids, rejected_ids

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)  # the pairs in zephyr's order

        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = measure.now()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            result.reference_seconds = measure.now() - started
            return out

        def training_step(self, model, inputs, *a, **k):
            result.step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.pairs_per_step,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            beta=BETA,
            max_length=lengths.max_length,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.ref_batch_size,
            gradient_checkpointing=checkpointing,
            bf16=dtype == torch.bfloat16,
            use_cpu=device.type == "cpu",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = TimedDPOTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=shapes.word_tokenizer(shapes.SHAPES[args.shape][0]),
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)  # its log lines would bury the table
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the training steps' peak (the reference pass is timed apart)
        trainer.train()
    ends = clock["begin"][:1] + clock["end"]
    result.step_seconds = [b - a for a, b in itertools.pairwise(ends)]
    result.first_loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    result.peak_gib = measure.peak_memory_gib()
    return result


# ---------------------------------------------------------------------------------------------------------


def run_engine(args, engine: str) -> measure.Result:
    if engine == "trl":
        return run_trl(args)
    return run_zephyr(args, engine)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    if args.result_json:  # one engine, in a process of its own
        measure.save(measure.run_guarded(lambda: run_engine(args, engines[0]), engines[0]), args.result_json)
        return
    isolate = args.isolate == "on" or (args.isolate == "auto" and torch.cuda.is_available())
    passed = list(argv if argv is not None else sys.argv[1:])
    results = []
    for engine in engines:
        if isolate:
            results.append(measure.run_isolated(__file__, engine, _without_engines(passed), args.timeout))
        else:
            results.append(run_engine(args, engine))
            _reset_accelerate()
    peak = args.peak_tflops or (measure.H200_BF16_TFLOPS if torch.cuda.is_available() else None)
    lengths = shapes.PAIRS[shapes.workload_scale(args.shape)]
    parameters = max(r.parameters for r in results)
    text = measure.header(
        f"DPO, shape {args.shape} ({parameters / 1e9:.3g}B parameters), "
        f"{args.pairs_per_step} pairs/step, max_length {lengths.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, reference batch {args.ref_batch_size}"
    )
    text += "\n\n" + measure.format_tables(
        "DPO training", results, baseline="trl", unit="pairs", peak_tflops=peak, epoch=True
    )
    measure.report(text, args.table_out)


def _without_engines(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--engines":
            skip = True
            continue
        if a.startswith("--engines="):
            continue
        out.append(a)
    return out


def _reset_accelerate() -> None:
    """Engines in one process: each trainer starts from a fresh accelerate state (it is a singleton)."""
    import gc

    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
