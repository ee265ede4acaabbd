"""Per-rank dispatch on real DeepSpeed ranks: equal losses at world 1, 2 and 4, each rank fetching 1/world."""

import numpy as np
import pytest
import ray

from mopd_ray.batch import RolloutBatch, TeacherScores, pad_sequences
from mopd_ray.roles import make_learner_group, setup_learners
from mopd_ray.warm import WARM
from .conftest import compose_cfg
from .test_weight_sync import SEQS, train_on

pytestmark = pytest.mark.slow
PROMPTS, N = 8, 2


def _batch(seed: int, names: list, second_teacher: str | None = None):
    """16 rows (8 prompts x 2 samples) of varied lengths, two teachers, rewards for GRPO, top-k unused.
    ``second_teacher``: every other prompt is also scored by it (a second slot, route weight 0.25)."""
    rng = np.random.default_rng(seed)
    rows = PROMPTS * N
    seqs = [SEQS[i % 2][: len(SEQS[i % 2]) - (i % 5)] for i in range(rows)]
    plens = np.full(rows, 9, np.int32)
    rlens = np.array([len(s) - 9 for s in seqs], np.int32)
    tokens = pad_sequences(seqs, 0)
    mask = np.arange(tokens.shape[1])[None] >= plens[:, None]
    rollout_lp = np.where(mask, -rng.random(tokens.shape) * 3, 0).astype(np.float32)
    tidx = (np.arange(rows) // N % len(names)).astype(np.int32)  # a prompt's samples share a teacher
    weights = None
    if second_teacher is not None:
        tidx = tidx % 2  # the first two teachers in slot 0
        both = np.arange(rows) // N % 2 == 0
        tidx = np.stack([tidx, np.where(both, names.index(second_teacher), -1)], -1).astype(np.int32)
        weights = np.stack([np.ones(rows), np.where(both, 0.25, 0.0)], -1).astype(np.float32)
    batch = RolloutBatch(tokens, plens, rlens, rollout_lp, np.repeat(np.arange(PROMPTS), N) + 100 * seed, tidx,
                         rng.integers(0, 2, rows).astype(np.float32), np.ones(rows, bool), tuple(["add"] * rows),
                         route_weight_BS=weights)
    scores = []
    for t, name in enumerate(names):
        sel = np.nonzero((batch.teacher_index_BS == t).any(-1))[0].astype(np.int32)
        lp = -rng.random((len(sel), int(rlens.max()))).astype(np.float32) * 2
        scores.append(TeacherScores(name, sel, plens[sel].copy(), lp))
    return batch, scores


def _run(artifacts, world: int, overrides: list) -> tuple:
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"learner.world_size={world}", f"data.prompts_per_step={PROMPTS}",
                      f"rollout.n_samples_per_prompt={N}", "learner.micro_batch_size=2", "learner.zero_stage=2",
                      "learner.lr=1e-2", *overrides)
    names = sorted(cfg.teachers.models)
    learners = make_learner_group(cfg, names)
    try:
        info = setup_learners(cfg, learners)
        if cfg.learner.max_tokens_per_micro_batch:  # the families here pack: the check found it
            assert [i["packing"] for i in info] == [cfg.learner.packing] * world
        steps = []
        for step in range(2):
            batch, scores = _batch(step, names)
            steps.append(learners.gather(train_on(learners, batch, scores, step, cfg.learner.mini_batches_per_step)))
        after = learners.gather(learners.call(0, "compute_logprobs", SEQS))
    finally:
        WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)
    return steps, after


# token-budget micro-batches (workers/packing.py): rows of 13-19 tokens, 40 tokens per micro-batch: packed, 2-3
# rows a forward; padded, 2 (length-sorted). The same loss, gradients and weights as micro_batch_size=2 rows
PACKED = ("learner.max_tokens_per_micro_batch=40",)
PADDED = ("learner.max_tokens_per_micro_batch=40", "learner.packing=false")


@pytest.mark.parametrize("overrides,variants", [
    # two optimizer steps per batch (pi_old recomputed), GRPO mixing, per-teacher whitening: every all-reduce
    (["learner.mini_batches_per_step=2", "algorithm.alpha=0.5", "algorithm.normalize_advantages=teacher"],
     ((1, ()), (2, ()), (4, ()), (2, PACKED))),
    # one mini-batch: pi_old taken from the training forward (no second forward)
    (["learner.mini_batches_per_step=1"], ((1, ()), (2, ()), (2, PADDED))),
], ids=["minibatches_grpo_whiten", "fused_pi_old"])
def test_losses_equal_across_world_sizes_and_bytes_split(local_ray, artifacts, overrides, variants):
    results = {(w, extra): _run(artifacts, w, [*overrides, *extra]) for w, extra in variants}
    ref_steps, ref_after = results[(1, ())]
    for (w, extra), (steps, after) in results.items():
        # packed forwards compute no padding; fixed rows of 13-19 tokens do
        assert (steps[0][0]["learner/padding_fraction"] == 0) == (extra == PACKED), (w, extra)
        for s, (ranks, ref) in enumerate(zip(steps, ref_steps)):
            m, m1 = ranks[0], ref[0]
            for key in ("loss", "reverse_kl", "entropy", "grad_norm", "response_tokens", "rows",
                        "teacher/add_expert/reverse_kl"):
                assert m[key] == pytest.approx(m1[key], rel=2e-5, abs=1e-6), (w, extra, s, key)
            total = m["learner/fetched_bytes_all_ranks"]
            per_rank = [r["learner/fetched_bytes"] for r in ranks]
            assert sum(per_rank) == pytest.approx(total)
            assert total <= ref[0]["learner/fetched_bytes_all_ranks"]  # parts are trimmed: never more padding
            # each rank pulls its own rows only: about 1/world of the step's payload
            assert max(per_rank) < 1.35 * total / w, (w, per_rank, total)
        for a, b in zip(after, ref_after):  # the same weights after the same updates (token-budget micro-batches
            # sum the gradient in another order: fp32 rounding, amplified by Adam's normalisation over two steps)
            np.testing.assert_allclose(a, b, atol=1e-4 if extra else 2e-5)
    assert ref_steps[1][0]["grad_norm"] > 0 and np.isfinite(ref_steps[1][0]["loss"])
    # pi_old is the learner's own (recomputed or from the training forward), not the random rollout log-probs
    assert all(ranks[0]["train_rollout_logprob_gap"] > 0.1 for ranks in ref_steps)


def test_pi_old_from_the_training_forward_equals_a_separate_one(local_ray, artifacts):
    """One mini-batch, no normalisation: pi_old comes from the training forward. A learner handed the
    true pi_old instead (rollout log-probs = the initial student's, recompute off) makes the same update."""
    from dataclasses import replace

    results = []
    for recompute in (True, False):
        cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.world_size=1", f"data.prompts_per_step={PROMPTS}",
                          f"rollout.n_samples_per_prompt={N}", "learner.micro_batch_size=4", "learner.lr=1e-2",
                          f"learner.recompute_old_logprobs={str(recompute).lower()}")
        names = sorted(cfg.teachers.models)
        learners = make_learner_group(cfg, names)
        try:
            setup_learners(cfg, learners)
            batch, scores = _batch(3, names)
            seqs = [batch.sequence(i).tolist() for i in range(batch.num_rows)]
            lp = learners.gather(learners.call(0, "compute_logprobs", seqs))  # the initial student = pi_old
            true_old = np.zeros_like(batch.rollout_logprobs_BL)
            for i, row in enumerate(lp):
                true_old[i, : len(row)] = row
            batch = replace(batch, rollout_logprobs_BL=np.where(batch.response_mask_BL(), true_old, 0).astype(np.float32))
            metrics = learners.gather(train_on(learners, batch, scores))[0]
            results.append((metrics, learners.gather(learners.call(0, "compute_logprobs", SEQS))))
        finally:
            WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)
    (fused, after_fused), (given, after_given) = results
    assert fused["train_rollout_logprob_gap"] < 1e-5  # the forward reproduced pi_old
    for key in ("loss", "reverse_kl", "grad_norm", "is_clip_fraction"):
        assert fused[key] == pytest.approx(given[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(after_fused, after_given):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_several_teachers_per_row_equal_across_world_sizes_with_exact_per_teacher_metrics(local_ray, artifacts):
    """Half the prompts are scored by their domain teacher and by `self` (weight 0.25), whitened per
    teacher. World 1 and 2 train the same; each teacher's tokens and reverse KL are over exactly the
    tokens it scored (checked against numpy with pi_old = the initial student's log-probs)."""
    overrides = ["learner.mini_batches_per_step=1", "algorithm.normalize_advantages=teacher"]
    runs = {}
    for world in (1, 2):
        cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"learner.world_size={world}",
                          f"data.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={N}",
                          "learner.micro_batch_size=2", "learner.lr=1e-2", *overrides)
        names = sorted(cfg.teachers.models)
        learners = make_learner_group(cfg, names)
        try:
            setup_learners(cfg, learners)
            batch, scores = _batch(5, names, second_teacher="self")
            seqs = [batch.sequence(i).tolist() for i in range(batch.num_rows)]
            old = learners.gather(learners.call_all("compute_logprobs", seqs))[0]
            metrics = learners.gather(train_on(learners, batch, scores))[0]
            runs[world] = (metrics, learners.gather(learners.call(0, "compute_logprobs", SEQS)))
        finally:
            WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)
    (m1, after1), (m2, after2) = runs[1], runs[2]
    for key in ("loss", "reverse_kl", "grad_norm", "teacher/self/reverse_kl", "teacher/add_expert/reverse_kl"):
        assert m2[key] == pytest.approx(m1[key], rel=2e-5, abs=1e-6), key
    for a, b in zip(after1, after2):
        np.testing.assert_allclose(a, b, atol=2e-5)
    mask = batch.response_mask_BL()
    total = mask.sum()
    for name in names:
        t = names.index(name)
        tokens = kl = 0.0
        for sc in scores:
            if sc.teacher != name:
                continue
            for i, r in enumerate(sc.rows_R):
                n = int(batch.response_lens_B[r])
                lp = sc.teacher_logprobs_RT[i, :n].astype(np.float64)
                o = old[r][int(batch.prompt_lens_B[r]): int(batch.prompt_lens_B[r]) + n]
                tokens += n
                kl += float((o - lp).sum())
        assert (batch.teacher_index_BS == t).any(-1).sum() > 0
        assert m1[f"teacher/{name}/tokens"] == tokens, name
        assert m1[f"teacher/{name}/token_share"] == pytest.approx(tokens / total)
        assert m1[f"teacher/{name}/reverse_kl"] == pytest.approx(kl / tokens, rel=1e-5), name
    # self scores half the rows on top of their domain teacher: shares add up to more than 1
    assert sum(m1[f"teacher/{n}/token_share"] for n in names) > 1.2


@ray.remote(num_cpus=0)
def _later(scores, delay_s: float):
    """Scores that arrive ``delay_s`` after they were asked for (a teacher still scoring a shard)."""
    import time

    time.sleep(delay_s)
    return scores


def _two_shards(batch, scores, world: int, delay_s: float) -> list:
    """[rank] -> two parts (the two halves of the batch, as two rollout shards); the second half's scores
    arrive ``delay_s`` late."""
    from dataclasses import replace

    from mopd_ray.dispatch import split_batch

    half = batch.num_rows // 2
    per_rank = [[] for _ in range(world)]
    for h, rows in enumerate((np.arange(half), np.arange(half, batch.num_rows))):
        part_scores = [replace(s.take(s.rows_R[np.isin(s.rows_R, rows)]),
                               rows_R=(s.rows_R[np.isin(s.rows_R, rows)] - rows[0]).astype(np.int32)) for s in scores]
        for rank, parts in enumerate(split_batch(batch.take(rows), part_scores, world, 1)):
            for p in parts:
                refs = [ray.put(s) if h == 0 else _later.remote(s, delay_s) for s in p["scores"]]
                per_rank[rank].append({"mini_batch": 0, "batch": ray.put(p["batch"]), "scores": refs})
    return per_rank


def test_streamed_scores_train_early_and_a_midaccumulation_nan_skips_on_every_rank(local_ray, artifacts):
    """Learners start on the micro-batches whose scores are in (the second shard's arrive 3 s late) and
    make the same update as with every score in hand; a NaN teacher score in a later micro-batch of one
    rank drops that whole accumulated update on both ranks (DeepSpeed's overflow path) and leaves the
    optimizer as it was: the next clean step lands where it lands without the bad step."""
    from dataclasses import replace

    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.world_size=2", f"data.prompts_per_step={PROMPTS}",
                      f"rollout.n_samples_per_prompt={N}", "learner.micro_batch_size=2", "learner.lr=1e-2")
    names = sorted(cfg.teachers.models)
    clean, clean_scores = _batch(0, names)
    bad = [replace(s, teacher_logprobs_RT=np.where(np.arange(len(s.rows_R))[:, None] == len(s.rows_R) - 1, np.nan,
                                                   s.teacher_logprobs_RT).astype(np.float32)) if i == 0 else s
           for i, s in enumerate(clean_scores)]  # the last row of the first teacher: one rank's 4th micro-batch
    final, final_scores = _batch(1, names)
    runs = {}
    for mode in ("streamed", "in_hand"):
        learners = make_learner_group(cfg, names)
        try:
            setup_learners(cfg, learners)
            parts = _two_shards(clean, clean_scores, 2, 3.0 if mode == "streamed" else 0.0)
            if mode == "in_hand":
                ray.get([r for ps in parts for p in ps for r in p["scores"]])
            first = learners.gather([learners.call(r, "train_step", parts[r], 0) for r in range(2)])
            w0 = learners.gather(learners.call(0, "compute_logprobs", SEQS))
            skipped = None
            if mode == "streamed":
                skipped = learners.gather([learners.call(r, "train_step", p, 1)
                                           for r, p in enumerate(_two_shards(clean, bad, 2, 0.0))])
                w1 = learners.gather(learners.call(0, "compute_logprobs", SEQS))
                for a, b in zip(w1, w0):  # nothing of the poisoned accumulation reached the weights
                    np.testing.assert_array_equal(a, b)
            last = learners.gather(train_on(learners, final, final_scores, 2))
            runs[mode] = (first, skipped, last, learners.gather(learners.call(0, "compute_logprobs", SEQS)))
        finally:
            WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)
    (s_first, skipped, s_last, s_after), (h_first, _, h_last, h_after) = runs["streamed"], runs["in_hand"]
    # streamed: training began before the late scores arrived, and waited for them later
    assert s_first[0]["learner/start_s"] < 2.0 and s_first[0]["learner/fetch_s"] > 2.5
    assert h_first[0]["learner/fetch_s"] < 2.0
    # the micro-batch of the late shard ran its forward before its scores were in; in hand, none did
    assert all(m["learner/forwards_ahead_of_scores"] >= 1 for m in s_first)
    assert all(m["learner/forwards_ahead_of_scores"] == 0 for m in h_first)
    for key in ("loss", "reverse_kl", "grad_norm", "entropy"):
        assert s_first[0][key] == pytest.approx(h_first[0][key], rel=1e-5, abs=1e-7), key
    assert [m["skipped_minibatches"] for m in skipped] == [1, 1]
    assert any("add_expert" in str(m) or names[0] in str(m) for m in skipped)
    assert s_last[0]["grad_norm"] == pytest.approx(h_last[0]["grad_norm"], rel=1e-5)
    for a, b in zip(s_after, h_after):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _rewarded(seed: int, rewarded_prompts: tuple):
    """A reward-only GRPO batch (no teacher): the prompts in ``rewarded_prompts`` have one sample right and
    one wrong, every other prompt's samples are all wrong (equal rewards: no learning signal)."""
    from dataclasses import replace

    batch, _ = _batch(seed, ["none"])
    rewards = np.zeros(batch.num_rows, np.float32)
    for p in rewarded_prompts:
        rewards[p * N] = 1.0
    return replace(batch, teacher_index_BS=np.full(batch.num_rows, -1, np.int32), route_weight_BS=None,
                   rewards_B=rewards)


def test_reward_only_steps_without_a_learning_signal_leave_weights_and_adam_state_alone(local_ray, artifacts):
    """Reward-only GRPO at world 2. One rewarded group, on one rank only: both ranks step. A batch whose
    groups all have equal rewards: skipped on both ranks, weights unchanged, and the next rewarded step lands
    where it lands without that batch (Adam's moments untouched). With the option off the same batch moves
    the weights (Adam's momentum from the earlier step): the defect the option fixes."""
    first, free, last = _rewarded(0, (PROMPTS - 1,)), _rewarded(1, ()), _rewarded(2, (0, 3))
    runs = {}
    for name, skip, batches in (("skip", True, (first, free, last)), ("off", False, (first, free)),
                                ("without_free", True, (first, last))):
        cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.world_size=2", f"data.prompts_per_step={PROMPTS}",
                          f"rollout.n_samples_per_prompt={N}", "learner.micro_batch_size=2", "learner.lr=1e-2",
                          "algorithm.signal=none", "algorithm.alpha=1.0",
                          f"algorithm.skip_signal_free_steps={str(skip).lower()}")
        learners = make_learner_group(cfg, [])
        try:
            setup_learners(cfg, learners)
            out = []
            for step, batch in enumerate(batches):
                metrics = learners.gather(train_on(learners, batch, [], step))
                out.append((metrics, learners.gather(learners.call(0, "compute_logprobs", SEQS))))
            runs[name] = out
        finally:
            WARM.park(learners)  # the next test of this shape takes it (mopd_ray/warm.py)
    skip, off, without = runs["skip"], runs["off"], runs["without_free"]
    (m_first, w_first), (m_free, w_free), (_, w_last) = skip
    assert [m["signal_free_minibatches"] for m in m_first] == [0, 0]  # the rank without a rewarded group steps too
    assert m_first[0]["grad_norm"] > 0
    assert [m["signal_free_minibatches"] for m in m_free] == [1, 1]
    for a, b in zip(w_free, w_first):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w_last, without[1][1]):  # as if the reward-free batch had never come
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(w_last, w_free))  # the last step did learn
    (_, w_off_first), (m_off_free, w_off_free) = off
    for a, b in zip(w_off_first, w_first):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [m["signal_free_minibatches"] for m in m_off_free] == [0, 0]
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(w_off_free, w_off_first)) > 1e-4


def _skewed_batch(names: list):
    """8 prompts x 2 samples: prompt 0's rows are 120 tokens long, the others 12-19 (a long tail)."""
    rng = np.random.default_rng(7)
    rows = PROMPTS * N
    lens = [120 if i < N else 12 + i % 8 for i in range(rows)]
    seqs = [rng.integers(3, 300, n).tolist() for n in lens]
    plens = np.full(rows, 6, np.int32)
    rlens = np.array(lens, np.int32) - plens
    tokens = pad_sequences(seqs, 0)
    mask = np.arange(tokens.shape[1])[None] >= plens[:, None]
    rollout_lp = np.where(mask, -rng.random(tokens.shape) * 3, 0).astype(np.float32)
    tidx = (np.arange(rows) // N % len(names)).astype(np.int32)[:, None]
    batch = RolloutBatch(tokens, plens, rlens, rollout_lp, np.repeat(np.arange(PROMPTS), N), tidx,
                         rng.integers(0, 2, rows).astype(np.float32), np.ones(rows, bool), tuple(["add"] * rows))
    scores = []
    for t, name in enumerate(names):
        sel = np.nonzero(tidx[:, 0] == t)[0].astype(np.int32)
        scores.append(TeacherScores(name, sel, plens[sel].copy(),
                                    -rng.random((len(sel), int(rlens.max()))).astype(np.float32) * 2))
    return batch, scores


def test_token_balanced_ranks_train_as_one_rank_does(local_ray, artifacts):
    """learner.balance_tokens: whole prompts go to ranks by tokens (mopd_ray/dispatch.py balance_by_tokens). One
    prompt of 2 x 120 tokens against seven of 2 x 12-19: by rows each rank would get 8 rows and one of them the
    long prompt too; balanced, one rank trains the long prompt alone and the other the seven short ones, with
    zero-weight passes so that both run as many micro-batches. The update equals one rank's with fixed rows."""
    base = [f"run.artifacts_dir={artifacts}", f"data.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={N}",
            "learner.micro_batch_size=2", "learner.lr=1e-2", "algorithm.alpha=0.5"]
    out = {}
    for world, extra in ((1, ()), (2, ("learner.max_tokens_per_micro_batch=64", "learner.balance_tokens=true"))):
        cfg = compose_cfg(*base, f"learner.world_size={world}", *extra)
        names = sorted(cfg.teachers.models)
        learners = make_learner_group(cfg, names)
        try:
            setup_learners(cfg, learners)
            batch, scores = _skewed_batch(names)
            ranks = learners.gather(train_on(learners, batch, scores, every_part=world > 1))
            out[world] = (ranks, learners.gather(learners.call(0, "compute_logprobs", SEQS)))
        finally:
            WARM.park(learners)
    (one, after1), (two, after2) = out[1], out[2]
    for key in ("loss", "reverse_kl", "entropy", "grad_norm", "response_tokens", "rows"):
        assert two[0][key] == pytest.approx(one[0][key], rel=2e-5, abs=1e-6), key
    for a, b in zip(after1, after2):
        np.testing.assert_allclose(a, b, atol=1e-4)
    tokens = sorted(r["learner/rank_tokens"] for r in two)
    assert tokens == [223, 240]  # the seven short prompts; the long one alone (2 x 120)
    assert sum(r["learner/zero_weight_micro_batches"] for r in two) > 0  # the rank of two long rows ran extra passes
    assert len({r["learner/micro_batches"] + r["learner/zero_weight_micro_batches"] for r in two}) == 1
