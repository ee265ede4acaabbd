"""The learner's loss for one micro-batch, assembled from algo/ (torch only; testable without engines).

Inputs are [b, L] tensors over the micro-batch's rows (L = padded prompt + response). ``logits_bLV``
is the student's output at positions that predict tokens[:, 1:], aligned so that index l refers to
token l (index 0 unused). ``denominator`` is the global normaliser (tokens or sequences of the whole
mini-batch across ranks, divided by ranks x accumulation steps), which makes the sum of the ranks'
micro-batch gradients exactly the gradient of the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..algo import DISTILL_LOSSES, POLICY_LOSSES, aggregate, full_vocab_reverse_kl, is_correction


@dataclass
class MicroBatch:
    tokens_bL: torch.Tensor  # long
    response_mask_bL: torch.Tensor  # float
    old_logprobs_bL: torch.Tensor  # pi_old (learner before this step, or rollout when not recomputed)
    rollout_logprobs_bL: torch.Tensor
    advantages_bL: torch.Tensor  # detached: distillation (sampled signal) + alpha * outcome
    coef_b: torch.Tensor  # routed teacher's weight per row
    teacher_index_b: torch.Tensor
    topk_ids_bLK: Optional[torch.Tensor] = None
    topk_logprobs_bLK: Optional[torch.Tensor] = None
    hidden_bLH: Optional[torch.Tensor] = None
    outcome_advantages_bL: Optional[torch.Tensor] = None  # alpha * A_outcome for the dense signals


def token_logprobs_from_logits(logits_bLV: torch.Tensor, tokens_bL: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits / T) at the sampled tokens; position l <- logits at l - 1. Returns [b, L]."""
    logits = logits_bLV[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.gather(logits, -1, tokens_bL[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(lp, (1, 0))


def entropy_from_logits(logits_bLV: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(logits_bLV[:, :-1].float(), dim=-1)
        return torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0))


SIGNAL_IDS = {"sampled": 0, "topk": 1, "full_vocab": 2}


def micro_batch_loss(logits_bLV: torch.Tensor, mb: MicroBatch, algo: dict, row_signal_b: torch.Tensor,
                     denominator: float, teacher_heads: Optional[dict] = None, temperature: float = 1.0,
                     vocab_size: int | None = None):
    """Returns (loss, metrics) for one micro-batch.

    Each row carries its teacher's signal (``row_signal_b``, ids of SIGNAL_IDS), so teachers with
    different signals can share a micro-batch: the rows partition the tokens, and every part is
    normalised by the same global ``denominator``, so the parts add up to one loss.

    - sampled rows: PPO clipped surrogate with A = distillation (+ alpha * outcome) advantage;
    - topk rows: coef * KL over the teacher's top-k + tail; full_vocab rows: coef * exact reverse KL;
      plus, when alpha > 0, the clipped surrogate on alpha * outcome advantage for those rows.
    """
    mask = mb.response_mask_bL
    logprobs = token_logprobs_from_logits(logits_bLV, mb.tokens_bL, temperature)
    gate = is_correction(algo["is_correction"], mb.old_logprobs_bL, mb.rollout_logprobs_bL, mask,
                         cap=algo["tis_cap"], low=algo["icepop_low"], high=algo["icepop_high"])
    pg_kwargs = dict(clip_low=algo["clip_low"], clip_high=algo["clip_high"], dual_clip=algo["dual_clip"],
                     agg=algo["loss_agg"], weights_BT=gate.weights_BT, denominator=denominator)
    policy_loss = POLICY_LOSSES.get(algo["policy_loss"])
    metrics = {"is_clip_fraction": gate.clipped_fraction.item()}
    loss = logits_bLV.new_zeros(())
    pg_outs = []
    sampled = (row_signal_b == SIGNAL_IDS["sampled"]).to(mask.dtype)[:, None]
    if sampled.any():
        out = policy_loss(logprobs, mb.old_logprobs_bL, mb.advantages_bL, mask * sampled, **pg_kwargs)
        loss = loss + out.loss
        pg_outs.append(out)
    dense = 1.0 - sampled
    if dense.any():
        b, L = mb.tokens_bL.shape
        logits = logits_bLV[:, :-1].reshape(b * (L - 1), -1)
        if temperature != 1.0:
            logits = logits / temperature
        per_tok = logits.new_zeros(b * (L - 1))
        sig_tok = row_signal_b[:, None].expand(b, L - 1).reshape(-1)
        tok_mask = mask[:, 1:].reshape(-1).bool()
        sel = tok_mask & (sig_tok == SIGNAL_IDS["topk"])
        if sel.any():
            fn = DISTILL_LOSSES.get(f"topk_{algo['topk_divergence']}")
            K = mb.topk_ids_bLK.shape[-1]
            kl = fn(logits[sel], mb.topk_ids_bLK[:, 1:].reshape(-1, K)[sel],
                    mb.topk_logprobs_bLK[:, 1:].reshape(-1, K)[sel], torch.ones(int(sel.sum()), device=logits.device))
            per_tok = per_tok.index_put((sel.nonzero().squeeze(-1),), kl)
        tidx = mb.teacher_index_b[:, None].expand(b, L - 1).reshape(-1)
        full = tok_mask & (sig_tok == SIGNAL_IDS["full_vocab"])
        for t in torch.unique(tidx[full]).tolist():  # rows arrive grouped by teacher: one head at a time
            sel = full & (tidx == t)
            w, bias = teacher_heads[t]
            H = mb.hidden_bLH.shape[-1]
            kl = full_vocab_reverse_kl(logits[sel], mb.hidden_bLH[:, 1:].reshape(-1, H)[sel], w,
                                       torch.ones(int(sel.sum()), device=logits.device),
                                       chunk_size=algo["full_vocab_chunk_size"], teacher_bias_V=bias,
                                       vocab_size=vocab_size)
            per_tok = per_tok.index_put((sel.nonzero().squeeze(-1),), kl)
        coef = mb.coef_b[:, None].expand(b, L - 1).reshape(-1)
        per_tok_bL = torch.nn.functional.pad((per_tok * coef).view(b, L - 1), (1, 0))
        distill = aggregate(per_tok_bL, mask * dense, algo["loss_agg"], denominator=denominator)
        metrics["distill_loss"] = distill.item()
        loss = loss + distill
        if mb.outcome_advantages_bL is not None:
            out = policy_loss(logprobs, mb.old_logprobs_bL, mb.outcome_advantages_bL, mask * dense, **pg_kwargs)
            loss = loss + out.loss
            pg_outs.append(out)
    if pg_outs:
        metrics["pg_clip_fraction"] = sum(o.clip_fraction.item() for o in pg_outs) / len(pg_outs)
        metrics["approx_kl"] = sum(o.approx_kl.item() for o in pg_outs) / len(pg_outs)
    return loss, metrics
