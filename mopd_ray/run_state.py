"""The driver's state of a run (what a checkpoint holds) and of a rollout in flight."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # multi-turn episodes carried over (env.carry_over): the next group id, and the prompts sent to the rollout
    # replicas whose groups have not come back yet ({group id: {"replica", "step", "item"}})
    next_group: int = 0
    in_flight: dict = field(default_factory=dict)

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
    group_before: int = 0  # RunState.next_group before this batch's prompts took theirs (carried episodes)
