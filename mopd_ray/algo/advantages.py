"""Per-token advantages: the sampled-token reverse-KL distillation signal and GRPO outcome advantages.

Shapes: B sequences (rows), T response positions, G teachers. All advantages are detached: they are
constants of the policy-gradient loss (a gradient through the teacher-minus-student log-ratio would
turn the estimator into something else; slime #1449).
"""

from __future__ import annotations

import torch

from .registry import ADVANTAGE_ESTIMATORS, OUTCOME_ESTIMATORS


def teacher_coefficients(teacher_index_B: torch.Tensor, teacher_weights_G: torch.Tensor) -> torch.Tensor:
    """coef_b = w[g_b]: each row's coefficient is the weight of the teacher it was routed to."""
    return teacher_weights_G.to(torch.get_default_dtype() if not teacher_weights_G.is_floating_point()
                                else teacher_weights_G.dtype)[teacher_index_B.long()]


def discounted_cumsum(x_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{s >= t} gamma^(s-t) m_s x_s  (masked positions contribute nothing; output masked).

    gamma = 0 returns x itself (per-token signal); gamma = 1 is the undiscounted sum of future
    per-token rewards, as in treating -KL_t as a dense reward.
    """
    x = torch.where(mask_BT.bool(), x_BT, torch.zeros_like(x_BT))
    if gamma == 0.0:
        return x
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out * mask_BT


@ADVANTAGE_ESTIMATORS.register("reverse_kl")
def reverse_kl_advantage(
    teacher_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    coef_B: torch.Tensor | float = 1.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Sampled-token reverse-KL advantage.

        A_bt = coef_b * sg[ log pi_T(y_bt | y_<t) - log pi_old(y_bt | y_<t) ] * m_bt

    Its expectation under y ~ pi_old is -KL(pi_old || pi_T) per position, so maximising
    sum_t A_t log pi_theta(y_t) descends the reverse KL along the student's own trajectories.
    ``coef_B`` is the per-row coefficient (the routed teacher's weight). With ``gamma`` > 0 the
    per-token signal is summed over future positions, sum_{s>=t} gamma^(s-t) A_s (a dense-reward
    return; lower variance per token is traded for credit assignment over the sequence).
    """
    coef = torch.as_tensor(coef_B, dtype=teacher_logprobs_BT.dtype, device=teacher_logprobs_BT.device)
    if coef.dim() == 1:
        coef = coef[:, None]
    mask = response_mask_BT.to(teacher_logprobs_BT.dtype)
    log_ratio = torch.where(mask.bool(), teacher_logprobs_BT - old_logprobs_BT,
                            torch.zeros_like(teacher_logprobs_BT))
    adv = coef * log_ratio * mask
    if gamma:
        adv = discounted_cumsum(adv, mask, gamma)
    return adv.detach()


def _group_stats(scores_B: torch.Tensor, group_ids_B: torch.Tensor):
    """Per-row mean, unbiased std and size of the row's group."""
    _, inverse = torch.unique(group_ids_B, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    dtype = scores_B.dtype
    count_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(
        0, inverse, torch.ones_like(scores_B))
    sum_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(0, inverse, scores_B)
    mean_G = sum_G / count_G
    sq_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(
        0, inverse, (scores_B - mean_G[inverse]) ** 2)
    std_G = torch.sqrt(sq_G / (count_G - 1).clamp(min=1))
    return mean_G[inverse], std_G[inverse], count_G[inverse]


def _grpo(rewards_B, group_ids_B, response_mask_BT, *, scale_by_std: bool, eps: float):
    rewards = rewards_B.to(torch.float64 if rewards_B.dtype == torch.float64 else torch.float32)
    mean_B, std_B, count_B = _group_stats(rewards, group_ids_B)
    adv_B = rewards - mean_B
    if scale_by_std:
        adv_B = adv_B / (std_B + eps)
    # A lone sample has no baseline: it gets no outcome signal rather than its raw reward.
    adv_B = torch.where(count_B > 1, adv_B, torch.zeros_like(adv_B))
    return (adv_B[:, None] * response_mask_BT.to(adv_B.dtype)).detach()


@OUTCOME_ESTIMATORS.register("grpo")
def grpo_outcome_advantage(rewards_B, group_ids_B, response_mask_BT, eps: float = 1e-6):
    """GRPO group-normalised outcome advantage, broadcast over response tokens.

        A_bt = (r_b - mean_{g(b)} r) / (std_{g(b)} r + eps) * m_bt

    Groups are the n samples of one prompt (``group_ids_B``); std is the unbiased sample std.
    A group of one sample gets 0. A group whose rewards are all equal gets 0.
    """
    return _grpo(rewards_B, group_ids_B, response_mask_BT, scale_by_std=True, eps=eps)


@OUTCOME_ESTIMATORS.register("grpo_no_std")
def grpo_no_std_outcome_advantage(rewards_B, group_ids_B, response_mask_BT, eps: float = 1e-6):
    """Std-free GRPO (Dr. GRPO): A_bt = (r_b - mean_{g(b)} r) * m_bt; avoids up-weighting easy groups."""
    return _grpo(rewards_B, group_ids_B, response_mask_BT, scale_by_std=False, eps=eps)


def mix_advantages(
    distill_BT: torch.Tensor,
    outcome_BT: torch.Tensor,
    alpha: float,
    has_reward_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_bt = A^distill_bt + alpha * h_b * A^outcome_bt  (MiMo-V2-Flash MOPD).

    ``has_reward_B`` (bool) marks rows whose domain has a verifiable reward; other rows keep the pure
    distillation advantage. alpha = 0 is pure distillation.
    """
    if alpha == 0.0:
        return distill_BT.detach()
    outcome = outcome_BT.to(distill_BT.dtype)
    if has_reward_B is not None:
        outcome = outcome * has_reward_B.to(distill_BT.dtype)[:, None]
    return (distill_BT + alpha * outcome).detach()


def advantage_moments(adv_BT: torch.Tensor, mask_BT: torch.Tensor, group_B: torch.Tensor,
                      n_groups: int) -> torch.Tensor:
    """[n_groups, 3] float64 (token count, sum, sum of squares) of the advantages of each group's rows.

    Moments rather than means, so data-parallel ranks can sum theirs (all-reduce) before normalising.
    """
    m = mask_BT.to(torch.float64)
    a = adv_BT.to(torch.float64) * m
    per_row = torch.stack([m.sum(-1), a.sum(-1), (a * a).sum(-1)], dim=-1)  # [B, 3]
    out = torch.zeros(n_groups, 3, dtype=torch.float64, device=adv_BT.device)
    return out.index_add_(0, group_B.long(), per_row)


def normalize_advantages(adv_BT: torch.Tensor, mask_BT: torch.Tensor, group_B: torch.Tensor | None = None,
                         moments_G3: torch.Tensor | None = None, scale: bool = True,
                         eps: float = 1e-8) -> torch.Tensor:
    """Normalise advantages within groups of rows, over response tokens:

        A_bt <- (A_bt - mean_g) / (std_g + eps)      (``scale=False``: A_bt - mean_g, a baseline only)

    g = group_B[b]; one group (the batch) when ``group_B`` is None. With a group per teacher, the mean
    is a per-teacher baseline: a teacher far from the student (every sampled token scored -7) no longer
    pushes every token down, only the tokens scored below that teacher's average; and teachers whose
    log-ratios differ in scale by orders of magnitude no longer share one scale. ``moments_G3`` are
    ``advantage_moments`` summed over ranks (default: this batch's own). The std is the population std.
    """
    if group_B is None:
        group_B = torch.zeros(adv_BT.shape[0], dtype=torch.long, device=adv_BT.device)
    if moments_G3 is None:
        moments_G3 = advantage_moments(adv_BT, mask_BT, group_B, int(group_B.max().item()) + 1 if len(group_B) else 0)
    n = moments_G3[:, 0].clamp(min=1)
    mean_G = moments_G3[:, 1] / n
    var_G = (moments_G3[:, 2] / n - mean_G ** 2).clamp(min=0)
    mean = mean_G[group_B.long()][:, None].to(adv_BT.dtype)
    out = adv_BT - mean
    if scale:
        out = out / (var_G.sqrt()[group_B.long()][:, None].to(adv_BT.dtype) + eps)
    return (out * mask_BT.to(adv_BT.dtype)).detach()
