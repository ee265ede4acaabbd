"""What a step reports beyond the learners' own metrics: generation speed and lengths, staleness, rewards,
faults, per-teacher latency and payload, teacher-pool swaps, the driver's own footprint; and the
evaluation through the rollout engines every ``run.eval_every`` steps."""

from __future__ import annotations

import logging

import numpy as np

from .run_state import PendingRollout

log = logging.getLogger("mopd_ray.orchestrator")


class Reporting:
    """Metrics and evaluation (a mixin of mopd_ray.orchestrator.Orchestrator: its state)."""

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
        from .pipeline import rollout_item

        items = [rollout_item(p, i) for i, p in enumerate(prompts)]
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
        out.update(domain_metrics(gen))
        out["reward/timeouts"] = sum(m.get("reward_timeouts", 0) for m in gen)
        out.update(episode_metrics(gen))
        out["driver/fetched_bytes"] = self.driver_fetched_bytes - self._fetched_at_last_log
        out["driver/rss_mb"] = psutil.Process().memory_info().rss / 2**20
        self._fetched_at_last_log = self.driver_fetched_bytes
        out.update(teacher_metrics(self.roles.teacher_names, scores, pending.step))
        return out


def episode_metrics(gen: list) -> dict:
    """Multi-turn episodes of a step (mopd_ray/workers/episodes.py): turns, environment tokens and failures, and
    how long the longest episode held its generate call against the mean episode."""
    eps = [m for m in gen if m.get("episodes")]
    if not eps:
        return {}
    n = sum(m["episodes"] for m in eps)
    out = {"env/episodes": n, "env/turns_mean": sum(m["episode_turns_sum"] for m in eps) / n,
           "env/turns_max": max(m["episode_turns_max"] for m in eps),
           "env/tokens": sum(m["env_tokens"] for m in eps), "env/errors": sum(m["env_errors"] for m in eps),
           "env/timeouts": sum(m["env_timeouts"] for m in eps),
           "env/wait_s_mean": sum(m["env_wait_s_sum"] for m in eps) / n,
           "rollout/episode_s_max": max(m["episode_s_max"] for m in eps),
           "rollout/episode_s_mean": sum(m["episode_s_sum"] for m in eps) / n,
           # env.carry_over: groups left running for a later step, and the oldest weights a trained episode began with
           "env/carried_groups": sum(m.get("episode_groups_carried", 0) for m in eps),
           "env/episode_lag_max": max(m.get("episode_lag_max", 0) for m in eps)}
    for m in eps:
        for d, k in m.get("env_errors_by_domain", {}).items():
            out[f"env/errors/{d}"] = out.get(f"env/errors/{d}", 0) + k
    return out


def domain_metrics(gen: list) -> dict:
    """reward/<domain> and reward/mean, rollout/truncated_fraction and its per-domain parts, from the rollout
    shards' meta (responses cut at rollout.max_new_tokens: rollout.overlong decides their fate)."""
    out, sums, counts, cut, seen = {}, {}, {}, {}, {}
    for m in gen:
        for d, v in m["reward_sum_by_domain"].items():
            sums[d] = sums.get(d, 0.0) + v
            counts[d] = counts.get(d, 0) + m["reward_count_by_domain"][d]
        for d, n in m.get("rows_by_domain", {}).items():
            seen[d] = seen.get(d, 0) + n
            cut[d] = cut.get(d, 0) + m.get("truncated_by_domain", {}).get(d, 0)
    for d in sums:
        out[f"reward/{d}"] = sums[d] / counts[d]
    for d in seen:
        out[f"rollout/truncated_fraction/{d}"] = cut[d] / max(seen[d], 1)
    if seen:
        out["rollout/truncated_fraction"] = sum(cut.values()) / max(sum(seen.values()), 1)
    if sums:
        out["reward/mean"] = sum(sums.values()) / sum(counts.values())
    return out


def teacher_metrics(names: list, scores: list, step: int) -> dict:
    """Per teacher: score latency, payload bytes, replicas busy (and a served teacher's requests, retries, tokens,
    bytes, latency percentiles); per teacher pool: swaps, their seconds, rows per teacher per replica. A teacher
    that got no rows this step is said."""
    out = {}
    for name in names:
        mine = [m for m in scores if m["teacher"] == name]
        if not mine:
            log.warning("teacher '%s' got no rows at step %d", name, step)
            continue
        out[f"teacher/{name}/score_latency_s"] = float(np.mean([m["latency_s"] for m in mine]))
        out[f"teacher/{name}/payload_bytes"] = sum(m["bytes"] for m in mine)
        out[f"teacher/{name}/replicas_busy"] = len({m["replica"] for m in mine})
        served = [m for m in mine if "endpoint_requests" in m]
        if served:  # a teacher served elsewhere (workers/endpoint.py): its requests, retries, latencies
            for k in ("endpoint_requests", "endpoint_retries", "endpoint_tokens", "endpoint_bytes"):
                out[f"teacher/{name}/{k}"] = sum(m[k] for m in served)
            for k in ("endpoint_latency_p50_s", "endpoint_latency_p95_s"):
                out[f"teacher/{name}/{k}"] = float(np.nanmax([m[k] for m in served]))
    for m in scores:  # teacher pools: swaps, their seconds, and rows per teacher per replica
        if "pool" in m:
            key = f"pool/{m['pool']}"
            out[f"{key}/swaps"] = out.get(f"{key}/swaps", 0) + m["swaps"]
            out[f"{key}/swap_s"] = out.get(f"{key}/swap_s", 0.0) + m["swap_s"]
            rows_key = f"{key}/rows/{m['teacher']}/replica{m['replica']}"
            out[rows_key] = out.get(rows_key, 0) + m["rows"]
    return out
