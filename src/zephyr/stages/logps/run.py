"""`zephyr logps`: per-pair sequence log-probs of a model on a preference file, the precomputed DPO
reference's pass as a command of its own (DESIGN.md §2 states the output).

The pairs are tokenized once into the tokenized-data cache (`zephyr.training.pairs`), the pass is
`zephyr.training.logps.compute_logps`.
"""

from __future__ import annotations

import os

import torch

from zephyr import io
from zephyr.core.config import LogpsConfig
from zephyr.core.errors import DataError
from zephyr.training.logps import LogpsTable, compute_logps
from zephyr.training.pairs import read_pairs


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_logps(cfg: LogpsConfig) -> LogpsTable:
    """`zephyr logps`: one JSON line per kept pair with `prompt_id`, `chosen_logps`, `rejected_logps`,
    `chosen_tokens`, `rejected_tokens`, in the input's order; the model's own chat template ("auto").

    Runs in float32 on CPU and in bf16 autocast on a GPU that has it (the precision `auto` of training).
    No truncation unless `cfg.max_length` is given.
    """
    from zephyr.models.load import load_model, load_tokenizer
    from zephyr.scoring.attention import register_packed_attention

    tokenizer = load_tokenizer(cfg.model, chat_template=cfg.chat_template)
    pairs, stats = read_pairs(
        tokenizer,
        cfg.data,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        on_bad_record=cfg.on_bad_record,
    )
    if not pairs:
        raise DataError(f"{cfg.data}: no pairs left to score")
    io.check_output_dir(os.path.dirname(os.path.abspath(cfg.out)))  # before the model loads
    device = default_device()
    net = load_model(cfg.model, dtype=torch.float32, attn_implementation=register_packed_attention()).to(
        device
    )
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    table = compute_logps(
        net,
        pairs,
        batch_size=cfg.batch_size,
        device=device,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None,
        progress=True,
        prefix_sharing=cfg.prefix_sharing,
    )
    io.write_jsonl(cfg.out, table.rows(pairs.prompt_ids))
    print(f"{cfg.out}: {stats.describe()}")
    return table
