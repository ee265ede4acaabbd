"""Faults on the real runtime: dead replicas are restarted and their work redone (every row trained
once), a dead learner rank restarts the learner group from the newest checkpoint inside the job (and
past the limit fails fast with the checkpoint to resume from), hung calls hit a deadline,
non-finite steps are skipped and then stop the run with the teacher and batch named."""

import os
import signal
import threading
import time

import pytest
import ray

from mopd_ray.cluster import ActorGroup, Bundle, RemoteCallError, WorkerDiedError
from mopd_ray.metrics import read_metrics
from mopd_ray.orchestrator import NonFiniteStepsError, Orchestrator

from .conftest import compose_cfg

pytestmark = pytest.mark.slow
HF = [f"teachers.models.{t}.backend=hf" for t in ("add_expert", "reverse_expert", "self")]
COMMON = ["experiment=local_smoke", "data.domains=[add,reverse]", "data.prompts_per_step=4",
          "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=4", "logging.wandb_mode=disabled",
          "logging.progress_bar=false", *HF]


def _orchestrator(artifacts, run_dir, *overrides):
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"run.checkpoint_dir={run_dir}/ck", *COMMON, *overrides)
    return Orchestrator(cfg, str(run_dir))


def _kill_at(orch, step, pick, sigkill: bool = False):
    """Kill the actor ``pick(orch)`` once the run has finished ``step`` steps (from another thread):
    ``ray.kill``, or SIGKILL of its process (as the kernel's OOM killer or a lost node would)."""
    def watch():
        while getattr(orch, "roles", None) is None or orch.state.step < step:
            time.sleep(0.05)
        actor = pick(orch)
        if sigkill:
            os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
        else:
            ray.kill(actor, no_restart=False)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


# teacher: add_expert and self share one pool replica (weights swapped in from disk, no cache) and
# reverse_expert has its own engine; both kinds of teacher replica are killed, at different steps
POOL = ["data.domains=[add,reverse,sort]", "teachers.pools.shared.replicas=1", "teachers.pools.shared.cache_gb=0",
        *[f"teachers.models.{t}.{k}" for t in ("add_expert", "self") for k in ("backend=auto", "pool=shared")]]


def test_dead_teacher_replicas_are_restarted_and_every_row_trained_once(local_ray, artifacts, tmp_path):
    orch = _orchestrator(artifacts, tmp_path, "run.total_steps=5", *POOL)
    _kill_at(orch, 1, lambda o: o.roles.teachers["reverse_expert"].actors[0])  # a dedicated group's replica
    _kill_at(orch, 3, lambda o: o.roles.teachers["add_expert"].actors[0])  # the pool's replica
    last = orch.run()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(5))
    assert last["rows_trained"] == 5 * 4 * 2  # every row of every step, once (the learners count them)
    assert last["faults/teacher_restarts"] >= 2  # the dedicated replica and the pool replica
    # the two pooled teachers were swapped in and out of the one replica, before and after its restart
    assert sum(r.get("pool/shared/swaps", 0) for r in rows) >= 2
    assert sum(r.get("pool/shared/swap_s", 0) for r in rows) > 0
    for t in ("add_expert", "self"):
        assert sum(r.get(f"pool/shared/rows/{t}/replica0", 0) for r in rows) > 0, t


def test_dead_rollout_and_learner_are_restarted_in_the_job_then_fails_fast_past_the_limit(local_ray, artifacts,
                                                                                          tmp_path):
    """The rollout replica's process is SIGKILLed after step 1: Ray restarts it, the driver re-syncs the
    current weights and regenerates the shard; it exits again, deterministically, inside the weight sync
    of version 5 (cluster.fault_exit_in_sync_version). Learner rank 1's process is SIGKILLed during step 3: the
    group is rebuilt from step_000002 and steps 2-3 are redone with the same rows (the redone step 2 has
    the first attempt's loss). A second learner death, past cluster.learner_restarts=1, stops the run
    naming the rank and the checkpoint to resume from. (benchmarks/bench_chaos.py: the long version.)"""
    orch = _orchestrator(artifacts, tmp_path, "run.total_steps=8", "run.save_every=2", "cluster.call_timeout_s=300",
                         "cluster.learner_restarts=1", "cluster.fault_exit_in_sync_version=5",
                         "rollout.weight_sync_bucket_mb=0")  # one tensor per bucket: the exit is mid-stream
    _kill_at(orch, 1, lambda o: o.roles.rollout.actors[0], sigkill=True)
    _kill_at(orch, 3, lambda o: o.roles.learners.actors[1], sigkill=True)
    _kill_at(orch, 7, lambda o: o.roles.learners.actors[0])  # of the new group; step_000006 is complete by then
    t0 = time.time()
    with pytest.raises(WorkerDiedError) as e:
        orch.run()
    assert time.time() - t0 < 300
    msg = str(e.value)
    assert "learner rank 0 died" in msg and "run.resume=auto" in msg and "step_000006" in msg, msg
    assert "learner restarts used: 1 of cluster.learner_restarts=1" in msg
    rows = read_metrics(tmp_path)
    steps = [r["step"] for r in rows]
    assert steps[:3] == [0, 1, 2] and steps[-5:] == [2, 3, 4, 5, 6], steps
    first, redone = [r for r in rows if r["step"] == 2]
    assert redone["loss"] == pytest.approx(first["loss"], rel=1e-6, abs=1e-9)  # the same rows, the same weights
    assert redone["rows_trained"] == first["rows_trained"]
    assert redone["faults/learner_restarts"] == 1 and first["faults/learner_restarts"] == 0
    assert redone["faults/steps_redone"] == 1
    assert rows[-1]["rows_trained"] == 7 * 4 * 2  # steps 0-6, every row once after the restart point
    assert max(r["faults/rollout_retries"] for r in rows[:3]) >= 1  # the engine died before step 2 was logged
    # the engine's process exited inside receive_weights of version 5 (after step 4), after its first
    # tensor, with the learner still sending: restarted, re-synced, and the run went on
    assert (tmp_path / "ck" / "fault_exit_in_sync.done").exists()
    assert rows[-1]["faults/rollout_retries"] >= 2  # both engine deaths, counted past the learner restart
    assert all(r["rollout/staleness"] == 0 for r in rows)  # the restarted engine got current weights


class _Sleeper:
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


def test_hung_call_becomes_a_clear_error_at_its_deadline(local_ray):
    group = ActorGroup("sleeper", _Sleeper, 1, Bundle(0.1), call_timeout_s=2.0)
    try:
        # the first call waits for the actor's process to start (seconds on a busy machine)
        assert group.gather(group.call(0, "work", 0.1), "work", timeout_s=120) == 0.1
        t0 = time.time()
        with pytest.raises(RemoteCallError, match=r"sleeper.work did not finish within 2 s \(cluster.call_timeout_s\)"):
            group.gather(group.call(0, "work", 60), "work")
        assert time.time() - t0 < 10
    finally:
        group.shutdown()


def test_nonfinite_steps_are_skipped_then_stop_the_run(local_ray, artifacts, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model

    broken = build_tiny_model(tmp_path / "nan_teacher", TinyModelConfig(seed=7))
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    orch = _orchestrator(artifacts, tmp_path / "run", "run.total_steps=6", "run.max_consecutive_skips=2",
                         "data.domains=[add]", f"teachers.models.add_expert.model_path={broken}",
                         "teachers.models.add_expert.tiny=null")
    with pytest.raises(NonFiniteStepsError) as e:
        orch.run()
    msg = str(e.value)
    assert "2 steps in a row" in msg and "step 1" in msg and "add_expert" in msg and "nonfinite_counts" in msg
    rows = read_metrics(tmp_path / "run")
    assert [r["faults/skipped_steps"] for r in rows] == [1]  # step 0 skipped and logged; step 1 stopped the run
