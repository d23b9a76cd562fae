"""SFT training speed: zephyr against TRL 1.16's SFTTrainer with BFD packing, same random model, same
conversations, same bins per step.

Both engines train a random Mistral-architecture model of the named shape (benchmarks/shapes.py) on the same
synthetic conversations (UltraChat-like lengths: 1–4 turns, user messages 16–256 tokens, answers 64–512,
loss on answer tokens only, cut to 2048), packed best-fit-decreasing into bins of 2048 tokens, 4 bins per
optimizer step, AdamW, gradient clipping at 1.0. On CUDA the weights and AdamW's states are bf16 in both; on
the CPU, fp32.

Engines:
- `zephyr`: the bins of a step as one row through the varlen flash kernel (no attention across documents,
  no padding), the LM head only on answer tokens in chunks, no gradient checkpointing, fused AdamW.
- `zephyr-ckpt`: the same with gradient checkpointing.
- `trl`: SFTTrainer with `packing_strategy="bfd"` (padding-free rows with per-document positions), SDPA
  attention, fused AdamW, gradient checkpointing on 7B. TRL takes the conversations as token ids and labels
  (its text tokenization is not timed), packs them with its own BFD and visits the bins in order.

Tokens/s counts the tokens of the rows trained over the steps after the warm-up; MFU counts 6·N FLOPs per
token (N = all parameters).

    python benchmarks/sft.py --shape tiny --steps 2                  # CPU smoke test (seconds)
    python benchmarks/sft.py --shape mistral-7b --steps 6 --warmup 2 # one H200: see benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
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
from dpo import _reset_accelerate, _without_engines, device_and_dtype  # noqa: E402

ENGINES = ("zephyr", "zephyr-ckpt", "trl")
DEFAULT_ENGINES = "zephyr,zephyr-ckpt,trl"
LEARNING_RATE = 2e-5  # the recipe's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(shapes.SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--bins-per-step", type=int, default=4)
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
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_documents(args):
    lengths = shapes.CONVERSATIONS[shapes.workload_scale(args.shape)]
    vocab = shapes.SHAPES[args.shape][0]
    # enough conversations that both engines' packings fill every step (BFD leaves a few percent empty)
    n_tokens = (
        int(1.15 * (args.warmup + args.steps) * args.bins_per_step * lengths.max_length) + lengths.max_length
    )
    return shapes.synthetic_conversations(n_tokens, lengths, vocab, args.seed), lengths


# ---------------------------------------------------------------------------------------------------------
# zephyr


def packed_agreement(model, bin_docs) -> float:
    """Largest relative difference of per-document log-prob sums between the packed row (the model's own
    attention) and one padded row per document through SDPA."""
    import torch

    from zephyr.data.packing import collate_packed, collate_padded
    from zephyr.training.forward import sequence_logps, target_doc_ids, token_logps

    implementation = model.config._attn_implementation
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = collate_packed(bin_docs)
        ours, _ = sequence_logps(token_logps(model, packed), target_doc_ids(packed), len(bin_docs))
        model.set_attn_implementation("sdpa")
        try:
            padded = collate_padded(bin_docs)
            theirs, _ = sequence_logps(token_logps(model, padded), target_doc_ids(padded), len(bin_docs))
        finally:
            model.set_attn_implementation(implementation)
    model.train(was_training)
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-12)).max())


class BenchTask:
    """The SFT task's packed collate and loss (a `TrainingTask` for `loop.train_step`)."""

    name = "sft"

    def collate(self, bins):
        from zephyr.data.packing import collate_packed

        return dict(collate_packed([doc for group in bins for doc in group]))

    def units(self, batch) -> int:
        from zephyr.training.sft import count_targets

        return count_targets(batch)

    def tokens(self, batch) -> int:
        return int(batch["input_ids"].numel())

    def loss(self, model, batch):
        from zephyr.training.forward import token_logps
        from zephyr.training.task import StepOutput

        return StepOutput(loss_sum=-token_logps(model, batch).sum())


def run_zephyr(args, engine: str) -> measure.Result:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    from zephyr.training.attention import register_packed_attention
    from zephyr.training.loop import train_step
    from zephyr.training.sft import pack_documents

    device, dtype = device_and_dtype()
    checkpointing = engine == "zephyr-ckpt"
    docs, lengths = make_documents(args)
    bins = pack_documents(docs, lengths.max_length)
    steps = args.warmup + args.steps
    if len(bins) < steps * args.bins_per_step:
        raise RuntimeError(f"{len(bins)} bins, fewer than {steps} steps × {args.bins_per_step}")
    measure.reset_peak_memory()
    model = shapes.build_model(
        args.shape, device=device, dtype=dtype, attn_implementation=register_packed_attention()
    )
    result = measure.Result(
        engine=engine,
        config=(
            f"varlen packed, {'checkpointing' if checkpointing else 'no checkpointing'}, "
            f"{str(dtype).removeprefix('torch.')}"
        ),
        parameters=shapes.count_parameters(model),
        units_per_step=args.bins_per_step,
        warmup=args.warmup,
    )
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    worst = packed_agreement(model, bins[0])
    result.check = f"per-document log-probs vs padded SDPA, max rel diff {worst:.1e} (limit {tolerance:g})"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda" or None)
    task = BenchTask()
    accelerator = Accelerator(cpu=device.type == "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        started = measure.now()
        group = bins[step * args.bins_per_step : (step + 1) * args.bins_per_step]
        batch = send_to_device(task.collate(group), device)
        stats = train_step(accelerator, model, optimizer, task, [batch], step=step, max_grad_norm=1.0)
        result.step_seconds.append(measure.now() - started)
        result.step_tokens.append(int(stats.tokens))
        if step == 0:
            result.first_loss = stats.loss_sum / stats.units
    result.peak_gib = measure.peak_memory_gib()
    return result


# ---------------------------------------------------------------------------------------------------------
# TRL


def run_trl(args) -> measure.Result:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device, dtype = device_and_dtype()
    docs, lengths = make_documents(args)
    checkpointing = args.trl_checkpointing == "on" or (
        args.trl_checkpointing == "auto" and args.shape == "mistral-7b"
    )
    measure.reset_peak_memory()
    model = shapes.build_model(args.shape, device=device, dtype=dtype, attn_implementation="sdpa")
    result = measure.Result(
        engine="trl",
        config=(
            f"SFTTrainer, BFD packing, SDPA, {'checkpointing' if checkpointing else 'no checkpointing'}, "
            f"{str(dtype).removeprefix('torch.')}"
        ),
        parameters=shapes.count_parameters(model),
        units_per_step=args.bins_per_step,
        warmup=args.warmup,
    )
    # TRL's labels: the token itself where trained (the model shifts them), −100 elsewhere
    data = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in docs],
            "labels": [[t if m else -100 for t, m in zip(ids, mask, strict=True)] for ids, mask in docs],
        }
    )
    clock: dict[str, list[float]] = {"begin": [], "end": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if not clock["begin"]:
                clock["begin"].append(measure.now())

        def on_step_end(self, args_, state, control, **kwargs):
            clock["end"].append(measure.now())

    class TimedSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *a, **k):
            result.step_tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.bins_per_step,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            max_length=lengths.max_length,
            packing=True,
            packing_strategy="bfd",
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
        trainer = TimedSFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=shapes.word_tokenizer(shapes.SHAPES[args.shape][0]),
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
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
    if args.result_json:
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
    lengths = shapes.CONVERSATIONS[shapes.workload_scale(args.shape)]
    parameters = max(r.parameters for r in results)
    text = measure.header(
        f"SFT, shape {args.shape} ({parameters / 1e9:.3g}B parameters), {args.bins_per_step} bins of "
        f"{lengths.max_length} tokens per step, {args.warmup} warm-up + {args.steps} timed steps"
    )
    text += "\n\n" + measure.format_tables(
        "SFT training", results, baseline="trl", unit="bins", peak_tflops=peak, epoch=False
    )
    measure.report(text, args.table_out)


if __name__ == "__main__":
    main()
