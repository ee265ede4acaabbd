"""pi_old and the per-token distillation advantages of a learner rank's rows (the algo/ estimators on its
tensors; normalisation moments all-reduced over the ranks)."""

from __future__ import annotations

import numpy as np


class LearnerAdvantages:
    """pi_old and advantages (a mixin of LearnerWorker: its state)."""

    def _fused_old_logprobs(self) -> bool:
        """pi_old equals the training forward when one mini-batch is trained and nothing needs pi_old of
        every row before the first backward (advantage normalisation): skip the extra forward then."""
        return (self.cfg["recompute_old_logprobs"] and self.cfg["mini_batches_per_step"] == 1
                and self.algo["normalize_advantages"] == "none")

    def _old_logprobs(self, g: dict, t: dict):
        """pi_old of every local row with the weights before this step's updates."""
        import torch

        old_lp = t["rollout_lp"].clone()
        self.engine.eval()
        with torch.no_grad():
            for idx, ghost in (p for rows in g["rows_by_mini"] for p in self._micro_plan(t, rows)):
                r = torch.from_numpy(idx).to(self.device)
                if ghost:  # a zero-weight pass (ZeRO-3 gathers parameters in every rank's forward)
                    self._forward_hidden(t["tokens"][r], t["attn"][r])
                    continue
                resp = t["mask"][r] > 0  # only response tokens are trained: only they need pi_old
                lp = self._token_logprobs(t["tokens"][r], t["attn"][r], resp, self.temperature)
                old_lp[r] = torch.where(resp, lp.to(old_lp.dtype), old_lp[r])
        self.engine.train()
        return old_lp

    def _sampled_advantage(self, t: dict, old_lp, r=slice(None)):
        """Per slot, the sampled-token reverse-KL advantage of rows ``r`` (0 for slots of other signals):
        [S, n, L]; their sum over slots is the distillation advantage."""
        import torch

        from ..algo import reverse_kl_advantage
        from .loss import SIGNAL_IDS

        sampled = (t["signal"][r] == SIGNAL_IDS["sampled"]).T[:, :, None]  # [S, n, 1]
        return torch.stack([reverse_kl_advantage(t["teacher_lp"][s][r], old_lp[r], t["mask"][r],
                                                 t["coef"][s][r] * sampled[s], gamma=self.algo["kl_gamma"])
                            for s in range(sampled.shape[0])])

    def _distill_advantages(self, t: dict, old_lp):
        """Sampled-token reverse-KL advantage, normalised with moments summed over every rank's rows:
        ``teacher*`` normalises each teacher's terms over its own tokens (a row's slots separately), then
        sums the slots; ``batch*`` normalises the sum over the rows that have a sampled-signal teacher."""
        from ..collectives import all_reduce

        from ..algo import advantage_moments, normalize_advantages
        from .loss import SIGNAL_IDS

        adv_S = self._sampled_advantage(t, old_lp)
        norm = self.algo["normalize_advantages"]
        if norm == "none":
            return adv_S.sum(0)
        scale = not norm.endswith("_mean")
        sampled = t["signal"] == SIGNAL_IDS["sampled"]  # [N, S]
        if not norm.startswith("teacher"):
            mask = t["mask"] * sampled.any(-1)[:, None]
            groups = t["tidx"].new_zeros(t["tidx"].shape[0])
            moments = advantage_moments(adv_S.sum(0), mask, groups, 1)
            all_reduce(moments)
            return normalize_advantages(adv_S.sum(0), mask, groups, moments, scale=scale)
        T = max(len(self.teacher_names), 1)
        groups = t["tidx"].clamp(min=0)  # an empty slot is masked out below
        masks = [t["mask"] * sampled[:, s, None] for s in range(adv_S.shape[0])]
        moments = sum(advantage_moments(adv_S[s], masks[s], groups[:, s], T) for s in range(adv_S.shape[0]))
        all_reduce(moments)
        return sum(normalize_advantages(adv_S[s], masks[s], groups[:, s], moments, scale=scale)
                   for s in range(adv_S.shape[0]))
