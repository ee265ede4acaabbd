"""Which learner rank trains which rows: the per-rank dispatch plan of one step (pure numpy, no ray).

A step's prompts are laid out in order. Mini-batch m is a contiguous block of P / n_mini prompts;
inside it, rank r owns a contiguous slice of P / (n_mini x world) prompts: that (mini-batch, rank)
pair is a *cell*. Rollout shards are a contiguous split of the prompts into S pieces (S may exceed
the replicas, so teachers score finished shards while others are still generating). A *part* is the
intersection of a shard and a cell: the rollout worker returns one object per part, teachers score
parts, and each rank fetches exactly its parts, so bytes per rank are 1/world of the step.

Two properties the math relies on:
- the rows of a mini-batch do not depend on the world size (so losses are equal at any world size);
- all samples of a prompt stay in one part (GRPO group statistics need no communication).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """Prompts ``prompts`` (indices into the shard's prompt list) go to ``rank`` in ``mini_batch``."""

    shard: int
    rank: int
    mini_batch: int
    prompts: np.ndarray  # int, indices into the shard's prompts


@dataclass(frozen=True)
class Shard:
    index: int
    replica: int
    prompts: np.ndarray  # int, indices into the step's prompts
    parts: tuple  # tuple[Part, ...], in prompt order

    def part_prompt_lists(self) -> list:
        """What the rollout worker is told: per part, indices into this shard's prompts."""
        return [p.prompts.tolist() for p in self.parts]


def cell_of(prompt: np.ndarray, n_prompts: int, world: int, n_mini: int) -> tuple:
    """(mini-batch, rank) of each prompt index."""
    per_mini = n_prompts // n_mini
    per_cell = per_mini // world
    return prompt // per_mini, (prompt % per_mini) // per_cell


def plan_step(n_prompts: int, n_shards: int, replicas: int, world: int, n_mini: int) -> list:
    """The shards of one step, each with its parts. ``n_prompts`` must divide into n_mini x world cells."""
    if n_prompts % (n_mini * world):
        raise ValueError(f"{n_prompts} prompts do not split into {n_mini} mini-batches x {world} ranks")
    n_shards = max(1, min(n_shards, n_prompts))
    shards = []
    for s, idx in enumerate(np.array_split(np.arange(n_prompts), n_shards)):
        mini, rank = cell_of(idx, n_prompts, world, n_mini)
        key = mini * world + rank
        parts = []
        for k in np.unique(key):  # contiguous prompts, so each cell's slice is one run
            local = np.nonzero(key == k)[0]
            parts.append(Part(s, int(k % world), int(k // world), local))
        shards.append(Shard(s, s % replicas, idx, tuple(parts)))
    return shards


def parts_by_rank(shards: list, world: int) -> list:
    """[rank] -> list of (shard index, part position in the shard, Part), in prompt order."""
    out = [[] for _ in range(world)]
    for sh in shards:
        for j, p in enumerate(sh.parts):
            out[p.rank].append((sh.index, j, p))
    return out


def split_batch(batch, scores: list, world: int, n_mini: int) -> list:
    """Dispatch a whole batch already in hand (tests, benchmarks): [rank] -> list of
    {"mini_batch", "batch": RolloutBatch, "scores": [TeacherScores]}, by the same cells as ``plan_step``.

    Prompts are the groups of ``batch.group_ids_B`` in order of first appearance.
    """
    _, first, inverse = np.unique(batch.group_ids_B, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # group -> prompt position in the batch
    prompt_of_row = order[inverse]
    mini, rank = cell_of(prompt_of_row, len(first), world, n_mini)
    out = [[] for _ in range(world)]
    for m in range(n_mini):
        for r in range(world):
            rows = np.nonzero((mini == m) & (rank == r))[0]
            part_scores = [c for c in (s.restrict(rows) for s in scores) if c is not None]  # the part's rows
            out[r].append({"mini_batch": m, "batch": batch.take(rows), "scores": part_scores})
    return out


def balance_by_tokens(lengths: list, groups: list, minis: list, world: int) -> list:
    """Rows to ranks by tokens (``learner.balance_tokens``): [rank][part] -> the part's rows (sorted indices)
    that rank trains. ``lengths[k]`` / ``groups[k]``: per row of part ``k``, its tokens and its GRPO group;
    ``minis[k]``: the part's mini-batch. Within each mini-batch, whole groups (a prompt's samples: their
    statistics stay on one rank) go to the rank with the fewest tokens so far, largest first (LPT); ties go
    to the lower rank, and every rank computes the same plan from the same inputs. The rows of a
    mini-batch, its loss and its gradient are unchanged; only which rank computes them."""
    out = [[np.zeros(0, np.int64) for _ in lengths] for _ in range(world)]
    for m in sorted(set(minis)):
        items = []  # (tokens, part, group, rows)
        for k in (k for k in range(len(lengths)) if minis[k] == m):
            g = np.asarray(groups[k])
            for gid in np.unique(g):
                rows = np.nonzero(g == gid)[0]
                items.append((int(np.asarray(lengths[k])[rows].sum()), k, rows))
        items.sort(key=lambda it: (-it[0], it[1], int(it[2][0])))
        load = [0] * world
        for tokens, k, rows in items:
            r = min(range(world), key=lambda i: (load[i], i))
            load[r] += tokens
            out[r][k] = np.sort(np.concatenate([out[r][k], rows]))
    return out
