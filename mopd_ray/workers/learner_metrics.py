"""A learner rank's report of its step: loss terms, KL and entropy, per-teacher token shares and KL, the
mismatch gate's statistics, timings; and the non-finite check of its inputs (which teacher's rows)."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..algo.mismatch import needs_rollout_logprobs


class LearnerMetrics:
    """The step's metrics and input checks (a mixin of LearnerWorker: its state)."""

    def _metrics(self, g: dict, t: dict, old_lp, loop: dict, t0: float) -> dict:
        """Per-teacher and step statistics summed over every rank (one all-reduce), as step metrics."""
        import torch
        from ..collectives import all_reduce

        T, n_mini, ws = len(self.teacher_names), self.cfg["mini_batches_per_step"], self.world_size
        mask, tidx = t["mask"].double(), t["tidx"]
        stats = torch.zeros(9 + 3 * T, dtype=torch.float64)
        for s in range(tidx.shape[1]):  # each teacher over the tokens it scored, in whichever slot
            log_ratio = t["teacher_lp"][s] - old_lp
            k1, k3 = -log_ratio.double() * mask, (torch.expm1(log_ratio) - log_ratio).double() * mask
            for i in range(T):
                sel = tidx[:, s] == i
                stats[9 + 3 * i: 12 + 3 * i] += torch.stack([mask[sel].sum(), k1[sel].sum(), k3[sel].sum()])
        stats[0] = mask.sum()
        stats[1] = ((old_lp - t["rollout_lp"]).abs().double() * mask).sum()
        stats[2:9] = torch.tensor([loop["entropy_sum"], loop["loss"], loop["is_clip_fraction"] / max(loop["n_micro"], 1),
                                   loop["pg_clip_fraction"] / max(loop["n_micro"], 1),
                                   loop["distill_loss"] / (ws * self.grad_accum), float(g["tokens"].shape[0]),
                                   float(g["fetched_bytes"])], dtype=torch.float64)
        stats.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # garbage rows are reported, not averaged in
        all_reduce(stats)
        tok = max(stats[0].item(), 1.0)
        metrics = {"loss": stats[3].item() / n_mini, "entropy": stats[2].item() / tok,
                   "is_clip_fraction": stats[4].item() / ws, "pg_clip_fraction": stats[5].item() / ws,
                   "train_rollout_logprob_gap": stats[1].item() / tok,
                   "grad_norm": float(np.mean(loop["grad_norms"])) if loop["grad_norms"] else float("nan"),
                   "lr": self.scheduler.get_last_lr()[0], "learner_step_s": time.perf_counter() - t0,
                   "response_tokens": stats[0].item(), "rows": int(stats[7].item()), "skipped_minibatches": loop["skipped"],
                   "signal_free_minibatches": loop["signal_free"],
                   "learner/fetched_bytes": g["fetched_bytes"], "learner/fetched_bytes_all_ranks": stats[8].item(),
                   "learner/fetch_s": g["fetch_s"], "learner/start_s": g.get("start_s", float("nan")),
                   "learner/forwards_ahead_of_scores": g.get("forwards_ahead", 0),
                   "learner/micro_batches": loop["n_micro"],  # this rank's (as many on every rank)
                   "learner/zero_weight_micro_batches": loop["ghosts"],  # this rank had fewer rows than that
                   "learner/rank_tokens": loop["row_tokens"],  # the tokens of this rank's rows (balance_tokens)
                   "learner/padding_fraction": 1.0 - loop["row_tokens"] / max(loop["forward_tokens"], 1), "learner/compute_s": time.perf_counter() - t0 - g["fetch_s"]}
        if not needs_rollout_logprobs(self.algo["is_correction"], self.cfg["recompute_old_logprobs"]):
            del metrics["train_rollout_logprob_gap"]  # the rollout was not asked for its log-probs
        if loop["nonfinite"]:
            metrics["nonfinite"] = loop["nonfinite"]
        if any(s != "sampled" for s in self.teacher_signals):
            metrics["distill_loss"] = stats[6].item() / n_mini
        for i, name in enumerate(self.teacher_names):
            n_t = stats[9 + 3 * i].item()
            metrics[f"teacher/{name}/token_share"] = n_t / tok
            metrics[f"teacher/{name}/tokens"] = n_t
            if n_t > 0:
                metrics[f"teacher/{name}/reverse_kl"] = stats[10 + 3 * i].item() / n_t
                metrics[f"teacher/{name}/reverse_kl_k3"] = stats[11 + 3 * i].item() / n_t
        # over every (token, teacher) pair: a row with two teachers counts against each
        metrics["reverse_kl"] = (sum(stats[10 + 3 * i].item() for i in range(T))
                                 / max(sum(stats[9 + 3 * i].item() for i in range(T)), 1.0))
        return metrics

    def _nonfinite_inputs(self, g: dict, rows: np.ndarray, old_lp) -> Optional[dict]:
        """None if every input of these rows is finite at response positions, else what was not.
        ``old_lp`` None: pi_old comes from the training forward (a non-finite one shows in the loss)."""
        import torch

        m = g["mask"][rows]
        old = None if old_lp is None else old_lp[torch.from_numpy(rows)].cpu().numpy()
        slots = g["slots"]
        checks = {"teacher_logprobs": np.concatenate([sl["lp"][rows][m] for sl in slots]),
                  "rollout_logprobs": g["rollout_lp"][rows][m]}
        if old is not None:
            checks["old_logprobs"] = old[m]
        if any(sl["topk_lp"] is not None for sl in slots):
            checks["topk_logprobs"] = np.concatenate([sl["topk_lp"][rows][m] for sl in slots if sl["topk_lp"] is not None])
        if any(sl["hidden"] is not None for sl in slots):
            checks["hidden_states"] = np.concatenate([sl["hidden"][torch.from_numpy(rows)][torch.from_numpy(m)].float().numpy()
                                                      for sl in slots if sl["hidden"] is not None])
        counts = {k: int((~np.isfinite(v)).sum()) for k, v in checks.items()}
        if not any(counts.values()):
            return None
        bad_slot = np.stack([~np.isfinite(np.where(g["mask"][rows], sl["lp"][rows], 0)).all(-1) for sl in slots], -1)
        bad = bad_slot.any(-1)
        if old is not None:
            bad |= ~np.isfinite(np.where(g["mask"][rows], old, 0)).all(-1)
        bad_rows = rows[bad]
        # the teachers whose scores were not finite (every teacher of a row whose pi_old was not)
        culprit = np.where(bad_slot[bad] | ~bad_slot[bad].any(-1, keepdims=True), g["teacher_index"][bad_rows], -1)
        teachers = self._names(culprit)
        return {"teachers": teachers, "stats": {"rows": int(len(rows)), "response_tokens": int(m.sum()),
                                                "nonfinite_counts": counts, "bad_rows": int(len(bad_rows))}}

    def _names(self, tidx: np.ndarray) -> list:
        """Sorted names of the teachers among slot indices ``tidx`` (-1: none)."""
        return sorted({self.teacher_names[i] for i in np.asarray(tidx).ravel().tolist() if i >= 0})
