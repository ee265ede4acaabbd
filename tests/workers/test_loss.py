"""The learner's micro-batch loss: rows of different signals share a batch and add up exactly."""

import torch

from mopd_ray.algo import (full_vocab_reverse_kl, ppo_clip_loss, reverse_kl_advantage, topk_forward_kl,
                           truncated_importance_weights)
from mopd_ray.workers.loss import MicroBatch, micro_batch_loss, token_logprobs_from_logits

ALGO = dict(is_correction="tis", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0, clip_low=0.2, clip_high=0.28,
            dual_clip=None, loss_agg="token_mean", policy_loss="ppo_clip", topk_divergence="forward",
            full_vocab_chunk_size=3)


def _setup(seed=0, b=3, L=6, V=11, H=4, K=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (b, L), generator=g)
    mask = torch.zeros(b, L, dtype=torch.float64)
    mask[:, 3:] = 1
    old = token_logprobs_from_logits(logits.detach(), tokens) + 0.01 * torch.randn(b, L, generator=g, dtype=torch.float64)
    rollout = old + 0.05 * torch.randn(b, L, generator=g, dtype=torch.float64)
    teacher_lp = -torch.rand(b, L, generator=g, dtype=torch.float64) * 3
    coef = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    adv = reverse_kl_advantage(teacher_lp, old, mask, coef)
    t_logits = torch.randn(b, L, V, generator=g, dtype=torch.float64)
    t_lp = torch.log_softmax(t_logits, -1)
    topk = torch.topk(t_lp, K, -1)
    hidden = torch.randn(b, L, H, generator=g, dtype=torch.float64)
    head = torch.randn(V, H, generator=g, dtype=torch.float64)
    mb = MicroBatch(tokens, mask, old, rollout, adv, coef, torch.tensor([0, 1, 2]), topk.indices, topk.values, hidden)
    return logits, mb, {2: (head, None)}


def test_sampled_rows_are_the_clipped_surrogate():
    logits, mb, _ = _setup()
    loss, metrics = micro_batch_loss(logits, mb, ALGO, torch.zeros(3, dtype=torch.long), denominator=mb.response_mask_bL.sum())
    lp = token_logprobs_from_logits(logits, mb.tokens_bL)
    gate = truncated_importance_weights(mb.old_logprobs_bL, mb.rollout_logprobs_bL, mb.response_mask_bL, cap=2.0)
    want = ppo_clip_loss(lp, mb.old_logprobs_bL, mb.advantages_bL, mb.response_mask_bL, clip_low=0.2, clip_high=0.28,
                         weights_BT=gate.weights_BT).loss
    assert torch.allclose(loss, want) and "pg_clip_fraction" in metrics


def test_mixed_signals_partition_rows_and_add_up():
    logits, mb, heads = _setup(seed=1)
    signals = torch.tensor([0, 1, 2])  # row 0 sampled, row 1 top-k, row 2 full vocabulary
    den = mb.response_mask_bL.sum()
    loss, _ = micro_batch_loss(logits, mb, ALGO, signals, denominator=den, teacher_heads=heads)
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
    part1 = mb.coef_b[1] * topk_forward_kl(logits[1, pos], mb.topk_ids_bLK[1, pos + 1], mb.topk_logprobs_bLK[1, pos + 1],
                                           torch.ones(3)).sum() / den
    head = heads[2][0]
    part2 = mb.coef_b[2] * full_vocab_reverse_kl(logits[2, pos], mb.hidden_bLH[2, pos + 1], head, torch.ones(3)).sum() / den
    assert torch.allclose(loss, part0 + part1 + part2)
