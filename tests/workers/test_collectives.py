"""mopd_ray/collectives.py: tensors go to the group's device, groups have timeouts, devices are the
actor's own; the gloo path runs here for real, the NCCL decisions are checked without a GPU."""

import datetime

import pytest
import torch
import torch.distributed as dist

from mopd_ray import collectives as C
from mopd_ray.roles import node_local_ranks


@pytest.fixture
def gloo_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    return dist.ProcessGroupGloo(store, 0, 1, datetime.timedelta(seconds=30))


def test_gloo_broadcast_and_the_default_group_reduce_on_cpu(gloo_group, tmp_path):
    t = torch.arange(4, dtype=torch.float32)
    assert C.backend_of(gloo_group) == "gloo" and C.group_device(gloo_group).type == "cpu"
    assert torch.equal(C.broadcast(gloo_group, t.clone(), 0), t)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        assert C.all_reduce(x) is x and x.tolist() == [1.0, 2.0]
        assert C.any_rank(True) and not C.any_rank(False)
    finally:
        dist.destroy_process_group()


def test_a_bucket_on_the_wrong_device_is_refused_by_name(gloo_group):
    class ProcessGroupNCCL:  # what an NCCL sync group looks like to the code, without a GPU
        def broadcast(self, t, src):
            raise AssertionError("never reached with a CPU tensor")

    assert C.backend_of(ProcessGroupNCCL()) == "nccl"
    with pytest.raises(ValueError, match="cpu tensor on a nccl group: allocate the bucket on cuda"):
        C.broadcast(ProcessGroupNCCL(), torch.zeros(2), 0)
    with pytest.raises(ValueError, match="meta tensor on a gloo group"):
        C.broadcast(gloo_group, torch.zeros(2, device="meta"), 0)


@pytest.mark.parametrize("visible,gpu_ids,want", [("3", [3], 0), ("1,3", [3], 1), ("", [2], 2), ("0", [], 0)])
def test_the_device_index_is_the_actors_own_gpu_not_the_rank(monkeypatch, visible, gpu_ids, want):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert C.local_device_index() == want


def test_no_cuda_means_device_zero(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C.local_device_index() == 0


def test_node_local_ranks_count_within_each_node():
    assert node_local_ranks(["a", "b", "a", "b", "a"]) == [(0, 3), (0, 2), (1, 3), (1, 2), (2, 3)]


def test_learner_env_local_rank_is_the_device_not_the_global_rank(monkeypatch):
    import os

    from mopd_ray.workers.deepspeed_env import set_dist_env

    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    set_dist_env(5, 8, "10.0.0.1", 29500)
    assert os.environ["RANK"] == "5" and os.environ["LOCAL_RANK"] == "0"


def test_members_of_an_nccl_group_on_one_gpu_are_named_before_the_group_is_made():
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): the learners' group and the weight-sync
    group check their members' GPU UUIDs first (None: a CPU process, gloo) and name who shares and the fix."""
    from mopd_ray.collectives import SharedGPUError, check_distinct_gpus

    check_distinct_gpus({"learner rank 0": None, "rollout replica 0 shard 0": None}, "weight-sync group", "fix")
    check_distinct_gpus({"learner rank 0": "GPU-a", "learner rank 1": "GPU-b"}, "learners' group", "fix")
    with pytest.raises(SharedGPUError, match="learner rank 0 and rollout replica 0 shard 1 share one.*object_store"):
        check_distinct_gpus({"learner rank 0": "GPU-a", "rollout replica 0 shard 0": "GPU-b",
                             "rollout replica 0 shard 1": "GPU-a"}, "weight-sync group",
                            "Use rollout.weight_sync=object_store")


def test_weight_sync_buckets_fit_in_half_of_the_least_free_engine_memory():
    """A receiver holds about two buckets at once: the configured size, unless an engine worker has less
    than four buckets free (a GPU that gpu_memory_utilization leaves nearly full)."""
    from mopd_ray.sync import choose_bucket_bytes

    MiB = 1 << 20
    assert choose_bucket_bytes(256 * MiB, [80_000 * MiB, 30_000 * MiB]) == 256 * MiB
    assert choose_bucket_bytes(256 * MiB, [4_000 * MiB, 600 * MiB]) == 150 * MiB  # the least free worker decides
    assert choose_bucket_bytes(256 * MiB, [2 * MiB]) == 1 * MiB  # never below 1 MiB
    assert choose_bucket_bytes(0, [600 * MiB]) == 0  # one tensor per bucket stays so
    assert choose_bucket_bytes(256 * MiB, [None]) == 256 * MiB  # nothing known: as configured
