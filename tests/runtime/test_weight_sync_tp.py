"""Weight sync into a tensor-parallel engine: every worker process is a member of the sync group.

(Its own module: the module-scoped TP=1 rollout group of test_weight_sync holds the 'rollout' placement group.)
"""

import numpy as np
import pytest

from mopd_ray.roles import (init_broadcast_group, make_learner_group, make_rollout_group, setup_learners,
                            sync_weights)

from .conftest import compose_cfg
from .test_weight_sync import SEQS, _synthetic_batch, train_on

pytestmark = pytest.mark.slow


def test_tensor_parallel_engine_workers_receive_the_broadcast_themselves(local_ray, artifacts):
    """A TP=2 rollout engine: both worker processes join the sync group (world 1 + 2) and load each
    bucket as it arrives (buckets of 64 KB split fused layers); the engine then serves the learner's weights."""
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "rollout.tensor_parallel_size=2", "rollout.max_new_tokens=8",
                      "rollout.weight_sync_bucket_mb=0", "learner.world_size=1", "learner.lr=3e-2",
                      "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=8",
                      "algorithm.is_correction=none")
    rollout = make_rollout_group(cfg)
    learners = make_learner_group(cfg, sorted(cfg.teachers.models))
    try:
        rollout.gather(rollout.call_all("ready"))
        # placed as on GPUs: the replica's own placement group of one bundle per shard, packed on one node,
        # the engine actor on bundle 0 and its shards beside it (vLLM's CPU build: the multiprocessing executor)
        from ray.util.placement_group import placement_group_table

        assert len(rollout.pgs) == 1
        table = placement_group_table(rollout.pgs[0])
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2
        placed = rollout.gather(rollout.call(0, "engine_placement"))
        assert placed["tensor_parallel_size"] == 2 and placed["backend"] == "mp"
        assert placed["placement_group"] == rollout.pgs[0].id.hex()
        setup_learners(cfg, learners)
        init_broadcast_group(cfg, learners, rollout)
        batch, scores = _synthetic_batch(8, seed=7)
        learners.gather(train_on(learners, batch, [scores]))
        after = learners.gather(learners.call(0, "compute_logprobs", SEQS))
        sync_weights(cfg, learners, rollout, version=1)
        engine = rollout.gather(rollout.call(0, "score_logprobs", SEQS))
        for e, l in zip(engine, after):
            np.testing.assert_allclose(e[1:], l[1:], atol=2e-5)
    finally:
        learners.shutdown()
        rollout.shutdown()
