"""Top-k forward/reverse KL with a tail bucket, against an explicit float64 reference."""

import math

import pytest
import torch

from mopd_ray.algo import DISTILL_LOSSES, topk_forward_kl, topk_reverse_kl


def _setup(seed=0, N=5, V=11, K=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g)
    teacher_logits = torch.randn(N, V, generator=g) * 2
    t_lp = torch.log_softmax(teacher_logits, -1)
    ids = torch.topk(t_lp, K, dim=-1).indices
    return z, t_lp, ids, torch.gather(t_lp, -1, ids)


def _reference(z, t_lp, ids, mask, reverse):
    out = []
    for n in range(z.shape[0]):
        if not mask[n]:
            out.append(0.0)
            continue
        zs = z[n].tolist()
        lse = math.log(sum(math.exp(x) for x in zs))
        q = [math.exp(x - lse) for x in zs]
        p = [math.exp(x) for x in t_lp[n].tolist()]
        support = ids[n].tolist()
        pk = [p[v] for v in support] + [1 - sum(p[v] for v in support)]
        qk = [q[v] for v in support] + [1 - sum(q[v] for v in support)]
        a, b = (qk, pk) if reverse else (pk, qk)
        out.append(sum(x * math.log(x / y) for x, y in zip(a, b)))
    return out


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_matches_reference(reverse):
    z, t_lp, ids, t_topk = _setup()
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    fn = topk_reverse_kl if reverse else topk_forward_kl
    got = fn(z, ids, t_topk, mask)
    ref = _reference(z, t_lp, ids, mask, reverse)
    assert got.tolist() == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("name", ["topk_forward", "topk_reverse"])
def test_topk_gradcheck_and_zero_at_teacher(name):
    fn = DISTILL_LOSSES.get(name)
    z, t_lp, ids, t_topk = _setup(seed=1)
    mask = torch.ones(z.shape[0])
    zz = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, ids, t_topk, mask).sum(), (zz,))
    # student equal to teacher: zero loss and zero gradient
    zt = t_lp.clone().requires_grad_()
    loss = fn(zt, ids, t_topk, mask).sum()
    loss.backward()
    assert abs(loss.item()) < 1e-12 and zt.grad.abs().max().item() < 1e-10


def test_topk_all_masked_is_finite():
    z, _, ids, t_topk = _setup()
    z = z.clone().requires_grad_()
    out = topk_forward_kl(z, ids, t_topk, torch.zeros(z.shape[0])).sum()
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_topk_tail_penalises_mass_moved_off_support():
    """Without a tail, a student that puts its mass outside the top-k could look perfect."""
    _, t_lp, ids, t_topk = _setup(seed=2)
    z = torch.full_like(t_lp, 0.0)
    z.scatter_(-1, ids, t_topk)  # same relative top-k odds...
    z_far = z.clone()
    mask_out = torch.ones_like(z_far, dtype=torch.bool).scatter_(-1, ids, False)
    z_far[mask_out] = 10.0  # ...but nearly all mass off the support
    mask = torch.ones(z.shape[0])
    assert (topk_reverse_kl(z_far, ids, t_topk, mask) > 1.0).all()
