"""Top-k distillation: KL over the teacher's top-k support plus one tail bucket.

Shapes: N positions (flatten [B, T] first), V vocabulary, K teacher top-k entries per position.

The teacher sends, per position, ids ``topk_ids_NK`` and log-probs ``teacher_topk_logprobs_NK``
(distinct ids, temperature 1). Both distributions are collapsed onto K + 1 outcomes: the K ids and
the tail (every other token):

    p_k = pi_T(v_k),           p_tail = 1 - sum_k p_k
    q_k = pi_S(v_k),           q_tail = 1 - sum_k q_k       (q from the student's logits z_NV)

- forward: KL(p || q) = sum_{k + tail} p log(p / q)     (verl's forward_kl_topk, but with a tail)
- reverse: KL(q || p) = sum_{k + tail} q log(q / p)

The tail keeps the loss a true KL between distributions (the collapsed divergence lower-bounds the
full-vocabulary one): without it the student could move mass off the top-k set unpenalised, the
instability reported with plain top-k reverse KL. Returns a per-position value [N] (0 where masked);
gradients flow to the student logits only.
"""

from __future__ import annotations

import torch

from .registry import DISTILL_LOSSES

_TINY = 1e-12


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-_TINY)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def collapsed_logprobs(topk_logprobs_NK: torch.Tensor) -> torch.Tensor:
    """[N, K] log-probs -> [N, K + 1] log-probs with the tail bucket appended."""
    tail = _log1mexp(torch.logsumexp(topk_logprobs_NK, dim=-1, keepdim=True))
    return torch.cat([topk_logprobs_NK, tail], dim=-1)


def student_topk_logprobs(student_logits_NV: torch.Tensor, topk_ids_NK: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[ids] without materialising a second [N, V] tensor."""
    lse_N1 = torch.logsumexp(student_logits_NV, dim=-1, keepdim=True)
    return torch.gather(student_logits_NV, -1, topk_ids_NK.long()) - lse_N1


def _masked(x_N, mask_N):
    return torch.where(mask_N.bool(), x_N, torch.zeros_like(x_N))


@DISTILL_LOSSES.register("topk_forward")
def topk_forward_kl(student_logits_NV, topk_ids_NK, teacher_topk_logprobs_NK, mask_N):
    log_q = collapsed_logprobs(student_topk_logprobs(student_logits_NV, topk_ids_NK))
    log_p = collapsed_logprobs(teacher_topk_logprobs_NK.to(log_q.dtype))
    p = log_p.exp()
    return _masked((p * (log_p - log_q)).sum(-1), mask_N)


@DISTILL_LOSSES.register("topk_reverse")
def topk_reverse_kl(student_logits_NV, topk_ids_NK, teacher_topk_logprobs_NK, mask_N):
    log_q = collapsed_logprobs(student_topk_logprobs(student_logits_NV, topk_ids_NK))
    log_p = collapsed_logprobs(teacher_topk_logprobs_NK.to(log_q.dtype))
    return _masked((log_q.exp() * (log_q - log_p)).sum(-1), mask_N)
