"""Packed attention: exact causal attention inside each document of a packed row, none across documents.

`register_packed_attention()` adds an implementation named "zephyr_packed" to transformers' attention and
mask registries; load or switch a model to it with `attn_implementation="zephyr_packed"`
(`model.set_attn_implementation(...)`). Document boundaries arrive the way transformers passes them to its
flash-attention path, as forward kwargs that reach every attention call: `cu_seq_lens_q` / `cu_seq_lens_k`
(int32 [segments + 1]) and `max_length_q` / `max_length_k` (int). Without them, boundaries are read off
`position_ids` (a position that does not continue the previous one starts a new document).

Kernels: on CUDA with `torch.nn.attention.varlen` (torch ≥ 2.10) the flash varlen kernel, causal via
`window_size=(-1, 0)`; elsewhere the dense path, exact, which is what the tests compare the kernel against:
the row's independent blocks (a document; a prefix with its continuations) side by side, right-padded to
the longest, in one SDPA call under a boolean mask of what each query sees (`segment_blocks`), so its cost
grows with the blocks' lengths, not the row's. Batches with a padding mask, and decoding with a
cache, take transformers' SDPA path unchanged. The kernel takes half precision only: under autocast, query,
keys and values are cast to the autocast dtype first (with fp32 weights the rotary embedding hands over an
fp32 query and key, which SDPA would have cast the same way). Each path is logged once per process, a CUDA
forward that falls back to the dense path as a warning, and `attention_paths()` lists those taken.

Sliding windows (Mistral's `sliding_window`, passed by the model as a kwarg): a query sees itself and the
window − 1 keys before it in its document, as transformers' masks say; the kernel takes it as
`window_size=(window − 1, 0)` and the dense path adds it to its mask.

Grouped-query attention: keys and values go to the kernel with their own heads where it takes fewer than the
query's (`enable_gqa`, or a kernel that takes them without the argument, which a probe checks once per
process against the repeated heads); otherwise each KV head is repeated for its query heads first.

Shared prefixes (`zephyr.data.packing.collate_shared_prefix`): the forward kwarg `shared_kv_index` (long
[keys]) lists, segment by segment, the row positions whose keys and values each query segment attends to, and
`cu_seq_lens_k` / `max_length_k` describe those key segments. A query segment shorter than its keys is
aligned to their end (query i of a segment with Lq queries and Lk keys sees keys 0..Lk − Lq + i), which is the
flash kernels' own causal convention when query and key lengths differ: every layer gathers its keys and
values by that index for the varlen kernel, and the dense path builds the same mask over the row positions
(each key once, however many continuations see it).

`packed_attention(model)` switches a model to "zephyr_packed" for a while (the scoring of a model loaded
with another attention); with a cache or a padding mask the implementation is transformers' SDPA anyway.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "zephyr_packed"
HALF = (torch.float16, torch.bfloat16)


def register_packed_attention() -> str:
    """Register "zephyr_packed" with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_attention_mask)
    return ATTN_IMPLEMENTATION


@contextlib.contextmanager
def packed_attention(causal_lm: Any) -> Iterator[None]:
    """`causal_lm` on "zephyr_packed" attention inside the block, on its own attention again after it."""
    before = causal_lm.config._attn_implementation
    if before == ATTN_IMPLEMENTATION:
        yield
        return
    causal_lm.set_attn_implementation(register_packed_attention())
    try:
        yield
    finally:
        causal_lm.set_attn_implementation(before)


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
        if kwargs.get("shared_kv_index") is not None:
            raise ValueError("shared_kv_index needs a packed row without attention mask or cache")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _note_path(query, "sdpa", "a padding mask or a cache")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    segments = _segments(query, kwargs)
    window = kwargs.get("sliding_window")
    dtype, why = varlen_dtype(query)
    if segments is None:
        dtype, why = None, "no segment boundaries (cu_seq_lens_q) given"
    if segments is not None and dtype is not None:
        if dropout:
            raise ValueError("the varlen attention kernel has no dropout; set attention_dropout to 0")
        _note_path(query, "varlen", why)
        out = varlen_causal_attention(
            query.to(dtype),
            key.to(dtype),
            value.to(dtype),
            segments.cu_q,
            segments.max_q,
            scaling,
            cu_seqlens_k=segments.cu_k,
            max_seqlen_k=segments.max_k,
            kv_index=segments.kv_index,
            window=window,
        )
    elif segments is not None:
        _note_path(query, "dense", why, missed_kernel=True)
        out = dense_block_attention(query, key, value, segments, dropout, scaling, window=window)
    else:
        _note_path(query, "dense", why)
        out = dense_causal_attention(
            query, key, value, kwargs.get("position_ids"), dropout, scaling, window=window
        )
    return out, None


# (path, why) of each attention path taken in this process, in the order first taken
_PATHS: dict[tuple[str, str], None] = {}


def attention_paths() -> list[tuple[str, str]]:
    """The paths "zephyr_packed" attention took in this process: ("varlen" | "dense" | "sdpa", why)."""
    return list(_PATHS)


def _note_path(query: torch.Tensor, path: str, why: str, *, missed_kernel: bool = False) -> None:
    """Log each path once per process: a packed CUDA row that missed the varlen kernel as a warning (the
    dense path pads its blocks, builds their mask and syncs with the host in every layer), anything else as
    information. Not while
    compiling (a compiled layer takes the path its eager calls took)."""
    if torch.compiler.is_compiling() or (path, why) in _PATHS:
        return
    _PATHS[(path, why)] = None
    (logger.warning if missed_kernel and query.is_cuda else logger.info)(
        "zephyr_packed attention on %s: %s (%s)", query.device, path, why
    )


@dataclass(frozen=True)
class Segments:
    """Segment boundaries of one packed row: queries, and keys (the same, unless keys are gathered)."""

    cu_q: torch.Tensor  # int32 [segments + 1], over the row
    cu_k: torch.Tensor  # int32 [segments + 1], over the row or over `kv_index`
    max_q: int
    max_k: int
    kv_index: torch.Tensor | None = None  # long [keys]: row position of each key (shared prefixes)


def _segments(query: torch.Tensor, kwargs: dict[str, Any]) -> Segments | None:
    """Boundaries of a single packed row from the flash-attention kwargs (None when not given)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        return None
    kv_index = kwargs.get("shared_kv_index")
    # Totals are checked only eagerly on the CPU: reading a CUDA tensor would synchronise in every layer, and
    # reading any tensor breaks a compiled layer's graph.
    check = not cu_q.is_cuda and not torch.compiler.is_compiling()
    if query.shape[0] != 1 or (check and int(cu_q[-1]) != query.shape[2]):
        raise ValueError(
            f"cu_seq_lens_q {cu_q.tolist()} does not describe a packed row of shape {tuple(query.shape[::2])}"
            " (batch, tokens): packed batches are one row holding every token"
        )
    max_q = kwargs.get("max_length_q")
    if max_q is None:
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
    if kv_index is None:
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
            raise ValueError(
                "zephyr_packed attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention) unless "
                "shared_kv_index gathers the keys"
            )
        return Segments(cu_q, cu_q, int(max_q), int(max_q))
    if cu_k is None or cu_k.numel() != cu_q.numel():
        raise ValueError("shared_kv_index needs cu_seq_lens_k with one key segment per query segment")
    if check and int(cu_k[-1]) != kv_index.numel():
        raise ValueError(
            f"cu_seq_lens_k ends at {int(cu_k[-1])}, shared_kv_index holds {kv_index.numel()} keys"
        )
    max_k = kwargs.get("max_length_k")
    if max_k is None:
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    return Segments(cu_q, cu_k, int(max_q), int(max_k), kv_index)


def varlen_dtype(query: torch.Tensor) -> tuple[torch.dtype | None, str]:
    """The half dtype the flash varlen kernel runs `query` in (None where it cannot), and why.

    Its own dtype when half; else, under autocast, the autocast dtype: with fp32 weights and bf16 autocast
    the rotary embedding returns fp32 cos/sin, so query and key reach attention in fp32 (SDPA would cast them
    to bf16 under autocast; the kernel, a custom op, is not cast for)."""
    if _varlen_attn() is None:
        return None, "this torch has no torch.nn.attention.varlen"
    if not _varlen_device(query):
        return None, f"{query.device.type}: the varlen kernel is CUDA-only"
    if query.dtype in HALF:
        return query.dtype, f"{_name(query.dtype)}"
    kind = query.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in HALF:
        dtype = torch.get_autocast_dtype(kind)
        return dtype, f"{_name(query.dtype)} cast to {_name(dtype)} under autocast"
    return None, f"{_name(query.dtype)} without half-precision autocast"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _varlen_device(query: torch.Tensor) -> bool:
    return query.is_cuda  # (the tests fake a kernel on the CPU through this)


def _load_varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# Looked up once, at import: a compiled decoder layer then reads constants instead of tracing an import and
# `inspect` (which would break its graph).
_VARLEN_ATTN = _load_varlen_attn()
_VARLEN_HAS_GQA = _VARLEN_ATTN is not None and "enable_gqa" in inspect.signature(_VARLEN_ATTN).parameters
# whether the kernel, without an `enable_gqa` argument, takes fewer KV heads correctly: probed once per process
_NATIVE_GQA: dict[str, bool] = {}


def _varlen_attn() -> Any:
    return _VARLEN_ATTN


def _varlen_has_gqa() -> bool:
    return _VARLEN_HAS_GQA


def gqa_mode(device: torch.device) -> str:
    """How keys and values with fewer heads than the query reach the kernel: "enable_gqa" (the kernel's
    argument), "native" (taken as they are, where `probe_native_gqa` found that right) or "repeat" (each KV
    head repeated for its query heads: the memory of the repeated heads is saved for backward)."""
    if _varlen_has_gqa():
        return "enable_gqa"
    if device.type not in _NATIVE_GQA:
        if torch.compiler.is_compiling():
            return "repeat"  # a compiled layer does not run the probe; the eager forwards before it do
        _NATIVE_GQA[device.type] = probe_native_gqa(device)
        logger.info("varlen attention on %s: native GQA %s", device.type, _NATIVE_GQA[device.type])
    return "native" if _NATIVE_GQA[device.type] else "repeat"


def probe_native_gqa(device: torch.device | str) -> bool:
    """Whether the varlen kernel, given keys and values with fewer heads than the query (and no `enable_gqa`),
    returns the output and gradients of the repeated heads: a small causal problem of two documents (one
    longer than the other) in bf16, each KV head serving two query heads. Any error means no."""
    kernel = _varlen_attn()
    if kernel is None:
        return False
    g = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 33, 96], dtype=torch.int32, device=device)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn((96, heads, 64), generator=g, device=device, dtype=torch.bfloat16)

    try:
        with torch.inference_mode(False), torch.enable_grad():  # the first forward may be a no-grad pass
            q, k, v = (rand(heads).requires_grad_() for heads in (4, 2, 2))
            grad_out = rand(4)

            def run(k_in: torch.Tensor, v_in: torch.Tensor) -> list[torch.Tensor]:
                out = kernel(q, k_in, v_in, cu, cu, 63, 63, window_size=(-1, 0))
                return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]

            native = run(k, v)
            repeated = run(k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    except Exception as exc:  # a kernel that checks the head counts, or any other refusal
        logger.info("varlen attention: fewer KV heads refused (%s)", exc)
        return False
    # bf16 results of the same math, summed in another order: within a few bf16 spacings (2^-8 relative)
    return all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        for a, b in zip(native, repeated, strict=True)
    )


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
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    kv_index: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Flash varlen kernel over one packed row (CUDA only). Returns [1, T, H, D].

    With `kv_index` (and its key segments `cu_seqlens_k`, `max_seqlen_k`), each segment's keys and values are
    gathered first; the kernel aligns a query segment shorter than its keys to their end. `window`: a
    sliding window (each query sees itself and the `window − 1` keys before it).
    """
    varlen_attn = _varlen_attn()
    cu_q = cu_seqlens.to(device=query.device, dtype=torch.int32)
    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H_kv, D]
    if kv_index is None:
        cu_k, max_k = cu_q, max_seqlen
    else:
        if cu_seqlens_k is None or max_seqlen_k is None:
            raise ValueError("kv_index needs cu_seqlens_k and max_seqlen_k")
        cu_k, max_k = cu_seqlens_k.to(device=query.device, dtype=torch.int32), max_seqlen_k
        index = kv_index.to(query.device)
        k, v = k.index_select(0, index), v.index_select(0, index)  # [keys, H_kv, D]
    groups = query.shape[1] // key.shape[1]
    gqa: dict[str, Any] = {}
    mode = gqa_mode(query.device) if groups > 1 else "none"
    if mode == "enable_gqa":
        gqa["enable_gqa"] = True
    elif mode == "repeat":
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    k, v = k.contiguous(), v.contiguous()
    # no key of a segment falls out of a window at least as long as the longest key segment: plain causal
    left = -1 if window is None or max_k <= window else window - 1
    out = varlen_attn(q, k, v, cu_q, cu_k, max_seqlen, max_k, scale=scaling, window_size=(left, 0), **gqa)
    return out.unsqueeze(0)


@dataclass(frozen=True)
class Blocks:
    """A packed row regrouped for one dense attention call: its independent blocks side by side, each
    right-padded to the longest. A block is a run of segments whose keys lie inside it: a document, or a
    prefix with its continuations (a shared-prefix segment's keys reach back into its prefix's segment)."""

    index: torch.Tensor  # long [blocks, width]: row position of each slot (a padding slot repeats a row)
    mask: torch.Tensor  # bool [blocks, 1, width, width]: the key slots each query slot sees
    slots: torch.Tensor  # long [T]: flat slot (block × width + place) of each row position


def segment_blocks(segments: Segments, total: int, window: int | None = None) -> Blocks:
    """The blocks of a packed row of `total` tokens and what each query sees in them: the keys of its own
    segment (`segments.kv_index`, or the segment itself), causally with queries aligned to the end of their
    keys, within a sliding `window` when given (key places counted among the segment's keys, as the varlen
    kernel counts them). A padding slot sees only itself, so no softmax row is empty."""
    cu_q, cu_k = segments.cu_q.long(), segments.cu_k.long()
    device = cu_q.device
    arange = torch.arange(total, device=device)
    n = cu_q.numel() - 1
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    keys = int(cu_k[-1])
    key_rows = arange if segments.kv_index is None else segments.kv_index.to(device).long()
    key_seg = torch.arange(n, device=device).repeat_interleave(len_k, output_size=keys)
    key_place = torch.arange(keys, device=device) - cu_k[:-1][key_seg]
    # A block starts at a segment that no segment from it on reaches before (through its keys).
    reach = cu_q[:-1].scatter_reduce(0, key_seg, key_rows, reduce="amin")
    first = reach.flip(0).cummin(0).values.flip(0) >= cu_q[:-1]
    seg_block = first.long().cumsum(0) - 1
    starts = cu_q[:-1][first]
    width = int((torch.cat([starts[1:], starts.new_tensor([total])]) - starts).max())
    # each segment's key place of every slot of its block (−1: not one of its keys)
    table = torch.full((n, width), -1, dtype=torch.long, device=device)
    table[key_seg, key_rows - starts[seg_block[key_seg]]] = key_place
    row_seg = torch.arange(n, device=device).repeat_interleave(len_q, output_size=total)
    row_block = seg_block[row_seg]
    row_place = arange - starts[row_block]
    query_place = (arange - cu_q[:-1][row_seg] + (len_k - len_q)[row_seg])[:, None]
    seen = table[row_seg]  # [T, width]
    allowed = (seen >= 0) & (seen <= query_place)
    if window is not None:
        allowed &= seen > query_place - window
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(starts.numel(), 1, 1)
    mask[row_block, row_place] = allowed
    index = (starts[:, None] + torch.arange(width, device=device)).clamp(max=total - 1)
    return Blocks(index, mask[:, None], row_block * width + row_place)


def dense_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    dropout: float,
    scaling: float | None,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention over one packed row (`segment_blocks`): one SDPA call over its blocks. Returns
    [1, T, H, D]."""
    t = query.shape[2]
    if segments.cu_q.numel() == 2 and segments.kv_index is None and (window is None or window >= t):
        return _causal_attention(query, key, value, dropout, scaling)  # one document: no mask to build
    blocks = _layer_blocks(segments, t, window)
    groups = query.shape[1] // key.shape[1]

    def by_block(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] → [blocks, H, width, D]
        return x[0][:, blocks.index].transpose(0, 1)

    out = F.scaled_dot_product_attention(
        by_block(query),
        repeat_kv_heads(by_block(key), groups),
        repeat_kv_heads(by_block(value), groups),
        attn_mask=blocks.mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return out.transpose(1, 2).flatten(0, 1)[blocks.slots][None]


# The blocks of the last row seen: every layer of a forward gets the same boundary tensors and builds the same
# blocks (a sliding window aside), so they are built once per forward instead of once per layer.
_LAST_BLOCKS: list[tuple[tuple[Any, ...], Blocks]] = []


def _layer_blocks(segments: Segments, total: int, window: int | None) -> Blocks:
    key = (segments.cu_q, segments.cu_k, segments.kv_index, total, window)
    if _LAST_BLOCKS:
        (seen, blocks) = _LAST_BLOCKS[0]
        if all(a is b or (isinstance(a, int) and a == b) for a, b in zip(seen, key, strict=True)):
            return blocks
    blocks = segment_blocks(segments, total, window)
    if not torch.compiler.is_compiling():
        _LAST_BLOCKS[:] = [(key, blocks)]  # holds the boundary tensors: their identities stay unique
    return blocks


def _causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv_heads(key, groups), repeat_kv_heads(value, groups)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous()


def block_causal_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, T] segment ids → [B, 1, T, T] boolean mask: key ≤ query within the same segment (and, with a
    sliding `window`, key > query − window)."""
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions → [B, T] segment ids: a new segment wherever a position does not continue (p ≠ prev + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
    return starts.cumsum(-1)


def dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """Rows without segment boundaries (a model called with positions only): documents read off
    `position_ids`, one SDPA call under a block-diagonal causal mask per row (within a sliding `window`,
    when given). Returns [B, T, H, D]."""
    t = query.shape[2]
    if window is not None and window >= t:
        window = None  # no key falls out of it
    segments = None
    if position_ids is not None:
        segments = segment_ids_from_positions(position_ids.to(query.device).expand(query.shape[0], -1))
    if window is None and (segments is None or bool((segments == segments[:, :1]).all())):
        return _causal_attention(query, key, value, dropout, scaling)  # one document per row
    if segments is None:
        segments = torch.zeros((query.shape[0], t), dtype=torch.long, device=query.device)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv_heads(key, groups), repeat_kv_heads(value, groups)
    mask = block_causal_mask(segments, window)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()
