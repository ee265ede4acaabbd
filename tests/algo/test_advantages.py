"""Advantages against float64 loop references written here."""

import math

import pytest
import torch

from mopd_ray.algo import (ADVANTAGE_ESTIMATORS, OUTCOME_ESTIMATORS, advantage_moments, discounted_cumsum,
                           grpo_no_std_outcome_advantage, grpo_outcome_advantage, mix_advantages,
                           normalize_advantages, reverse_kl_advantage, teacher_coefficients)



def _mask(B, T, lengths):
    m = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


def test_reverse_kl_advantage_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    t_lp, o_lp = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    mask = _mask(B, T, [7, 3, 0, 5])
    teacher_index = torch.tensor([0, 1, 1, 2])
    weights = torch.tensor([1.0, 0.5, 2.0])
    coef = teacher_coefficients(teacher_index, weights)
    adv = reverse_kl_advantage(t_lp, o_lp, mask, coef)
    for b in range(B):
        for t in range(T):
            want = weights[teacher_index[b]].item() * (t_lp[b, t] - o_lp[b, t]).item() if mask[b, t] else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-12)


def test_reverse_kl_advantage_is_detached_and_ignores_garbage_in_padding():
    t_lp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    o_lp = torch.tensor([[-2.0, float("nan")]], requires_grad=True)
    adv = reverse_kl_advantage(t_lp, o_lp, torch.tensor([[1.0, 0.0]]))
    assert not adv.requires_grad
    assert torch.equal(adv, torch.tensor([[1.0, 0.0]]))


def test_discounted_future_kl_matches_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g)
    mask = _mask(3, 6, [6, 4, 1])
    gamma = 0.9
    out = discounted_cumsum(x, mask, gamma)
    for b in range(3):
        for t in range(6):
            want = sum(gamma ** (s - t) * x[b, s].item() * mask[b, s].item() for s in range(t, 6)) if mask[b, t] else 0
            assert out[b, t].item() == pytest.approx(want, abs=1e-12)
    assert torch.equal(discounted_cumsum(x, mask, 0.0), x * mask)
    adv = reverse_kl_advantage(x, torch.zeros_like(x), mask, 1.0, gamma=gamma)
    assert torch.allclose(adv, out)


def _grpo_reference(rewards, groups, scale):
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        if len(members) < 2:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + 1e-6) if scale else r - mean)
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_outcome_advantage_matches_reference(scale):
    rewards = [1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 3.0]
    groups = [7, 7, 7, 7, 2, 2, 9, 4]  # a uniform group, two lone samples
    mask = _mask(8, 5, [5, 4, 3, 2, 1, 5, 5, 0])
    fn = grpo_outcome_advantage if scale else grpo_no_std_outcome_advantage
    adv = fn(torch.tensor(rewards), torch.tensor(groups), mask)
    ref = _grpo_reference(rewards, groups, scale)
    for b in range(8):
        for t in range(5):
            assert adv[b, t].item() == pytest.approx(ref[b] * mask[b, t].item(), abs=1e-9)


def test_mix_adds_alpha_outcome_only_where_reward_exists():
    d = torch.ones(2, 3)
    o = torch.full((2, 3), 2.0)
    mixed = mix_advantages(d, o, alpha=0.5, has_reward_B=torch.tensor([True, False]))
    assert torch.equal(mixed, torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(mix_advantages(d, o, alpha=0.0), d)


def test_registered_by_name_and_unknown_name_lists_valid_ones():
    assert ADVANTAGE_ESTIMATORS.get("reverse_kl") is reverse_kl_advantage
    assert OUTCOME_ESTIMATORS.get("grpo_no_std") is grpo_no_std_outcome_advantage
    with pytest.raises(KeyError, match="valid names: grpo, grpo_no_std"):
        OUTCOME_ESTIMATORS.get("gpro")


@pytest.mark.parametrize("scale", [True, False])
def test_group_normalisation_matches_loop_reference(scale):
    """Per-teacher whitening / baseline == a float64 loop over each group's response tokens; moments
    summed over two 'ranks' (halves of the batch) give the same result as the whole batch's."""
    g = torch.Generator().manual_seed(3)
    B, T = 10, 7
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 5 - 3
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    group = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    ref = torch.zeros_like(adv)
    for k in range(3):
        vals = [adv[b, t].item() for b in range(B) for t in range(T) if group[b] == k and mask[b, t]]
        mu = sum(vals) / len(vals)
        sd = (sum((v - mu) ** 2 for v in vals) / len(vals)) ** 0.5
        for b in range(B):
            for t in range(T):
                if group[b] == k and mask[b, t]:
                    ref[b, t] = (adv[b, t] - mu) / (sd + 1e-8) if scale else adv[b, t] - mu
    out = normalize_advantages(adv, mask, group, scale=scale)
    torch.testing.assert_close(out, ref)
    halves = advantage_moments(adv[:5], mask[:5], group[:5], 3) + advantage_moments(adv[5:], mask[5:], group[5:], 3)
    torch.testing.assert_close(normalize_advantages(adv, mask, group, halves, scale=scale), ref)
    assert not out.requires_grad and (out[mask == 0] == 0).all()
    # each group's tokens now average 0 (and have unit std when scaled)
    for k in range(3):
        sel = (group[:, None] == k).expand(B, T) & mask.bool()
        assert abs(out[sel].mean().item()) < 1e-9
        if scale:
            assert out[sel].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    # one group (the batch) when no groups are given
    whole = normalize_advantages(adv, mask)
    assert abs(whole[mask.bool()].mean().item()) < 1e-9


def test_sampled_signal_is_an_unbiased_estimate_of_the_exact_reverse_kl_gradient():
    """E_{y ~ pi}[ grad of the PPO loss with A = log pi_T(y) - log pi(y) ] (on-policy) == grad of the
    exact KL(pi || pi_T): the sampled-token signal is a one-sample estimate of the full_vocab gradient.
    The expectation is taken exactly, by weighting every vocabulary entry with pi(y)."""
    from mopd_ray.algo import ppo_clip_loss, reverse_kl_from_logits

    g = torch.Generator().manual_seed(0)
    V = 7
    z = torch.randn(1, V, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(1, V, generator=g, dtype=torch.float64) * 3
    kl = reverse_kl_from_logits(z, zt, torch.ones(1)).sum()
    (exact,) = torch.autograd.grad(kl, z)
    logp, logq = torch.log_softmax(z, -1)[0], torch.log_softmax(zt, -1)[0]
    expected = torch.zeros(())
    for y in range(V):  # one "sampled" token per term, weighted by its probability under the student
        lp = logp[y].view(1, 1)
        adv = reverse_kl_advantage(logq[y].view(1, 1), lp.detach(), torch.ones(1, 1))
        out = ppo_clip_loss(lp, lp.detach(), adv, torch.ones(1, 1))
        expected = expected + logp[y].exp().detach() * out.loss
    (estimate,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(estimate, exact)
