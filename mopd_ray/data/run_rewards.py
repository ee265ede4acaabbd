"""The rewards of a run's domains: data.rewards (and data.train_rewards) over the synthetic domains' own
(exact match), as the keyword arguments of mopd_ray.rewards.Rewards."""

from __future__ import annotations

import os

from ..rewards import Rewards
from .domains import DOMAINS


def rewards_spec(cfg, train: bool = False) -> dict:
    """The keyword arguments of Rewards for a run's config (sent to the rollout actors): the judge
    (data.rewards), or with ``train`` the rewards the rollouts are trained on (data.train_rewards on top)."""
    by_domain = {**dict(cfg.data.rewards), **(dict(cfg.data.train_rewards) if train else {})}
    return {"by_domain": by_domain, "timeout_s": float(cfg.data.reward_timeout_s),
            "builtin_domains": sorted(DOMAINS), "search_path": [os.getcwd()]}


def rewards_from_cfg(cfg) -> Rewards:
    return Rewards(**rewards_spec(cfg))
