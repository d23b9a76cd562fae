"""What benchmarks/gpu.sh runs on the card it finds: the model shape and the engines that fit its memory.

Memory of the training steps on one H200 (docs/benchmarks.md, REFERENCE.md), bf16 weights and AdamW states
(8 bytes a parameter: 54 GiB at the Mistral-7B shape) plus activations:
- zephyr without checkpointing: ~100–105 GiB at 7B; every second layer checkpointed (`zephyr-half`): ~80 GiB;
- zephyr with checkpointing (`zephyr-ckpt`): ~56 GiB; TRL with checkpointing and a precomputed reference:
  ~58 GiB.
So a card of 120 GiB or more (H200) runs the 7B shape with every default engine. An 80 GB card (H100, 79 GiB
to torch) runs the 7B shape with the engines that fit there: `zephyr-ckpt` (`master_weights: bf16` and
gradient checkpointing), `zephyr-ckpt75` (three layers in four checkpointed: ~54 + 8 × 1.6 GiB of
activations, the fastest zephyr expected to fit) and TRL's configuration that fits: bf16 weights, fused
AdamW, gradient checkpointing, `precompute_ref_log_probs`. A smaller card runs the 1B shape (the same
workloads) with the default engines.

    python benchmarks/plan.py        # prints shell assignments: CARD, CARD_GIB, SHAPE, DPO_ENGINES, SFT_ENGINES
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

H200_CLASS_GIB = 120.0  # every default engine at 7B (the largest needs ~105 GiB)
H100_CLASS_GIB = (
    72.0  # the checkpointed 7B engines (~58 GiB) with room for the allocator and the CUDA context
)


@dataclass(frozen=True)
class Plan:
    shape: str
    dpo_engines: str
    sft_engines: str
    why: str


def plan_for(total_gib: float) -> Plan:
    """The shape and engines for a card of `total_gib` GiB."""
    if total_gib >= H200_CLASS_GIB:
        return Plan(
            "mistral-7b", "zephyr,zephyr-ckpt,trl", "zephyr,zephyr-ckpt,trl", "every engine fits at 7B"
        )
    if total_gib >= H100_CLASS_GIB:
        return Plan(
            "mistral-7b",
            "zephyr-ckpt75,zephyr-ckpt,trl",
            "zephyr-ckpt75,zephyr-ckpt,trl",
            "7B without checkpointing (~105 GiB) and with half the layers checkpointed (~80 GiB) do not fit",
        )
    return Plan(
        "1b", "zephyr,zephyr-ckpt,trl", "zephyr,zephyr-ckpt,trl", "the 7B training state does not fit"
    )


def shell_lines(card: str, total_gib: float, plan: Plan) -> str:
    values = {
        "CARD": card,
        "CARD_GIB": f"{total_gib:.1f}",
        "SHAPE": plan.shape,
        "DPO_ENGINES": plan.dpo_engines,
        "SFT_ENGINES": plan.sft_engines,
        "PLAN_WHY": plan.why,
    }
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    props = torch.cuda.get_device_properties(0)
    total_gib = props.total_memory / 2**30
    print(shell_lines(props.name, total_gib, plan_for(total_gib)))


if __name__ == "__main__":
    main()
