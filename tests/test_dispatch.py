"""The per-rank dispatch plan: every prompt once, mini-batches independent of the world size, whole groups."""

import numpy as np
import pytest

from mopd_ray.batch import RolloutBatch, TeacherScores, pad_sequences
from mopd_ray.dispatch import cell_of, parts_by_rank, plan_step, split_batch


@pytest.mark.parametrize("P,S,R,W,M", [(16, 2, 1, 1, 1), (16, 4, 2, 2, 1), (16, 3, 2, 4, 2), (64, 5, 2, 4, 4),
                                       (8, 8, 1, 2, 2)])
def test_plan_covers_each_prompt_once_in_its_cell(P, S, R, W, M):
    shards = plan_step(P, S, R, W, M)
    assert len(shards) == S and {sh.replica for sh in shards} == set(range(min(R, S)))
    seen = []
    for sh in shards:
        for part in sh.parts:
            prompts = sh.prompts[part.prompts]
            mini, rank = cell_of(prompts, P, W, M)
            assert set(mini.tolist()) == {part.mini_batch} and set(rank.tolist()) == {part.rank}
            seen += prompts.tolist()
    assert sorted(seen) == list(range(P))
    by_rank = parts_by_rank(shards, W)
    for r in range(W):  # every rank gets P / W prompts, P / (W M) per mini-batch
        counts = np.bincount([p.mini_batch for _, _, p in by_rank[r] for _ in p.prompts], minlength=M)
        assert counts.tolist() == [P // (W * M)] * M


def test_mini_batch_membership_does_not_depend_on_world_size():
    P, M = 32, 4
    members = {}
    for W in (1, 2, 4):
        mini, _ = cell_of(np.arange(P), P, W, M)
        members[W] = mini.tolist()
    assert members[1] == members[2] == members[4]


def test_plan_rejects_uneven_cells():
    with pytest.raises(ValueError, match="do not split"):
        plan_step(6, 2, 1, 4, 1)


def test_split_batch_keeps_groups_and_scores_on_their_rows():
    n, P = 2, 8
    seqs = [[1] * 3 + [5 + i] * (1 + i % 4) for i in range(n * P)]
    tokens = pad_sequences(seqs, 0)
    plens = np.full(n * P, 3, np.int32)
    rlens = np.array([len(s) - 3 for s in seqs], np.int32)
    batch = RolloutBatch(tokens, plens, rlens, np.zeros(tokens.shape, np.float32), np.repeat(np.arange(P), n),
                         np.arange(n * P, dtype=np.int32) % 2, np.zeros(n * P, np.float32), np.ones(n * P, bool),
                         tuple("d" for _ in seqs))
    scores = []
    for t in (0, 1):
        rows = np.nonzero(batch.teacher_index_BS[:, 0] == t)[0].astype(np.int32)
        lp = np.stack([np.pad(np.full(rlens[r], float(r)), (0, rlens.max() - rlens[r])) for r in rows]).astype(np.float32)
        scores.append(TeacherScores(f"t{t}", rows, plens[rows], lp))
    out = split_batch(batch, scores, world=2, n_mini=2)
    total = 0
    for rank_parts in out:
        for p in rank_parts:
            b = p["batch"]
            total += b.num_rows
            assert b.tokens_BL.shape[1] == int((b.prompt_lens_B + b.response_lens_B).max())
            groups, counts = np.unique(b.group_ids_B, return_counts=True)
            assert (counts == n).all()  # whole groups
            for s in p["scores"]:  # each score row still carries the original row's values
                for i, r in enumerate(s.rows_R):
                    orig = np.nonzero((batch.group_ids_B == b.group_ids_B[r]) &
                                      (batch.teacher_index_BS[:, 0] == b.teacher_index_BS[r, 0]))[0][0]
                    assert s.teacher_logprobs_RT[i, 0] == float(orig)
    assert total == n * P
