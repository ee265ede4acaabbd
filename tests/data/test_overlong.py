"""Responses cut at max_new_tokens (rollout.overlong): kept, masked from the loss, or penalised as in DAPO."""

import numpy as np
import pytest

from mopd_ray.batch import RolloutBatch
from mopd_ray.config import ConfigError, validate
from mopd_ray.workers.rollout import overlong_penalty

from ..helpers import compose_cfg


def _batch(mask_truncated):
    tokens = np.ones((3, 6), np.int32)
    return RolloutBatch(tokens, np.array([2, 2, 2], np.int32), np.array([4, 2, 4], np.int32),
                        np.zeros((3, 6), np.float32), np.arange(3), np.zeros(3, np.int32), np.zeros(3, np.float32),
                        np.array([False, True, False]), ("a", "a", "b"), truncated_B=np.array([True, False, True]),
                        mask_truncated=mask_truncated)


def test_masked_truncated_rows_carry_no_loss_and_the_mark_survives_a_split():
    kept, masked = _batch(False), _batch(True)
    assert (kept.loss_mask_BL() == kept.response_mask_BL()).all() and kept.loss_mask_BL().sum() == 10
    assert masked.loss_mask_BL().sum(-1).tolist() == [0, 2, 0]  # only the finished row trains
    part = masked.take(np.array([1, 2]))
    assert part.truncated_B.tolist() == [False, True] and part.mask_truncated
    assert part.loss_mask_BL().sum(-1).tolist() == [2, 0]


def test_dapo_overlong_shaping():
    cfg = {"overlong": "penalty", "max_new_tokens": 100, "overlong_buffer": 20, "overlong_penalty": 0.5}
    assert overlong_penalty(80, False, cfg) == 0.0  # before the buffer
    assert overlong_penalty(90, False, cfg) == pytest.approx(0.25)  # halfway into it
    assert overlong_penalty(100, True, cfg) == 0.5  # cut: the whole penalty
    assert overlong_penalty(100, True, {**cfg, "overlong_buffer": 0}) == 0.5
    assert overlong_penalty(99, False, {**cfg, "overlong_buffer": 0}) == 0.0
    assert overlong_penalty(100, True, {**cfg, "overlong": "keep"}) == 0.0


@pytest.mark.parametrize("override,key", [("rollout.overlong=drop", "rollout.overlong"),
                                          ("rollout.overlong_buffer=64", "rollout.overlong_buffer"),
                                          ("rollout.overlong_penalty=-1", "rollout.overlong_penalty")])
def test_bad_overlong_settings_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(override, "rollout.max_new_tokens=32"))
