"""The driver loop. It holds ObjectRefs and small metadata only: trajectories, teacher scores and
weights go from actor to actor through the object store and never enter this process.

One step: sample prompts -> rollout shards -> each shard, as soon as it is ready, to the teachers of
its rows -> learners train on the refs -> weight sync -> metrics. With ``max_staleness=1`` the next
step's rollout is launched before this step's update, overlapping generation with training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from omegaconf import OmegaConf

from .cluster import get_with_deadline, init_ray
from .config import resolved_signal
from .data.prompts import build_prompt_pool, make_sampler
from .metrics import MetricsLogger
from .roles import build_roles, student_fingerprint, sync_weights

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything a resumable checkpoint must hold, in one place."""

    step: int = 0
    weight_version: int = 0
    sampler: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    teacher_rr: dict = field(default_factory=dict)  # round-robin position per teacher
    rows_trained: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PendingRollout:
    step: int
    shard_refs: list
    meta_refs: list
    shard_rows: list  # per shard: teacher index of each row (small, known from the prompts)


class Orchestrator:
    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.state = RunState()
        self.driver_fetched_bytes = 0  # what ray.get brought into this process (metadata only)
        self._fetched_at_last_log = 0
        self.eval_history: list = []  # (step, flat eval metrics)

    # ------------------------------------------------------------------ helpers
    def _get(self, refs, what: str):
        out = get_with_deadline(refs, what, self.cfg.cluster.call_timeout_s)
        self.driver_fetched_bytes += len(ray.cloudpickle.dumps(out))
        return out

    def _launch_rollout(self, step: int) -> PendingRollout:
        cfg = self.cfg
        prompts = self.sampler.next_batch()
        n, R = cfg.rollout.n_samples_per_prompt, len(self.roles.rollout)
        base = step * cfg.data.prompts_per_step
        items = [{"prompt_ids": p["prompt_ids"], "domain": p["domain"], "answer": p.get("answer"),
                  "group_id": base + i, "teacher_index": p["teacher_index"]} for i, p in enumerate(prompts)]
        shards = [s.tolist() for s in np.array_split(np.arange(len(items)), R)]
        shard_refs, meta_refs, shard_rows = [], [], []
        for i, idx in enumerate(shards):
            batch_ref, meta_ref = self.roles.rollout.actors[i].generate.options(num_returns=2).remote(
                [items[j] for j in idx], step, cfg.run.seed)
            shard_refs.append(batch_ref)
            meta_refs.append(meta_ref)
            shard_rows.append(np.repeat([items[j]["teacher_index"] for j in idx], n))
        return PendingRollout(step, shard_refs, meta_refs, shard_rows)

    def _score(self, pending: PendingRollout) -> tuple:
        """Send each shard to its rows' teachers as soon as that shard is ready (refs only)."""
        score_refs = [[] for _ in pending.shard_refs]
        score_meta_refs = []
        index = {ref: i for i, ref in enumerate(pending.shard_refs)}
        waiting = list(pending.shard_refs)
        deadline = time.monotonic() + self.cfg.cluster.call_timeout_s
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()),
                                      fetch_local=False)
            if not ready:
                from .cluster import RemoteCallError

                raise RemoteCallError(f"rollout.generate did not finish within {self.cfg.cluster.call_timeout_s:g} s")
            i = index[ready[0]]
            for t, name in enumerate(self.roles.teacher_names):
                rows = np.nonzero(pending.shard_rows[i] == t)[0].astype(np.int32)
                if len(rows) == 0:
                    continue
                group = self.roles.teachers[name]
                k = self.state.teacher_rr.get(name, 0)
                self.state.teacher_rr[name] = k + 1
                signal = resolved_signal(self.cfg, name)
                scores_ref, meta_ref = group.actors[k % len(group)].score.options(num_returns=2).remote(
                    ready[0], rows, self.cfg.algorithm.topk if signal == "topk" else 0, signal == "full_vocab")
                score_refs[i].append(scores_ref)
                score_meta_refs.append(meta_ref)
        return score_refs, score_meta_refs

    def _sync_weights(self) -> float:
        version = self.state.weight_version + 1
        seconds = sync_weights(self.cfg, self.roles.learners, self.roles.rollout, version)
        self.state.weight_version = version
        return seconds

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        from transformers import AutoTokenizer

        from .config import resource_demand

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.pool = build_prompt_pool(cfg, tokenizer)
        self.sampler = make_sampler(self.pool, cfg)
        init_ray(cfg.cluster, resource_demand(cfg)["CPU"], gpu=resource_demand(cfg)["GPU"] > 0)
        self.roles = build_roles(cfg, student_fingerprint(tokenizer, cfg.model.path))
        placement = self.roles.placement()
        (Path(self.run_dir) / "placement.json").write_text(json.dumps(placement, indent=1))
        log.info("placement (node ids by role): %s", {k: [n[:8] for n in v] for k, v in placement.items()})
        logger = MetricsLogger(self.run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logging,
                               cfg.run.total_steps, cfg.run.name)
        last: dict = {}
        self.logger = logger
        try:
            self._maybe_evaluate(force=True)
            pending = self._launch_rollout(self.state.step)
            while self.state.step < cfg.run.total_steps:
                step = self.state.step
                t0 = time.perf_counter()
                score_refs, score_meta_refs = self._score(pending)
                current = pending
                if cfg.algorithm.max_staleness == 1 and step + 1 < cfg.run.total_steps:
                    pending = self._launch_rollout(step + 1)  # overlaps this update; one version stale
                metrics = self._get(self.roles.learners.call_all("train_step", current.shard_refs, score_refs, step),
                                    "learner.train_step")[0]
                metrics["weight_sync_s"] = self._sync_weights()
                if cfg.algorithm.max_staleness == 0 and step + 1 < cfg.run.total_steps:
                    pending = self._launch_rollout(step + 1)
                metrics.update(self._side_metrics(current, score_meta_refs, time.perf_counter() - t0))
                self.state.step += 1
                self.state.rows_trained += int(sum(len(r) for r in current.shard_rows))
                self.state.sampler = self.sampler.state_dict()
                logger.log(step, metrics)
                last = metrics
                self._maybe_evaluate(force=self.state.step == cfg.run.total_steps)
            self._get(self.roles.learners.call_all("save_pretrained", f"{self.run_dir}/student_final"),
                      "export student")
        finally:
            logger.close()
            self.roles.shutdown()
        return last

    def _maybe_evaluate(self, force: bool = False) -> None:
        """Greedy accuracy and pass@k on the held-out split, through the rollout engines."""
        every, step = self.cfg.run.eval_every, self.state.step
        if every <= 0 or not self.pool.eval or not (force or step % every == 0):
            return
        if getattr(self, "_last_eval_step", None) == step:
            return
        self._last_eval_step = step
        from .evaluate import merge_results

        prompts = self.pool.eval
        if self.cfg.run.eval_max_prompts:
            prompts = prompts[: self.cfg.run.eval_max_prompts]
        items = [{"prompt_ids": p["prompt_ids"], "domain": p["domain"], "answer": p.get("answer")} for p in prompts]
        shards = np.array_split(np.arange(len(items)), len(self.roles.rollout))
        refs = [a.evaluate.remote([items[j] for j in idx], self.cfg.run.eval_pass_k, self.cfg.run.seed)
                for a, idx in zip(self.roles.rollout.actors, shards)]
        self.eval_history.append((step, self.logger.log_eval(step, merge_results(self._get(refs, "evaluate")))))

    def _side_metrics(self, pending: PendingRollout, score_meta_refs: list, step_s: float) -> dict:
        """Small numbers the roles report about their own work (never the payloads)."""
        gen = self._get(pending.meta_refs, "rollout meta")
        scores = self._get(score_meta_refs, "teacher meta")
        tokens = sum(m["response_tokens"] for m in gen)
        gen_s = max(m["generate_s"] for m in gen)
        rows = sum(m["rows"] for m in gen)
        out = {"step_s": step_s, "rollout/tokens_per_s": tokens / max(gen_s, 1e-9), "rollout/generate_s": gen_s,
               "rollout/mean_response_len": tokens / max(rows, 1),
               "rollout/finished_fraction": sum(m["finished"] for m in gen) / max(rows, 1),
               "weight_version": self.state.weight_version,
               # how many updates behind the learner the trained rollouts were (0 on-policy, 1 with overlap)
               "rollout/staleness": self.state.weight_version - 1 - min(m["weight_version"] for m in gen),
               "data/epoch": self.sampler.epoch,
               "data/consumed": self.sampler.consumed, "data/dropped_too_long": self.pool.dropped_too_long}
        sums, counts = {}, {}
        for m in gen:
            for d, v in m["reward_sum_by_domain"].items():
                sums[d] = sums.get(d, 0.0) + v
                counts[d] = counts.get(d, 0) + m["reward_count_by_domain"][d]
        for d in sums:
            out[f"reward/{d}"] = sums[d] / counts[d]
        if sums:
            out["reward/mean"] = sum(sums.values()) / sum(counts.values())
        import psutil

        out["driver/fetched_bytes"] = self.driver_fetched_bytes - self._fetched_at_last_log
        out["driver/rss_mb"] = psutil.Process().memory_info().rss / 2**20
        self._fetched_at_last_log = self.driver_fetched_bytes
        for name in self.roles.teacher_names:
            lat = [m["latency_s"] for m in scores if m["teacher"] == name]
            if lat:
                out[f"teacher/{name}/score_latency_s"] = float(np.mean(lat))
                out[f"teacher/{name}/payload_bytes"] = sum(m["bytes"] for m in scores if m["teacher"] == name)
            else:
                log.warning("teacher '%s' got no rows at step %d", name, pending.step)
        return out
