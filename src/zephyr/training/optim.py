"""AdamW over bf16 weights and bf16 moments, stored with stochastic rounding: 8 bytes of training state per
parameter (weight, gradient, two moments) instead of 16 with fp32 master weights.

Why the rounding matters: bf16 keeps 8 significant bits, so a weight of 0.02 moves only in steps of about
6e-5. An AdamW update is about the learning rate per step (5e-7 in dDPO), a hundred times below half that
step: rounded to nearest, every update is lost and the model never changes, silently. The moments suffer the
same way: β2 = 0.999 shrinks the second moment by 0.1% per step, below bf16's resolution, so it never decays.
Stochastic rounding stores the upper neighbour with probability equal to the value's share of the gap, which
makes each stored value an unbiased estimate of the fp32 result: updates accumulate in expectation.

The arithmetic of a step is fp32 (in chunks, so the temporaries stay small whatever the size of a tensor);
only the stores round. On fp32 tensors nothing rounds and the step is exactly AdamW's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Elements per chunk of a step's fp32 temporaries: 128 MiB each, whatever the size of the tensor.
CHUNK = 1 << 25


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` (fp32) in bf16, rounded up or down at random with the probability that makes the result unbiased.

    A bf16 is the upper 16 bits of an fp32. Adding a uniform random 16-bit integer to the fp32's bit pattern
    carries into the upper half with probability (low bits) / 2^16, the value's share of the gap to the next
    bf16 away from zero; truncating then gives that neighbour or the one towards zero. Exact bf16 values,
    infinities and NaNs are unchanged.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.view(torch.int32) + noise
    return bits.bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def store(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write fp32 `value` into `dst`: stochastically rounded when `dst` is bf16, exactly otherwise."""
    if dst.dtype == torch.bfloat16:
        dst.copy_(stochastic_round(value, generator))
    else:
        dst.copy_(value)


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
    """One AdamW step in fp32, torch.optim.AdamW's formula: the new (param, exp_avg, exp_avg_sq).
    `step` counts from 1."""
    param = param.float() * (1 - lr * weight_decay)
    grad = grad.float()
    exp_avg = exp_avg.float().lerp_(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)
    return param, exp_avg, exp_avg_sq


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW whose moments take the parameters' dtype; bf16 stores round stochastically (module docstring).

    The random bits come from a generator seeded by (`seed`, step), so a run resumed from a checkpoint
    (which holds the step) rounds exactly as the uninterrupted run would.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,  # torch.optim.AdamW's default
        seed: int = 0,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _seeded(self, device: torch.device, step: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + step)
        return generator

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        generators: dict[torch.device, torch.Generator] = {}  # seeded once per device and step
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                if p.device not in generators:  # the draws then follow the parameters' order
                    generators[p.device] = self._seeded(p.device, step)
                hyper = {
                    "step": step,
                    "lr": group["lr"],
                    "beta1": beta1,
                    "beta2": beta2,
                    "eps": group["eps"],
                    "weight_decay": group["weight_decay"],
                }
                _update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], hyper, generators[p.device])
        return loss


def _update(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hyper: dict[str, Any],
    generator: torch.Generator,
) -> None:
    """`adamw_math` over flat chunks of one parameter, each result stored back into its own dtype."""
    tensors = (p, grad, exp_avg, exp_avg_sq)
    if all(t.is_contiguous() for t in tensors):
        chunks = zip(*(t.view(-1).split(CHUNK) for t in tensors), strict=True)
    else:  # a strided view cannot be cut into flat chunks: one piece
        chunks = iter([tensors])
    for chunk in chunks:
        new = adamw_math(*chunk, **hyper)
        for dst, value in zip((chunk[0], chunk[2], chunk[3]), new, strict=True):
            store(dst, value, generator)
