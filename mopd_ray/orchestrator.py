"""The driver loop. It holds ObjectRefs and small metadata only: trajectories, teacher scores and
weights go from actor to actor through the object store and never enter this process.

One step: sample prompts -> rollout shards -> each shard, as soon as it is ready, to the teachers of
its rows -> learners train on the refs -> weight sync -> metrics -> eval / checkpoint every k steps.
With ``max_staleness=k`` up to k later rollouts are launched before this step's update (async).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from .cluster import RemoteCallError, WorkerDiedError, gather_fail_fast, get_with_deadline, init_ray
from .config import resolved_signal
from .data.prompts import build_prompt_pool, make_sampler
from .dispatch import parts_by_rank, plan_step
from .metrics import MetricsLogger
from .run_identity import RunStart, plan_run
from .roles import (build_roles, init_broadcast_group, make_learner_group, pool_replica, setup_learners,
                    share_teacher_heads, sync_weights)

log = logging.getLogger(__name__)


class NonFiniteStepsError(RuntimeError):
    pass


# A replica that died, or is being restarted by Ray, while we waited on it.
_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator was aborted")


def _peer_lost(err: Exception) -> bool:
    """A collective failed because another member of its group went away (not a bug in the call)."""
    text = str(err).lower()
    return any(k in text for k in _PEER_LOST)


@dataclass
class RunState:
    """Everything of the driver's that a resumable checkpoint must hold, in one place."""

    step: int = 0
    weight_version: int = 0
    sampler: dict = field(default_factory=dict)  # position of the next batch not yet trained on
    rng: dict = field(default_factory=dict)
    teacher_rr: dict = field(default_factory=dict)  # round-robin position per teacher
    rows_trained: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    rollout_retries: int = 0
    teacher_restarts: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PendingRollout:
    step: int
    sampler_before: dict  # sampler state before this batch was drawn (what a checkpoint must resume from)
    plan: list  # dispatch.Shard per rollout shard: its replica and its parts (learner rank, mini-batch)
    shard_items: list  # per shard: the prompt dicts sent (small), to resubmit after a replica restart
    part_refs: list  # per shard: one RolloutBatch ref per part
    meta_refs: list  # per shard: the small meta
    part_teachers: list  # per shard, per part: [rows, slots] teacher indices (small, known from the prompts)
    weight_version: int = 0  # weights the engines must hold when they generate this batch
    sampler_after: dict = field(default_factory=dict)  # and after it (this batch's data/epoch, data/consumed)


class Orchestrator:
    def __init__(self, cfg, run_dir: str, pool=None, start: RunStart | None = None):
        """``start``: the run's identity and starting checkpoint (mopd_ray.run_identity.plan_run; planned here
        when not given)."""
        self.cfg, self.run_dir, self.pool = cfg, str(Path(run_dir).resolve()), pool
        self.start = start
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.state = RunState()
        self.driver_fetched_bytes = 0  # what ray.get brought into this process (metadata only)
        self._fetched_at_last_log = 0
        self.eval_history: list = []  # (step, flat eval metrics)
        self.last_checkpoint = None
        self.first_metrics: dict = {}  # of the first step this launch trained (the closing summary's "before")
        self.wall_s = 0.0
        self.learner_restarts = 0  # in this job (not in RunState: a restart restores RunState)
        self.steps_redone = 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self._start()
        last: dict = {}
        try:
            self._maybe_evaluate(force=True)
            stop_at = cfg.run.total_steps
            if cfg.run.steps_per_launch > 0:  # time-limited allocations: a slice now, resume=auto later
                stop_at = min(stop_at, self.state.step + cfg.run.steps_per_launch)
            self.stop_at = stop_at
            # rollouts launched and not yet trained on, oldest first; with max_staleness=k up to k run
            # ahead of the update (generated with weights at most k versions old; the IS gate corrects)
            queue = deque([self._launch_rollout(self.state.step)] if self.state.step < stop_at else [])
            launched = self.state.step + len(queue)
            while self.state.step < stop_at:
                step, t0 = self.state.step, time.perf_counter()
                current = queue.popleft()
                learner_inputs, score_meta_refs = self._score(current)
                while len(queue) < cfg.algorithm.max_staleness and launched < stop_at:
                    queue.append(self._launch_rollout(launched))  # overlaps this update
                    launched += 1
                try:
                    metrics = self._train(step, learner_inputs)
                except (WorkerDiedError, RemoteCallError) as e:
                    # a learner rank died: rebuild the group from the newest checkpoint, redo the rows after it
                    queue, launched = self._recover_learners(e, step)
                    continue
                self.state.step += 1
                if not queue and launched < stop_at:  # on-policy: the next rollout as soon as the weights are synced,
                    queue.append(self._launch_rollout(launched))  # generating while this step's metrics are logged
                    launched += 1
                self.state.rows_trained += int(metrics.pop("rows"))
                metrics["rows_trained"] = self.state.rows_trained
                metrics.update(self._side_metrics(current, score_meta_refs, time.perf_counter() - t0))
                self.logger.log(step, metrics)
                last = metrics
                self.first_metrics = self.first_metrics or metrics
                try:
                    self._maybe_checkpoint(queue[0] if queue else None)
                except (WorkerDiedError, RemoteCallError) as e:  # the incomplete checkpoint is never used
                    queue, launched = self._recover_learners(e, step)
                    continue
                self._maybe_evaluate(force=self.state.step == stop_at)
            self._get(self.roles.learners.call_all("save_pretrained", f"{self.run_dir}/student_final"),
                      "export student")
        finally:
            self.logger.close()
            self.roles.shutdown()
            self.wall_s = time.perf_counter() - t_start
        return last

    def _train(self, step: int, learner_inputs: list) -> dict:
        """train_step on every rank, then the weight sync: the step's metrics (rank 0's)."""
        cfg = self.cfg
        self._phase = "train"
        metrics = gather_fail_fast(
            [self.roles.learners.call(r, "train_step", learner_inputs[r], step) for r in range(len(self.roles.learners))],
            [f"learner rank {i}" for i in range(len(self.roles.learners))], "learner.train_step",
            cfg.cluster.call_timeout_s, hint=self._resume_hint())[0]
        self._count_nonfinite(step, metrics)
        self._phase = "sync"
        metrics["weight_sync_s"] = self._sync_weights()
        self._phase = "train"
        return metrics

    def _recover_learners(self, err: Exception, step: int) -> tuple:
        """A learner rank died (``err`` surfaced on a call to the learners): tear the group down, start it
        again, load the newest complete checkpoint (the initial student at step 0 without one), re-sync
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
            for i in range(len(roles.rollout)):
                self._wait_for_rollout(i)
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
        for k, v in replica_faults.items():
            setattr(self.state, k, max(v, getattr(self.state, k)))
        self.steps_redone += failed_at - self.state.step
        log.warning("learner group restarted in %.1f s from %s: continuing at step %d (%d step(s) redone)",
                    time.perf_counter() - t0, path or "the initial student", self.state.step, failed_at - self.state.step)
        return deque([self._launch_rollout(self.state.step)]), self.state.step + 1

    # ------------------------------------------------------------------ start and resume
    def _start(self) -> None:
        cfg = self.cfg
        from transformers import AutoTokenizer

        from .config import resource_demand

        from .storage import check_writable_locations, probe_shared_storage

        check_writable_locations(cfg, self.run_dir)
        self.start = self.start or plan_run(cfg)
        identity = self.start.identity
        log.info("run %s: id %s, checkpoints in %s", cfg.run.name, identity.run_id, self.start.root)
        (Path(self.run_dir) / "identity.json").write_text(json.dumps(identity.record(), indent=1))
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        if self.pool is None:
            self.pool = build_prompt_pool(cfg, tokenizer)
        self.sampler = make_sampler(self.pool, cfg)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        demand = resource_demand(cfg)
        init_ray(cfg.cluster, demand["CPU"], gpu=demand["GPU"] > 0)
        self.roles = build_roles(cfg, tokenizer, self.pool.teacher_names)
        probe_shared_storage([self.start.root, self.run_dir], self.roles.learners, cfg.cluster.call_timeout_s)
        # each teacher replica's process now: a call answered from another process later is a restart
        self._teacher_pids = {}
        for name, group in self.roles.teachers.items():
            key = cfg.teachers.models[name].pool or name
            for i, pid in enumerate(self._get(group.call_all("pid"), "teacher pids")):
                self._teacher_pids[(key, i)] = pid
        placement = self.roles.placement()
        (Path(self.run_dir) / "placement.json").write_text(json.dumps(placement, indent=1))
        log.debug("placement (node ids by role): %s", {k: [n[:8] for n in v] for k, v in placement.items()})
        if self.start.resume_from is not None:
            self._resume(self.start.resume_from)
        logged = OmegaConf.to_container(cfg, resolve=True)
        logged["run"]["id"] = identity.run_id
        self.logger = MetricsLogger(self.run_dir, logged, cfg.logging, cfg.run.total_steps, cfg.run.name)
        if self.state.step and self.logger.bar is not None:
            self.logger.bar.update(self.state.step)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_state(path)
        log.info("resuming from checkpoint %s (step %d)", path, state["step"])
        self._get(self.roles.learners.call_all("load_checkpoint", str(path)), "learner.load_checkpoint")
        self.state = RunState(**{k: v for k, v in state["run_state"].items() if k in RunState.__dataclass_fields__})
        self.sampler.load_state_dict(self.state.sampler)
        random.setstate(_tuple_state(state["rng"]["python"]))
        np.random.set_state(_np_state(state["rng"]["numpy"]))
        sync_weights(self.cfg, self.roles.learners, self.roles.rollout, self.state.weight_version)
        self.last_checkpoint = path

    def _resume_hint(self) -> str:
        where = self.last_checkpoint or f"{self.start.root} (none written yet)"
        return f"resume with run.resume=auto (run {self.start.identity.run_id}) from the newest checkpoint: {where}"

    def _maybe_checkpoint(self, in_flight) -> None:
        cfg, step = self.cfg, self.state.step
        if not (step == self.stop_at or (cfg.run.save_every > 0 and step % cfg.run.save_every == 0)):
            return
        t0 = time.perf_counter()
        # the sampler position of the oldest batch not yet trained on (an overlapped rollout is redone)
        self.state.sampler = in_flight.sampler_before if in_flight is not None else self.sampler.state_dict()
        tmp = ckpt.begin(self.start.root, step)
        self._get(self.roles.learners.call_all("save_checkpoint", str(tmp)), "learner.save_checkpoint")
        state = {"step": step, "run_state": self.state.state_dict(),
                 "rng": {"python": random.getstate(), "numpy": _np_state_json(np.random.get_state())},
                 "config": OmegaConf.to_container(cfg, resolve=True), "identity": self.start.identity.record()}
        self.last_checkpoint = ckpt.commit(tmp, step, state, keep=cfg.run.keep_checkpoints)
        log.debug("checkpoint %s written in %.1f s", self.last_checkpoint, time.perf_counter() - t0)

    # ------------------------------------------------------------------ one step's pieces
    def _get(self, refs, what: str):
        out = get_with_deadline(refs, what, self.cfg.cluster.call_timeout_s)
        self.driver_fetched_bytes += len(ray.cloudpickle.dumps(out))
        return out

    def _launch_rollout(self, step: int) -> PendingRollout:
        cfg = self.cfg
        before = self.sampler.state_dict()
        prompts = self.sampler.next_batch()
        n, R = cfg.rollout.n_samples_per_prompt, len(self.roles.rollout)
        base = step * cfg.data.prompts_per_step
        items = [{"prompt_ids": p["prompt_ids"], "domain": p["domain"], "answer": p.get("answer"),
                  "group_id": base + i, "teacher_index": p["teacher_index"], "route_weight": p["route_weight"]}
                 for i, p in enumerate(prompts)]
        plan = plan_step(len(items), R * cfg.rollout.shards_per_replica, R, cfg.learner.world_size,
                         cfg.learner.mini_batches_per_step)
        shard_items = [[items[j] for j in sh.prompts] for sh in plan]
        part_teachers = [[np.repeat(np.array([shard_items[sh.index][j]["teacher_index"] for j in part.prompts],
                                             np.int32).reshape(len(part.prompts), -1), n, axis=0)
                          for part in sh.parts] for sh in plan]
        pending = PendingRollout(step, before, plan, shard_items, [None] * len(plan), [None] * len(plan),
                                 part_teachers, self.state.weight_version, self.sampler.state_dict())
        for sh in plan:
            self._submit_shard(pending, sh.index)
        return pending

    def _submit_shard(self, pending: PendingRollout, s: int) -> None:
        sh = pending.plan[s]
        *part_refs, meta_ref = self.roles.rollout.actors[sh.replica].generate.options(
            num_returns=len(sh.parts) + 1).remote(pending.shard_items[s], pending.step, self.cfg.run.seed,
                                                  sh.part_prompt_lists())
        pending.part_refs[s], pending.meta_refs[s] = part_refs, meta_ref

    def _score(self, pending: PendingRollout) -> tuple:
        """Send each shard's parts to their rows' teachers as soon as that shard is ready (refs only).

        A rollout replica that died is restarted by Ray; its unfinished shards are generated again after
        the new replica gets the current weights (same prompts and seeds, so the same rows). Returns
        (per-rank learner inputs, teacher meta refs).
        """
        score_refs = [[[] for _ in sh.parts] for sh in pending.plan]
        score_meta_refs = []
        waiting = {pending.meta_refs[s]: s for s in range(len(pending.plan))}
        deadline = time.monotonic() + self.cfg.cluster.call_timeout_s
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RemoteCallError(f"rollout.generate did not finish within {self.cfg.cluster.call_timeout_s:g} s "
                                      "(cluster.call_timeout_s)")
            s = waiting.pop(ready[0])
            replica = pending.plan[s].replica
            try:
                meta = ray.get(ready[0])  # the small meta: raises if the replica died
                if meta["weight_version"] != pending.weight_version:  # restarted with its initial weights
                    raise ray.exceptions.RayActorError(f"rollout replica {replica} holds weight version "
                                                       f"{meta['weight_version']}, expected {pending.weight_version}")
            except _REPLICA_GONE as e:
                self._recover_rollout(replica, e)
                # this shard and the replica's others still queued are lost with it: generate them again
                redo = [s, *(o for o in waiting.values() if pending.plan[o].replica == replica)]
                waiting = {k: v for k, v in waiting.items() if v not in redo}
                for other in redo:
                    self._submit_shard(pending, other)
                    waiting[pending.meta_refs[other]] = other
                continue
            score_meta_refs += self._score_shard(pending, s, score_refs[s])
        inputs = [[] for _ in range(self.cfg.learner.world_size)]
        for rank, parts in enumerate(parts_by_rank(pending.plan, self.cfg.learner.world_size)):
            inputs[rank] = [{"mini_batch": p.mini_batch, "batch": pending.part_refs[s][j], "scores": score_refs[s][j]}
                            for s, j, p in parts]
        return inputs, score_meta_refs

    def _score_shard(self, pending: PendingRollout, s: int, out: list) -> list:
        """Calls to each teacher with rows in shard ``s``, each returning one ref per part it scored.

        A dedicated teacher group with more replicas than the step has shards splits each shard's rows
        among its replicas (every replica scores at once); otherwise one replica per shard, in turn."""
        metas = []
        names = self.roles.teacher_names
        # a pool replica runs its calls in order: its teacher of the previous call first (no swap for it)
        last = self.__dict__.setdefault("_pool_last", {})  # (pool, replica) -> teacher of its latest call
        slot = {n: (self.cfg.teachers.models[n].pool, pool_replica(self.cfg, names, n)) for n in names}
        order = sorted(range(len(names)), key=lambda t: last.get(slot[names[t]]) != names[t])
        for t in order:
            name = names[t]
            rows = [np.nonzero((tp == t).any(axis=1))[0].astype(np.int32) for tp in pending.part_teachers[s]]
            which = [j for j, r in enumerate(rows) if len(r)]
            if not which:
                continue
            group = self.roles.teachers[name]
            replica = slot[name][1]
            if replica is None:  # a dedicated group: its replicas in turn, a shard split among several
                chunks = min(-(-len(group) // len(pending.plan)), max(len(r) for r in rows))
                k = self.state.teacher_rr.get(name, 0)
                self.state.teacher_rr[name] = k + chunks
                split = [np.array_split(r, chunks) for r in rows]  # per part, one piece per replica
                calls = [((k + c) % len(group), [pieces[c] for pieces in split]) for c in range(chunks)]
            else:
                last[slot[name]] = name
                calls = [(replica, rows)]
            signal = resolved_signal(self.cfg, name)
            for replica, sub in calls:
                which = [j for j, r in enumerate(sub) if len(r)]
                *refs, meta_ref = group.actors[replica].score_parts.options(num_returns=len(which) + 1).remote(
                    name, [sub[j] for j in which], self.cfg.algorithm.topk if signal == "topk" else 0,
                    signal == "full_vocab", *[pending.part_refs[s][j] for j in which])
                for j, ref in zip(which, refs):
                    out[j].append(ref)
                metas.append(meta_ref)
        return metas

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

    def _wait_for_rollout(self, i: int) -> None:
        """Until rollout replica ``i`` (restarted by Ray) answers, within ``cluster.call_timeout_s``."""
        timeout = self.cfg.cluster.call_timeout_s
        deadline = time.monotonic() + timeout
        while not _alive(self.roles.rollout.actors[i], timeout_s=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise RemoteCallError(f"rollout replica {i} did not come back within {timeout:g} s")
            time.sleep(1.0)

    def _sync_weights(self) -> float:
        version = self.state.weight_version + 1
        try:
            seconds = sync_weights(self.cfg, self.roles.learners, self.roles.rollout, version)
        except (*_REPLICA_GONE, RemoteCallError, ray.exceptions.RayTaskError) as e:
            # a learner rank that died mid-stream shows on the other members as a lost peer: the learner
            # group's recovery (which restarts the engines too, as they may sit in a receive from it)
            gone = [i for i, a in enumerate(self.roles.learners.actors) if not _alive(a, timeout_s=5.0)]
            if gone:
                raise WorkerDiedError(f"learner rank {gone[0]} died during the weight sync ({type(e).__name__}). "
                                      f"{self._resume_hint()}") from None
            dead = [i for i, a in enumerate(self.roles.rollout.actors) if not _alive(a, timeout_s=5.0)]
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

    def _maybe_evaluate(self, force: bool = False) -> None:
        """Greedy accuracy and pass@k on the held-out split, through the rollout engines."""
        every, step = self.cfg.run.eval_every, self.state.step
        if every <= 0 or not self.pool.eval or not (force or step % every == 0):
            return
        if getattr(self, "_last_eval_step", None) == step:
            return
        self._last_eval_step = step
        from .evaluate import merge_results, per_domain_subset

        prompts = per_domain_subset(self.pool.eval, self.cfg.run.eval_max_prompts)
        items = [{"prompt_ids": p["prompt_ids"], "domain": p["domain"], "answer": p.get("answer")} for p in prompts]
        shards = np.array_split(np.arange(len(items)), len(self.roles.rollout))
        refs = [a.evaluate.remote([items[j] for j in idx], self.cfg.run.eval_pass_k, self.cfg.run.seed)
                for a, idx in zip(self.roles.rollout.actors, shards)]
        self.eval_history.append((step, self.logger.log_eval(step, merge_results(self._get(refs, "evaluate")))))

    def _count_teacher_restarts(self, scores: list) -> int:
        """A replica that answers from a new process was restarted by Ray (its calls were retried)."""
        pids = self.__dict__.setdefault("_teacher_pids", {})
        for m in scores:
            key = (m.get("pool") or m["teacher"], m["replica"])  # a pool replica is one process for its teachers
            if key in pids and pids[key] != m["pid"]:
                self.state.teacher_restarts += 1
            pids[key] = m["pid"]
        return self.state.teacher_restarts

    def _side_metrics(self, pending: PendingRollout, score_meta_refs: list, step_s: float) -> dict:
        """Small numbers the roles report about their own work (never the payloads)."""
        import psutil

        gen = self._get(pending.meta_refs, "rollout meta")
        scores = self._get(score_meta_refs, "teacher meta")
        tokens = sum(m["response_tokens"] for m in gen)
        busy: dict = {}  # a replica generates its shards one after another
        for m in gen:
            busy[m["replica"]] = busy.get(m["replica"], 0.0) + m["generate_s"]
        gen_s = max(busy.values())
        rows = sum(m["rows"] for m in gen)
        out = {"step_s": step_s, "rollout/tokens_per_s": tokens / max(gen_s, 1e-9), "rollout/generate_s": gen_s,
               "rollout/mean_response_len": tokens / max(rows, 1),
               "rollout/finished_fraction": sum(m["finished"] for m in gen) / max(rows, 1),
               "weight_version": self.state.weight_version,
               # how many updates behind the learner the trained rollouts were (0 on-policy, 1 with overlap)
               "rollout/staleness": self.state.weight_version - 1 - min(m["weight_version"] for m in gen),
               # of the batch trained (the sampler itself may be ahead: a next rollout already launched)
               "data/epoch": pending.sampler_after["epoch"], "data/consumed": pending.sampler_after["consumed"],
               "data/dropped_too_long": self.pool.dropped_too_long, "faults/rollout_retries": self.state.rollout_retries,
               "faults/skipped_steps": self.state.skipped_steps, "faults/learner_restarts": self.learner_restarts,
               "faults/steps_redone": self.steps_redone,
               "faults/teacher_restarts": self._count_teacher_restarts(scores)}
        sums, counts = {}, {}
        for m in gen:
            for d, v in m["reward_sum_by_domain"].items():
                sums[d] = sums.get(d, 0.0) + v
                counts[d] = counts.get(d, 0) + m["reward_count_by_domain"][d]
        for d in sums:
            out[f"reward/{d}"] = sums[d] / counts[d]
        if sums:
            out["reward/mean"] = sum(sums.values()) / sum(counts.values())
        out["reward/timeouts"] = sum(m.get("reward_timeouts", 0) for m in gen)
        out["driver/fetched_bytes"] = self.driver_fetched_bytes - self._fetched_at_last_log
        out["driver/rss_mb"] = psutil.Process().memory_info().rss / 2**20
        self._fetched_at_last_log = self.driver_fetched_bytes
        for name in self.roles.teacher_names:
            lat = [m["latency_s"] for m in scores if m["teacher"] == name]
            if lat:
                out[f"teacher/{name}/score_latency_s"] = float(np.mean(lat))
                out[f"teacher/{name}/payload_bytes"] = sum(m["bytes"] for m in scores if m["teacher"] == name)
                out[f"teacher/{name}/replicas_busy"] = len({m["replica"] for m in scores if m["teacher"] == name})
            else:
                log.warning("teacher '%s' got no rows at step %d", name, pending.step)
        for m in scores:  # teacher pools: swaps, their seconds, and rows per teacher per replica
            if "pool" in m:
                key = f"pool/{m['pool']}"
                out[f"{key}/swaps"] = out.get(f"{key}/swaps", 0) + m["swaps"]
                out[f"{key}/swap_s"] = out.get(f"{key}/swap_s", 0.0) + m["swap_s"]
                rows_key = f"{key}/rows/{m['teacher']}/replica{m['replica']}"
                out[rows_key] = out.get(rows_key, 0) + m["rows"]
        return out


def _alive(actor, timeout_s: float = 30.0) -> bool:
    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
        return True
    except Exception:
        return False


def _np_state_json(st) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_state(st) -> tuple:
    return (st[0], np.asarray(st[1], dtype=np.uint32), st[2], st[3], st[4])


def _tuple_state(st):
    return (st[0], tuple(st[1]), st[2])
