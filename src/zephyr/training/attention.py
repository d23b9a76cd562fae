"""Packed attention: exact causal attention inside each document of a packed row, none across documents.

`register_packed_attention()` adds an implementation named "zephyr_packed" to transformers' attention and
mask registries; load or switch a model to it with `attn_implementation="zephyr_packed"`
(`model.set_attn_implementation(...)`). Document boundaries arrive the way transformers passes them to its
flash-attention path, as forward kwargs that reach every attention call: `cu_seq_lens_q` / `cu_seq_lens_k`
(int32 [segments + 1]) and `max_length_q` / `max_length_k` (int). Without them, boundaries are read off
`position_ids` (a position that does not continue the previous one starts a new document).

Kernels: on CUDA with `torch.nn.attention.varlen` (torch ≥ 2.10) the flash varlen kernel, causal via
`window_size=(-1, 0)`; elsewhere one dense SDPA call under a block-diagonal causal boolean mask, which is
exact and is what the tests compare the kernel against. Batches with a padding mask, and decoding with a
cache, take transformers' SDPA path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "zephyr_packed"


def register_packed_attention() -> str:
    """Register "zephyr_packed" with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_attention_mask)
    return ATTN_IMPLEMENTATION


def packed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask hook: no mask for a full (possibly packed) causal sequence, else SDPA's mask.

    Without a mask function transformers would hand a raw 2D padding mask to the attention call; with
    SDPA's it would build an O(T²) block mask for every packed row, which the varlen kernel does not need.
    """
    from transformers.masking_utils import sdpa_mask

    full = attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all()))
    if full and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook. query [B, H, T, D], key/value [B, H_kv, T, D] → ([B, T, H, D], None)."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu_seqlens, max_seqlen = _segments(query, kwargs)
    if cu_seqlens is not None and _varlen_available(query):
        if dropout:
            raise ValueError("the varlen attention kernel has no dropout; set attention_dropout to 0")
        out = varlen_causal_attention(query, key, value, cu_seqlens, max_seqlen, scaling)
    else:
        out = dense_causal_attention(
            query, key, value, cu_seqlens, kwargs.get("position_ids"), dropout, scaling
        )
    return out, None


def _segments(query: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
    """Boundaries of a single packed row from the flash-attention kwargs (None when not given)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        return None, 0
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError("zephyr_packed attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention)")
    # (the total is checked only on CPU: reading a CUDA tensor would synchronise in every layer)
    if query.shape[0] != 1 or (not cu_q.is_cuda and int(cu_q[-1]) != query.shape[2]):
        raise ValueError(
            f"cu_seq_lens_q {cu_q.tolist()} does not describe a packed row of shape {tuple(query.shape[::2])}"
            " (batch, tokens): packed batches are one row holding every token"
        )
    max_seqlen = kwargs.get("max_length_q")
    if max_seqlen is None:
        max_seqlen = int((cu_q[1:] - cu_q[:-1]).max())
    return cu_q, int(max_seqlen)


def _varlen_available(query: torch.Tensor) -> bool:
    # flash kernels: CUDA and half precision only; anything else takes the exact dense path
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


@functools.cache
def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_has_gqa() -> bool:
    return "enable_gqa" in inspect.signature(_varlen_attn()).parameters


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, D] → [B, H_kv·groups, T, D], each KV head serving `groups` consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scaling: float | None,
) -> torch.Tensor:
    """Flash varlen kernel over one packed row (CUDA only). Returns [1, T, H, D]."""
    varlen_attn = _varlen_attn()
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    groups = query.shape[1] // key.shape[1]
    gqa: dict[str, Any] = {}
    if _varlen_has_gqa():
        gqa["enable_gqa"] = groups > 1
    else:  # torch 2.10/2.11: no GQA in the kernel
        key, value = repeat_kv_heads(key, groups), repeat_kv_heads(value, groups)
    k, v = key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous()
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scaling, window_size=(-1, 0), **gqa)
    return out.unsqueeze(0)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids → [B, 1, T, T] boolean mask: key ≤ query within the same segment."""
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int [segments + 1] boundaries → [1, total] segment index of each token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device).repeat_interleave(
        lengths, output_size=total
    )
    return ids[None]


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions → [B, T] segment ids: a new segment wherever a position does not continue (p ≠ prev + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
    return starts.cumsum(-1)


def dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Exact packed attention with one SDPA call and a block-diagonal causal mask. Returns [B, T, H, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv_heads(key, groups), repeat_kv_heads(value, groups)
    t = query.shape[2]
    if cu_seqlens is not None:
        segments = segment_ids_from_cu_seqlens(cu_seqlens.to(query.device), t)
    elif position_ids is not None:
        segments = segment_ids_from_positions(position_ids.to(query.device).expand(query.shape[0], -1))
    else:
        segments = None
    if segments is None or bool((segments == segments[:, :1]).all()):
        # one document per row: the plain causal kernel, no mask to build
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling
        )
    else:
        mask = block_causal_mask(segments)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    return out.transpose(1, 2).contiguous()
