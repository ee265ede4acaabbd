"""Roles on the nodes of a multi-node cluster (ray.cluster_utils.Cluster: several raylets on this machine)."""

import json

import pytest

from mopd_ray.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_roles_on_different_nodes_of_a_multi_node_cluster(artifacts, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from mopd_ray.cluster import WORKER_ENV
    from mopd_ray.orchestrator import Orchestrator

    from .conftest import compose_cfg

    if ray.is_initialized():
        ray.shutdown()
    # the two learner ranks on two nodes: each writes its part of the checkpoints from its own node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"learner_node": 1}})
    cluster.add_node(num_cpus=1, resources={"learner_node": 1})
    cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
    cluster.add_node(num_cpus=3, resources={"teacher_node": 3})
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
        over = [
            "experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=3", "cluster=ray_cluster",
            f"run.checkpoint_dir={tmp_path}/shared/ck",
            "algorithm=sampled_grpo", "algorithm.max_staleness=1", "data.domains=[add,sort]",
            f"cluster.address={cluster.address}", "logging.wandb_mode=disabled", "logging.progress_bar=false",
            "+rollout.custom_resources.rollout_node=1", "+learner.custom_resources.learner_node=1",
            *[f"+teachers.models.{t}.custom_resources.teacher_node=1" for t in ("add_expert", "reverse_expert", "self")],
            *[f"teachers.models.{t}.backend=hf" for t in ("add_expert", "reverse_expert", "self")]]
        from mopd_ray.models.prepare import prepare_models

        prepare_models(compose_cfg(*over))
        # 2 steps, stopped with a checkpoint; then relaunched with run.resume=auto for the third
        Orchestrator(compose_cfg(*over, "run.steps_per_launch=2"), str(tmp_path / "first")).run()
        last = Orchestrator(compose_cfg(*over, "run.resume=auto"), str(tmp_path / "resumed")).run()
        assert last["weight_version"] == 3 and last["rows_trained"] == 3 * 4 * 2
        first, resumed = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "resumed")
        assert [r["step"] for r in first] == [0, 1] and [r["step"] for r in resumed] == [2]
        # next rollout overlapped each update: batches after the first of a launch are one version stale
        assert [r["rollout/staleness"] for r in first + resumed] == [0, 1, 0]
        assert all("reward/mean" in r for r in first + resumed)
        ids = [json.loads((tmp_path / d / "identity.json").read_text())["run_id"] for d in ("first", "resumed")]
        assert ids[0] == ids[1] and (tmp_path / "shared" / "ck" / ids[0] / "step_000003" / "COMPLETE").exists()
        placement = json.loads((tmp_path / "resumed" / "placement.json").read_text())
        learner_nodes, rollout_nodes = set(placement["learner"]), set(placement["rollout"])
        teacher_nodes = {n for k, v in placement.items() if k.startswith("teacher:") for n in v}
        assert len(learner_nodes) == 2 and len(rollout_nodes) == len(teacher_nodes) == 1
        assert len(learner_nodes | rollout_nodes | teacher_nodes) == 4
        # one rank per node: each is rank 0 of its node and owns device 0 (LOCAL_RANK), whatever its global rank
        assert [(r["rank"], r["node_local_rank"], r["local_rank_env"]) for r in placement["learner_ranks"]] == \
            [(0, 0, "0"), (1, 0, "0")]
    finally:
        ray.shutdown()
        cluster.shutdown()
        from ..conftest import ensure_local_ray

        ensure_local_ray()  # the session's local cluster, for the tests after this one
