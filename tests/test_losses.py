"""Preference and SFT losses: hand-computed golden values, stability, and parity with TRL 1.16."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rounding import tolerance
from zephyr.training.losses import (
    PREFERENCE_LOSSES,
    LossParams,
    PairLogps,
    get_preference_loss,
    sft_token_losses,
)

LN2 = 0.6931471805599453


def pairs(chosen, rejected, chosen_tokens=None, rejected_tokens=None) -> PairLogps:
    chosen = torch.tensor(chosen, dtype=torch.float64)
    rejected = torch.tensor(rejected, dtype=torch.float64)
    ones = torch.ones_like(chosen, dtype=torch.long)
    return PairLogps(
        chosen,
        rejected,
        ones if chosen_tokens is None else torch.tensor(chosen_tokens),
        ones if rejected_tokens is None else torch.tensor(rejected_tokens),
    )


def run(name, policy, ref, **params):
    return get_preference_loss(name)(policy, ref, LossParams(**params))


# --- golden values, computed by hand -------------------------------------------------------------------


def test_sigmoid_golden():
    # policy Δ = −10 − (−11) = 1, ref Δ = −10 − (−10) = 0, h = 1, β = 0.1
    # loss = −log σ(0.1) = log(1 + e^{−0.1}) = 0.6443966600735709
    # rewards: chosen 0.1·(−10 + 10) = 0, rejected 0.1·(−11 + 10) = −0.1
    out = run("sigmoid", pairs([-10.0], [-11.0]), pairs([-10.0], [-10.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.6443966600735709, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)


@pytest.mark.parametrize("name,params", [("sigmoid", {}), ("cdpo", {"label_smoothing": 0.1})])
def test_step_zero_is_ln2_when_policy_equals_reference(name, params):
    # h = 0 → −log σ(0) = ln 2; cdpo: −(1−ε)·log σ(0) − ε·log σ(0) = ln 2 as well
    logps = pairs([-35.2, -7.0, -120.5], [-40.0, -3.5, -99.0])
    out = run(name, logps, logps, beta=0.1, **params)
    assert torch.allclose(out.losses, torch.full((3,), LN2, dtype=torch.float64), atol=1e-15)
    assert torch.equal(out.chosen_rewards, torch.zeros(3, dtype=torch.float64))


def test_step_zero_is_ln2_in_bfloat16():
    logps = PairLogps(
        torch.tensor([-35.0, -7.0], dtype=torch.bfloat16),
        torch.tensor([-41.0, -2.0], dtype=torch.bfloat16),
        torch.tensor([12, 3]),
        torch.tensor([15, 1]),
    )
    out = run("sigmoid", logps, logps)
    assert out.losses.dtype == torch.bfloat16
    one_rounding = tolerance(LN2, torch.bfloat16, roundings=1)  # ln 2 rounded to bf16
    assert out.losses.float().tolist() == pytest.approx([LN2, LN2], abs=one_rounding)


def test_cdpo_golden():
    # h = 1, β = 0.1, ε = 0.2:
    # −0.8·log σ(0.1) − 0.2·log σ(−0.1) = 0.8·0.6443966600735709 + 0.2·(0.1 + 0.6443966600735709)
    #   = 0.6443966600735709 + 0.02 = 0.6643966600735709
    out = run("cdpo", pairs([-10.0], [-11.0]), pairs([-10.0], [-10.0]), beta=0.1, label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(0.6643966600735709, abs=1e-12)


def test_ipo_golden_is_length_normalised():
    # log-ratios: chosen −10 − (−12) = 2 over 5 tokens → 0.4; rejected −12 − (−10) = −2 over 4 tokens → −0.5
    # h̄ = 0.4 − (−0.5) = 0.9; β = 0.1 → 1/(2β) = 5; loss = (0.9 − 5)² = 16.81
    # rewards are not normalised: 0.1·2 = 0.2 and 0.1·(−2) = −0.2
    out = run("ipo", pairs([-10.0], [-12.0], [5], [4]), pairs([-12.0], [-10.0], [5], [4]), beta=0.1)
    assert out.losses.item() == pytest.approx(16.81, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.2, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.2, abs=1e-12)


def test_hinge_golden():
    # pair 1: h = 2 − (−2) = 4 → relu(1 − 0.1·4) = 0.6
    # pair 2: h = 12 − 0 = 12 → relu(1 − 1.2) = 0
    # pair 3: h = −3 → relu(1 + 0.3) = 1.3
    policy = pairs([-10.0, 0.0, -3.0], [-12.0, -12.0, 0.0])
    ref = pairs([-12.0, 0.0, 0.0], [-10.0, 0.0, 0.0])
    out = run("hinge", policy, ref, beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.6, 0.0, 1.3], abs=1e-12)


def test_rpo_golden():
    # DPO part as test_sigmoid_golden: 0.6443966600735709
    # NLL of the chosen answer: −(−10)/4 tokens = 2.5; α = 0.5 → 0.6443966600735709 + 1.25 = 1.8943966600735709
    out = run(
        "rpo", pairs([-10.0], [-11.0], [4], [7]), pairs([-10.0], [-10.0], [4], [7]), beta=0.1, rpo_alpha=0.5
    )
    assert out.losses.item() == pytest.approx(1.8943966600735709, abs=1e-12)


def test_simpo_golden():
    # average log-probs: chosen −6/3 = −2, rejected −12/4 = −3; β = 2, γ = 0.5
    # −log σ(2·(−2 + 3) − 0.5) = −log σ(1.5) = log(1 + e^{−1.5}) = 0.2014132779827524
    # rewards: 2·(−2) = −4, 2·(−3) = −6
    out = run("simpo", pairs([-6.0], [-12.0], [3], [4]), None, beta=2.0, simpo_gamma=0.5)
    assert out.losses.item() == pytest.approx(0.2014132779827524, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-4.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-6.0, abs=1e-12)


def test_missing_reference_counts_as_zero():
    # reference-free DPO: h = −10 − (−11) = 1 → same value as test_sigmoid_golden
    out = run("sigmoid", pairs([-10.0], [-11.0]), None, beta=0.1)
    assert out.losses.item() == pytest.approx(0.6443966600735709, abs=1e-12)


def test_sft_token_losses():
    assert sft_token_losses(torch.tensor([-0.5, -2.0, 0.0])).tolist() == [0.5, 2.0, 0.0]


# --- contracts and numerics ----------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "cdpo", "ipo", "hinge", "rpo", "simpo"}
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*sigmoid"):
        get_preference_loss("dpo")


def test_simpo_refuses_a_reference():
    logps = pairs([-1.0], [-2.0])
    with pytest.raises(ValueError, match="reference-free"):
        run("simpo", logps, logps)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "rpo", "simpo"])
def test_label_smoothing_is_never_ignored(name):
    with pytest.raises(ValueError, match="cdpo"):
        run(name, pairs([-1.0], [-2.0]), None, label_smoothing=0.1)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_extreme_inputs_stay_finite(name):
    params = {"label_smoothing": 0.1} if name == "cdpo" else {}
    chosen = torch.tensor([-1e5, 0.0, -3.0], dtype=torch.float32, requires_grad=True)
    rejected = torch.tensor([0.0, -1e5, -3.0], dtype=torch.float32, requires_grad=True)
    counts = torch.tensor([0, 7, 2])  # an empty answer must not divide by zero
    out = run(name, PairLogps(chosen, rejected, counts, counts), None, beta=1.0, **params)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert not out.chosen_rewards.requires_grad


def test_sigmoid_gradient_golden():
    # d/dπ_c of −log σ(β·h) = −β·σ(−β·h); h = 0 → −0.1·0.5 = −0.05, and +0.05 for π_r
    chosen = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    one = torch.ones(1, dtype=torch.long)
    run("sigmoid", PairLogps(chosen, rejected, one, one), None, beta=0.1).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05, abs=1e-15)
    assert rejected.grad.item() == pytest.approx(0.05, abs=1e-15)


# --- parity with TRL 1.16 -------------------------------------------------------------------------------


def random_pairs(n: int, seed: int) -> tuple[PairLogps, PairLogps]:
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 40, (n,), generator=g)
    rejected_tokens = torch.randint(1, 40, (n,), generator=g)

    def side(scale: float) -> PairLogps:
        c = -torch.rand(n, generator=g, dtype=torch.float64) * chosen_tokens * scale
        r = -torch.rand(n, generator=g, dtype=torch.float64) * rejected_tokens * scale
        return PairLogps(c, r, chosen_tokens, rejected_tokens)

    return side(3.0), side(3.0)


class _FakeAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class _FakeLogProbModel(torch.nn.Module):
    """Stands in for TRL's fused-LM-head forward: per-token log-probs that sum to given values."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo_loss(policy: PairLogps, ref: PairLogps, i: int, loss_types, loss_weights, beta):
    """TRL 1.16 `DPOTrainer._compute_loss` on pair i, with the model replaced by known log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = (int(policy.chosen_tokens[i]), int(policy.rejected_tokens[i]))
    length = max(n) + 1  # one prompt token, then the answer
    completion_mask = torch.zeros(2, length, dtype=torch.long)
    per_token = torch.zeros(2, length - 1, dtype=torch.float64)
    for row, (total, count) in enumerate(zip((policy.chosen[i], policy.rejected[i]), n, strict=True)):
        completion_mask[row, 1 : 1 + count] = 1
        per_token[row, :count] = total / count  # labels of positions 1..count, shifted left by one
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_FakeAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2, length, dtype=torch.long),
        "attention_mask": torch.ones(2, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref.chosen[i : i + 1],
        "ref_rejected_logps": ref.rejected[i : i + 1],
    }
    loss = DPOTrainer._compute_loss(fake, _FakeLogProbModel(per_token), inputs, return_outputs=False)
    metrics = fake._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,trl_types,trl_weights,params",
    [
        ("sigmoid", ["sigmoid"], [1.0], {"beta": 0.1}),
        ("sigmoid", ["sigmoid"], [1.0], {"beta": 0.01}),
        ("ipo", ["ipo"], [1.0], {"beta": 0.1}),
        ("hinge", ["hinge"], [1.0], {"beta": 0.3}),
        ("rpo", ["sigmoid", "sft"], [1.0, 0.7], {"beta": 0.1, "rpo_alpha": 0.7}),
    ],
)
def test_parity_with_trl_dpo_trainer(name, trl_types, trl_weights, params):
    pytest.importorskip("trl")
    policy, ref = random_pairs(6, seed=len(name))
    ours = run(name, policy, ref, **params)
    for i in range(6):
        loss, chosen_reward, rejected_reward = trl_dpo_loss(
            policy, ref, i, trl_types, trl_weights, params["beta"]
        )
        assert ours.losses[i].item() == pytest.approx(loss, abs=1e-6, rel=1e-6)
        assert ours.chosen_rewards[i].item() == pytest.approx(chosen_reward, abs=1e-6)
        assert ours.rejected_rewards[i].item() == pytest.approx(rejected_reward, abs=1e-6)


def trl_cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, **attrs):
    """TRL 1.16 `CPOTrainer.cpo_loss` (reference-free; only reads a few attributes)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, accelerator=_FakeAccelerator(), **attrs)
    return CPOTrainer.cpo_loss(fake, chosen, rejected)


@pytest.mark.slow
def test_cdpo_parity_with_trl_label_smoothing():
    # TRL 1.16's DPOTrainer dropped label smoothing from its sigmoid loss; its CPOTrainer sigmoid loss still
    # has it. Fed the log-ratios instead of log-probs, CPO's logits are exactly h.
    pytest.importorskip("trl")
    policy, ref = random_pairs(16, seed=3)
    ours = run("cdpo", policy, ref, beta=0.1, label_smoothing=0.15)
    losses, _, _ = trl_cpo_loss(
        policy.chosen - ref.chosen,
        policy.rejected - ref.rejected,
        beta=0.1,
        label_smoothing=0.15,
        loss_type="sigmoid",
    )
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_simpo_parity_with_trl_cpo():
    pytest.importorskip("trl")
    policy, _ = random_pairs(16, seed=4)
    ours = run("simpo", policy, None, beta=2.0, simpo_gamma=0.8)
    # TRL averages the log-probs itself (average_log_prob=True for simpo) before cpo_loss
    avg_chosen = policy.chosen / policy.chosen_tokens
    avg_rejected = policy.rejected / policy.rejected_tokens
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss(
        avg_chosen, avg_rejected, beta=2.0, label_smoothing=0.0, loss_type="simpo", simpo_gamma=0.8
    )
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-6, rtol=1e-6)
