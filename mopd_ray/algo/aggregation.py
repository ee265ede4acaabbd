"""Masked reductions and the three loss aggregation modes.

Shapes: B sequences, T response positions. ``mask_BT`` is 1.0 on response tokens that count.

- ``token_mean``:          L = sum_{b,t} m_bt l_bt / sum_{b,t} m_bt
- ``seq_mean_token_mean``: L = mean_{b: n_b>0} ( sum_t m_bt l_bt / n_b ),  n_b = sum_t m_bt
- ``seq_mean_token_sum``:  L = mean_{b: n_b>0} ( sum_t m_bt l_bt )       (Dr. GRPO style)

An all-masked batch gives 0 (finite, zero gradient), never NaN: a data-parallel shard can be empty.
``denominator`` overrides the local normaliser (the token count for token_mean, the sequence count
otherwise) so that data-parallel ranks can divide by the global count and their sum is exact.
"""

from __future__ import annotations

import torch

from .registry import LOSS_AGGREGATIONS


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims when None); masked-out entries may be inf/NaN."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1): 0 on an all-masked input."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _safe_div(num: torch.Tensor, den) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / den.clamp(min=1)


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, denominator=None) -> torch.Tensor:
    den = mask_BT.sum() if denominator is None else denominator
    return _safe_div(masked_sum(loss_BT, mask_BT), den)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, denominator=None) -> torch.Tensor:
    tokens_B = mask_BT.sum(dim=-1)
    per_seq_B = _safe_div(masked_sum(loss_BT, mask_BT, dim=-1), tokens_B)
    den = (tokens_B > 0).sum() if denominator is None else denominator
    return _safe_div(per_seq_B.sum(), den)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss_BT: torch.Tensor, mask_BT: torch.Tensor, denominator=None) -> torch.Tensor:
    tokens_B = mask_BT.sum(dim=-1)
    per_seq_B = masked_sum(loss_BT, mask_BT, dim=-1)
    den = (tokens_B > 0).sum() if denominator is None else denominator
    return _safe_div(per_seq_B.sum(), den)


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, denominator=None) -> torch.Tensor:
    """Reduce per-token losses to a scalar with the aggregation ``mode`` chosen by name."""
    return LOSS_AGGREGATIONS.get(mode)(loss_BT, mask_BT, denominator=denominator)
