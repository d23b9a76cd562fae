"""SFT training speed: zephyr against TRL 1.16's SFTTrainer with BFD packing, same random model, same
conversations, same bins per step.

Both engines train a random Mistral-architecture model of the named shape (benchmarks/shapes.py) on the same
synthetic conversations (UltraChat-like lengths: 1–4 turns, user messages 16–256 tokens, answers 64–512,
loss on answer tokens only, cut to 2048), packed best-fit-decreasing into bins of 2048 tokens, 4 bins per
optimizer step, AdamW, gradient clipping at 1.0. On CUDA the weights and AdamW's states are bf16 in both; on
the CPU, fp32.

Engines:
- `zephyr`: the bins of a step as one row through the varlen flash kernel (no attention across documents,
  no padding), the LM head only on answer tokens in chunks, no gradient checkpointing, the
  stochastically rounded bf16 AdamW of `master_weights: bf16`.
- `zephyr-ckpt`: the same with gradient checkpointing.
- `zephyr-half`, `zephyr-compile`: checkpointing every second layer; compiled decoder layers (not run by
  default).
- `trl`: SFTTrainer with `packing_strategy="bfd"` (padding-free rows with per-document positions), SDPA
  attention, fused AdamW, gradient checkpointing on 7B. TRL takes the conversations as token ids and labels
  (its text tokenization is not timed), packs them with its own BFD and visits the bins in order.

Tokens/s counts the tokens of the rows trained over the steps after the warm-up; MFU counts 6·N FLOPs per
token (N = all parameters).

    python benchmarks/sft.py --shape tiny --steps 2                  # CPU smoke test (seconds)
    python benchmarks/sft.py --shape mistral-7b --steps 6 --warmup 2 # one H200: see benchmarks/gpu.sh
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))  # runs from a checkout without installing zephyr

import measure  # noqa: E402
import shapes  # noqa: E402

ENGINES = measure.ENGINES
LEARNING_RATE = 2e-5  # the recipe's


def parse_args(argv: list[str] | None = None):
    p = measure.parser(__doc__)
    p.add_argument("--bins-per-step", type=int, default=4)
    measure.add_run_arguments(p, (*ENGINES, "trl"))
    return p.parse_args(argv)


def make_documents(args):
    lengths = shapes.CONVERSATIONS[shapes.workload_scale(args.shape)]
    vocab = shapes.SHAPES[args.shape][0]
    # enough conversations that both engines' packings fill every step (BFD leaves a few percent empty)
    n_tokens = (
        int(1.15 * (args.warmup + args.steps) * args.bins_per_step * lengths.max_length) + lengths.max_length
    )
    return shapes.synthetic_conversations(n_tokens, lengths, vocab, args.seed), lengths


def describe(args, parameters: int) -> str:
    """The workload, in the tables' header."""
    lengths = shapes.CONVERSATIONS[shapes.workload_scale(args.shape)]
    return (
        f"SFT, shape {args.shape} ({parameters / 1e9:.3g}B parameters), {args.bins_per_step} bins of "
        f"{lengths.max_length} tokens per step, {args.warmup} warm-up + {args.steps} timed steps"
    )


# ---------------------------------------------------------------------------------------------------------
# zephyr


def packed_check(model, bin_docs) -> str:
    """Per-document log-prob sums of the packed row (the model's own attention) against one padded row per
    document through SDPA."""
    from zephyr.data.packing import collate_packed, collate_padded
    from zephyr.scoring.forward import sequence_logps, target_doc_ids, token_logps

    def logp_sums(model, batch):
        sums, _ = sequence_logps(token_logps(model, batch), target_doc_ids(batch), len(bin_docs))
        return sums

    return measure.sdpa_check(
        "per-document log-probs",
        model,
        lambda model: logp_sums(model, collate_packed(bin_docs)),
        lambda model: logp_sums(model, collate_padded(bin_docs)),
    )


class BenchTask:
    """The SFT task's packed collate and loss (a `TrainingTask` for `loop.train_step`)."""

    name = "sft"

    def collate(self, bins):
        from zephyr.data.packing import collate_packed

        return collate_packed([doc for group in bins for doc in group])

    def units(self, batch) -> int:
        from zephyr.stages.sft.run import count_targets

        return count_targets(batch)

    def tokens(self, batch) -> int:
        return int(batch.input_ids.numel())

    def loss(self, model, batch):
        from zephyr.scoring.forward import token_logps
        from zephyr.training.task import StepOutput

        return StepOutput(loss_sum=-token_logps(model, batch).sum())


def run_zephyr(args, engine: str) -> measure.Result:
    from zephyr.scoring.attention import register_packed_attention
    from zephyr.stages.sft.data import pack_documents

    settings = ENGINES[engine]
    docs, lengths = make_documents(args)
    bins = pack_documents(docs, lengths.max_length)
    steps, n = args.warmup + args.steps, args.bins_per_step
    if len(bins) < steps * n:
        raise RuntimeError(f"{len(bins)} bins, fewer than {steps} steps × {n}")
    model, result = measure.start_run(
        args,
        engine,
        "varlen packed",
        checkpointing=settings.describe(),
        attn_implementation=register_packed_attention(),
        units_per_step=n,
    )
    result.check = packed_check(model, bins[0])
    measure.require_varlen()
    result.check += measure.kernel_note(model)
    groups = [bins[step * n : (step + 1) * n] for step in range(steps)]
    measure.time_zephyr(
        model, BenchTask(), groups, engine=settings, learning_rate=LEARNING_RATE, result=result
    )
    return result


# ---------------------------------------------------------------------------------------------------------
# TRL


def run_trl(args) -> measure.Result:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    docs, lengths = make_documents(args)
    model, result = measure.start_trl(
        args, "SFTTrainer, BFD packing, SDPA", units_per_step=args.bins_per_step
    )
    # TRL's labels: the token itself where trained (the model shifts them), −100 elsewhere
    data = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in docs],
            "labels": [[t if m else -100 for t, m in zip(ids, mask, strict=True)] for ids, mask in docs],
        }
    )
    timed = measure.sequential_trainer(SFTTrainer, result, lambda inputs: int(inputs["input_ids"].numel()))
    measure.time_trl(
        timed,
        SFTConfig,
        args,
        model,
        data,
        result,
        learning_rate=LEARNING_RATE,
        max_length=lengths.max_length,
        packing=True,
        packing_strategy="bfd",
    )
    return result


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    table = measure.Table("SFT training", "bins", describe)
    measure.main(argv, __file__, parse_args, (*ENGINES, "trl"), run_zephyr, run_trl, table)


if __name__ == "__main__":
    main()
