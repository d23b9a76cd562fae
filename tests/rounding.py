"""How far apart two computations of one floating-point value may be: from its dtype and its size.

The tests compare values computed twice through different code paths: batched and one at a time, packed and
padded, chunked and whole, shared prefix and not, two processes and one, zephyr and TRL or
lm-evaluation-harness. Both are the same real number rounded differently: the paths add the same terms in
other orders (another matmul blocking, another kernel, another CPU's vector width), so the gap depends on the
machine, and a tolerance below the dtype's resolution at the value's size (fp32 spacing near 100 is 7.6e-6)
fails on some CPU sooner or later.

The rule: two computations of a value whose terms have size `magnitude` may differ by
`roundings × eps(dtype) × magnitude`. The size is
- a sum of log-probs (all negative): its absolute value;
- a tensor or a list: its largest absolute entry;
- log-probs of a model with large logits: those of the whole vocabulary (their largest absolute value is
  the spread of the logits, which the log-sum-exp rounds at), not only the chosen token's;
- a loss or reward made from log-probs: its slope times their total size (`preference_tolerance`).

PATHS = 32 roundings for one value through two paths of the same math. A reduction over n terms in any
pairwise or blocked order is within about log2(n) roundings of the terms' total size; the largest here have
at most 2^16 terms (a 49k-token vocabulary's log-sum-exp), so each path is within ~16 roundings of the exact
value and the two within ~32 of each other. Seen on an AMD EPYC: 1 to 5 (log-prob sums 1 to 2, gradients up
to 5).

A real bug moves the value by far more: a mask that lets documents or choices see each other, a wrong
position, a reference that is not the policy, micro-batches weighted wrongly. The tests that prove such a bug
is caught assert that its gap is at least `BUG_FACTOR` tolerances wide.

Training runs compared step by step through two paths (accumulated or not, two processes or one) carry each
step's gap into the next: their losses, gradient norms and weights get `PATHS × steps` roundings. Weights are
sized as the whole model (its largest weight), not tensor by tensor: Adam divides the momentum by the root of
the second moment, so an entry whose gradient nearly cancels turns a rounding gap into an update gap of many
of its own ulps (seen: 6 ulps of the model's largest weight, in an LM-head row, after 3 steps).

Exact comparisons stay exact only where one process runs the same ops on the same shapes (a recomputed layer,
empty chunks added to the same ones): then the result is bit-identical on any CPU.
"""

from __future__ import annotations

import torch

PATHS = 32

# A bug's gap must exceed the tolerance at least this many times for a comparison to prove it is caught.
BUG_FACTOR = 10


def magnitude(values) -> float:
    """The size of what is compared: a number's absolute value, or the largest absolute entry of a tensor or
    of a (nested) list or tuple of numbers and tensors."""
    if isinstance(values, torch.Tensor):
        return float(values.detach().abs().max()) if values.numel() else 0.0
    if isinstance(values, list | tuple):
        return max((magnitude(v) for v in values), default=0.0)
    return abs(float(values))


def tolerance(values, dtype: torch.dtype = torch.float32, roundings: int = PATHS) -> float:
    """The absolute gap allowed between two computations of `values` in `dtype`: `roundings` roundings at
    their size (`magnitude`)."""
    return roundings * torch.finfo(dtype).eps * magnitude(values)


def preference_tolerance(beta: float, *logps, roundings: int = PATHS) -> float:
    """The gap allowed in a DPO-family loss or reward made from fp32 sequence log-probs `logps` (policy and
    reference, chosen and rejected: each a number or tensor of sums). The sigmoid, cDPO, hinge and SimPO losses
    and the rewards β·(log π − log π_ref) move by at most β per unit of any one log-prob, and each log-prob by
    its own tolerance."""
    return beta * sum(tolerance(x, roundings=roundings) for x in logps)


def step_zero_tolerance(beta: float, line: dict) -> float:
    """The gap allowed between ln 2 and a DPO run's first logged loss (one step per line), whose reference is
    the policy run on other row shapes: `line` holds that step's mean log-probs per pair."""
    chosen, rejected = line["logps/chosen"], line["logps/rejected"]
    return preference_tolerance(beta, chosen, rejected, chosen, rejected)
