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
    """One micro-batch. A row has S teacher *slots* (its route's teachers, -1 where the route is shorter);
    per-slot inputs are lists over slots (None where no slot of the micro-batch needs that signal)."""

    tokens_bL: torch.Tensor  # long
    response_mask_bL: torch.Tensor  # float
    old_logprobs_bL: torch.Tensor  # pi_old (learner before this step, or rollout when not recomputed)
    rollout_logprobs_bL: torch.Tensor
    advantages_bL: torch.Tensor  # detached: distillation of the sampled-signal slots + alpha * outcome
    coef_SbL: torch.Tensor  # [S, b, L] each slot's coefficient per token (teacher x route weight; 0: empty)
    teacher_index_bS: torch.Tensor  # long [b, S], -1: empty slot
    signal_bS: torch.Tensor  # long [b, S], SIGNAL_IDS of the slot's teacher, -1: empty slot
    topk_ids_SbLK: Optional[list] = None  # per slot: long [b, L, K] or None
    topk_logprobs_SbLK: Optional[list] = None
    hidden_SbLH: Optional[list] = None  # per slot: float [b, L, H] or None
    outcome_advantages_bL: Optional[torch.Tensor] = None  # alpha * A_outcome for rows without a sampled slot


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


def micro_batch_loss(terms: dict, mb: MicroBatch, algo: dict, denominator: float):
    """Returns (loss, metrics) for one micro-batch from its per-token ``terms`` ([b, L] ``logprobs`` and
    ``dense``: terms_from_hidden, the learner's path, or terms_from_logits, the reference).

    Each slot of a row carries its teacher's signal (``mb.signal_bS``), so a row may be scored by several
    teachers with different signals, and rows of different teachers share a micro-batch. Every term is
    normalised by the same global ``denominator``, so the terms add up to one loss:

    - rows with a sampled-signal slot: PPO clipped surrogate with A = sum over their sampled slots of
      coef x log-ratio (built by the caller) + alpha * outcome;
    - each topk / full_vocab slot: coef x KL over the teacher's top-k + tail / exact reverse KL, summed
      over the row's dense slots; rows without a sampled slot add, when alpha > 0, the clipped
      surrogate on alpha * outcome.
    """
    mask = mb.response_mask_bL
    logprobs = terms["logprobs"]
    gate = is_correction(algo["is_correction"], mb.old_logprobs_bL, mb.rollout_logprobs_bL, mask,
                         cap=algo["tis_cap"], low=algo["icepop_low"], high=algo["icepop_high"])
    pg_kwargs = dict(clip_low=algo["clip_low"], clip_high=algo["clip_high"], dual_clip=algo["dual_clip"],
                     agg=algo["loss_agg"], weights_BT=gate.weights_BT, denominator=denominator)
    policy_loss = POLICY_LOSSES.get(algo["policy_loss"])
    metrics = {"is_clip_fraction": gate.clipped_fraction.item()}
    loss = logprobs.new_zeros(())
    pg_outs = []
    sig = mb.signal_bS
    has_sampled = (sig == SIGNAL_IDS["sampled"]).any(-1) | (sig < 0).all(-1)  # no teacher: reward-only rows
    has_dense = (sig > SIGNAL_IDS["sampled"]).any(-1)
    pg_rows = has_sampled.to(mask.dtype)[:, None]
    if has_sampled.any():
        out = policy_loss(logprobs, mb.old_logprobs_bL, mb.advantages_bL, mask * pg_rows, **pg_kwargs)
        loss = loss + out.loss
        pg_outs.append(out)
    if has_dense.any():
        per_tok_bL = terms["dense"]
        distill = aggregate(per_tok_bL, mask * has_dense.to(mask.dtype)[:, None], algo["loss_agg"],
                            denominator=denominator)
        metrics["distill_loss"] = distill.item()
        loss = loss + distill
        outcome_rows = (has_dense & ~has_sampled).to(mask.dtype)[:, None]
        if mb.outcome_advantages_bL is not None and outcome_rows.any():
            out = policy_loss(logprobs, mb.old_logprobs_bL, mb.outcome_advantages_bL, mask * outcome_rows, **pg_kwargs)
            loss = loss + out.loss
            pg_outs.append(out)
    if pg_outs:
        metrics["pg_clip_fraction"] = sum(o.clip_fraction.item() for o in pg_outs) / len(pg_outs)
        metrics["approx_kl"] = sum(o.approx_kl.item() for o in pg_outs) / len(pg_outs)
    return loss, metrics


def terms_from_hidden(hidden_bLH: torch.Tensor, logits_fn, mb: MicroBatch, teacher_heads: Optional[dict],
                      temperature: float, algo: dict, chunk: int, want_entropy: bool = False) -> dict:
    """The learner's path: per-token terms at the response positions from the last hidden states, chunk by
    chunk (workers/token_terms.py); ``logits_fn`` turns hidden states into tempered logits over the
    tokenizer (token_terms.head_logits)."""
    from .token_terms import DenseSlots, positions, token_terms

    where = mb.response_mask_bL > 0
    dense = None
    if bool((mb.signal_bS > SIGNAL_IDS["sampled"]).any()):
        rows, cols = positions(where)  # the order token_terms gives its positions in
        pick = (lambda x: None if x is None else x[rows, cols])
        dense = DenseSlots(signal_NS=mb.signal_bS[rows], teacher_NS=mb.teacher_index_bS[rows],
                           coef_NS=mb.coef_SbL[:, rows, cols].T,
                           topk_ids=[None if x is None else x[rows, cols].long() for x in (mb.topk_ids_SbLK or [])],
                           topk_logprobs=[pick(x) for x in (mb.topk_logprobs_SbLK or [])],
                           hidden=[pick(x) for x in (mb.hidden_SbLH or [])], heads=teacher_heads or {},
                           topk_divergence=algo["topk_divergence"])
    return token_terms(hidden_bLH, logits_fn, mb.tokens_bL, where, chunk, temperature, dense, want_entropy)


def terms_from_logits(logits_bLV: torch.Tensor, mb: MicroBatch, teacher_heads: Optional[dict], temperature: float,
                      vocab_size: Optional[int], algo: dict) -> dict:
    """The reference path (the learner's before hidden-state chunks, kept to test them against): the same
    terms from full [b, L, V] logits at T = 1 (the sampling temperature applied here)."""
    return {"logprobs": token_logprobs_from_logits(logits_bLV, mb.tokens_bL, temperature),
            "dense": (_dense_kl(logits_bLV, mb, teacher_heads, temperature, vocab_size, algo)
                      if bool((mb.signal_bS > SIGNAL_IDS["sampled"]).any()) else None),
            "entropy": entropy_from_logits(logits_bLV)}


def _dense_kl(logits_bLV, mb: MicroBatch, teacher_heads, temperature, vocab_size, algo) -> torch.Tensor:
    """[b, L] sum over the dense slots of coef x per-token KL (position l: the KL of the prediction of
    token l; 0 at prompt positions and for sampled or empty slots)."""
    b, L = mb.tokens_bL.shape
    logits = logits_bLV[:, :-1].reshape(b * (L - 1), -1)
    if temperature != 1.0:
        logits = logits / temperature
    tok_mask = mb.response_mask_bL[:, 1:].reshape(-1).bool()
    total = logits.new_zeros(b * (L - 1))
    for s in range(mb.signal_bS.shape[1]):
        sig_tok = mb.signal_bS[:, s, None].expand(b, L - 1).reshape(-1)
        per_tok = logits.new_zeros(b * (L - 1))
        sel = tok_mask & (sig_tok == SIGNAL_IDS["topk"])
        if sel.any():
            fn = DISTILL_LOSSES.get(f"topk_{algo['topk_divergence']}")
            ids, lps = mb.topk_ids_SbLK[s], mb.topk_logprobs_SbLK[s]
            K = ids.shape[-1]
            kl = fn(logits[sel], ids[:, 1:].reshape(-1, K)[sel], lps[:, 1:].reshape(-1, K)[sel],
                    torch.ones(int(sel.sum()), device=logits.device))
            per_tok = per_tok.index_put((sel.nonzero().squeeze(-1),), kl)
        tidx = mb.teacher_index_bS[:, s, None].expand(b, L - 1).reshape(-1)
        full = tok_mask & (sig_tok == SIGNAL_IDS["full_vocab"])
        for t in torch.unique(tidx[full]).tolist():  # rows arrive grouped by teacher: one head at a time
            sel = full & (tidx == t)
            w, bias, *post = teacher_heads[t]  # (W, bias[, (scale, softcap)]): the learner always sends all three
            post = post[0] if post else (1.0, 0.0)
            hidden = mb.hidden_SbLH[s]
            kl = full_vocab_reverse_kl(logits[sel], hidden[:, 1:].reshape(-1, hidden.shape[-1])[sel], w,
                                       torch.ones(int(sel.sum()), device=logits.device),
                                       chunk_size=algo["full_vocab_chunk_size"], teacher_bias_V=bias,
                                       vocab_size=vocab_size, teacher_post=post)
            per_tok = per_tok.index_put((sel.nonzero().squeeze(-1),), kl)
        total = total + per_tok * mb.coef_SbL[s][:, 1:].reshape(-1)
    return torch.nn.functional.pad(total.view(b, L - 1), (1, 0))
