"""k1/k2/k3 estimators of KL(pi || pi_ref) from samples y ~ pi, for reporting.

With log_ratio_t = log pi_ref(y_t) - log pi(y_t) on tokens sampled from pi (Schulman, "Approximating
KL divergence"):

- k1 = -log_ratio                         unbiased, high variance, can be negative
- k2 = 0.5 * log_ratio^2                  biased, low variance, >= 0
- k3 = exp(log_ratio) - 1 - log_ratio     unbiased, low variance, >= 0

For MOPD reporting pi is the student and pi_ref the teacher: the mean over response tokens estimates
the per-token reverse KL KL(pi_student || pi_teacher). Shapes: [B, T] in, [B, T] out (masked to 0).
"""

from __future__ import annotations

import torch

from .aggregation import masked_mean
from .registry import KL_ESTIMATORS


def _log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT):
    lr = ref_logprobs_BT - logprobs_BT
    return torch.where(mask_BT.bool(), lr, torch.zeros_like(lr))


@KL_ESTIMATORS.register("k1")
def k1(logprobs_BT, ref_logprobs_BT, mask_BT):
    return -_log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT) * mask_BT


@KL_ESTIMATORS.register("k2")
def k2(logprobs_BT, ref_logprobs_BT, mask_BT):
    return 0.5 * _log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT) ** 2 * mask_BT


@KL_ESTIMATORS.register("k3")
def k3(logprobs_BT, ref_logprobs_BT, mask_BT):
    lr = _log_ratio(logprobs_BT, ref_logprobs_BT, mask_BT)
    return (torch.expm1(lr) - lr) * mask_BT


def kl_estimate(kind: str, logprobs_BT, ref_logprobs_BT, mask_BT) -> torch.Tensor:
    """Mean over response tokens of the chosen per-token estimator (0 on an all-masked batch)."""
    return masked_mean(KL_ESTIMATORS.get(kind)(logprobs_BT, ref_logprobs_BT, mask_BT), mask_BT)
