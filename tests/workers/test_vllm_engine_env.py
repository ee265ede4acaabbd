"""The CPU engine's environment: eager engines compile nothing, compiled ones compile again after them."""

import os

import pytest

from mopd_ray.workers import vllm_engine


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(vllm_engine, "_dynamo_off_by_us", False)
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU",
              "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(k, raising=False)


def test_eager_then_compiled_engine_in_one_process(clean_env):
    vllm_engine.apply_cpu_engine_env(None, True, 1)
    assert os.environ["TORCHDYNAMO_DISABLE"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    env = vllm_engine.apply_cpu_engine_env(None, False, 2)  # compiled, TP=2: worker processes, bound cores
    assert "TORCHDYNAMO_DISABLE" not in os.environ and "TORCHDYNAMO_DISABLE" not in env
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_a_users_own_dynamo_switch_is_left_alone(clean_env, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    vllm_engine.apply_cpu_engine_env(None, True, 1)
    vllm_engine.apply_cpu_engine_env(None, False, 1)
    assert os.environ["TORCHDYNAMO_DISABLE"] == "1"


class _PG:  # a placement group as vLLM sees it: only present or not
    pass


def test_tensor_parallel_engines_use_the_ray_executor_on_gpus_inside_their_placement_group():
    """The GPU branch (its CPU twin, the multiprocessing executor inside the same placement groups, runs in
    tests/runtime/test_weight_sync_tp.py): one worker per bundle of the replica's group, each with its
    share of a GPU, the actor's emptied CUDA_VISIBLE_DEVICES dropped."""
    kwargs, env = vllm_engine.engine_placement(4, 1.0, True, _PG())
    assert kwargs == {"distributed_executor_backend": "ray"}
    assert env == {"VLLM_RAY_BUNDLE_INDICES": "0,1,2,3", "VLLM_RAY_PER_WORKER_GPUS": "1",
                   "CUDA_VISIBLE_DEVICES": None}
    assert vllm_engine.engine_placement(2, 0.25, True, _PG())[1]["VLLM_RAY_PER_WORKER_GPUS"] == "0.25"
    # outside Ray (mopd-eval on a GPU box), on CPU, and unsharded engines: no Ray executor
    assert vllm_engine.engine_placement(2, 1.0, True, None) == ({"distributed_executor_backend": "mp"}, {})
    assert vllm_engine.engine_placement(2, 1.0, False, _PG()) == ({"distributed_executor_backend": "mp"}, {})
    assert vllm_engine.engine_placement(1, 1.0, True, _PG()) == ({}, {})
