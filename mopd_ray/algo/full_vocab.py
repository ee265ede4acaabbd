"""Exact full-vocabulary reverse KL per position, without ever holding [N, V] teacher logits.

Shapes: N positions (flatten [B, T] first), V vocabulary, H teacher hidden size.

    z_n      = student logits at position n                    [N, V]
    u_n      = W_T h_n (+ b_T)   teacher logits rebuilt from   h: [N, H], W_T: [V_T, H]
    KL_n     = sum_v p_n(v) (log p_n(v) - log q_n(v)),   p = softmax(z_n), q = softmax(u_n)
    dKL_n/dz_n(v) = p_n(v) * (log p_n(v) - log q_n(v) - KL_n)

The teacher ships its last-layer (post-norm) hidden states h, not logits; the learner holds the
teacher's frozen output head W_T. ``ChunkedReverseKL`` walks the positions ``chunk_size`` at a time:
the forward keeps only KL_n, the backward rebuilds each chunk's teacher logits again, so peak extra
memory is O(chunk_size * V) whatever N is. Gradients go to the student logits only (the teacher is
frozen: h and W_T get none).

Head post-processing: some families change the logits after the head: Gemma 2 / 3 soft-cap them
(u <- c * tanh(u / c), ``final_logit_softcapping``), Cohere multiplies by ``logit_scale``, Granite divides
by ``logits_scaling``. ``teacher_post = (scale, softcap)`` applies u <- u * scale, then the cap (0: none);
the teacher's config gives it (models/compat.py ``head_post``), so the distribution rebuilt here is the
teacher's own.

Vocabulary padding: embeddings are often padded past the tokenizer (Qwen2.5: 152,064 rows for 151,665
tokens). ``vocab_size`` truncates both sides to the shared tokenizer size before the softmax: the
project's one convention (models/compat.py ``token_rows``), which the engines follow by masking those
rows, so the student distribution here is the one its engine samples from.
"""

from __future__ import annotations

import torch

from .registry import DISTILL_LOSSES


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def teacher_logits(teacher_hidden_CH, teacher_head_VH, teacher_bias_V, vocab_size, dtype, post=(1.0, 0.0)):
    """The teacher's logits [C, vocab_size] from its hidden states, head, bias and post-processing."""
    u = teacher_hidden_CH.to(dtype) @ teacher_head_VH[:vocab_size].to(dtype).T
    if teacher_bias_V is not None:
        u = u + teacher_bias_V[:vocab_size].to(dtype)
    scale, cap = float(post[0]), float(post[1])
    if scale != 1.0:
        u = u * scale
    if cap > 0:
        u = cap * torch.tanh(u / cap)
    return u


def _chunk_logprobs(student_logits_CV, teacher_hidden_CH, teacher_head_VH, teacher_bias_V, vocab_size, dtype,
                    post=(1.0, 0.0)):
    log_p = torch.log_softmax(student_logits_CV[:, :vocab_size].to(dtype), dim=-1)
    u = teacher_logits(teacher_hidden_CH, teacher_head_VH, teacher_bias_V, vocab_size, dtype, post)
    return log_p, torch.log_softmax(u, dim=-1)


class ChunkedReverseKL(torch.autograd.Function):
    """Autograd function: per-position exact reverse KL, teacher logits rebuilt chunk by chunk."""

    @staticmethod
    def forward(ctx, student_logits_NV, teacher_hidden_NH, teacher_head_VH, teacher_bias_V, mask_N,
                chunk_size, vocab_size, post=(1.0, 0.0)):
        dtype = _compute_dtype(student_logits_NV.dtype)
        n = student_logits_NV.shape[0]
        kl_N = torch.zeros(n, dtype=dtype, device=student_logits_NV.device)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            log_p, log_q = _chunk_logprobs(student_logits_NV[s:e], teacher_hidden_NH[s:e], teacher_head_VH,
                                           teacher_bias_V, vocab_size, dtype, post)
            kl_N[s:e] = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl_N = torch.where(mask_N.bool(), kl_N, torch.zeros_like(kl_N))
        ctx.save_for_backward(student_logits_NV, teacher_hidden_NH, teacher_head_VH,
                              teacher_bias_V if teacher_bias_V is not None else torch.empty(0), mask_N, kl_N)
        ctx.has_bias = teacher_bias_V is not None
        ctx.chunk_size, ctx.vocab_size, ctx.post = chunk_size, vocab_size, post
        return kl_N.to(student_logits_NV.dtype)

    @staticmethod
    def backward(ctx, grad_kl_N):
        student_logits_NV, teacher_hidden_NH, teacher_head_VH, bias, mask_N, kl_N = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        dtype = kl_N.dtype
        grad_z = torch.zeros_like(student_logits_NV)
        scale_N = (grad_kl_N.to(dtype) * mask_N.to(dtype))
        n, v = student_logits_NV.shape[0], ctx.vocab_size
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            log_p, log_q = _chunk_logprobs(student_logits_NV[s:e], teacher_hidden_NH[s:e], teacher_head_VH,
                                           bias, v, dtype, ctx.post)
            g = log_p.exp() * (log_p - log_q - kl_N[s:e, None]) * scale_N[s:e, None]
            grad_z[s:e, :v] = g.to(grad_z.dtype)
        return grad_z, None, None, None, None, None, None, None


@DISTILL_LOSSES.register("full_vocab")
def full_vocab_reverse_kl(
    student_logits_NV: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    teacher_head_VH: torch.Tensor,
    mask_N: torch.Tensor,
    chunk_size: int = 1024,
    teacher_bias_V: torch.Tensor | None = None,
    vocab_size: int | None = None,
    teacher_post: tuple = (1.0, 0.0),
) -> torch.Tensor:
    """Per-position exact reverse KL(student || teacher) [N], 0 where masked. See module docstring."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    v = vocab_size or min(student_logits_NV.shape[-1], teacher_head_VH.shape[0])
    if v > student_logits_NV.shape[-1] or v > teacher_head_VH.shape[0]:
        raise ValueError(f"vocab_size {v} exceeds the student ({student_logits_NV.shape[-1]}) or teacher "
                         f"({teacher_head_VH.shape[0]}) output size")
    if teacher_hidden_NH.shape[-1] != teacher_head_VH.shape[-1]:
        raise ValueError(f"teacher hidden size {teacher_hidden_NH.shape[-1]} does not match its output head "
                         f"{tuple(teacher_head_VH.shape)}")
    return ChunkedReverseKL.apply(student_logits_NV, teacher_hidden_NH.detach(), teacher_head_VH.detach(),
                                  None if teacher_bias_V is None else teacher_bias_V.detach(), mask_N,
                                  int(chunk_size), int(v), (float(teacher_post[0]), float(teacher_post[1])))


def reverse_kl_from_logits(student_logits_NV, teacher_logits_NV, mask_N, vocab_size: int | None = None):
    """Unchunked exact reverse KL from full teacher logits: the naive baseline (holds [N, V] twice)."""
    v = vocab_size or min(student_logits_NV.shape[-1], teacher_logits_NV.shape[-1])
    dtype = _compute_dtype(student_logits_NV.dtype)
    log_p = torch.log_softmax(student_logits_NV[:, :v].to(dtype), dim=-1)
    log_q = torch.log_softmax(teacher_logits_NV[:, :v].detach().to(dtype), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return torch.where(mask_N.bool(), kl, torch.zeros_like(kl)).to(student_logits_NV.dtype)
