"""A learner rank's rows of a step: its rollout parts fetched from the object store into one local
[N, L] layout, their teacher scores placed slot by slot as they arrive (all at once, or micro-batch by
micro-batch while teachers still score), and the torch tensors the loss reads."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..batch import RolloutBatch, batch_nbytes


class LearnerRows:
    """Fetching and laying out this rank's rows (a mixin of LearnerWorker: its state)."""

    def _fetch_rows(self, parts: list) -> dict:
        """ray.get this rank's rollout parts: local [n, L] arrays and each row's mini-batch. Their teacher
        scores are fetched later by ``_await_rows`` (all at once, or micro-batch by micro-batch)."""
        import ray
        import torch
        from ..collectives import all_reduce

        t0 = time.perf_counter()
        batches: list[RolloutBatch] = ray.get([p["batch"] for p in parts])
        fetched = sum(batch_nbytes(b) for b in batches)
        if self.cfg.get("balance_tokens"):  # every rank was given every part: keep the rows of a token-balanced plan
            parts, batches = self._balanced(parts, batches)
        g = _layout(batches, self.teacher_names)
        g["score_refs"] = [list(p["scores"]) for p in parts]
        g["keep"] = [p.get("keep") for p in parts]
        g["fetched_bytes"] = fetched
        g["mini_B"] = np.concatenate([np.full(b.num_rows, p["mini_batch"], np.int64) for b, p in zip(batches, parts)])
        n_mini = self.cfg["mini_batches_per_step"]
        mine = [np.nonzero(g["mini_B"] == m)[0] for m in range(n_mini)]
        if self.teacher_heads:  # group rows by teacher so one output head is used at a time
            mine = [r[np.lexsort(g["teacher_index"][r].T[::-1])] for r in mine]
        g["rows_by_mini"] = mine
        # global denominators of each mini-batch: response tokens and non-empty sequences over all ranks
        totals = torch.tensor([[g["mask"][r].sum(), (g["mask"][r].sum(-1) > 0).sum()] for r in mine], dtype=torch.float64)
        all_reduce(totals)
        g["totals"] = totals
        g["fetch_s"] = time.perf_counter() - t0  # waiting for rollouts / scores still in flight, and the copy
        return g

    def _balanced(self, parts: list, batches: list) -> tuple:
        """This rank's rows of the step's parts under ``learner.balance_tokens`` (mopd_ray/dispatch.py
        ``balance_by_tokens``): the parts it keeps rows of, each cut to those rows (``keep``)."""
        from ..dispatch import balance_by_tokens

        plan = balance_by_tokens([b.prompt_lens_B + b.response_lens_B for b in batches],
                                 [b.group_ids_B for b in batches], [p["mini_batch"] for p in parts],
                                 self.world_size)[self.rank]
        mine = [(dict(p, keep=rows), b.take(rows)) for p, b, rows in zip(parts, batches, plan) if len(rows)]
        return [p for p, _ in mine], [b for _, b in mine]

    def _await_rows(self, g: dict, t: Optional[dict], rows) -> int:
        """Fetch and place the teacher scores of every part holding some of ``rows`` (None: all parts);
        refresh the teacher tensors of ``t`` for those rows. The wait counts as fetch time. Returns how many
        of those scores were still being computed when called (0: all were in)."""
        import ray

        todo = [k for k in range(len(g["offsets"]) - 1) if k not in g["placed"] and (
            rows is None or ((rows >= g["offsets"][k]) & (rows < g["offsets"][k + 1])).any())]
        if not todo:
            return 0
        t0 = time.perf_counter()
        refs = [r for k in todo for r in g["score_refs"][k]]
        pending = len(refs) - len(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        got = ray.get(refs)
        g["fetch_s"] += time.perf_counter() - t0
        for k in todo:
            mine, got = got[:len(g["score_refs"][k])], got[len(g["score_refs"][k]):]
            g["fetched_bytes"] += sum(s.nbytes() for s in mine)
            if g["keep"][k] is not None:  # a part this rank trains some rows of: their scores, renumbered
                mine = [c for c in (sc.restrict(g["keep"][k]) for sc in mine) if c is not None]
            _place(g, k, mine, self.teacher_names)
            if t is not None:
                self._teacher_tensors(g, t, np.arange(g["offsets"][k], g["offsets"][k + 1]))
        return pending

    def _tensors(self, g: dict) -> dict:
        """Torch views of the local rows, each slot's teacher, signal and per-token coefficient, outcome
        advantages. ``teacher_lp`` is [S, N, L]: slot s of every row (zeros where the slot is empty)."""
        import torch

        from ..algo import OUTCOME_ESTIMATORS, mix_advantages
        from .loss import SIGNAL_IDS

        dev = self.device
        tidx = torch.from_numpy(g["teacher_index"].astype(np.int64)).to(dev)  # [N, S]
        t = {"tokens": torch.from_numpy(g["tokens"].astype(np.int64)).to(dev),
             "mask": torch.from_numpy(g["mask"].astype(np.float32)).to(dev),
             "attn": torch.from_numpy(g["attn"]).long().to(dev), "attn_np": g["attn"],
             "rollout_lp": torch.from_numpy(g["rollout_lp"]).to(dev), "tidx": tidx}
        S, (N, L) = len(g["slots"]), g["mask"].shape
        t["teacher_lp"] = torch.zeros((S, N, L), dtype=torch.float32, device=dev)  # filled as scores arrive
        t["coef"] = torch.zeros((S, N, L), dtype=torch.float32, device=dev)
        empty = tidx < 0
        safe = tidx.clamp(min=0)
        if self.teacher_names:
            w = torch.tensor(self.teacher_weights, dtype=torch.float32, device=dev)[safe]
            coef = torch.where(empty, 0.0, w * torch.from_numpy(g["route_weight"]).to(dev))  # [N, S]
            signal = torch.tensor([SIGNAL_IDS[x] for x in self.teacher_signals], device=dev)[safe]
            t["signal"] = torch.where(empty, -1, signal)
        else:  # reward-only (GRPO): no distillation term, the outcome advantage alone
            coef = torch.zeros(tidx.shape, dtype=torch.float32, device=dev)
            t["signal"] = torch.full(tidx.shape, -1, dtype=torch.long, device=dev)
        t["coef_NS"] = coef
        if len(g["placed"]) == len(g["offsets"]) - 1:
            self._teacher_tensors(g, t, np.arange(N))
        a = self.algo
        t["outcome"] = torch.zeros_like(t["mask"])
        if a["alpha"] > 0 and g["has_reward"].any():  # groups never straddle ranks (dispatch plan)
            rewards = torch.from_numpy(np.nan_to_num(g["rewards"])).to(dev)
            t["outcome"] = mix_advantages(torch.zeros_like(t["mask"]), OUTCOME_ESTIMATORS.get(a["outcome_estimator"])(
                rewards, torch.from_numpy(g["group_ids"]).to(dev), t["mask"]).float(), a["alpha"],
                torch.from_numpy(g["has_reward"]).to(dev))
        return t

    def _teacher_tensors(self, g: dict, t: dict, rows: np.ndarray) -> None:
        """Teacher log-probs [S, n, L] and per-token coefficients of ``rows``, from their placed scores."""
        import torch

        r = torch.from_numpy(rows).to(self.device)
        lp = torch.from_numpy(np.stack([sl["lp"][rows] for sl in g["slots"]])).to(self.device)
        t["teacher_lp"][:, r] = lp
        t["coef"][:, r] = self._token_coefficients(t["coef_NS"][r], lp)

    def _token_coefficients(self, coef_NS, teacher_lp_SNL):
        """[S, N, L] coefficient of each slot at each token. ``fixed``: the slot's weight everywhere;
        ``confidence``: a row's total weight shared among its teachers in proportion to weight x the
        teacher's probability of the sampled token (a teacher unsure of a token cedes it to the others)."""
        import torch

        fixed = coef_NS.T[:, :, None].expand_as(teacher_lp_SNL)
        if self.algo.get("teacher_combine", "fixed") == "fixed" or coef_NS.shape[1] == 1:
            return fixed.contiguous()
        logit = torch.where(fixed > 0, torch.log(fixed.clamp(min=1e-30)) + teacher_lp_SNL, float("-inf"))
        share = torch.nan_to_num(torch.softmax(logit, dim=0), nan=0.0)  # rows without a teacher: 0
        return (share * coef_NS.sum(-1)[None, :, None]).detach()


def _assemble(shards: list, scores: list, teacher_names: list) -> dict:
    """Concatenate shards into [N, L] arrays and place each teacher's scores in its rows' slots.

    ``slots[s]`` holds slot s of every row: ``lp`` [N, L], and ``topk_ids`` / ``topk_lp`` [N, L, K] and
    ``hidden`` [N, L, H] where some teacher of that slot serves those signals (else None).
    """
    out = _layout(shards, teacher_names)
    for k, s_list in enumerate(scores):
        _place(out, k, s_list, teacher_names)
    _check_scored(out, teacher_names)
    return out


def _layout(shards: list, teacher_names: list) -> dict:
    """The rollout side of ``_assemble``: [N, L] arrays of the shards' rows, empty teacher slots."""
    L = max(b.tokens_BL.shape[1] for b in shards)
    N = sum(b.num_rows for b in shards)

    def cat(get, fill=0, dtype=None):
        parts = []
        for b in shards:
            a = get(b)
            pad = [(0, 0), (0, L - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
            parts.append(np.pad(a, pad, constant_values=fill))
        return np.concatenate(parts).astype(dtype or parts[0].dtype)

    out = {"tokens": cat(lambda b: b.tokens_BL), "rollout_lp": cat(lambda b: b.rollout_logprobs_BL, dtype=np.float32),
           "mask": cat(lambda b: b.loss_mask_BL())}
    lens = np.concatenate([b.prompt_lens_B + b.response_lens_B for b in shards])
    out["attn"] = np.arange(L)[None, :] < lens[:, None]
    S = max(b.teacher_index_BS.shape[1] for b in shards)
    pad_slots = (lambda a, fill: np.pad(a, [(0, 0), (0, S - a.shape[1])], constant_values=fill))
    tidx = np.concatenate([pad_slots(b.teacher_index_BS, -1) for b in shards])
    if not teacher_names:
        tidx[:] = -1  # reward-only: no row has a teacher
    out["teacher_index"] = tidx
    out["route_weight"] = np.concatenate([pad_slots(b.route_weight_BS, 0.0) for b in shards])
    out["group_ids"] = np.concatenate([b.group_ids_B for b in shards])
    out["rewards"] = np.concatenate([b.rewards_B for b in shards])
    out["has_reward"] = np.concatenate([b.has_reward_B for b in shards])
    out["slots"] = [{"lp": np.zeros((N, L), np.float32), "topk_ids": None, "topk_lp": None, "hidden": None}
                    for _ in range(S)]
    out["scored"] = np.zeros((N, S), np.int32)
    out["offsets"] = np.cumsum([0] + [b.num_rows for b in shards])
    out["response_lens"] = [b.response_lens_B for b in shards]
    out["placed"] = set()
    return out


def _place(out: dict, k: int, s_list: list, teacher_names: list) -> None:
    """Place the TeacherScores of shard ``k`` in its rows' slots (``out`` from ``_layout``)."""
    import torch

    from .teacher import expand_hidden

    tidx, slots, scored = out["teacher_index"], out["slots"], out["scored"]
    N, L = out["mask"].shape
    offset, resp_lens = out["offsets"][k], out["response_lens"][k]
    for sc in s_list:
        rows = offset + sc.rows_R.astype(np.int64)
        hit = tidx[rows] == teacher_names.index(sc.teacher)
        if not hit.any(-1).all():
            raise RuntimeError(f"teacher '{sc.teacher}' scored rows {rows[~hit.any(-1)][:8].tolist()} that are "
                               "not routed to it")
        slot_R = hit.argmax(-1)
        scored[rows, slot_R] += 1
        r, pos, ok = sc.positions(L)
        ok = ok & (np.arange(pos.shape[1])[None, :] < resp_lens[sc.rows_R][:, None])
        for s in np.unique(slot_R):
            sel = ok & (slot_R == s)[:, None]
            rr, pp = rows[r[sel]], pos[sel]
            sl = slots[s]
            sl["lp"][rr, pp] = sc.teacher_logprobs_RT[sel]
            if sc.topk_ids_RTK is not None:
                if sl["topk_ids"] is None:
                    K = sc.topk_ids_RTK.shape[-1]
                    sl["topk_ids"] = np.zeros((N, L, K), np.int32)
                    sl["topk_lp"] = np.full((N, L, K), -1e4, np.float32)
                sl["topk_ids"][rr, pp] = sc.topk_ids_RTK[sel]
                sl["topk_lp"][rr, pp] = np.maximum(sc.topk_logprobs_RTK[sel], -1e4)
            if sc.hidden_RTH is not None:
                h = expand_hidden(sc.hidden_RTH, sc.hidden_dtype)
                if sl["hidden"] is None:
                    sl["hidden"] = torch.zeros((N, L, h.shape[-1]), dtype=h.dtype)
                sl["hidden"][torch.from_numpy(rr), torch.from_numpy(pp)] = h[torch.from_numpy(sel)]
    out["placed"].add(k)


def _check_scored(out: dict, teacher_names: list) -> None:
    """Every (row, teacher slot) was scored exactly once."""
    tidx, scored = out["teacher_index"], out["scored"]
    want = (tidx >= 0).astype(np.int32)
    if teacher_names and not (scored == want).all():
        bad = np.nonzero((scored != want).any(-1))[0][:8]
        raise RuntimeError(f"rows {bad.tolist()} were scored {scored[bad].tolist()} times per teacher slot "
                           f"(teachers {tidx[bad].tolist()}); every teacher of a row scores it exactly once")
