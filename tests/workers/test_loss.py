"""The learner's micro-batch loss: rows of different signals share a batch, a row may have several
teachers, and every term adds up exactly (checked against a float64 reference written token by token)."""

import math

import pytest
import torch

from mopd_ray.algo import (full_vocab_reverse_kl, ppo_clip_loss, reverse_kl_advantage, topk_forward_kl,
                           truncated_importance_weights)
from mopd_ray.workers.loss import SIGNAL_IDS, MicroBatch, micro_batch_loss, terms_from_logits, token_logprobs_from_logits

ALGO = dict(is_correction="tis", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0, clip_low=0.2, clip_high=0.28,
            dual_clip=None, loss_agg="token_mean", policy_loss="ppo_clip", topk_divergence="forward",
            full_vocab_chunk_size=3)
S_, K_, F_ = SIGNAL_IDS["sampled"], SIGNAL_IDS["topk"], SIGNAL_IDS["full_vocab"]


def _setup(seed=0, b=3, L=6, V=11, H=4, K=3, signals=((S_,), (K_,), (F_,)), teachers=((0,), (1,), (2,)),
           coefs=((1.0,), (0.5,), (2.0,))):
    """Random inputs; ``signals`` / ``teachers`` / ``coefs`` per row and slot (-1: empty slot)."""
    g = torch.Generator().manual_seed(seed)
    S = len(signals[0])
    logits = torch.randn(b, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (b, L), generator=g)
    mask = torch.zeros(b, L, dtype=torch.float64)
    mask[:, 3:] = 1
    old = token_logprobs_from_logits(logits.detach(), tokens) + 0.01 * torch.randn(b, L, generator=g, dtype=torch.float64)
    rollout = old + 0.05 * torch.randn(b, L, generator=g, dtype=torch.float64)
    teacher_lp = -torch.rand(S, b, L, generator=g, dtype=torch.float64) * 3
    sig = torch.tensor(signals)
    coef = torch.tensor(coefs, dtype=torch.float64).T[:, :, None].expand(S, b, L).contiguous()
    adv = sum(reverse_kl_advantage(teacher_lp[s], old, mask, coef[s] * (sig[:, s] == S_)[:, None]) for s in range(S))
    topk = [torch.topk(torch.log_softmax(torch.randn(b, L, V, generator=g, dtype=torch.float64), -1), K, -1)
            for _ in range(S)]
    hidden = [torch.randn(b, L, H, generator=g, dtype=torch.float64) for _ in range(S)]
    heads = {t: (torch.randn(V, H, generator=g, dtype=torch.float64), None) for t in range(4)}
    mb = MicroBatch(tokens, mask, old, rollout, adv, coef, torch.tensor(teachers), sig,
                    [t.indices for t in topk], [t.values for t in topk], hidden)
    return logits, mb, heads, teacher_lp


def test_sampled_rows_are_the_clipped_surrogate():
    logits, mb, _, _ = _setup(signals=((S_,), (S_,), (S_,)))
    loss, metrics = micro_batch_loss(terms_from_logits(logits, mb, None, 1.0, None, ALGO), mb, ALGO,
                                     denominator=mb.response_mask_bL.sum())
    lp = token_logprobs_from_logits(logits, mb.tokens_bL)
    gate = truncated_importance_weights(mb.old_logprobs_bL, mb.rollout_logprobs_bL, mb.response_mask_bL, cap=2.0)
    want = ppo_clip_loss(lp, mb.old_logprobs_bL, mb.advantages_bL, mb.response_mask_bL, clip_low=0.2, clip_high=0.28,
                         weights_BT=gate.weights_BT).loss
    assert torch.allclose(loss, want) and "pg_clip_fraction" in metrics


def test_mixed_signals_partition_rows_and_add_up():
    logits, mb, heads, _ = _setup(seed=1)  # row 0 sampled, row 1 top-k, row 2 full vocabulary
    den = mb.response_mask_bL.sum()
    loss, _ = micro_batch_loss(terms_from_logits(logits, mb, heads, 1.0, None, ALGO), mb, ALGO, denominator=den)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # independent assembly of the three parts
    lp = token_logprobs_from_logits(logits, mb.tokens_bL)
    m = mb.response_mask_bL
    gate = truncated_importance_weights(mb.old_logprobs_bL, mb.rollout_logprobs_bL, m, cap=2.0)
    row0 = torch.zeros_like(m)
    row0[0] = 1
    part0 = ppo_clip_loss(lp, mb.old_logprobs_bL, mb.advantages_bL, m * row0, clip_low=0.2, clip_high=0.28,
                          weights_BT=gate.weights_BT, denominator=den).loss
    pos = torch.arange(2, 5)  # logits at l-1 predict token l, l = 3..5
    ids, lps = mb.topk_ids_SbLK[0], mb.topk_logprobs_SbLK[0]
    part1 = 0.5 * topk_forward_kl(logits[1, pos], ids[1, pos + 1], lps[1, pos + 1], torch.ones(3)).sum() / den
    head = heads[2][0]
    part2 = 2.0 * full_vocab_reverse_kl(logits[2, pos], mb.hidden_SbLH[0][2, pos + 1], head, torch.ones(3)).sum() / den
    assert torch.allclose(loss, part0 + part1 + part2)


def _reference(logits, mb, heads, den, clip=(0.2, 0.28), cap=2.0):
    """The combined loss written out token by token in float64, from the definitions:

    rows with a sampled slot:  -w_t min(r_t A_t, clip(r_t) A_t), A_t = sum_sampled c_s (lp_T,s - lp_old)
    each top-k slot:            c_s sum_{k + tail} p log(p / q)
    each full-vocabulary slot:  c_s sum_v q log(q / p),  p = softmax(hidden_s @ W_T,s^T)
    all divided by ``den``; position l is predicted by the logits at l - 1."""
    b, L, _ = logits.shape
    total = logits.new_zeros(())
    for i in range(b):
        sig = mb.signal_bS[i].tolist()
        for l in range(1, L):
            if mb.response_mask_bL[i, l] == 0:
                continue
            logq = torch.log_softmax(logits[i, l - 1], -1)
            q = logq.exp()
            tok = int(mb.tokens_bL[i, l])
            if S_ in sig:
                adv = sum(float(mb.coef_SbL[s, i, l]) * (float(mb._teacher_lp[s, i, l]) - float(mb.old_logprobs_bL[i, l]))
                          for s, x in enumerate(sig) if x == S_)
                ratio = torch.exp(logq[tok] - mb.old_logprobs_bL[i, l])
                w = min(math.exp(float(mb.old_logprobs_bL[i, l] - mb.rollout_logprobs_bL[i, l])), cap)
                total = total - w * torch.minimum(ratio * adv, ratio.clamp(1 - clip[0], 1 + clip[1]) * adv)
            for s, x in enumerate(sig):
                c = mb.coef_SbL[s, i, l]
                if x == K_:
                    ids, p_lp = mb.topk_ids_SbLK[s][i, l], mb.topk_logprobs_SbLK[s][i, l]
                    p = torch.cat([p_lp.exp(), 1 - p_lp.exp().sum()[None]])
                    qq = torch.cat([q[ids], 1 - q[ids].sum()[None]])
                    total = total + c * (p * (p.log() - qq.log())).sum()
                elif x == F_:
                    p_log = torch.log_softmax(heads[int(mb.teacher_index_bS[i, s])][0] @ mb.hidden_SbLH[s][i, l], -1)
                    total = total + c * (q * (logq - p_log)).sum()
    return total / den


@pytest.mark.parametrize("combine", ["fixed", "confidence"])
def test_several_teachers_per_row_equal_a_float64_reference_in_loss_and_gradient(combine):
    # row 0: two sampled teachers; row 1: top-k + sampled; row 2: full-vocab + top-k; row 3: one sampled
    # teacher and an empty slot
    signals = ((S_, S_), (K_, S_), (F_, K_), (S_, -1))
    teachers = ((0, 3), (1, 0), (2, 1), (0, -1))
    coefs = ((1.0, 0.2), (1.0, 0.5), (1.0, 0.3), (0.7, 0.0))
    logits, mb, heads, teacher_lp = _setup(seed=3, b=4, signals=signals, teachers=teachers, coefs=coefs)
    if combine == "confidence":  # per-token weights as the learner builds them (each row's total kept)
        from mopd_ray.workers.learner import LearnerWorker

        w = LearnerWorker.__new__(LearnerWorker)
        w.algo = {"teacher_combine": "confidence"}
        coef = w._token_coefficients(torch.tensor(coefs, dtype=torch.float64), teacher_lp)
        assert torch.allclose(coef.sum(0), torch.tensor(coefs, dtype=torch.float64).sum(-1)[:, None].expand(4, 6))
        assert (coef[1, 3] == 0).all()  # the empty slot gets nothing
        mb.coef_SbL = coef
        sig = torch.tensor(signals)
        mb.advantages_bL = sum(reverse_kl_advantage(teacher_lp[s], mb.old_logprobs_bL, mb.response_mask_bL,
                                                    coef[s] * (sig[:, s] == S_)[:, None]) for s in range(2))
    mb._teacher_lp = teacher_lp
    den = mb.response_mask_bL.sum()
    loss, _ = micro_batch_loss(terms_from_logits(logits, mb, heads, 1.0, None, ALGO), mb, ALGO, denominator=den)
    (grad,) = torch.autograd.grad(loss, logits)
    want = _reference(logits, mb, heads, den)
    (want_grad,) = torch.autograd.grad(want, logits)
    assert abs(loss.item() - want.item()) < 1e-10 and abs(want.item()) > 1e-3
    assert torch.allclose(grad, want_grad, atol=1e-12, rtol=1e-9)
