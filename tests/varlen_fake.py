"""A stand-in for torch's CUDA `varlen_attn` on the CPU, for tests of what zephyr hands the kernel.

`FakeVarlen` follows the flash kernels' conventions in plain torch: one row of tokens [T, H, D], segments
from `cu_q` / `cu_k`, causality and sliding windows as `window_size=(left, 0)` (a query sees the keys at most
`left` before it; −1: all), a query segment shorter than its keys aligned to their end. It records each call
(dtypes, head counts, window) and, by `gqa`, takes keys with fewer heads than the query as torch 2.11 might:
"refuse" raises, "native" lets each KV head serve consecutive query heads (what GQA means), "interleaved"
pairs query head h with KV head h mod H_kv (a wrong convention that a probe must catch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class FakeVarlen:
    gqa: str = "refuse"
    calls: list[dict] = field(default_factory=list)

    def __call__(
        self, q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
    ):
        left, right = window_size
        assert right == 0, "zephyr asks for causal attention only"
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and self.gqa == "refuse" and not enable_gqa:
            raise RuntimeError(f"Expect query and key/value to have the same number of heads ({groups}x)")
        self.calls.append(
            {"dtypes": (q.dtype, k.dtype, v.dtype), "heads": (q.shape[1], k.shape[1]), "window": window_size}
        )
        if groups > 1:
            if self.gqa == "native" or enable_gqa:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            else:  # "interleaved"
                k, v = k.repeat(1, groups, 1), v.repeat(1, groups, 1)
        pieces = []
        for s in range(len(cu_q) - 1):
            a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            assert b - a <= max_q and d - c <= max_k
            shift = (d - c) - (b - a)  # queries aligned to the end of their keys
            allowed = torch.ones(b - a, d - c, dtype=torch.bool).tril(diagonal=shift)
            if left >= 0:
                allowed &= torch.ones(b - a, d - c, dtype=torch.bool).triu(diagonal=shift - left)
            qs, ks, vs = (x.transpose(0, 1).float() for x in (q[a:b], k[c:d], v[c:d]))
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
            pieces.append(out.transpose(0, 1).to(q.dtype))
        return torch.cat(pieces)


def use_fake_kernel(monkeypatch, attention, fake: FakeVarlen, *, gqa_argument: bool = False) -> FakeVarlen:
    """Make "zephyr_packed" attention treat CPU tensors as the kernel's device and call `fake` as its kernel
    (torch 2.11's: no `enable_gqa` argument unless `gqa_argument`); the GQA probe starts afresh."""
    monkeypatch.setattr(attention, "_varlen_device", lambda query: True)
    monkeypatch.setattr(attention, "_varlen_attn", lambda: fake)
    monkeypatch.setattr(attention, "_varlen_has_gqa", lambda: gqa_argument)
    monkeypatch.setattr(attention, "_NATIVE_GQA", {})
    monkeypatch.setattr(attention, "_PATHS", {})
    return fake
