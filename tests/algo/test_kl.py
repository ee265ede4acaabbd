"""k1/k2/k3 estimators against their formulas, and as estimators of the true KL."""

import math

import pytest
import torch

from mopd_ray.algo import KL_ESTIMATORS, kl_estimate


def test_estimators_match_formulas_and_mask():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for b, t in ((0, 0), (0, 1)):
        r = ref[b, t].item() - lp[b, t].item()
        assert KL_ESTIMATORS.get("k1")(lp, ref, mask)[b, t].item() == pytest.approx(-r)
        assert KL_ESTIMATORS.get("k2")(lp, ref, mask)[b, t].item() == pytest.approx(0.5 * r * r)
        assert KL_ESTIMATORS.get("k3")(lp, ref, mask)[b, t].item() == pytest.approx(math.exp(r) - 1 - r)
    for k in ("k1", "k2", "k3"):
        assert KL_ESTIMATORS.get(k)(lp, ref, mask)[0, 2].item() == 0.0
        assert kl_estimate(k, lp, ref, torch.zeros_like(mask)).item() == 0.0


def test_k1_and_k3_are_unbiased_estimates_of_reverse_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), -1)  # student
    q = torch.softmax(torch.randn(6, generator=g), -1)  # teacher
    true_kl = (p * (p.log() - q.log())).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[samples][None], q.log()[samples][None]
    mask = torch.ones_like(lp)
    for k in ("k1", "k3"):
        assert kl_estimate(k, lp, ref, mask).item() == pytest.approx(true_kl, rel=0.03)
