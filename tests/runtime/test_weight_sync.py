"""After a sync, the rollout engine's log-probs of fixed token ids equal the learner's own (fp32)."""

import numpy as np
import pytest
import ray

from mopd_ray.batch import RolloutBatch, TeacherScores, pad_sequences
from mopd_ray.dispatch import split_batch
from mopd_ray.roles import (init_broadcast_group, make_learner_group, make_rollout_group, setup_learners,
                            sync_weights)

from mopd_ray.warm import WARM

from .conftest import compose_cfg

pytestmark = pytest.mark.slow

SEQS = [[1, 298, 201, 67, 70, 70, 19, 20, 2, 201, 1, 275, 307, 201, 21, 22, 2],
        [1, 298, 201, 80, 33, 34, 35, 36, 2, 201, 1, 275, 307, 201, 36, 35, 34, 33, 2]]


def _synthetic_batch(n_rows: int, seed: int):
    """A rollout shard and one teacher's scores, made here, to drive a real train_step."""
    rng = np.random.default_rng(seed)
    seqs = [SEQS[i % 2] for i in range(n_rows)]
    plens = np.array([9 if i % 2 == 0 else 9 for i in range(n_rows)], np.int32)
    rlens = np.array([len(s) - 9 for s in seqs], np.int32)
    tokens = pad_sequences(seqs, 0)
    lp = np.where(np.arange(tokens.shape[1])[None] >= plens[:, None], -rng.random(tokens.shape) * 3, 0)
    batch = RolloutBatch(tokens, plens, rlens, lp.astype(np.float32), np.arange(n_rows) // 2,
                         np.zeros(n_rows, np.int32), np.full(n_rows, np.nan, np.float32), np.ones(n_rows, bool),
                         tuple(["add"] * n_rows))
    teacher_lp = np.full((n_rows, int(rlens.max())), -0.1, np.float32)  # response positions only
    return batch, TeacherScores("add_expert", np.arange(n_rows, dtype=np.int32), plens.copy(), teacher_lp)


def train_on(learners, batch, scores, step: int = 0, n_mini: int = 1, every_part: bool = False) -> list:
    """Dispatch a batch in hand to the learner ranks (each gets refs of its own rows only; ``every_part``: every
    rank gets every part, as under learner.balance_tokens); train_step refs."""
    inputs = [[{"mini_batch": p["mini_batch"], "batch": ray.put(p["batch"]), "scores": [ray.put(s) for s in p["scores"]]}
               for p in parts] for parts in split_batch(batch, scores, len(learners), n_mini)]
    if every_part:
        inputs = [[p for parts in inputs for p in parts]] * len(inputs)
    return [learners.call(rank, "train_step", inputs[rank], step) for rank in range(len(learners))]


@pytest.fixture(scope="module")
def rollout(local_ray, artifacts):
    # the rollouts of add are trained on a reward of the user's (always 1), its evaluation judged by exact match
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "rollout.max_new_tokens=8",
                      "data.train_rewards.add=tests.rewards_fixture:always_one")
    group = make_rollout_group(cfg)
    group.gather(group.call_all("ready"))
    yield group
    group.shutdown()


# Each case trains to different weights (its own lr), so an engine left with the previous case's
# weights would fail the comparison.
@pytest.mark.parametrize("stage,transport,lr", [(2, "broadcast", 2e-2), (3, "broadcast", 3e-2),
                                                (3, "object_store", 4e-2)])
def test_rollout_matches_learner_after_sync(rollout, artifacts, stage, transport, lr):
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"learner.zero_stage={stage}", f"learner.lr={lr}",
                      f"rollout.weight_sync={transport}", "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
                      "learner.micro_batch_size=2", "algorithm.is_correction=none")
    names = sorted(cfg.teachers.models)
    learners = make_learner_group(cfg, names)
    try:
        setup_learners(cfg, learners)
        if transport == "broadcast":
            init_broadcast_group(cfg, learners, rollout)
        before = learners.gather(learners.call_all("compute_logprobs", SEQS))[0]
        stale = rollout.gather(rollout.call(0, "score_logprobs", SEQS))  # what the engine served so far
        batch, scores = _synthetic_batch(8, seed=stage)
        metrics = learners.gather(train_on(learners, batch, [scores]))[0]
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        after = learners.gather(learners.call_all("compute_logprobs", SEQS))
        # ranks agree, and the update really moved the weights
        for a, b in zip(after[0], after[1]):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert max(np.abs(a - b).max() for a, b in zip(after[0], before)) > 1e-3
        sync_weights(cfg, learners, rollout, version=1)
        engine_after = rollout.gather(rollout.call(0, "score_logprobs", SEQS))
        for e, l, l0 in zip(engine_after, after[0], before):
            np.testing.assert_allclose(e[1:], l[1:], atol=2e-5)
            assert np.abs(e - l0).max() > 1e-3  # the engine serves the updated weights, not the initial ones
        assert max(np.abs(e - s).max() for e, s in zip(engine_after, stale)) > 1e-4
    finally:
        WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)



def test_rollouts_are_rewarded_by_train_rewards_and_evaluated_by_the_judge(rollout):
    """data.train_rewards.add replaces add's reward in the rollouts only; sort keeps exact match; the
    evaluation judges add by exact match (an answer no response gives: 0)."""
    prompts = [{"prompt_ids": SEQS[i % 2][:9], "domain": dom, "answer": "no such answer", "group_id": i,
                "teacher_index": [-1]} for i, dom in enumerate(["add", "add", "sort", "sort"])]
    *batches, meta = rollout.gather(rollout.call(0, "generate", prompts, 0, 0))
    (batch,) = batches
    by_domain = {d: batch.rewards_B[[i for i, x in enumerate(batch.domains) if x == d]] for d in ("add", "sort")}
    assert by_domain["add"].tolist() == [1.0] * len(by_domain["add"]) and len(by_domain["add"]) >= 2
    assert by_domain["sort"].tolist() == [0.0] * len(by_domain["sort"])
    assert meta["reward_sum_by_domain"]["add"] == len(by_domain["add"])
    acc = rollout.gather(rollout.call(0, "evaluate", prompts, 0, 0))
    assert acc["add"]["accuracy"] == 0.0 and acc["sort"]["accuracy"] == 0.0
    # responses cut at max_new_tokens (8 here) are marked, and counted per domain for the metrics
    cut = batch.truncated_B
    assert cut is not None and cut.tolist() == (batch.response_lens_B == 8).tolist()
    assert not (cut & batch.finished_B).any()
    assert meta["truncated_by_domain"] == {d: int(cut[[x == d for x in batch.domains]].sum()) for d in ("add", "sort")}
    assert meta["rows_by_domain"] == {"add": len(by_domain["add"]), "sort": len(by_domain["sort"])}


def test_rollout_logprobs_are_asked_for_only_when_something_consumes_them(rollout, artifacts):
    """With no importance correction and pi_old recomputed by the learner, vLLM is not asked for the
    sampled tokens' log-probs (zeros in the batch); otherwise they are there at every response token."""
    from mopd_ray.algo.mismatch import needs_rollout_logprobs

    prompts = [{"prompt_ids": SEQS[i % 2][:9], "domain": "add", "answer": "1", "group_id": i,
                "teacher_index": [-1]} for i in range(4)]
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "rollout.max_new_tokens=8", "algorithm.is_correction=none")
    assert not needs_rollout_logprobs(cfg.algorithm.is_correction, cfg.learner.recompute_old_logprobs)
    assert needs_rollout_logprobs("none", False) and needs_rollout_logprobs("tis", True)
    bare = make_rollout_group(cfg, name="rollout:no-logprobs")
    try:
        (without, _), (with_lp, _) = [g.gather(g.call(0, "generate", prompts, 3, 0)) for g in (bare, rollout)]
    finally:
        bare.shutdown()
    assert without.response_lens_B.sum() >= 8
    resp = with_lp.response_mask_BL().astype(bool)
    assert resp.sum() >= 8 and (with_lp.rollout_logprobs_BL[resp] < 0).all()
    assert (without.rollout_logprobs_BL == 0).all()


def test_a_sync_that_leaves_an_engine_on_other_weights_stops_naming_the_module(rollout, artifacts):
    """The post-sync check (mopd_ray/sync_check.py): a sync that did not deliver one tensor leaves the engine
    on a mix of weights; the check stops it with the engine module that missed its tensor. A complete
    sync passes it, and its figures are kept for the step's metrics."""
    from mopd_ray.sync_check import WeightSyncCheckError, check_engines

    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.lr=5e-2", "rollout.weight_sync=object_store",
                      "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=2",
                      "algorithm.is_correction=none")
    learners = make_learner_group(cfg, sorted(cfg.teachers.models))
    try:
        setup_learners(cfg, learners)
        batch, scores = _synthetic_batch(8, seed=5)
        learners.gather(train_on(learners, batch, [scores]))
        (state_ref,) = learners.gather(learners.call_all("export_to_store"))[0]
        state = dict(ray.get(state_ref))
        del state["model.layers.1.mlp.down_proj.weight"]
        rollout.gather(rollout.call_all("update_weights_from_store", state, 7))
        with pytest.raises(WeightSyncCheckError) as e:
            check_engines(cfg, learners, rollout, 7)
        msg = str(e.value)
        assert "after weight sync 7, rollout replica 0" in msg and "model.layers.1.mlp.down_proj" in msg
        assert "rollout.weight_sync_check_tolerance" in msg
        sync_weights(cfg, learners, rollout, version=8)  # the whole state: the check passes
        assert rollout.last_sync_check["probe_gap"] < 1e-4
    finally:
        WARM.park(learners)
