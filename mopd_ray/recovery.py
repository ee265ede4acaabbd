"""What the driver does when a role fails: a dead rollout replica is restarted and its shards generated
again, a dead learner rank restarts the learner group from this run's own newest checkpoint (or its
starting state), a weight sync that lost a member is rebuilt, non-finite steps are counted and stop the
run past a limit. Each path keeps every row trained once."""

from __future__ import annotations

import logging
import random
import time
from collections import deque

import numpy as np
import ray

from . import checkpoint as ckpt
from .cluster import RemoteCallError, WorkerDiedError, answers
from .data.prompts import make_sampler
from .roles import init_broadcast_group, make_learner_group, setup_learners, share_teacher_heads, sync_weights
from .run_state import RunState

log = logging.getLogger("mopd_ray.orchestrator")


class NonFiniteStepsError(RuntimeError):
    pass


# A replica that died, or is being restarted by Ray, while we waited on it.
_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator was aborted")


def _peer_lost(err: Exception) -> bool:
    """A collective failed because another member of its group went away (not a bug in the call)."""
    text = str(err).lower()
    return any(k in text for k in _PEER_LOST)


class Recovery:
    """The orchestrator's failure handling (a mixin of mopd_ray.orchestrator.Orchestrator: its state)."""

    def _recover_learners(self, err: Exception, step: int) -> tuple:
        """A learner rank died (``err`` surfaced on a call to the learners): tear the group down, start it
        again, load this run's newest complete checkpoint (without one, its own starting state), re-sync
        the engines (restarted too if the rank died while streaming weights into them) and continue from
        that step with the sampler and RNG of the checkpoint, so the rows after it are the same rows.
        Anything but a dead rank, or more than ``cluster.learner_restarts`` restarts, is raised. Returns the
        new rollout queue (the restart step's batch, launched) and the next step to launch."""
        cfg, roles = self.cfg, self.roles
        if not (isinstance(err, WorkerDiedError) or _peer_lost(err)):
            raise err  # a failing or hung call, not a lost rank: restarting would not help
        if self.learner_restarts >= cfg.cluster.learner_restarts:
            raise WorkerDiedError(f"{err} [in-job learner restarts used: {self.learner_restarts} of "
                                  f"cluster.learner_restarts={cfg.cluster.learner_restarts}]") from None
        self.learner_restarts += 1
        t0 = time.perf_counter()
        in_sync = getattr(self, "_phase", "train") == "sync"
        log.warning("a learner rank died at step %d (%s); restarting the learner group (%d of %d)%s", step,
                    str(err).split(". ")[0], self.learner_restarts, cfg.cluster.learner_restarts,
                    ", and the rollout engines (the rank died while streaming weights into them)" if in_sync else "")
        roles.learners.shutdown()
        roles.learners = make_learner_group(cfg, roles.teacher_names)
        setup_learners(cfg, roles.learners)
        share_teacher_heads(cfg, roles)
        if in_sync:  # the engines may hold half-loaded weights or sit in a receive from the dead sender
            for a in roles.rollout.actors:
                ray.kill(a, no_restart=False)
            for i in range(len(roles.rollout)):  # the kill is asynchronous: wait for the new process
                self._wait_for_rollout(i, not_pid=self.rollout_pids.get(i))
        if cfg.rollout.weight_sync == "broadcast":
            init_broadcast_group(cfg, roles.learners, roles.rollout)  # a new group with the new rank 0
        # this run's own state only: its newest checkpoint, else what it started from
        path = ckpt.find_latest(self.start.root, run_id=self.start.identity.run_id) or self.start.resume_from
        failed_at = self.state.step
        # replica restarts so far happened in this job: they stay counted (and spent) past the rollback
        replica_faults = {"rollout_retries": self.state.rollout_retries, "teacher_restarts": self.state.teacher_restarts}
        if path is not None:
            self._resume(path)
        else:  # no checkpoint yet: from the initial student, the first batch again
            self.state = RunState()
            self.sampler = make_sampler(self.pool, cfg)
            random.seed(cfg.run.seed)
            np.random.seed(cfg.run.seed)
            sync_weights(cfg, roles.learners, roles.rollout, self.state.weight_version)
            self._restored()
        for k, v in replica_faults.items():
            setattr(self.state, k, max(v, getattr(self.state, k)))
        self.steps_redone += failed_at - self.state.step
        log.warning("learner group restarted in %.1f s from %s: continuing at step %d (%d step(s) redone)",
                    time.perf_counter() - t0, path or "the initial student", self.state.step, failed_at - self.state.step)
        return deque([self._launch_rollout(self.state.step)]), self.state.step + 1

    def _recover_rollout(self, i: int, err: Exception) -> None:
        if self.state.rollout_retries >= self.cfg.cluster.max_restarts * len(self.roles.rollout):
            raise RuntimeError(f"rollout replica {i} died again after {self.state.rollout_retries} restarts: {err}")
        self.state.rollout_retries += 1
        log.warning("rollout replica %d died or restarted (%s); waiting for it, re-syncing weights, retrying",
                    i, err)
        rollout = self.roles.rollout
        self._wait_for_rollout(i)
        if self.cfg.rollout.weight_sync == "broadcast":
            init_broadcast_group(self.cfg, self.roles.learners, rollout)  # the group had the dead member
        sync_weights(self.cfg, self.roles.learners, rollout, self.state.weight_version)

    def _wait_for_rollout(self, i: int, not_pid=None) -> None:
        """Until rollout replica ``i`` (restarted by Ray) answers from a live process (other than
        ``not_pid``: the one just killed), within ``cluster.call_timeout_s``."""
        timeout = self.cfg.cluster.call_timeout_s
        deadline = time.monotonic() + timeout
        actor = self.roles.rollout.actors[i]
        while True:
            try:
                pid = ray.get(actor.pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
                if pid != not_pid:
                    self.rollout_pids[i] = pid
                    return
            except Exception:  # restarting, or not yet scheduled
                pass
            if time.monotonic() > deadline:
                raise RemoteCallError(f"rollout replica {i} did not come back within {timeout:g} s")
            time.sleep(0.5)

    def _sync_weights(self) -> float:
        version = self.state.weight_version + 1
        try:
            seconds = sync_weights(self.cfg, self.roles.learners, self.roles.rollout, version)
        except (*_REPLICA_GONE, RemoteCallError, ray.exceptions.RayTaskError) as e:
            # a learner rank that died mid-stream shows on the other members as a lost peer: the learner
            # group's recovery (which restarts the engines too, as they may sit in a receive from it)
            gone = [i for i, a in enumerate(self.roles.learners.actors) if not answers([a], timeout_s=5.0)]
            if gone:
                raise WorkerDiedError(f"learner rank {gone[0]} died during the weight sync ({type(e).__name__}). "
                                      f"{self._resume_hint()}") from None
            dead = [i for i, a in enumerate(self.roles.rollout.actors) if not answers([a], timeout_s=5.0)]
            # An engine killed mid-broadcast may surface on the sender's side (learner rank 0: "connection
            # closed by peer") and be restarted by Ray before we look: rebuild the group and resend then too.
            if not dead and not _peer_lost(e):
                raise
            self.state.weight_version = version  # the learners' weights are this version now
            self._recover_rollout(dead[0] if dead else 0, e)
            return 0.0
        self.state.weight_version = version
        return seconds

    def _count_nonfinite(self, step: int, metrics: dict) -> None:
        skipped = int(metrics.get("skipped_minibatches", 0))
        if not skipped:
            self.state.consecutive_skips = 0
            return
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        info = metrics.get("nonfinite", {})
        log.warning("step %d: non-finite values, update skipped (%d in a row): %s", step,
                    self.state.consecutive_skips, info)
        if self.state.consecutive_skips >= self.cfg.run.max_consecutive_skips:
            raise NonFiniteStepsError(
                f"{self.state.consecutive_skips} steps in a row had non-finite loss or inputs (run.max_consecutive_"
                f"skips={self.cfg.run.max_consecutive_skips}); last at step {step}, rows of teacher(s) "
                f"{info.get('teachers')}, batch statistics {info.get('stats')}. Check those teachers' models and "
                f"payloads, or lower learner.lr; {self._resume_hint()}")
