"""The pipeline in one driver: rollouts ahead of updates up to max_staleness, shards split among teacher replicas."""

import pytest

from mopd_ray.metrics import read_metrics

from .conftest import compose_cfg

pytestmark = pytest.mark.slow


def test_async_rollouts_up_to_max_staleness_and_every_row_once(local_ray, artifacts, tmp_path):
    """max_staleness=2: two rollouts run ahead of each update (3 shards per replica, parts per rank);
    the add domain is scored by two teachers (its expert, and self at weight 0.2); sampling at
    temperature 0.7 (the pre-flight compares engine and learner at temperature 1, as vLLM scores prompts;
    the rollout log-probs are of the tempered distribution, as the learner's)."""
    from mopd_ray.orchestrator import Orchestrator

    cfg = compose_cfg("experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=5",
                      "algorithm.max_staleness=2", "rollout.shards_per_replica=3", "logging.wandb_mode=disabled",
                      f"run.checkpoint_dir={tmp_path}/ck",
                      "rollout.temperature=0.7",
                      "teachers.routing.add=[{teacher: add_expert}, {teacher: self, weight: 0.2}]",
                      "logging.progress_bar=false", *[f"teachers.models.{t}.backend=hf" for t in
                                                      ("add_expert", "reverse_expert", "self")])
    last = Orchestrator(cfg, str(tmp_path)).run()
    rows = read_metrics(tmp_path)
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 2, 2, 2]
    assert rows[0]["train_rollout_logprob_gap"] < 1e-3  # step 0 is on-policy: same tempered log-probs
    assert last["rows_trained"] == 5 * 4 * 2 and last["weight_version"] == 5
    assert all(0 < r["learner/fetched_bytes"] < r["learner/fetched_bytes_all_ranks"] for r in rows)
    # self scored the sort rows and, beside add_expert, the add rows: every token but the reverse ones
    for r in rows:
        assert r["teacher/self/tokens"] == r["response_tokens"] - r["teacher/reverse_expert/tokens"]
    assert sum(r["teacher/add_expert/tokens"] for r in rows) > 0 and all(r["loss"] == r["loss"] for r in rows)


def test_a_shard_split_among_teacher_replicas_trains_as_one_replica(local_ray, artifacts, tmp_path):
    """One rollout shard a step and a teacher with two replicas: the shard's rows are split between them
    (both score every step), every row is scored exactly once (the learner checks) and the update equals
    the one with a single replica scoring everything."""
    from mopd_ray.orchestrator import Orchestrator

    runs = {}
    for replicas in (1, 2):
        cfg = compose_cfg("experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=2",
                          "logging.wandb_mode=disabled", "logging.progress_bar=false", "run.eval_every=0",
                          f"run.checkpoint_dir={tmp_path}/ck",
                          f"teachers.models.add_expert.replicas={replicas}", "teachers.models.add_expert.backend=hf",
                          "data.domains=[add]")  # only the teacher under test starts
        Orchestrator(cfg, str(tmp_path / f"r{replicas}")).run()
        runs[replicas] = read_metrics(tmp_path / f"r{replicas}")
    assert [r["teacher/add_expert/replicas_busy"] for r in runs[2]] == [2, 2]
    assert [r["teacher/add_expert/replicas_busy"] for r in runs[1]] == [1, 1]
    for one, two in zip(runs[1], runs[2]):
        assert one["rows_trained"] == two["rows_trained"]
        assert one["teacher/add_expert/tokens"] == two["teacher/add_expert/tokens"] > 0
        assert abs(one["loss"] - two["loss"]) < 1e-5 and abs(one["grad_norm"] - two["grad_norm"]) < 1e-4
