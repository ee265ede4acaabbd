"""Train/inference mismatch correction on r_t = pi_train(y_t) / pi_rollout(y_t).

The rollout engine (vLLM) and the learner compute log-probs of the same tokens with different
kernels; off-policy lag (max_staleness = 1) widens the gap. Both gates below are detached weights
that multiply the per-token policy loss.

- ``tis``    (truncated importance sampling): w_t = min(r_t, cap)
- ``icepop`` (IcePop, Ring-1T):               w_t = r_t * 1[low <= r_t <= high]
  (tokens far off-distribution are dropped; the rest keep their importance weight)
- ``none``:                                   w_t = 1

Each returns ``IsCorrection(weights_BT, clipped_fraction)``: the fraction of response tokens whose
ratio was truncated (tis) or masked out (icepop), for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .aggregation import masked_mean
from .registry import IS_CORRECTIONS


@dataclass(frozen=True)
class IsCorrection:
    weights_BT: torch.Tensor
    clipped_fraction: torch.Tensor  # scalar


def _log_ratio(train_logprobs_BT, rollout_logprobs_BT, mask_BT):
    lr = (train_logprobs_BT - rollout_logprobs_BT).detach()
    # Padding positions can hold -inf/garbage: keep them at ratio 1 so nothing downstream is NaN.
    return torch.where(mask_BT.bool(), lr, torch.zeros_like(lr))


@IS_CORRECTIONS.register("none")
def no_correction(train_logprobs_BT, rollout_logprobs_BT, mask_BT, **_) -> IsCorrection:
    zero = torch.zeros((), dtype=train_logprobs_BT.dtype, device=train_logprobs_BT.device)
    return IsCorrection(torch.ones_like(train_logprobs_BT) * mask_BT, zero)


@IS_CORRECTIONS.register("tis")
def truncated_importance_weights(
    train_logprobs_BT, rollout_logprobs_BT, mask_BT, cap: float = 2.0, **_
) -> IsCorrection:
    """w_t = min(exp(log pi_train - log pi_rollout), cap) * m_t, detached."""
    log_ratio = _log_ratio(train_logprobs_BT, rollout_logprobs_BT, mask_BT)
    ratio = torch.exp(log_ratio)
    clipped = (ratio > cap).to(ratio.dtype)
    weights = torch.clamp(ratio, max=cap) * mask_BT
    return IsCorrection(weights.detach(), masked_mean(clipped, mask_BT))


@IS_CORRECTIONS.register("icepop")
def icepop_mask(
    train_logprobs_BT, rollout_logprobs_BT, mask_BT, low: float = 0.5, high: float = 2.0, **_
) -> IsCorrection:
    """w_t = r_t * 1[low <= r_t <= high] * m_t, r_t = exp(log pi_train - log pi_rollout), detached."""
    log_ratio = _log_ratio(train_logprobs_BT, rollout_logprobs_BT, mask_BT)
    ratio = torch.exp(log_ratio)
    inside = ((ratio >= low) & (ratio <= high)).to(ratio.dtype)
    return IsCorrection((ratio * inside * mask_BT).detach(), masked_mean(1.0 - inside, mask_BT))


def is_correction(name: str, train_logprobs_BT, rollout_logprobs_BT, mask_BT, **kwargs) -> IsCorrection:
    return IS_CORRECTIONS.get(name)(train_logprobs_BT, rollout_logprobs_BT, mask_BT, **kwargs)


def needs_rollout_logprobs(is_correction: str, recompute_old_logprobs: bool) -> bool:
    """Whether anything consumes the rollout engine's log-probs of its sampled tokens: the
    importance-sampling correction (``algorithm.is_correction``) or pi_old taken from the rollout
    (``learner.recompute_old_logprobs=false``). When nothing does, vLLM is not asked for them (they cost
    17-20% of the generate time of a tiny student here) and ``train_rollout_logprob_gap`` is not reported."""
    return is_correction != "none" or not recompute_old_logprobs
