"""The PPO/GRPO clipped surrogate with an asymmetric clip range.

Shapes: B rows, T response positions.

    r_t   = exp(log pi_theta(y_t) - log pi_old(y_t))
    l_t   = max( -A_t r_t,  -A_t clip(r_t, 1 - eps_low, 1 + eps_high) )
    l_t   = min( l_t, -A_t c )          for A_t < 0 when dual-clip c is set (c > 1)
    L     = aggregate( w_t * l_t )      w_t: detached IS-correction weights (mismatch.py)

The aggregation (token_mean, seq_mean_token_mean, seq_mean_token_sum) is chosen by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .aggregation import aggregate, masked_mean
from .registry import POLICY_LOSSES


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # fraction of response tokens where the clipped branch was taken
    approx_kl: torch.Tensor  # k3 estimate of KL(pi_old || pi_theta) over response tokens
    per_token_loss_BT: torch.Tensor


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    weights_BT: torch.Tensor | None = None,
    denominator=None,
) -> PolicyLossOutput:
    mask = response_mask_BT.to(logprobs_BT.dtype)
    adv = advantages_BT.detach()
    log_ratio = torch.where(mask.bool(), logprobs_BT - old_logprobs_BT.detach(),
                            torch.zeros_like(logprobs_BT))
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    if weights_BT is not None:
        per_token = per_token * weights_BT.detach()
    loss = aggregate(per_token, mask, agg, denominator=denominator)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(mask.dtype), mask)
        approx_kl = masked_mean(torch.exp(-log_ratio) - 1.0 + log_ratio, mask)
    return PolicyLossOutput(loss, clip_frac, approx_kl, per_token)
