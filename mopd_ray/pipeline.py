"""One step's rollout and teacher scoring, as refs: the batch is sharded over the rollout replicas and
addressed per learner rank (mopd_ray/dispatch.py); each shard goes to the teachers of its rows as soon as
it is ready, so teachers score while generation goes on; a replica lost mid-step generates its shards
again with the same prompts and seeds."""

from __future__ import annotations

import math
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
        before, group_before = self.sampler.state_dict(), self.state.next_group
        prompts = self.sampler.next_batch()
        n, R = cfg.rollout.n_samples_per_prompt, len(self.roles.rollout)
        base = step * cfg.data.prompts_per_step
        carry = self._carries()
        items = [rollout_item(p, self._group_id(carry, base + i)) for i, p in enumerate(prompts)]
        plan = plan_step(len(items), R * cfg.rollout.shards_per_replica, R, cfg.learner.world_size,
                         cfg.learner.mini_batches_per_step)
        shard_items = [[items[j] for j in sh.prompts] for sh in plan]
        if carry:
            self._carry_extras(step, plan, shard_items)
        part_teachers = [[np.repeat(np.array([shard_items[sh.index][j]["teacher_index"] for j in part.prompts],
                                             np.int32).reshape(len(part.prompts), -1), n, axis=0)
                          for part in sh.parts] for sh in plan]
        pending = PendingRollout(step, before, plan, shard_items, [None] * len(plan), [None] * len(plan),
                                 part_teachers, self.state.weight_version, self.sampler.state_dict(), group_before)
        for sh in plan:
            self._submit_shard(pending, sh.index)
        return pending

    # ------------------------------------------------------------------ multi-turn episodes carried over
    def _carries(self) -> bool:
        """Episodes carry over between steps: env.carry_over > 0 and some training row has an environment."""
        if "_carry" not in self.__dict__:
            self._carry = self.cfg.env.carry_over > 0 and any(r.get("env") for r in self.pool.train)
        return self._carry

    def _group_id(self, carry: bool, default: int) -> int:
        if not carry:
            return default
        self.state.next_group += 1
        return self.state.next_group - 1

    def _carry_extras(self, step: int, plan: list, shard_items: list) -> None:
        """Prompts beyond the step's: at a run's first launch, env.carry_over x the step's prompts (the share of
        groups in flight from then on); after a restore, the prompts the checkpoint had in flight. Each goes to
        a shard in turn, and every prompt sent is recorded in flight until its group comes back."""
        resend = self.__dict__.pop("_resend", None)
        if resend is not None:
            extras = resend
        elif not self.state.in_flight:
            k = math.ceil(self.cfg.env.carry_over * self.cfg.data.prompts_per_step)
            extras = [rollout_item(p, self._group_id(True, 0)) for p in self.sampler.next_batch(k)]
        else:
            extras = []
        for j, item in enumerate(extras):
            shard_items[j % len(plan)].append(item)
        for sh in plan:
            for item in shard_items[sh.index]:
                self.state.in_flight[str(item["group_id"])] = {"replica": sh.replica, "step": step, "item": item}

    def _came_back(self, pending: PendingRollout, s: int, meta: dict) -> None:
        """A carried shard's groups came back: no longer in flight; its parts' teachers are those groups'."""
        if "groups" not in meta:
            return
        for g in meta["groups"]:
            self.state.in_flight.pop(str(g), None)
        pending.part_teachers[s] = meta["part_teachers"]

    def _lost_with(self, pending: PendingRollout, replica: int, redo: list) -> None:
        """A replica died with its carried episodes: its prompts in flight go out again with its first redone shard."""
        if not self._carries():
            return
        sent = {str(i["group_id"]) for s in redo for i in pending.shard_items[s]}
        lost = [v["item"] for g, v in self.state.in_flight.items() if v["replica"] == replica and g not in sent]
        pending.shard_items[redo[0]] = pending.shard_items[redo[0]] + lost

    def carry_state(self, oldest_pending) -> dict:
        """What a checkpoint keeps of the carried episodes: the prompts in flight that were sent before the oldest
        batch not yet trained on (that batch is drawn again on resume), and the group counter then."""
        if oldest_pending is None:
            return {"in_flight": dict(self.state.in_flight), "next_group": self.state.next_group}
        return {"in_flight": {g: v for g, v in self.state.in_flight.items() if v["step"] < oldest_pending.step},
                "next_group": oldest_pending.group_before}

    def _restored(self) -> None:
        """After a restore (resume, learner recovery): the engines forget their carried episodes and the prompts
        the checkpoint had in flight go out again with the next launch."""
        if not self._carries():
            return
        self._get(self.roles.rollout.call_all("drop_episodes"), "rollout.drop_episodes")
        self._resend = [v["item"] for v in self.state.in_flight.values()]

    def _submit_shard(self, pending: PendingRollout, s: int) -> None:
        sh = pending.plan[s]
        want = len(sh.prompts) if self._carries() else None
        *part_refs, meta_ref = self.roles.rollout.actors[sh.replica].generate.options(
            num_returns=len(sh.parts) + 1).remote(pending.shard_items[s], pending.step, self.cfg.run.seed,
                                                  sh.part_prompt_lists(), want)
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
                self._lost_with(pending, replica, redo)
                for other in redo:
                    self._submit_shard(pending, other)
                    waiting[pending.meta_refs[other]] = other
                continue
            self._came_back(pending, s, meta)
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
