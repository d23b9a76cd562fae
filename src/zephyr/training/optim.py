"""AdamW over bf16 weights and bf16 moments, stored with stochastic rounding: 8 bytes of training state per
parameter (weight, gradient, two moments) instead of 16 with fp32 master weights.

Why the rounding matters: bf16 keeps 8 significant bits, so a weight of 0.02 moves only in steps of 2^-13
(1.2e-4). An AdamW update is about the learning rate per step (5e-7 in dDPO), over a hundred times below half
that step: rounded to nearest, every update is lost and the model never changes, silently. The moments suffer the
same way: β2 = 0.999 shrinks the second moment by 0.1% per step, below bf16's resolution, so it never decays.
Stochastic rounding stores the upper neighbour with probability equal to the value's share of the gap, which
makes each stored value an unbiased estimate of the fp32 result: updates accumulate in expectation.

The random bits are a counter-based hash of (element index, key), the key mixing the seed, the step and the
tensor: the same bits on any device and in any process (DDP replicas round alike and stay identical; an
FSDP2 shard hashes its elements' places in the whole weight, so sharding changes no bit), a resumed run rounds
as the uninterrupted one, and the whole step compiles into one kernel per tensor on CUDA (reading 8 bytes and
writing 6 per parameter). Elsewhere it runs eagerly, in chunks that bound the temporaries. The arithmetic is fp32; only the stores round. On fp32 tensors nothing rounds and the step is
AdamW's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

MASK32 = 0xFFFFFFFF
# Elements per eager chunk: its int64 and fp32 temporaries stay at tens of MiB whatever the tensor's size.
CHUNK = 1 << 22


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (Mueller's finaliser: shifts, xors and one 27-bit multiplier, so that int64
    products never overflow), of a Python int or an int64 tensor of values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def random_bits16(index: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """16 pseudo-random bits (int32 in [0, 2^16)) per element of int64 `index`, a function of (index, key)."""
    return (mix32(mix32(index & MASK32) ^ key) & 0xFFFF).to(torch.int32)


def stochastic_round(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`x` (fp32) in bf16, rounded up or down at random with the probability that makes the result unbiased.

    A bf16 is the upper 16 bits of an fp32. Adding `bits`, uniform in [0, 2^16), to the fp32's bit pattern
    carries into the upper half with probability (low bits) / 2^16, the value's share of the gap to the next
    bf16 away from zero; truncating then gives that neighbour or the one towards zero. Exact bf16 values,
    infinities and NaNs are unchanged.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32, got {x.dtype}")
    return ((x.view(torch.int32) + bits) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _store(dst: torch.Tensor, value: torch.Tensor, index: torch.Tensor, key: torch.Tensor) -> None:
    """Write fp32 `value` into `dst`: stochastically rounded when `dst` is bf16, exactly otherwise."""
    if dst.dtype == torch.bfloat16:
        dst.copy_(stochastic_round(value, random_bits16(index, key)))
    else:
        dst.copy_(value)


def adamw_flat(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    keys: torch.Tensor,
    scalars: torch.Tensor,
) -> None:
    """One AdamW step of flat tensors (or chunks of them) in place, torch.optim.AdamW's formula in fp32.

    `start`: the index of the first element (0-d int64); `keys`: the rounding keys of the weights and both
    moments (int64 [3]); `scalars`: fp32 [6] = decay 1 − lr·wd, step size lr / (1 − β1^t), √(1 − β2^t), eps,
    β1, β2. Tensors rather than numbers: a compiled step then serves every tensor, step and learning rate.
    """
    decay, step_size, bias2_sqrt, eps, beta1, beta2 = scalars.unbind()
    g32 = g.float()
    m32 = m.float().lerp(g32, 1 - beta1)
    v32 = v.float() * beta2 + (1 - beta2) * g32 * g32
    p32 = p.float() * decay - step_size * m32 / (v32.sqrt() / bias2_sqrt + eps)
    index = torch.arange(p.numel(), device=p.device) + start
    for dst, value, key in zip((p, m, v), (p32, m32, v32), keys.unbind(), strict=True):
        _store(dst, value, index, key)


def adamw_math(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new (param, exp_avg, exp_avg_sq) of fp32 tensors after AdamW step `step` (from 1), unrounded."""
    p, m, v = (t.detach().clone().float().reshape(-1) for t in (param, exp_avg, exp_avg_sq))
    scalars = _scalars(step, lr, beta1, beta2, eps, weight_decay, param.device)
    adamw_flat(p, grad.float().reshape(-1), m, v, torch.tensor(0), torch.zeros(3, dtype=torch.long), scalars)
    return p.view_as(param), m.view_as(param), v.view_as(param)


def _scalars(
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, device: torch.device
) -> torch.Tensor:
    values = [1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps, beta1, beta2]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a process holds: a DTensor's (FSDP2) local shard, else the tensor itself."""
    return getattr(t, "_local_tensor", t)


def shard_start(t: torch.Tensor) -> int:
    """Where the process's shard of `t` starts in the whole tensor, in elements: 0 unless `t` is a DTensor
    sharded by rows (FSDP2's Shard(0)), whose local rows are one contiguous run of the whole.

    The rounding bits are a hash of this index plus the element's place in the shard, so an element rounds
    alike however many processes share the tensor: FSDP over N GPUs steps as one GPU would. Other shardings
    keep the shard's own indices (still unbiased, only not shard-invariant).
    """
    local = _local(t)
    if local is t:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
    if local.numel() == 0 or tuple(local_shape[1:]) != shape[1:]:
        return 0
    return offset[0] * local[0].numel() if local.dim() else 0


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW whose moments take the parameters' dtype; bf16 stores round stochastically (module docstring).

    `fused`: run each tensor's step as one compiled kernel (default: on CUDA); True once a compiled step ran.
    If compiling fails, the step warns once, runs eagerly (`fused` False) and keeps the reason in `fallback`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,  # torch.optim.AdamW's default
        seed: int = 0,
        fused: bool | None = None,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self.fused = fused
        self.fallback: str | None = None  # why the compiled step fell back to the eager one
        self._compiled: Callable | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        work = self._advance()
        if not work:
            return loss
        # every tensor's rounding keys and shard start, and every (group, step)'s scalars: one host-to-device
        # copy each per step
        devices = {tensors[0].device for tensors, _, _ in work}
        keys = {d: torch.tensor([key for t, key, _ in work if t[0].device == d]).to(d) for d in devices}
        hypers = {hyper for _, _, hyper in work}  # usually one: every tensor at the same step and group
        scalars = {(d, hyper): _scalars(*hyper, d) for d in devices for hyper in hypers}
        seen = dict.fromkeys(devices, 0)
        for tensors, _, hyper in work:
            device = tensors[0].device
            self._update(tensors, keys[device][seen[device]], scalars[(device, hyper)])
            seen[device] += 1
        return loss

    def _advance(self) -> list[tuple[list[torch.Tensor], list[int], tuple]]:
        """Count a step for every parameter with a gradient: its (weight, gradient, moments), its three
        rounding keys (from the seed, its step and its place in the optimizer) followed by its shard's start,
        and its step's hyperparameters."""
        work = []
        number = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                number += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                base = mix32((self.seed * 0x9E3779B1 + step * 0x85EBCA6B + number * 3) & MASK32)
                keys = [mix32((base + k) & MASK32) for k in range(3)] + [shard_start(p)]
                hyper = (step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                work.append((tensors, keys, hyper))
        return work

    def _update(self, tensors: list[torch.Tensor], keys: torch.Tensor, scalars: torch.Tensor) -> None:
        """One tensor's step; `keys`: its three rounding keys, then its shard's start (int64 [4], on device)."""
        if not all(t.is_contiguous() for t in tensors):
            raise ValueError("StochasticAdamW needs contiguous parameters, gradients and moments")
        flats = [t.view(-1) for t in tensors]
        rounding, start = keys[:3], keys[3]
        if self._use_fused(flats[0].device):
            try:
                self._compiled_step()(*flats, start, rounding, scalars)
                self.fused = True
                return
            except Exception as exc:  # a compiler missing or failing: the eager step is the same math
                logger.warning("StochasticAdamW: compiling the step failed (%s); running it eagerly", exc)
                self.fused = False
                self.fallback = f"{type(exc).__name__}: {exc}"
        for first in range(0, flats[0].numel(), CHUNK):
            chunk = [f[first : first + CHUNK] for f in flats]
            adamw_flat(*chunk, start + first, rounding, scalars)

    def _use_fused(self, device: torch.device) -> bool:
        return compiles_by_default(device) if self.fused is None else self.fused

    def _compiled_step(self) -> Callable:
        if self._compiled is None:
            self._compiled = torch.compile(adamw_flat, dynamic=True, fullgraph=True)
        return self._compiled


def compiles_by_default(device: torch.device) -> bool:
    """Where the step compiles unless told otherwise: CUDA (elsewhere the eager step runs, in chunks)."""
    return device.type == "cuda"
