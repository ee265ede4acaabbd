"""Token-budget micro-batches and sequence packing for the learner's forwards.

Reasoning traces are long-tailed: with a fixed number of rows per micro-batch padded to the longest, most of
a forward's work goes to padding, and one long row sets the memory of a whole micro-batch. Here:

- ``plan_micro_batches`` cuts a rank's rows into micro-batches of at most ``max_tokens`` tokens each: with
  packing the cost of a micro-batch is the sum of its rows' lengths; without, rows sorted by length are cut
  so that rows x longest stays in the budget. Every rank must run the same number of micro-batches (DeepSpeed
  reduces gradients per backward, ZeRO-3 gathers parameters per forward, and the step's all-reduces are per
  micro-batch): the caller takes the largest count over the ranks and every rank splits its rows into that
  many (``split_to``). A row longer than the budget gets a micro-batch of its own.
- ``packed_hidden`` runs a micro-batch's rows as one sequence [1, sum of lengths] with position ids that start
  again at 0 for every row and no attention mask: transformers then masks attention at the rows' boundaries
  (masking_utils ``find_packed_sequence_indices``; flash-attention-2 on GPUs uses the same position ids as
  varlen boundaries), and hands the hidden states back in the padded [b, n, H] layout the loss expects, so the
  loss, its normalisation and its denominators are those of the padded path.
- ``packing_works`` checks that a model really packs (a model whose masks ignore the position ids would let
  one row attend to another: silently wrong) with one small forward at set-up; where it does not, the
  learner falls back to length-sorted padded micro-batches and says so.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _cost(lengths: np.ndarray, packed: bool) -> int:
    """Tokens a micro-batch of rows of ``lengths`` costs: their sum packed, rows x longest padded."""
    if not len(lengths):
        return 0
    return int(lengths.sum()) if packed else int(len(lengths) * lengths.max())


def _first_fit(lengths: np.ndarray, max_tokens: int, packed: bool) -> list:
    """Groups of row indices within the budget, longest rows first (first-fit decreasing when packed; padded:
    consecutive rows in that order, so rows of a micro-batch have similar lengths)."""
    order = np.argsort(-lengths, kind="stable")
    groups: list = []
    if packed:
        loads: list = []
        for i in order:
            for g, load in enumerate(loads):
                if load + lengths[i] <= max_tokens:
                    groups[g].append(i)
                    loads[g] += int(lengths[i])
                    break
            else:
                groups.append([i])
                loads.append(int(lengths[i]))
    else:
        for i in order:
            if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
    return groups


def needed_micro_batches(lengths: np.ndarray, max_tokens: int, packed: bool) -> int:
    """How many micro-batches of at most ``max_tokens`` tokens the rows of ``lengths`` need on this rank."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    return len(_first_fit(np.asarray(lengths, np.int64), max_tokens, packed))


def split_to(lengths: np.ndarray, max_tokens: int, packed: bool, k: int) -> list:
    """The rows (indices into ``lengths``) in exactly ``k`` micro-batches, each within the budget where this
    rank needs no more than ``k``: the first-fit groups, then the costliest group split in two while there are
    fewer than ``k``. Micro-batches come in the order of their first row (earlier rows, from earlier rollout
    shards, train first while later ones are still being scored)."""
    lengths = np.asarray(lengths, np.int64)
    if k < 1:
        raise ValueError(f"cannot split {len(lengths)} rows into {k} micro-batches")
    groups = [np.array(g, np.int64) for g in _first_fit(lengths, max_tokens, packed)] if len(lengths) else []
    if len(groups) > k:
        raise ValueError(f"{len(lengths)} rows need {len(groups)} micro-batches of {max_tokens} tokens, more than {k}")
    while len(groups) < k:
        splittable = [g for g in range(len(groups)) if len(groups[g]) > 1]
        if not splittable:
            break
        g = max(splittable, key=lambda j: _cost(lengths[groups[j]], packed))
        rows = groups.pop(g)
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        if packed:  # two halves of near-equal tokens, longest first to the lighter one
            halves, loads = ([], []), [0, 0]
            for i in rows:
                h = int(loads[1] < loads[0])
                halves[h].append(i)
                loads[h] += int(lengths[i])
            groups += [np.array(halves[0], np.int64), np.array(halves[1], np.int64)]
        else:  # the long half and the short half
            groups += [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    # fewer rows than micro-batches (another rank needs more): empty ones at the end, which the learner runs
    # as zero-weight passes over one of its rows, so that every rank's collectives still pair up
    return sorted((np.sort(g) for g in groups), key=lambda g: int(g[0])) + [np.zeros(0, np.int64)] * (k - len(groups))


def plan_micro_batches(lengths: np.ndarray, micro_batch_size: int, max_tokens: int | None, packed: bool,
                       agree: Callable[[int], int] = lambda k: k) -> list:
    """The micro-batches of a rank's rows (indices into ``lengths``, in the rows' order). Without
    ``max_tokens``: ``micro_batch_size`` consecutive rows each (the fixed layout). With it: token-budget
    micro-batches, their number made equal on every rank by ``agree`` (the maximum over the ranks); a rank
    with fewer rows than that gets empty micro-batches at the end (``split_to``)."""
    n = len(lengths)
    if not max_tokens:
        return [np.arange(s, min(n, s + micro_batch_size)) for s in range(0, n, micro_batch_size)]
    k = agree(needed_micro_batches(lengths, max_tokens, packed) if n else 0)
    return split_to(lengths, max_tokens, packed, k) if k else []


def pack(tokens_bL, lens_b) -> tuple:
    """Rows ``tokens_bL[i, :lens_b[i]]`` as one row: (input ids [1, T], position ids [1, T], row of each
    packed position [T], column of each [T])."""
    import torch

    lens = [int(x) for x in lens_b.tolist()]
    rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)]).to(tokens_bL.device)
    cols = torch.cat([torch.arange(n) for n in lens]).to(tokens_bL.device)
    return tokens_bL[rows, cols][None], cols[None], rows, cols


def packed_hidden(hidden_fn: Callable, tokens_bL, lens_b):
    """Last hidden states [b, n, H] (n: the longest row; zeros past each row's end) of rows ``tokens_bL`` of
    lengths ``lens_b``, computed as one packed sequence. ``hidden_fn(input_ids, attention_mask,
    position_ids)`` returns the model's last hidden states."""
    ids, pos, rows, cols = pack(tokens_bL, lens_b)
    h = hidden_fn(ids, None, pos)[0]  # [T, H]
    n = int(lens_b.max())
    out = h.new_zeros((tokens_bL.shape[0], n, h.shape[-1]))
    return out.index_put((rows, cols), h)


def packing_works(hidden_fn: Callable, vocab: int, device, dtype) -> tuple:
    """(True, gap) when a packed forward of two rows gives their padded forward's hidden states; (False, gap)
    when not (a model whose masks ignore the position ids). ``gap``: the largest difference relative to the
    hidden states' scale."""
    import torch

    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([7, 5])
    tokens = torch.randint(1, max(2, vocab), (2, 7), generator=g).to(device)
    attn = (torch.arange(7)[None] < lens[:, None]).long().to(device)
    with torch.no_grad():
        padded = hidden_fn(tokens, attn, None).float()
        packed = packed_hidden(hidden_fn, tokens, lens).float()
    valid = attn.bool()
    gap = float((padded[valid] - packed[valid]).abs().max() / padded[valid].abs().max().clamp(min=1e-6))
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return gap <= tol, gap


VARLEN_SDPA = "mopd_varlen_sdpa"


def _varlen_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, row by row of a packed sequence: each row attends over its own block (its
    slice of the block mask transformers built: causal, sliding windows), so attention costs the sum of the rows'
    squared lengths, not the packed length squared (what flash-attention-2's variable-length kernels do on GPUs;
    this is their twin where they do not run). Anything else (not packed, decoding) is plain sdpa."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    T = query.shape[2]
    if pos is None or query.shape[0] != 1 or key.shape[2] != T or pos.shape[-1] != T or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    p = pos.reshape(-1)
    starts = (torch.diff(p, prepend=p[:1] - 1) != 1).nonzero().flatten().tolist()
    if len(starts) <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = [*starts, T] if starts[0] == 0 else [0, *starts, T]
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # a row no longer than the layer's window (if any) is plainly causal: sdpa's causal kernel, no mask
        # (with a mask, CPU sdpa falls back to its math kernel); a longer one takes its slice of the mask
        block = None if (not window or e - s <= window) and getattr(module, "is_causal", True) else \
            attention_mask[..., s:e, s:e]
        out, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], block, **kwargs)
        outs.append(out)  # [1, rows' length, heads, head dim]
    return torch.cat(outs, dim=1), None


def use_varlen_attention(model) -> str:
    """Run ``model``'s packed rows row by row where its attention would otherwise attend over the whole packed
    length (transformers' sdpa: the default, and the only one on CPU). Flash-attention and other implementations
    are kept. Returns the implementation in use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "sdpa"):
        try:
            model.set_attn_implementation(VARLEN_SDPA)
        except (ValueError, TypeError):  # a model that cannot switch (remote code): whole-length sdpa
            return str(current)
        return VARLEN_SDPA
    return str(current)
