"""Warm groups (mopd_ray/warm.py): a parked group is taken only by its own key (and reset through
``reuse``), freed when a new group needs its resources, and never handed out dead. The runs that reuse
real engines are checked by equality elsewhere: test_resume's uninterrupted run starts fresh and the
stopped one takes its warm engines, with equal losses; test_dispatch_world's learner groups are reused
across world sizes with equal losses."""

import os
import signal

import pytest
import ray

from mopd_ray.cluster import Bundle
from mopd_ray.warm import WARM, GroupSpec, reuse_key
from mopd_ray.workers.base import RoleWorker

pytestmark = pytest.mark.slow


class _Counting(RoleWorker):
    def __init__(self, tag: str):
        self.tag, self.reused = tag, 0

    def reuse(self, tag: str) -> bool:
        self.tag, self.reused = tag, self.reused + 1
        return True

    def state(self) -> tuple:
        return self.tag, self.reused


def _spec(name, n, cpus, tag, with_args=True):
    s = GroupSpec(name, _Counting, n, Bundle(cpus), {"init_args": lambda i: ((tag,), {}), "call_timeout_s": 60})
    s.reuse_key = reuse_key(s, with_args=with_args)
    return s


def test_parked_groups_are_taken_by_key_reset_and_freed_for_resources(local_ray):
    WARM.evict()
    a, = WARM.realize([_spec("a", 2, 1.0, "first")])
    WARM.park(a)
    again, = WARM.realize([_spec("a", 2, 1.0, "first")])
    assert again is a and a.gather(a.call_all("state")) == [("first", 1)] * 2  # reset through reuse
    WARM.park(a)
    # another constructor argument: not interchangeable (a new group); without args in the key: taken, reset
    other, = WARM.realize([_spec("a", 2, 1.0, "second")])
    assert other is not a and len(WARM) == 1
    WARM.park(other)
    learner_like, = WARM.realize([_spec("a", 2, 1.0, "third", with_args=False)])
    assert learner_like is not a and learner_like is not other  # its key has no args: a third kind
    WARM.park(learner_like)
    assert len(WARM) == 3
    # a group that needs most of the cluster: the parked ones are shut down, oldest first, to place it
    free = ray.available_resources().get("CPU", 0)
    big, = WARM.realize([_spec("big", 1, free + 2.5, "big")])
    assert len(WARM) < 3 and a._down
    big.shutdown()
    # a parked group whose process died is never handed out
    WARM.evict()
    c, = WARM.realize([_spec("c", 1, 0.5, "c")])
    WARM.park(c)
    os.kill(ray.get(c.actors[0].pid.remote()), signal.SIGKILL)
    fresh, = WARM.realize([_spec("c", 1, 0.5, "c")])
    assert fresh is not c and fresh.gather(fresh.call_all("state")) == [("c", 0)]
    fresh.shutdown()
    WARM.evict()


def test_a_parked_engine_group_becomes_another_of_its_kind_in_place_and_restarts_as_it(local_ray, artifacts):
    """A parked rollout group and a run that wants another model folder: its process is rebuilt in place
    (the same pid: vLLM not imported again) and serves the new folder's model. Killed, Ray restarts it with
    the arguments of its latest rebuild, not its first ones: it comes back serving the new model (with its
    creation arguments it would serve the old one, a silently wrong engine)."""
    import time

    import numpy as np

    from mopd_ray.roles import make_rollout_group
    from mopd_ray.workers.reference import reference_logprobs

    from .conftest import compose_cfg

    WARM.evict()
    common = ["experiment=local_smoke", f"run.artifacts_dir={artifacts}", "rollout.max_new_tokens=8"]
    first = make_rollout_group(compose_cfg(*common))
    probes = first.gather(first.call(0, "probe_sequences"))
    student = first.gather(first.call(0, "score_logprobs", probes))
    pid = first.gather(first.call(0, "pid"))
    WARM.park(first)
    other = f"{artifacts}/tiny/teacher_add"
    group = make_rollout_group(compose_cfg(*common, f"model.path={other}", "model.tiny=null"))
    try:
        assert group is first and group.rebuilt and group.gather(group.call(0, "pid")) == pid  # in place
        served = group.gather(group.call(0, "score_logprobs", probes))
        from transformers import AutoTokenizer

        want = reference_logprobs(other, probes, "float32", len(AutoTokenizer.from_pretrained(other)))

        def gap(a, b):
            return max(float(np.abs(np.asarray(x[1:]) - np.asarray(y[1:])).max()) for x, y in zip(a, b))

        assert gap(served, want) < 1e-4 and gap(served, student) > 1e-2  # the new folder's model, not the old
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 300
        while True:  # Ray restarts it (cluster.max_restarts)
            try:
                if group.gather(group.call(0, "pid"), timeout_s=30) != pid:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the rollout actor was not restarted"
            time.sleep(0.5)
        assert gap(group.gather(group.call(0, "score_logprobs", probes)), want) < 1e-4  # as rebuilt, after restart
    finally:
        group.shutdown()
        WARM.evict()
    from ray.experimental.internal_kv import _internal_kv_get

    assert _internal_kv_get(f"mopd/init_args/{group.actors[0]._actor_id.hex()}") is None  # forgotten with it
