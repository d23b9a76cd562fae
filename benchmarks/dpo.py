"""DPO training speed: zephyr against TRL 1.16's DPOTrainer, same random model, same pairs, same pairs per step.

Both engines train a random Mistral-architecture model of the named shape (benchmarks/shapes.py) on the same
synthetic pairs (UltraFeedback-like lengths: prompt 32–384 tokens, answers 32–640, max_length 1024), 8 pairs
per optimizer step, sigmoid loss β = 0.1, AdamW, gradient clipping at 1.0, reference log-probs precomputed
before training (the reference pass is timed on its own), steps in the same order. On CUDA the weights and
AdamW's states are bf16 in both (the configuration in which TRL fits 7B on one H200); on the CPU, fp32.

Engines:
- `zephyr`: no padding (one packed row per step through the varlen flash kernel), each prompt run once per
  pair (prefix sharing), the LM head only on answer tokens in chunks, no gradient checkpointing, the
  stochastically rounded bf16 AdamW of `master_weights: bf16`.
- `zephyr-ckpt`: the same with gradient checkpointing (the configuration that stays within TRL's memory).
- `zephyr-half`, `zephyr-compile`: checkpointing every second layer; compiled decoder layers (not run by
  default).
- `zephyr-noshare`: `zephyr` without prefix sharing (not run by default; for the ablation).
- `trl`: DPOTrainer with `precompute_ref_log_probs`, SDPA attention, padded batches (its `padding_free` is
  disabled in 1.16), fused AdamW (rounded to nearest: at the recipe's 5e-7 its bf16 weights would not move,
  which a speed comparison does not see), gradient checkpointing on 7B (without it the padded 7B step runs out of
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

import dataclasses
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))  # runs from a checkout without installing zephyr

import measure  # noqa: E402
import shapes  # noqa: E402

ENGINES = {**measure.ENGINES, "zephyr-noshare": measure.Engine(prefix_sharing=False)}
BETA = 0.1
LEARNING_RATE = 5e-7  # the recipe's; a speed benchmark is indifferent to it


def parse_args(argv: list[str] | None = None):
    p = measure.parser(__doc__)
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--ref-batch-size", type=int, default=32, help="pairs per forward of the reference pass")
    measure.add_run_arguments(p, (*ENGINES, "trl"))
    return p.parse_args(argv)


def make_pairs(args):
    from zephyr.training.logps import TokenizedPair

    lengths = shapes.PAIRS[shapes.workload_scale(args.shape)]
    vocab = shapes.SHAPES[args.shape][0]
    n = (args.warmup + args.steps) * args.pairs_per_step
    raw = shapes.synthetic_pairs(n, lengths, vocab, args.seed)
    return [TokenizedPair(str(i), tuple(p), tuple(c), tuple(r)) for i, (p, c, r) in enumerate(raw)], lengths


def describe(args, parameters: int) -> str:
    """The workload, in the tables' header."""
    lengths = shapes.PAIRS[shapes.workload_scale(args.shape)]
    return (
        f"DPO, shape {args.shape} ({parameters / 1e9:.3g}B parameters), "
        f"{args.pairs_per_step} pairs/step, max_length {lengths.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, reference batch {args.ref_batch_size}"
    )


# ---------------------------------------------------------------------------------------------------------
# zephyr


def padded_check(model, pairs) -> str:
    """Per-pair log-probs of the fast path (the model's own attention on `pack_pairs` rows) against one padded
    row per sequence through SDPA, on `pairs`."""
    import torch

    from zephyr.data.packing import collate_padded
    from zephyr.scoring.forward import sequence_logps, target_doc_ids, token_logps
    from zephyr.training.logps import pack_pairs, pair_logps

    docs = []
    for p in pairs:
        for answer in (p.chosen_ids, p.rejected_ids):
            docs.append((list(p.prompt_ids) + list(answer), [0] * len(p.prompt_ids) + [1] * len(answer)))

    def ours(model):
        fast = pair_logps(model, pack_pairs(pairs, prefix_sharing=True))
        return torch.stack([fast.chosen, fast.rejected], 1)

    def theirs(model):
        padded = collate_padded(docs)
        sums, _ = sequence_logps(token_logps(model, padded), target_doc_ids(padded), len(docs))
        return sums.view(-1, 2)

    return measure.sdpa_check("per-pair log-probs", model, ours, theirs)


def run_zephyr(args, engine: str) -> measure.Result:
    from zephyr.scoring.attention import register_packed_attention
    from zephyr.stages.dpo.reference import Reference
    from zephyr.training.logps import compute_logps

    settings = ENGINES[engine]
    sharing = settings.prefix_sharing
    pairs, _ = make_pairs(args)
    model, result = measure.start_run(
        args,
        engine,
        f"varlen, {'prompt shared' if sharing else 'no sharing'}",
        checkpointing=settings.describe(),
        attn_implementation=register_packed_attention(),
        units_per_step=args.pairs_per_step,
        total_units=len(pairs),
    )
    result.check = padded_check(model, pairs[: args.pairs_per_step])
    measure.require_varlen()
    result.check += measure.kernel_note(model)

    started = measure.now()
    table = compute_logps(
        model, pairs, batch_size=args.ref_batch_size, device=model.device, prefix_sharing=sharing
    )
    result.reference_seconds = measure.now() - started

    task = BenchTask(Reference("precomputed", tables={"train": table}, ready=True), sharing)
    n = args.pairs_per_step
    groups = [
        [(i, pairs[i]) for i in range(step * n, (step + 1) * n)] for step in range(args.warmup + args.steps)
    ]
    measure.time_zephyr(model, task, groups, engine=settings, learning_rate=LEARNING_RATE, result=result)
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
        return dataclasses.replace(
            batch, reference=self.reference.select([("train", i) for i, _ in examples])
        )

    def units(self, batch) -> int:
        return batch.num_pairs

    def tokens(self, batch) -> int:
        return batch.num_tokens

    def loss(self, model, batch):
        from zephyr.stages.dpo.run import preference_step

        return preference_step(model, batch, self.reference, self.loss_fn, self.params)


# ---------------------------------------------------------------------------------------------------------
# TRL


def run_trl(args) -> measure.Result:
    import trl.trainer.dpo_trainer as trl_dpo
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs, lengths = make_pairs(args)
    trl_dpo.hash_module = lambda module: uuid.uuid4().hex  # see the module docstring
    model, result = measure.start_trl(
        args, "DPOTrainer, padded, SDPA", units_per_step=args.pairs_per_step, total_units=len(pairs)
    )
    data = Dataset.from_dict(
        {
            "prompt_ids": [list(p.prompt_ids) for p in pairs],
            "chosen_ids": [list(p.chosen_ids) for p in pairs],
            "rejected_ids": [list(p.rejected_ids) for p in pairs],
        }
    )
    base = measure.sequential_trainer(DPOTrainer, result, lambda inputs: int(inputs["attention_mask"].sum()))

    class TimedDPOTrainer(base):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset  # already token ids: prompt_ids, chosen_ids, rejected_ids

        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = measure.now()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            result.reference_seconds = measure.now() - started
            return out

    # the peak memory is the training steps' (the reference pass is timed apart)
    measure.time_trl(
        TimedDPOTrainer,
        DPOConfig,
        args,
        model,
        data,
        result,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        max_length=lengths.max_length,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.ref_batch_size,
    )
    return result


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    table = measure.Table("DPO training", "pairs", describe, epoch=True)
    measure.main(argv, __file__, parse_args, (*ENGINES, "trl"), run_zephyr, run_trl, table)


if __name__ == "__main__":
    main()
