"""PPO/GRPO clipped surrogate and aggregations against float64 loop references."""

import math

import pytest
import torch

from mopd_ray.algo import LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate, ppo_clip_loss



def _ref_token_loss(lp, old, a, lo, hi, dual):
    r = math.exp(lp - old)
    loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    if dual is not None and a < 0:
        loss = min(loss, -a * dual)
    return loss


def _ref_agg(L, M, mode):
    B, T = len(L), len(L[0])
    if mode == "token_mean":
        n = sum(M[b][t] for b in range(B) for t in range(T))
        return sum(L[b][t] * M[b][t] for b in range(B) for t in range(T)) / max(n, 1)
    seqs = []
    for b in range(B):
        n = sum(M[b])
        if n == 0:
            continue
        s = sum(L[b][t] * M[b][t] for t in range(T))
        seqs.append(s / n if mode == "seq_mean_token_mean" else s)
    return sum(seqs) / max(len(seqs), 1)


def _inputs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    lp = old + torch.randn(B, T, generator=g) * 0.4
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[2, :] = 0
    return lp, old, adv, mask


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_matches_reference(agg, dual):
    lp, old, adv, mask = _inputs()
    w = torch.rand(*lp.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    out = ppo_clip_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual, agg=agg, weights_BT=w)
    B, T = lp.shape
    L = [[_ref_token_loss(lp[b, t].item(), old[b, t].item(), adv[b, t].item(), 0.2, 0.28, dual) * w[b, t].item()
          for t in range(T)] for b in range(B)]
    assert out.loss.item() == pytest.approx(_ref_agg(L, mask.tolist(), agg), abs=1e-12)


def test_asymmetric_clip_blocks_gradient_outside_range():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])  # ratio 1.5 > 1+0.28 with A>0: clipped; 0.5 < 1-0.2 with A<0: clipped
    out = ppo_clip_loss(lp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    out.loss.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2))
    assert out.clip_fraction.item() == 1.0


def test_ppo_gradcheck():
    lp, old, adv, mask = _inputs(seed=5)
    lp = lp.clone().requires_grad_()
    for agg in LOSS_AGGREGATIONS.names():
        assert torch.autograd.gradcheck(
            lambda x: ppo_clip_loss(x, old, adv, mask, clip_low=0.3, clip_high=0.3, agg=agg).loss, (lp,))


def test_zero_advantage_gives_zero_loss_and_gradient():
    lp, old, _, mask = _inputs(seed=2)
    lp = lp.clone().requires_grad_()
    out = ppo_clip_loss(lp, old, torch.zeros_like(lp), mask)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(lp.grad) == 0


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_all_masked_batch_is_finite_with_zero_grad(agg):
    lp = torch.full((2, 3), float("-inf"), requires_grad=True)  # padding can hold anything
    out = ppo_clip_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), agg=agg)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert torch.isfinite(lp.grad).all() and torch.count_nonzero(lp.grad) == 0


def test_global_denominator_makes_shards_sum_to_full_batch():
    lp, old, adv, mask = _inputs(seed=4, B=6)
    full = ppo_clip_loss(lp, old, adv, mask, agg="token_mean").loss
    n = mask.sum()
    parts = sum(ppo_clip_loss(lp[s], old[s], adv[s], mask[s], agg="token_mean", denominator=n).loss
                for s in (slice(0, 3), slice(3, 6)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss
    with pytest.raises(KeyError, match="token_mean"):
        aggregate(lp, mask, "token_avg")
