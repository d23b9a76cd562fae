"""Log-probabilities of target tokens, with the LM head applied only to those tokens, in chunks.

A batch comes from `zephyr.data.packing`: a `PackedBatch` (one row, `cu_seqlens`, per-document
`position_ids`; with `shared` keys for shared prefixes, "zephyr_packed" attention only) or a `PaddedBatch`
(`attention_mask`), with `labels[t]` the target predicted at position t, −100 where there is none. Its type
chooses the attention inputs (`model_inputs`).

The model is called through its own `__call__` (so DDP, FSDP2 and DeepSpeed wrappers run their hooks) with
`logits_to_keep` empty, so its forward projects no position at all; a forward hook on the decoder takes
its final hidden states. The LM head then runs on the target rows only, `chunk_size` rows at a time, with
log-softmax in float32; under autograd each chunk is checkpointed, so its fp32 logits are recomputed in
backward instead of kept: memory holds one chunk of [rows × vocab] logits, never all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zephyr.core.errors import ZephyrError
from zephyr.data.packing import IGNORE_INDEX, PackedBatch, PaddedBatch
from zephyr.scoring.attention import ATTN_IMPLEMENTATION

Batch = PackedBatch | PaddedBatch
# A transformers causal LM (a PreTrainedModel): its decoder, head and config are read by name, which
# torch's Module typing cannot follow.
CausalLM = Any

# Post-head logit transforms of some architectures that the chunked head does not reproduce.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def token_logps(
    model: torch.nn.Module, batch: Batch, *, hidden: torch.Tensor | None = None, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-prob of every target (labels != −100) under `model`, [n_targets] float32, in row-major order.

    `model` is a causal LM or a wrapper of one (`.module`). Packed batches pass their boundaries to
    attention as `cu_seq_lens_q/k` and `max_length_q/k` (the "zephyr_packed" and flash implementations use
    them; "sdpa" and "eager" rebuild them from `position_ids`), so no document attends to another.
    `hidden`: the batch's final hidden states [B, T, H] when already taken (`decoder_hidden_states`).
    """
    if hidden is None:
        hidden = decoder_hidden_states(model, batch)
    labels = batch.labels.to(hidden.device)
    targets = labels != IGNORE_INDEX
    return target_logps(unwrap_model(model), hidden[targets], labels[targets], chunk_size=chunk_size)


def target_doc_ids(batch: Batch) -> torch.Tensor:
    """Document index of each target, in the order `token_logps` returns them (the segments of `sequence_logps`)."""
    return batch.doc_ids[batch.labels != IGNORE_INDEX]


def sequence_logps(
    token_logps: torch.Tensor, segment_ids: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment sums of target log-probs [n_segments] and target counts [n_segments] (long)."""
    segment_ids = segment_ids.to(token_logps.device)
    sums = token_logps.new_zeros(n_segments).index_add(0, segment_ids, token_logps)
    counts = torch.zeros(n_segments, dtype=torch.long, device=token_logps.device)
    counts = counts.index_add(0, segment_ids, torch.ones_like(segment_ids))
    return sums, counts


def unwrap_model(model: torch.nn.Module) -> CausalLM:
    """The causal LM inside DDP / DeepSpeed / compile wrappers."""
    while True:
        inner = next(
            (
                getattr(model, name)
                for name in ("module", "_orig_mod")
                if isinstance(getattr(model, name, None), torch.nn.Module)
            ),
            None,
        )
        if inner is None:
            return model
        model = inner


def model_inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    """Forward kwargs of a packed or padded batch (labels stay out: the model computes no loss)."""
    inputs: dict[str, Any] = {
        "input_ids": batch.input_ids.to(device),
        "position_ids": batch.position_ids.to(device),
    }
    if isinstance(batch, PaddedBatch):
        inputs["attention_mask"] = batch.attention_mask.to(device)
        return inputs
    cu_seqlens = batch.cu_seqlens.to(device=device, dtype=torch.int32)
    inputs.update(
        attention_mask=None,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=batch.max_seqlen,
        max_length_k=batch.max_seqlen,
    )
    if batch.shared is not None:  # shared prefixes: only "zephyr_packed" attention reads the key index
        inputs.update(
            cu_seq_lens_k=batch.shared.cu_seqlens_k.to(device=device, dtype=torch.int32),
            max_length_k=batch.shared.max_seqlen_k,
            shared_kv_index=batch.shared.kv_index.to(device),
        )
    return inputs


def decoder_hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder body, taken during a forward that projects nothing."""
    causal_lm = unwrap_model(model)
    if isinstance(batch, PackedBatch) and batch.shared is not None:
        _check_shared_prefix_attention(causal_lm)
    device = causal_lm.get_input_embeddings().weight.device
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm.get_decoder().register_forward_hook(keep)
    try:
        nothing = torch.empty(0, dtype=torch.long, device=device)
        model(**model_inputs(batch, device), logits_to_keep=nothing, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call in the forward, saw {len(captured)}")
    return captured[0]


def _check_shared_prefix_attention(causal_lm: CausalLM) -> None:
    implementation = getattr(causal_lm.config, "_attn_implementation", None)
    if implementation != ATTN_IMPLEMENTATION:
        # any other attention would let the later answers of a group attend to the wrong keys, silently
        raise ValueError(
            f"a shared-prefix batch needs attn_implementation={ATTN_IMPLEMENTATION!r}, "
            f"the model uses {implementation!r}"
        )


def target_logps(
    causal_lm: CausalLM, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for rows of final hidden states [N, H] → [N] float32, chunk by chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    head = head_logits(causal_lm)

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)

    grad = torch.is_grad_enabled()
    pieces = []
    for k in range(_chunk_count(causal_lm, len(targets), chunk_size, hidden.device)):
        h, y = hidden[k * chunk_size : (k + 1) * chunk_size], targets[k * chunk_size : (k + 1) * chunk_size]
        pieces.append(checkpoint(chunk_logps, h, y, use_reentrant=False) if grad else chunk_logps(h, y))
    return torch.cat(pieces)


def _chunk_count(causal_lm: CausalLM, rows: int, chunk_size: int, device: torch.device) -> int:
    """Chunks for `rows` targets, at least one (an empty batch still yields a graph). Under DeepSpeed ZeRO-3
    every call of the head gathers its partitioned weight, a collective that each process must join as often
    as the others: there every process runs as many chunks as the one with the most (the rest empty)."""
    count = max(math.ceil(rows / chunk_size), 1)
    if _zero3_partitioned(causal_lm.get_output_embeddings().weight) and dist.is_initialized():
        most = torch.tensor(count, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        count = int(most.item())
    return count


def _zero3_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 tags the parameters it partitions


def vocabulary_logps(causal_lm: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """log p(every token | hidden[i]) for a few rows of final hidden states [N, H] → [N, V] float32 (what
    comes next at requested positions, not the targets' log-probs: one row per position)."""
    return torch.log_softmax(head_logits(causal_lm)(hidden), dim=-1)


def head_logits(causal_lm: CausalLM) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [N, H] → float32 logits [N, V], as the model's own head makes them (final softcapping
    included; a model that transforms its logits otherwise is refused)."""
    project = head_projection(causal_lm)
    softcap = _final_logit_softcapping(causal_lm)

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = project(h).float()
        return torch.tanh(out / softcap) * softcap if softcap else out

    return logits


def head_projection(causal_lm: CausalLM) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [N, H] → logits [N, V] through the model's output embeddings."""
    head = causal_lm.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        # FSDP2 keeps sharded DTensor parameters outside the model's forward: gather the head once per call
        full = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
        return lambda h: F.linear(h.to(full.dtype), full, bias)
    if _zero3_partitioned(weight) or not isinstance(head, torch.nn.Linear):
        # calling the module lets DeepSpeed ZeRO-3 gather the partitioned weight in its hooks
        return lambda h: head(h.to(weight.dtype))
    # The weight itself, not the module: accelerate's FSDP2 leaves the head's group unsharded after the
    # forward, and calling the module again would run its FSDP hooks once per chunk, whose backward frees the
    # gathered weights before the final norm's backward reads them. Outside the model's forward no autocast
    # applies: bring bf16 activations to the weight's dtype.
    return lambda h: F.linear(h.to(weight.dtype), weight, bias)


def _final_logit_softcapping(causal_lm: CausalLM) -> float | None:
    config = causal_lm.config.get_text_config()
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ZephyrError(
                f"{type(causal_lm).__name__} scales its logits after the head ({name}), which zephyr's "
                "scoring (the head on scored positions only) does not reproduce"
            )
    return getattr(config, "final_logit_softcapping", None)
