"""StochasticAdamW and stochastic rounding: exact where nothing rounds, unbiased where it does, and the reason it
exists: bf16 AdamW rounded to nearest loses small updates."""

from __future__ import annotations

import pytest
import torch

from rounding import PATHS, tolerance
from zephyr.training.optim import StochasticAdamW, adamw_math, mix32, random_bits16, stochastic_round

ULP_BELOW_1 = 2.0**-8  # bf16's spacing in [0.5, 1)
ULP_ABOVE_1 = 2.0**-7  # in [1, 2)


def bits(n: int, key: int = 12345) -> torch.Tensor:
    return random_bits16(torch.arange(n), key)


def test_mix32_is_muellers_hash_on_ints_and_tensors():
    def reference(x: int) -> int:
        x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
        x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
        return (x >> 16) ^ x

    values = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1]
    assert [mix32(v) for v in values] == [reference(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]
    assert mix32(1) == 824515495  # pinned: a changed hash would change every bf16 run's rounding


def test_random_bits_are_uniform_deterministic_and_keyed():
    b = bits(1 << 16)
    assert b.dtype == torch.int32 and int(b.min()) >= 0 and int(b.max()) < 1 << 16
    counts = torch.bincount(b >> 12, minlength=16).double()  # 16 buckets of 4,096 expected
    assert float(((counts - 4096) ** 2 / 4096).sum()) < 45  # chi-square, 15 dof: p ≈ 1e-4
    assert torch.equal(b, bits(1 << 16))
    assert float((b == bits(1 << 16, key=12346)).double().mean()) < 0.01


def test_bf16_values_round_to_themselves():
    exact = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    special = [0.0, -0.0, float("inf"), float("-inf"), 1.0, -2.5, 3.0e38]
    special = torch.tensor(special).to(torch.bfloat16).float()
    for x in (exact, special):
        assert torch.equal(stochastic_round(x, bits(len(x))).float(), x)
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]), bits(1)).float()).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounds_to_a_neighbour_with_the_probability_of_its_share(sign):
    # 1 + ¼ ulp: up (1 + 1 ulp) with probability ¼, down (1.0) with ¾; the sign only mirrors it
    x = torch.full((200_000,), sign * (1.0 + 0.25 * ULP_ABOVE_1))
    out = stochastic_round(x, bits(len(x))).float()
    up, down = sign * (1.0 + ULP_ABOVE_1), sign * 1.0
    assert set(out.unique().tolist()) == {up, down}
    share_up = float((out == up).double().mean())
    assert abs(share_up - 0.25) < 0.005  # 5 standard deviations of 200,000 draws
    assert abs(float(out.double().mean()) - float(x[0])) < 0.005 * ULP_ABOVE_1


def test_stochastic_round_takes_only_fp32():
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round(torch.ones(2, dtype=torch.float64), bits(2))


def _model_pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g).to(next(model.parameters()).dtype)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0},
    ]


def test_fp32_steps_are_torch_adamw():
    ours, theirs = _model_pair(torch.float32)
    hyper = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6}
    _train(ours, StochasticAdamW(_groups(ours), **hyper), steps=5)
    _train(theirs, torch.optim.AdamW(_groups(theirs), **hyper), steps=5)
    allowed = tolerance(list(theirs.parameters()), roundings=5 * PATHS)  # 5 steps, two implementations
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=allowed)


def test_adamw_math_first_step_by_hand():
    # step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) = ±lr; decay first: p·(1 − lr·wd)
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -4.0])
    new_p, m, v = adamw_math(
        p, g, torch.zeros(2), torch.zeros(2), step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=0.0, weight_decay=0.5
    )
    torch.testing.assert_close(new_p, torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]))
    torch.testing.assert_close(m, torch.tensor([0.05, -0.4]))
    torch.testing.assert_close(v, torch.tensor([0.0025, 0.16]))


def test_a_bf16_step_is_the_fp32_step_within_one_ulp():
    ours, reference = _model_pair(torch.bfloat16)
    reference.float()
    hyper = {"lr": 1e-3, "weight_decay": 0.01}
    _train(ours, StochasticAdamW(ours.parameters(), **hyper), steps=1)
    _train(reference, torch.optim.AdamW(reference.parameters(), **hyper), steps=1)
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        # the fp32 run saw the same bf16 inputs and weights; its result lies between our two neighbours
        ulp = torch.finfo(torch.bfloat16).eps * b.detach().abs().clamp_min(1e-30)
        assert ((a.float() - b).abs() <= ulp * 1.0001).all()


def test_small_updates_accumulate_in_expectation_where_rounding_to_nearest_loses_them():
    """Weights at 1.0 and a constant gradient: each AdamW step moves them by lr = 1e-4, a twentieth of
    bf16's half-spacing below 1. Rounded to nearest (torch's AdamW on bf16 weights) nothing ever moves; with
    stochastic rounding the mean follows the fp32 run's 1 − 100·lr = 0.99."""
    steps, lr = 100, 1e-4
    results = {}
    for name, make in {"nearest": torch.optim.AdamW, "stochastic": StochasticAdamW}.items():
        weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        optimizer = make([weight], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        results[name] = float(weight.detach().double().mean())
    assert results["nearest"] == 1.0
    assert abs(results["stochastic"] - (1 - steps * lr)) < 1e-3  # spread of the mean: ~2e-4
    assert lr < ULP_BELOW_1 / 2 / 10


def test_same_seed_same_weights_and_a_resumed_optimizer_continues_exactly():
    whole, resumed = _model_pair(torch.bfloat16)
    opt_whole = StochasticAdamW(whole.parameters(), lr=1e-3, seed=7)
    _train(whole, opt_whole, steps=4)

    first = StochasticAdamW(resumed.parameters(), lr=1e-3, seed=7)
    _train(resumed, first, steps=2)
    state = first.state_dict()
    again = StochasticAdamW(resumed.parameters(), lr=1e-3, seed=7)  # as after a restart
    again.load_state_dict(state)
    # the data of steps 3 and 4: continue the generator of the uninterrupted run's inputs
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        torch.randn(32, 8, generator=g)
    for _ in range(2):
        resumed(torch.randn(32, 8, generator=g).to(torch.bfloat16)).pow(2).mean().backward()
        again.step()
        again.zero_grad()
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    other, _ = _model_pair(torch.bfloat16)
    _train(other, StochasticAdamW(other.parameters(), lr=1e-3, seed=8), steps=4)
    assert any(not torch.equal(a, b) for a, b in zip(whole.parameters(), other.parameters(), strict=True))


def test_chunks_round_as_the_whole_tensor(monkeypatch):
    """The bits depend on the element's index in its tensor, not on the chunk it is stepped in."""
    import zephyr.training.optim as optim

    whole, chunked = _model_pair(torch.bfloat16)
    _train(whole, StochasticAdamW(whole.parameters(), lr=1e-2), steps=3)
    monkeypatch.setattr(optim, "CHUNK", 5)  # every tensor in several pieces, the last one short
    _train(chunked, StochasticAdamW(chunked.parameters(), lr=1e-2), steps=3)
    for a, b in zip(whole.parameters(), chunked.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_compiled_step_is_the_eager_step():
    """The fused (compiled) step, which CUDA runs, here through inductor's CPU backend."""
    eager, compiled = _model_pair(torch.bfloat16)
    _train(eager, StochasticAdamW(eager.parameters(), lr=1e-2, fused=False), steps=3)
    optimizer = StochasticAdamW(compiled.parameters(), lr=1e-2, fused=True)
    _train(compiled, optimizer, steps=3)
    assert optimizer.fused  # it compiled, rather than falling back
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        ulp = torch.finfo(torch.bfloat16).eps * a.detach().float().abs()
        assert ((a.float() - b.float()).abs() <= ulp).all()  # fp32 contractions may flip a rounding
        assert float((a == b).double().mean()) > 0.99


@pytest.mark.gpu
def test_the_cuda_step_is_the_cpu_step():
    """On CUDA the step is compiled (one kernel per tensor); the bits are the same hash as on the CPU."""
    cpu, cuda = _model_pair(torch.bfloat16)
    cuda.cuda()
    _train(cpu, StochasticAdamW(cpu.parameters(), lr=1e-2), steps=3)
    g = torch.Generator().manual_seed(0)
    optimizer = StochasticAdamW(cuda.parameters(), lr=1e-2)
    for _ in range(3):
        cuda(torch.randn(32, 8, generator=g).to(torch.bfloat16).cuda()).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.fused  # compiled, not fallen back
    for a, b in zip(cpu.parameters(), cuda.parameters(), strict=True):
        b = b.detach().cpu()
        ulp = torch.finfo(torch.bfloat16).eps * a.detach().float().abs()
        # the forward and backward differ by device; a flipped rounding stays within one spacing
        assert ((a.float() - b.float()).abs() <= 2 * ulp).all()


def test_a_default_step_that_compiles_says_so(monkeypatch):
    """`fused` left to the default, on a device where the step compiles (CUDA's case, faked here with the
    eager step standing in for the compiled kernel): after a step it reads True, as the CUDA test asserts."""
    import zephyr.training.optim as optim

    compiled = []

    def stand_in(fn, **kwargs):
        compiled.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", stand_in)
    monkeypatch.setattr(optim, "compiles_by_default", lambda device: True)
    model, _ = _model_pair(torch.bfloat16)
    optimizer = StochasticAdamW(model.parameters(), lr=1e-2)
    assert optimizer.fused is None
    _train(model, optimizer, steps=2)
    assert optimizer.fused is True and optimizer.fallback is None
    assert compiled == [(optim.adamw_flat, {"dynamic": True, "fullgraph": True})]  # compiled once


def test_a_step_that_fails_to_compile_warns_and_runs_eagerly(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    fallen, eager = _model_pair(torch.bfloat16)
    optimizer = StochasticAdamW(fallen.parameters(), lr=1e-2, fused=True)
    _train(fallen, optimizer, steps=2)
    _train(eager, StochasticAdamW(eager.parameters(), lr=1e-2, fused=False), steps=2)
    assert optimizer.fused is False
    assert optimizer.fallback == "RuntimeError: no compiler here"  # what a benchmark table shows
    warnings = [r for r in caplog.records if "compiling the step failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    for a, b in zip(fallen.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_builds_one_scalars_tensor_per_group_not_per_parameter(monkeypatch):
    import zephyr.training.optim as optim

    calls = []
    real = optim._scalars
    monkeypatch.setattr(optim, "_scalars", lambda *a: calls.append(a) or real(*a))
    model, _ = _model_pair(torch.bfloat16)
    _train(model, StochasticAdamW(_groups(model), lr=1e-3), steps=2)  # 4 tensors in 2 groups
    assert len(calls) == 4  # 2 groups × 2 steps (on a GPU: the host-to-device copies of a step)
