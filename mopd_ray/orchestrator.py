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
from pathlib import Path

import numpy as np
import ray
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from .cluster import RemoteCallError, WorkerDiedError, gather_fail_fast, get_with_deadline, init_ray
from .data.prompts import build_prompt_pool, make_sampler
from .metrics import MetricsLogger
from .pipeline import StepPipeline
from .recovery import NonFiniteStepsError, Recovery  # noqa: F401  (NonFiniteStepsError: raised by run())
from .reporting import Reporting
from .roles import build_roles, sync_weights
from .run_identity import RunStart, plan_run
from .run_state import RunState

log = logging.getLogger(__name__)


class Orchestrator(StepPipeline, Recovery, Reporting):
    """The loop, start-up, resume and checkpoints; launching and scoring rollouts (mopd_ray/pipeline.py),
    failure handling (mopd_ray/recovery.py) and reporting (mopd_ray/reporting.py) are its mixins."""

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
        last: dict = {}
        clean = False
        try:
            self._start()
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
            clean = True
        finally:
            if getattr(self, "logger", None) is not None:
                self.logger.close()
            if getattr(self, "roles", None) is not None:  # a clean end keeps them warm for a next run
                self.roles.shutdown(park=clean and self.cfg.cluster.reuse_engines)
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
        check = getattr(self.roles.rollout, "last_sync_check", None)
        if check:
            metrics["weight_sync/probe_gap"], metrics["weight_sync/check_s"] = check["probe_gap"], check["check_s"]
        self._phase = "train"
        return metrics

    # ------------------------------------------------------------------ start, resume, checkpoints
    def _start(self) -> None:
        cfg = self.cfg
        from transformers import AutoTokenizer

        from .config import resource_demand

        from .storage import check_writable_locations, probe_shared_storage

        if self.start is None:  # mopd_ray.main checked and planned before any engine started
            check_writable_locations(cfg, self.run_dir)
            self.start = plan_run(cfg)
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
        self.rollout_pids = dict(enumerate(self._get(self.roles.rollout.call_all("pid"), "rollout pids")))
        # each teacher replica's process now: a call answered from another process later is a restart
        self._teacher_pids = {}
        for name, group in self.roles.teachers.items():
            key = cfg.teachers.models[name].pool or name
            for i, pid in enumerate(self._get(group.call_all("pid"), "teacher pids")):
                self._teacher_pids[(key, i)] = pid
        placement = self.roles.placement()
        (Path(self.run_dir) / "placement.json").write_text(json.dumps(placement, indent=1))
        log.debug("placement (node ids by role): %s", {k: [n[:8] for n in v] for k, v in placement.items() if k != "learner_ranks"})
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
        self._restored()
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
        state = {"step": step, "run_state": {**self.state.state_dict(), **self.carry_state(in_flight)},
                 "rng": {"python": random.getstate(), "numpy": _np_state_json(np.random.get_state())},
                 "config": OmegaConf.to_container(cfg, resolve=True), "identity": self.start.identity.record()}
        self.last_checkpoint = ckpt.commit(tmp, step, state, keep=cfg.run.keep_checkpoints)
        log.debug("checkpoint %s written in %.1f s", self.last_checkpoint, time.perf_counter() - t0)

    def _get(self, refs, what: str):
        out = get_with_deadline(refs, what, self.cfg.cluster.call_timeout_s)
        self.driver_fetched_bytes += len(ray.cloudpickle.dumps(out))
        return out


def _np_state_json(st) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_state(st) -> tuple:
    return (st[0], np.asarray(st[1], dtype=np.uint32), st[2], st[3], st[4])


def _tuple_state(st):
    return (st[0], tuple(st[1]), st[2])
