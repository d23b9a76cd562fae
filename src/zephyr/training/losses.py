"""Training losses as pure functions: the DPO family and the SFT token loss.

Every preference loss has one signature, `fn(policy, ref, params) -> PreferenceLoss`, and is picked once from
`PREFERENCE_LOSSES` by name; the training step never branches on the loss type. Inputs are per-pair sums of
answer-token log-probabilities (and answer-token counts), outputs are per-pair losses and rewards; the loop
sums the per-pair losses and divides by the number of pairs in the whole optimizer step.

Notation: for one pair, h = (π_c − ref_c) − (π_r − ref_r), the difference of the chosen and rejected
log-ratios (π_c: summed log-prob of the chosen answer under the policy, and so on). A missing reference
(`ref=None`, reference "none") counts as log-probs of zero, which is reference-free DPO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per-pair log-probabilities of the chosen and rejected answers, shape [B] each.

    `chosen` / `rejected` are sums over answer tokens; `chosen_tokens` / `rejected_tokens` count those tokens
    (the length normalisation of IPO, RPO and SimPO needs them).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossParams:
    beta: float = 0.1  # paper: 0.1 (handbook retuned: 0.01); IPO's τ; SimPO's β (its paper uses 2.0–2.5)
    label_smoothing: float = 0.0  # cDPO ε: assumed probability that a preference label is flipped
    rpo_alpha: float = 1.0  # RPO: weight of the per-token NLL of the chosen answer
    simpo_gamma: float = 0.5  # SimPO target margin γ, in reward units (TRL's `simpo_gamma`, not γ/β)


@dataclass
class PreferenceLoss:
    """Per-pair losses [B] and the implicit rewards [B] of each side (detached: they are metrics)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


PreferenceLossFn = Callable[[PairLogps, "PairLogps | None", LossParams], PreferenceLoss]


def _logratios(policy: PairLogps, ref: PairLogps | None) -> tuple[torch.Tensor, torch.Tensor]:
    if ref is None:
        return policy.chosen, policy.rejected
    return policy.chosen - ref.chosen, policy.rejected - ref.rejected


def _rewarded(
    losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, p: LossParams
) -> PreferenceLoss:
    return PreferenceLoss(losses, p.beta * chosen.detach(), p.beta * rejected.detach())


def _require_no_smoothing(name: str, p: LossParams) -> None:
    # Label smoothing belongs to cdpo only; accepting it elsewhere would ignore it silently.
    if p.label_smoothing != 0:
        raise ValueError(f"loss '{name}' does not use label_smoothing (got {p.label_smoothing}); use 'cdpo'")


def _per_token(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # clamp: an empty answer (a truncated pair) must not divide by zero
    return logps / counts.to(logps.dtype).clamp(min=1)


def sigmoid_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """DPO: −log σ(β·h)."""
    _require_no_smoothing("sigmoid", p)
    chosen, rejected = _logratios(policy, ref)
    return _rewarded(-F.logsigmoid(p.beta * (chosen - rejected)), chosen, rejected, p)


def cdpo_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """Conservative DPO: −(1−ε)·log σ(β·h) − ε·log σ(−β·h), ε = label_smoothing.

    The DPO loss under labels flipped with probability ε (TRL's sigmoid loss with label smoothing before
    1.x; TRL 1.16's DPOTrainer no longer applies it, its CPOTrainer still does).
    """
    eps = p.label_smoothing
    chosen, rejected = _logratios(policy, ref)
    logits = p.beta * (chosen - rejected)
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return _rewarded(losses, chosen, rejected, p)


def ipo_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """IPO: (h̄ − 1/(2β))², β = τ of the IPO paper.

    As TRL 1.16: each side's log-ratio is divided by its own answer-token count before the difference,
    h̄ = (π_c − ref_c)/n_c − (π_r − ref_r)/n_r, so the squared loss does not grow with answer length. The
    rewards stay β·(summed log-ratio), as for DPO.
    """
    _require_no_smoothing("ipo", p)
    chosen, rejected = _logratios(policy, ref)
    h_avg = _per_token(chosen, policy.chosen_tokens) - _per_token(rejected, policy.rejected_tokens)
    return _rewarded((h_avg - 1 / (2 * p.beta)) ** 2, chosen, rejected, p)


def hinge_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """SLiC-style hinge: relu(1 − β·h)."""
    _require_no_smoothing("hinge", p)
    chosen, rejected = _logratios(policy, ref)
    return _rewarded(torch.relu(1 - p.beta * (chosen - rejected)), chosen, rejected, p)


def rpo_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """RPO: DPO + α·NLL of the chosen answer, NLL = −π_c / n_c (mean over that pair's answer tokens).

    The NLL is normalised per pair, as in the RPO paper, so a pair's loss does not depend on which other
    pairs share its micro-batch. TRL 1.16 (loss_type ["sigmoid", "sft"], loss_weights [1, α]) averages the
    NLL over all chosen tokens of the micro-batch instead; the two agree pair by pair and whenever the
    chosen answers of a batch have equal lengths.
    """
    _require_no_smoothing("rpo", p)
    dpo = sigmoid_loss(policy, ref, p)
    nll = -_per_token(policy.chosen, policy.chosen_tokens)
    return PreferenceLoss(dpo.losses + p.rpo_alpha * nll, dpo.chosen_rewards, dpo.rejected_rewards)


def simpo_loss(policy: PairLogps, ref: PairLogps | None, p: LossParams) -> PreferenceLoss:
    """SimPO (reference-free): −log σ(β·(π_c/n_c − π_r/n_r) − γ), γ = simpo_gamma.

    γ is the target margin in reward units, as TRL's CPOTrainer `simpo_gamma` (which subtracts γ/β from
    the log-prob difference before scaling by β: the same number); the SimPO repository's
    `gamma_beta_ratio` is γ/β. No NLL term: TRL's CPO default cpo_alpha=1 adds one, SimPO does not.
    Rewards are β·(average answer log-prob).
    """
    _require_no_smoothing("simpo", p)
    if ref is not None:
        raise ValueError("loss 'simpo' is reference-free: pass ref=None")
    chosen = _per_token(policy.chosen, policy.chosen_tokens)
    rejected = _per_token(policy.rejected, policy.rejected_tokens)
    losses = -F.logsigmoid(p.beta * (chosen - rejected) - p.simpo_gamma)
    return _rewarded(losses, chosen, rejected, p)


PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "rpo": rpo_loss,
    "simpo": simpo_loss,
}

REFERENCE_FREE_LOSSES = frozenset({"simpo"})


def get_preference_loss(name: str) -> PreferenceLossFn:
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(PREFERENCE_LOSSES))
        raise ValueError(f"unknown preference loss '{name}' (known: {known})") from None


def sft_token_losses(target_logps: torch.Tensor) -> torch.Tensor:
    """Per-target-token SFT losses, −log p(target).

    The SFT objective of a step is the sum of these over every target token of the optimizer step divided by
    the number of target tokens in the step (all micro-batches and processes): the loop does that division,
    so accumulation and data parallelism give the same loss as one large batch.
    """
    return -target_logps
