"""The MOPD math: pure tensor functions, registered by name. Imports no ray, vllm or deepspeed."""

from . import advantages, aggregation, full_vocab, kl, mismatch, policy_loss, topk  # noqa: F401  (registers)
from .advantages import (advantage_moments, discounted_cumsum, grpo_no_std_outcome_advantage, grpo_outcome_advantage,
                         mix_advantages, normalize_advantages, reverse_kl_advantage, teacher_coefficients)
from .aggregation import aggregate, masked_mean, masked_sum
from .full_vocab import full_vocab_reverse_kl, reverse_kl_from_logits
from .kl import kl_estimate
from .mismatch import IsCorrection, icepop_mask, is_correction, truncated_importance_weights
from .policy_loss import PolicyLossOutput, ppo_clip_loss
from .registry import (ADVANTAGE_ESTIMATORS, DISTILL_LOSSES, IS_CORRECTIONS, KL_ESTIMATORS, LOSS_AGGREGATIONS,
                       OUTCOME_ESTIMATORS, POLICY_LOSSES, Registry)
from .topk import topk_forward_kl, topk_reverse_kl

__all__ = [
    "ADVANTAGE_ESTIMATORS", "DISTILL_LOSSES", "IS_CORRECTIONS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
    "OUTCOME_ESTIMATORS", "POLICY_LOSSES", "Registry", "IsCorrection", "PolicyLossOutput", "advantage_moments",
    "aggregate",
    "discounted_cumsum", "full_vocab_reverse_kl", "grpo_no_std_outcome_advantage", "grpo_outcome_advantage",
    "icepop_mask", "is_correction", "kl_estimate", "masked_mean", "masked_sum", "mix_advantages",
    "normalize_advantages", "ppo_clip_loss", "reverse_kl_advantage", "reverse_kl_from_logits",
    "teacher_coefficients", "topk_forward_kl", "topk_reverse_kl", "truncated_importance_weights",
]
