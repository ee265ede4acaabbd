"""Exact full-vocabulary reverse KL: reference, gradients, chunking and bounded memory."""

import math

import pytest
import torch

from mopd_ray.algo import DISTILL_LOSSES, full_vocab_reverse_kl, reverse_kl_from_logits
from mopd_ray.utils.memtrack import PeakMemoryTracker


def _setup(seed=0, N=6, V=13, H=5, pad=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V + pad, generator=g)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V + 2 * pad, H, generator=g) * 0.7
    b = torch.randn(V + 2 * pad, generator=g) * 0.1
    return z, h, w, b


def _reference(z, h, w, b, mask, V):
    out = []
    for n in range(z.shape[0]):
        if not mask[n]:
            out.append(0.0)
            continue
        zs = [z[n, v].item() for v in range(V)]
        us = [sum(h[n, k].item() * w[v, k].item() for k in range(h.shape[1])) + b[v].item() for v in range(V)]
        lz = math.log(sum(math.exp(x) for x in zs))
        lu = math.log(sum(math.exp(x) for x in us))
        out.append(sum(math.exp(zs[v] - lz) * ((zs[v] - lz) - (us[v] - lu)) for v in range(V)))
    return out


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_matches_explicit_vocabulary_sum(chunk):
    z, h, w, b = _setup()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    got = full_vocab_reverse_kl(z, h, w, mask, chunk_size=chunk, teacher_bias_V=b)
    assert got.tolist() == pytest.approx(_reference(z, h, w, b, mask, 13), abs=1e-10)


def test_padded_vocabularies_are_truncated_to_the_tokenizer():
    z, h, w, b = _setup(pad=3)  # student has 3, teacher 6 padded rows
    mask = torch.ones(6)
    got = full_vocab_reverse_kl(z, h, w, mask, chunk_size=4, teacher_bias_V=b, vocab_size=13)
    assert got.tolist() == pytest.approx(_reference(z, h, w, b, mask, 13), abs=1e-10)


def test_gradcheck_and_gradient_only_to_student():
    z, h, w, b = _setup(seed=1)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    zz = z.clone().requires_grad_()
    weights = torch.rand(6, generator=torch.Generator().manual_seed(7))
    assert torch.autograd.gradcheck(
        lambda x: (full_vocab_reverse_kl(x, h, w, mask, chunk_size=4, teacher_bias_V=b) * weights).sum(), (zz,))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    full_vocab_reverse_kl(zz, hh, ww, mask, chunk_size=4).sum().backward()
    assert hh.grad is None and ww.grad is None


def test_chunked_equals_unchunked_and_naive():
    z, h, w, _ = _setup(seed=2, N=37, V=50, H=8)
    mask = (torch.rand(37, generator=torch.Generator().manual_seed(3)) > 0.2).double()
    grads = []
    for chunk in (1, 5, 37, 100):
        zz = z.clone().requires_grad_()
        kl = full_vocab_reverse_kl(zz, h, w, mask, chunk_size=chunk)
        kl.sum().backward()
        grads.append((kl.detach(), zz.grad))
    zz = z.clone().requires_grad_()
    naive = reverse_kl_from_logits(zz, h @ w.T, mask)
    naive.sum().backward()
    for kl, g in grads:
        assert torch.allclose(kl, naive, atol=1e-12) and torch.allclose(g, zz.grad, atol=1e-12)


def test_zero_loss_and_zero_gradient_when_student_equals_teacher():
    _, h, w, b = _setup(seed=3)
    z = (h @ w.T + b).clone().requires_grad_()
    kl = full_vocab_reverse_kl(z, h, w, torch.ones(6), chunk_size=4, teacher_bias_V=b)
    kl.sum().backward()
    assert kl.abs().max().item() < 1e-12 and z.grad.abs().max().item() < 1e-12


def test_all_masked_is_finite_with_zero_gradient():
    z, h, w, _ = _setup()
    z = z.clone().requires_grad_()
    kl = full_vocab_reverse_kl(z, h, w, torch.zeros(6), chunk_size=4)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and kl.abs().sum() == 0 and torch.count_nonzero(z.grad) == 0


def test_float32_student_with_bfloat16_teacher_hidden_states():
    z, h, w, _ = _setup(seed=4)
    got = full_vocab_reverse_kl(z.float(), h.bfloat16(), w.float(), torch.ones(6), chunk_size=2)
    want = reverse_kl_from_logits(z, h.bfloat16().double() @ w.T, torch.ones(6))
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
    assert DISTILL_LOSSES.get("full_vocab") is full_vocab_reverse_kl


def _extra_peak_bytes(fn, N, V=2048, H=32):
    """Peak bytes allocated by forward + backward, beyond the inputs and the returned gradient."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=g, dtype=torch.float32, requires_grad=True)
    h = torch.randn(N, H, generator=g, dtype=torch.float32)
    w = torch.randn(V, H, generator=g, dtype=torch.float32)
    mask = torch.ones(N, dtype=torch.float32)
    with PeakMemoryTracker() as mem:
        (grad,) = torch.autograd.grad(fn(z, h, w, mask).sum(), z)
    return mem.peak_bytes - grad.numel() * grad.element_size()


def test_chunked_peak_memory_stays_bounded_as_sequence_grows():
    chunked = lambda z, h, w, m: full_vocab_reverse_kl(z, h, w, m, chunk_size=64)  # noqa: E731
    naive = lambda z, h, w, m: reverse_kl_from_logits(z, h @ w.T, m)  # noqa: E731
    small, large = 256, 2048  # 8x the positions
    chunked_small, chunked_large = _extra_peak_bytes(chunked, small), _extra_peak_bytes(chunked, large)
    naive_small, naive_large = _extra_peak_bytes(naive, small), _extra_peak_bytes(naive, large)
    logits_bytes_large = large * 2048 * 4
    # chunked: only O(chunk x V) working memory (+ O(N) per-position scalars) whatever N is
    assert chunked_large < 1.2 * chunked_small + 64 * large
    assert chunked_large < 0.25 * logits_bytes_large
    # naive: several [N, V] tensors, growing with N
    assert naive_large > 6 * naive_small and naive_large > 2 * logits_bytes_large
