"""TIS and IcePop gates against loop references."""

import math

import pytest
import torch

from mopd_ray.algo import IS_CORRECTIONS, icepop_mask, is_correction, truncated_importance_weights



def _inputs():
    train = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]]))
    rollout = torch.log(torch.tensor([[0.5, 0.1, 0.4, 0.9], [0.8, 0.2, 0.05, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return train, rollout, mask


def test_tis_matches_reference():
    train, rollout, mask = _inputs()
    out = truncated_importance_weights(train, rollout, mask, cap=2.0)
    clipped = n = 0
    for b in range(2):
        for t in range(4):
            r = math.exp(train[b, t].item() - rollout[b, t].item())
            want = min(r, 2.0) if mask[b, t] else 0.0
            assert out.weights_BT[b, t].item() == pytest.approx(want, abs=1e-12)
            if mask[b, t]:
                n += 1
                clipped += r > 2.0
    assert out.clipped_fraction.item() == pytest.approx(clipped / n)


def test_icepop_zeroes_tokens_outside_band():
    train, rollout, mask = _inputs()
    out = icepop_mask(train, rollout, mask, low=0.5, high=2.0)
    dropped = n = 0
    for b in range(2):
        for t in range(4):
            r = math.exp(train[b, t].item() - rollout[b, t].item())
            inside = 0.5 <= r <= 2.0
            want = r if (inside and mask[b, t]) else 0.0
            assert out.weights_BT[b, t].item() == pytest.approx(want, abs=1e-12)
            if mask[b, t]:
                n += 1
                dropped += not inside
    assert out.clipped_fraction.item() == pytest.approx(dropped / n)
    assert 0 < out.clipped_fraction.item() < 1


def test_gates_are_detached_finite_on_padding_and_named():
    train = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    rollout = torch.tensor([[-1.0, float("-inf")]])
    mask = torch.tensor([[1.0, 0.0]])
    for name in IS_CORRECTIONS.names():
        out = is_correction(name, train, rollout, mask)
        assert not out.weights_BT.requires_grad
        assert torch.isfinite(out.weights_BT).all() and torch.isfinite(out.clipped_fraction)
        assert out.weights_BT[0, 0].item() == pytest.approx(1.0)
    empty = is_correction("tis", train, rollout, torch.zeros(1, 2))
    assert empty.clipped_fraction.item() == 0.0


def test_rollout_logprobs_are_needed_only_by_a_gate_or_a_rollout_pi_old():
    from mopd_ray.algo.mismatch import needs_rollout_logprobs

    assert not needs_rollout_logprobs("none", True)
    assert needs_rollout_logprobs("none", False) and needs_rollout_logprobs("tis", True)
    assert needs_rollout_logprobs("icepop", True) and needs_rollout_logprobs("tis", False)
