"""Token-budget micro-batches and packed forwards (workers/packing.py): plans, and packed = padded hidden states
on real transformers models of several families (their own masks, from the position ids)."""

import numpy as np
import pytest
import torch

from mopd_ray.config import TINY_ARCHS, TinyModelConfig
from mopd_ray.workers.packing import (VARLEN_SDPA, needed_micro_batches, packed_hidden, packing_works,
                                      plan_micro_batches, split_to, use_varlen_attention)
from mopd_ray.workers.token_terms import last_hidden

# long-tailed, as reasoning traces are: many short rows and a few long ones
LENGTHS = np.array([37, 2100, 64, 51, 380, 33, 45, 8000, 90, 41, 1200, 58])


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_plans_hold_every_row_once_within_the_budget(packed):
    budget = 8192
    need = needed_micro_batches(LENGTHS, budget, packed)
    for k in (need, need + 2, len(LENGTHS)):  # another rank may need more: every rank runs as many
        plan = split_to(LENGTHS, budget, packed, k)
        assert len(plan) == k
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(LENGTHS)))
        for rows in plan:
            cost = LENGTHS[rows].sum() if packed else len(rows) * LENGTHS[rows].max()
            assert cost <= budget or len(rows) == 1, (k, rows, cost)
        assert [p[0] for p in plan] == sorted(p[0] for p in plan)  # earlier rows (earlier shards) first
    # padded rows of a micro-batch have similar lengths: the 8000-token row is not padded into others
    padded = split_to(LENGTHS, budget, False, needed_micro_batches(LENGTHS, budget, False))
    assert [len(p) for p in padded if 7 in p] == [1]
    # packed, the budget is spent on tokens: fewer forwards than padded
    assert needed_micro_batches(LENGTHS, budget, True) < needed_micro_batches(LENGTHS, budget, False)


def test_a_row_longer_than_the_budget_gets_its_own_micro_batch_and_rank_counts_are_agreed():
    assert needed_micro_batches(np.array([5000, 10, 10]), 1000, True) == 2
    seen = []

    def agree(k):  # another rank needs 3
        seen.append(k)
        return max(k, 3)

    plan = plan_micro_batches(np.array([5000, 10, 10]), 8, 1000, True, agree)
    assert seen == [2] and len(plan) == 3
    # without a budget: the fixed rows
    assert [p.tolist() for p in plan_micro_batches(np.arange(5), 2, None, True)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than"):
        split_to(np.array([600, 600, 600]), 1000, True, 2)


def _hidden_fn(model):
    return lambda ids, attn, pos: last_hidden(model, model.get_decoder(), ids, attn, pos)


@pytest.mark.parametrize("family", TINY_ARCHS)
def test_packed_forward_equals_the_padded_one(family, tmp_path):
    """Every family of the architecture matrix (sliding windows, soft-caps, experts, QK-norm included), with
    transformers' own packed masks and with the learner's row-by-row attention (``use_varlen_attention``), here
    with a sliding window of 16 that the longer rows exceed; values and gradients."""
    from transformers import AutoModelForCausalLM

    from mopd_ray.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / family, TinyModelConfig(arch=family))
    windowed = family in ("gemma2", "gemma3", "mistral")
    model = AutoModelForCausalLM.from_pretrained(path, **({"sliding_window": 16} if windowed else {})).eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([23, 5, 17, 1, 30])
    tokens = torch.randint(3, 250, (5, 30), generator=g)
    attn = (torch.arange(30)[None] < lens[:, None]).long()
    valid = attn.bool()
    fn = _hidden_fn(model)
    padded = fn(tokens, attn, None)
    grad_padded = torch.autograd.grad(padded[valid].square().sum(), model.get_decoder().layers[0].self_attn.o_proj.weight)[0]
    for impl in ("sdpa", VARLEN_SDPA):
        if impl == VARLEN_SDPA:
            assert use_varlen_attention(model) == VARLEN_SDPA
        packed = packed_hidden(fn, tokens, lens)
        assert packed.shape == padded.shape
        torch.testing.assert_close(packed[valid], padded[valid], atol=2e-5, rtol=1e-4, msg=impl)
        assert not packed[~valid].any()  # nothing past a row's end
        grad = torch.autograd.grad(packed[valid].square().sum(), model.get_decoder().layers[0].self_attn.o_proj.weight)[0]
        torch.testing.assert_close(grad, grad_padded, atol=1e-4, rtol=1e-4, msg=impl)
        ok, gap = packing_works(fn, 250, "cpu", torch.float32)
        assert ok and gap < 1e-5


def test_a_model_whose_masks_ignore_the_position_ids_fails_the_packing_check(tiny_model_dir):
    """A forward that drops the position ids (as remote-code models with their own masks may): the rows of a
    packed sequence see each other; the check finds it and the learner falls back to padding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fn = _hidden_fn(model)
    ok, gap = packing_works(lambda ids, attn, pos: fn(ids, attn, None), 250, "cpu", torch.float32)
    assert not ok and gap > 1e-2
