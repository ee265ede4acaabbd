"""The student's per-token terms from its last hidden states, chunk by chunk, at the positions that need them.

A [b, L, V] logits tensor is never built: at 8k tokens x 152k vocabulary it is ~5 GB per row in fp32, and
the loss path kept about four copies (softmax, log-softmax, their gradients). Instead:

- the decoder's forward gives the last hidden states [b, L, H] (post-norm, what the output head reads);
- only the positions the caller asks for (the response tokens for the loss; every token for a probe) are
  gathered, N of them, and walked ``chunk`` positions at a time: each chunk's logits [C, V] (head, the
  family's logit scale / soft-cap, the tokenizer's columns, the sampling temperature) give the chunk's
  log-probs at the sampled tokens, its entropy and its distillation terms (top-k KL over the teacher's
  support + tail, exact full-vocabulary reverse KL against the teacher's rebuilt logits), and are
  dropped;
- with gradients, each chunk runs under activation checkpointing: the backward recomputes the chunk's
  logits instead of keeping them, so the extra memory is O(chunk x V) in the forward and the backward
  alike, whatever N is (the fused linear-cross-entropy kernels do the same; this is their CPU twin, the
  same interface on every device).

Position l's terms come from the hidden state at l - 1 (it predicts token l); results are scattered back
into [b, L] tensors (0 elsewhere), so the policy losses and aggregations of algo/ are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..algo import DISTILL_LOSSES

SIGNAL_IDS = {"sampled": 0, "topk": 1, "full_vocab": 2}


@dataclass
class DenseSlots:
    """The micro-batch's dense (top-k / full-vocab) teacher slots, per position [N] (see MicroBatch)."""

    signal_NS: torch.Tensor  # long, SIGNAL_IDS per slot, -1: empty
    teacher_NS: torch.Tensor  # long, teacher index per slot
    coef_NS: torch.Tensor  # float, coefficient per slot (0: empty)
    topk_ids: list  # per slot: long [N, K] or None
    topk_logprobs: list  # per slot: float [N, K] or None
    hidden: list  # per slot: float [N, H_teacher] or None
    heads: dict  # teacher index -> (W [V_t, H_t], bias or None, (scale, softcap))
    topk_divergence: str = "reverse"


def last_hidden(forward: Callable, decoder: torch.nn.Module, tokens_bL, attn_bL, position_ids=None) -> torch.Tensor:
    """The decoder's last hidden states [b, L, H] (post final norm: what the head reads) from a causal LM's
    ``forward`` (a DeepSpeed engine or the model itself: its hooks and bookkeeping run), asking it for the
    last position's logits only (``logits_to_keep``; a model without it computes them all, dropped).
    ``position_ids`` without ``attn_bL``: packed rows (workers/packing.py)."""
    seen = {}

    def keep(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    kwargs = {"input_ids": tokens_bL, "attention_mask": attn_bL}
    if position_ids is not None:  # transformers finds packed rows only without a mask and a KV cache
        kwargs.update(position_ids=position_ids, use_cache=False)
    hook = decoder.register_forward_hook(keep)
    try:
        try:
            forward(**kwargs, logits_to_keep=1)
        except TypeError:  # a remote-code model without logits_to_keep
            forward(**kwargs)
    finally:
        hook.remove()
    return seen["h"]


def head_logits(head: torch.nn.Module, post: tuple, vocab: int, temperature: float) -> Callable:
    """hidden [C, H] -> logits [C, vocab] as the model computes them (the head, then its family's logit
    scale and soft-cap), cut to the tokenizer's ids, divided by the sampling temperature."""
    scale, cap = float(post[0]), float(post[1])

    def fn(h_CH: torch.Tensor) -> torch.Tensor:
        z = head(h_CH)[..., :vocab]
        z = z if z.dtype == torch.float64 else z.float()
        if scale != 1.0:
            z = z * scale
        if cap > 0:
            z = cap * torch.tanh(z / cap)
        if temperature != 1.0:
            z = z / temperature
        return z

    return fn


def _teacher_logits(h_CH, head: tuple, vocab: int, dtype) -> torch.Tensor:
    """A full-vocabulary teacher's logits at temperature 1 (teachers score at 1: algo/full_vocab.py)."""
    from ..algo.full_vocab import teacher_logits

    w, bias, *post = head
    return teacher_logits(h_CH, w, bias, vocab, dtype, post[0] if post else (1.0, 0.0))


def entropy_of(z_CV: torch.Tensor, lse_C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy of softmax(z) per row, with one [C, V] temporary: H = lse - sum_v p_v z_v."""
    with torch.no_grad():
        lse_C = torch.logsumexp(z_CV, dim=-1) if lse_C is None else lse_C
        p = torch.exp(z_CV - lse_C[:, None])
        return lse_C - torch.einsum("cv,cv->c", p, z_CV)


def _chunk(logits_fn, h_CH, targets_C, dense: Optional[DenseSlots], s: int, e: int, temperature: float,
           want_entropy: bool):
    z = logits_fn(h_CH)  # [C, V]
    lse = torch.logsumexp(z, dim=-1)
    lp = torch.gather(z, -1, targets_C[:, None]).squeeze(-1) - lse
    ent = None
    if want_entropy:  # of the model's distribution (temperature 1), as the metric has always been
        zd = z.detach()
        ent = entropy_of(zd, lse.detach()) if temperature == 1.0 else entropy_of(zd * temperature)
    total = z.new_zeros(z.shape[0])
    if dense is not None:
        vocab = z.shape[-1]
        for slot in range(dense.signal_NS.shape[1]):
            sig, coef = dense.signal_NS[s:e, slot], dense.coef_NS[s:e, slot]
            sel = (sig == SIGNAL_IDS["topk"]) & (coef != 0)
            if bool(sel.any()):
                fn = DISTILL_LOSSES.get(f"topk_{dense.topk_divergence}")
                kl = fn(z[sel], dense.topk_ids[slot][s:e][sel], dense.topk_logprobs[slot][s:e][sel],
                        torch.ones(int(sel.sum()), device=z.device))
                total = total.index_add(0, sel.nonzero().squeeze(-1), coef[sel] * kl)
            full = (sig == SIGNAL_IDS["full_vocab"]) & (coef != 0)
            for t in torch.unique(dense.teacher_NS[s:e, slot][full]).tolist():
                sel = full & (dense.teacher_NS[s:e, slot] == t)
                u = _teacher_logits(dense.hidden[slot][s:e][sel], dense.heads[t], vocab, z.dtype)
                log_p = z[sel] - lse[sel][:, None]
                log_q = torch.log_softmax(u, dim=-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                total = total.index_add(0, sel.nonzero().squeeze(-1), coef[sel] * kl)
    return lp, total, ent


def positions(where_bL: torch.Tensor) -> tuple:
    """(rows, cols) of the positions ``where_bL`` marks, position 0 left out (nothing predicts it), in the
    order every per-position input here is given (DenseSlots)."""
    where = where_bL.bool().clone()
    where[:, 0] = False
    return where.nonzero(as_tuple=True)


def _gather(hidden_bLH, tokens_bL, where_bL) -> tuple:
    """(rows, cols, the hidden state predicting each position [N, H], each position's token [N])."""
    rows, cols = positions(where_bL)
    return rows, cols, hidden_bLH[rows, cols - 1], tokens_bL[rows, cols].long()


def token_terms(hidden_bLH: torch.Tensor, logits_fn: Callable, tokens_bL: torch.Tensor, where_bL: torch.Tensor,
                chunk: int, temperature: float = 1.0, dense: Optional[DenseSlots] = None,
                want_entropy: bool = False, checkpointed: Optional[bool] = None) -> dict:
    """Per-token terms at the positions ``where_bL`` (bool [b, L]; position 0 is never one: nothing predicts
    it), each from the hidden state one position earlier. Returns [b, L] tensors, 0 elsewhere:
    ``logprobs`` (log-prob of the token, differentiable), ``dense`` (sum over the dense slots of coef x KL,
    differentiable; None without ``dense``), ``entropy`` (no gradient; None unless ``want_entropy``).
    ``dense`` holds per-position inputs in the order of ``where_bL.nonzero()``. ``checkpointed`` (default:
    whether ``hidden_bLH`` needs a gradient) recomputes each chunk in the backward."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    b, L = tokens_bL.shape
    rows, cols, h_NH, targets_N = _gather(hidden_bLH, tokens_bL, where_bL)
    n = int(rows.shape[0])
    checkpointed = hidden_bLH.requires_grad if checkpointed is None else checkpointed
    lps, totals, ents = [], [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        calls = []

        def run(h, _s=s, _e=e, _calls=calls):
            # the backward's recomputation needs no entropy (it has no gradient): computed once, in the forward
            _calls.append(1)
            return _chunk(logits_fn, h, targets_N[_s:_e], dense, _s, _e, temperature, want_entropy and len(_calls) == 1)

        lp, total, ent = checkpoint(run, h_NH[s:e], use_reentrant=False) if checkpointed else run(h_NH[s:e])
        lps.append(lp)
        totals.append(total)
        ents.append(ent)
    out_dtype = torch.float64 if hidden_bLH.dtype == torch.float64 else torch.float32
    zeros = hidden_bLH.new_zeros((b, L), dtype=out_dtype)
    cat = (lambda xs: torch.cat(xs) if xs else hidden_bLH.new_zeros(0, dtype=out_dtype))
    index = (rows, cols)
    return {"logprobs": zeros.index_put(index, cat(lps).to(out_dtype)),
            "dense": None if dense is None else zeros.index_put(index, cat(totals).to(out_dtype)),
            "entropy": None if not want_entropy else zeros.index_put(index, cat(ents).to(out_dtype)).detach()}


@torch.no_grad()
def score_chunks(hidden_bLH: torch.Tensor, logits_fn: Callable, tokens_bL: torch.Tensor, where_bL: torch.Tensor,
                 chunk: int, topk: int = 0) -> tuple:
    """A frozen model's scores at positions ``where_bL`` (a teacher's response tokens), chunk by chunk
    from its hidden states: ([b, L] log-probs of the tokens, [b, L, K] top-k ids, [b, L, K] their log-probs;
    the top-k are None without ``topk``). 0 / -inf elsewhere."""
    b, L = tokens_bL.shape
    rows, cols, h_NH, targets = _gather(hidden_bLH, tokens_bL, where_bL)
    lp = torch.zeros(b, L, dtype=torch.float32, device=hidden_bLH.device)
    ids = torch.zeros(b, L, topk, dtype=torch.long, device=hidden_bLH.device) if topk else None
    tk = torch.full((b, L, topk), float("-inf"), dtype=torch.float32, device=hidden_bLH.device) if topk else None
    for s in range(0, int(rows.shape[0]), chunk):
        e = min(int(rows.shape[0]), s + chunk)
        z = logits_fn(h_NH[s:e]).float()
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
        r, c = rows[s:e], cols[s:e]
        lp[r, c] = torch.gather(logp, -1, targets[s:e, None]).squeeze(-1)
        if topk:
            v, i = torch.topk(logp, topk, dim=-1)
            ids[r, c], tk[r, c] = i, v
    return lp, ids, tk
