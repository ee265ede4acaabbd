"""One step's rollout and teacher scoring, as refs: the batch is sharded over the rollout replicas and
addressed per learner rank (mopd_ray/dispatch.py); each shard goes to the teachers of its rows as soon as
it is ready, so teachers score while generation goes on; a replica lost mid-step generates its shards
again with the same prompts and seeds."""

from __future__ import annotations

import time

import numpy as np
import ray

from .cluster import RemoteCallError
from .config import resolved_signal
from .dispatch import parts_by_rank, plan_step
from .envs.base import ENV_ROW_KEYS
from .recovery import _REPLICA_GONE
from .roles import pool_replica
from .run_state import PendingRollout


def rollout_item(p: dict, group_id: int) -> dict:
    """What a rollout replica is sent of a prompt row (an episode's environment also gets the row itself)."""
    item = {"prompt_ids": p["prompt_ids"], "domain": p["domain"], "answer": p.get("answer"), "group_id": group_id,
            "teacher_index": p["teacher_index"], "route_weight": p["route_weight"]}
    if p.get("env"):
        item["env"] = p["env"]
        item["row"] = {k: p[k] for k in ENV_ROW_KEYS if k in p}
    return item


class StepPipeline:
    """Launching and scoring rollouts (a mixin of mopd_ray.orchestrator.Orchestrator: its state)."""

    def _launch_rollout(self, step: int) -> PendingRollout:
        cfg = self.cfg
        before = self.sampler.state_dict()
        prompts = self.sampler.next_batch()
        n, R = cfg.rollout.n_samples_per_prompt, len(self.roles.rollout)
        base = step * cfg.data.prompts_per_step
        items = [rollout_item(p, base + i) for i, p in enumerate(prompts)]
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
        if self.cfg.learner.balance_tokens:  # every rank sees every part and keeps a token-balanced share of them
            inputs = [[p for parts in inputs for p in parts]] * len(inputs)
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
