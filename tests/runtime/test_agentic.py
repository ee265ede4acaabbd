"""Agentic MOPD on the real engines: multi-turn episodes with environments in their own actors, environment
tokens that carry no gradient, KL or advantage, and environments that fail, hang or are slow without stopping
the run."""

import numpy as np
import pytest

from mopd_ray.batch import RolloutBatch, TeacherScores, pad_sequences
from mopd_ray.metrics import read_metrics
from mopd_ray.roles import make_learner_group, setup_learners
from mopd_ray.warm import WARM

from .conftest import compose_cfg
from .test_weight_sync import SEQS, train_on

pytestmark = pytest.mark.slow
ROWS = 8


def _episodes(seed: int, env_perturb: float, with_mask: bool = True, failed: int = 0):
    """8 two-turn episodes: prompt (9 ids), the student's turn, an environment turn (positions 12-14 of the
    response region), the student's second turn. ``env_perturb`` shifts the teacher's and the rollout's log-probs
    at the environment's positions only. ``failed``: the first rows' episodes failed (no student token trains)."""
    rng = np.random.default_rng(seed)
    seqs = [SEQS[i % 2] for i in range(ROWS)]
    plens = np.full(ROWS, 9, np.int32)
    rlens = np.array([len(s) - 9 for s in seqs], np.int32)
    tokens = pad_sequences(seqs, 0)
    L = tokens.shape[1]
    pos = np.arange(L)[None]
    env = (pos >= 12) & (pos < 15) & (pos < (plens + rlens)[:, None])  # "<|im_start|>tool\n" ids inside responses
    resp = (pos >= plens[:, None]) & (pos < (plens + rlens)[:, None])
    lp = np.where(resp, -rng.random(tokens.shape) * 3, 0) + np.where(env, env_perturb, 0)
    batch = RolloutBatch(tokens, plens, rlens, lp.astype(np.float32), np.arange(ROWS) // 2, np.zeros(ROWS, np.int32),
                         rng.integers(0, 2, ROWS).astype(np.float32), np.ones(ROWS, bool), tuple(["calc"] * ROWS),
                         action_mask_BL=(resp & ~env & (np.arange(ROWS) >= failed)[:, None]) if with_mask else None)
    teacher = -rng.random((ROWS, int(rlens.max()))).astype(np.float32) * 2
    teacher[:, 3:6] += 5 * env_perturb  # response columns 3-5 = token positions 12-14
    return batch, [TeacherScores("add_expert", np.arange(ROWS, dtype=np.int32), plens.copy(), teacher)]


def test_environment_tokens_get_no_gradient_kl_or_advantage(local_ray, artifacts):
    """The same loss and gradient whatever the teacher and the rollout engine say at the environment's tokens; without the
    mask of the student's tokens the same perturbation changes it (the test can fail)."""
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.world_size=1", f"data.prompts_per_step={ROWS // 2}",
                      "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=4", "learner.lr=0.0",
                      "algorithm.alpha=0.5", "learner.recompute_old_logprobs=false")
    names = sorted(cfg.teachers.models)
    learners = make_learner_group(cfg, names)
    out = {}
    try:
        setup_learners(cfg, learners)
        for case, (perturb, mask, failed) in {"clean": (0.0, True, 0), "perturbed": (-2.0, True, 0),
                                              "unmasked": (0.0, False, 0), "unmasked_perturbed": (-2.0, False, 0),
                                              "failed": (0.0, True, 4)}.items():
            batch, scores = _episodes(0, perturb, mask, failed)  # lr 0: every case at the same weights
            out[case] = learners.gather(train_on(learners, batch, scores))[0]
    finally:
        WARM.park(learners)
    clean, perturbed = out["clean"], out["perturbed"]
    for key in ("loss", "reverse_kl", "grad_norm", "entropy", "response_tokens"):
        assert perturbed[key] == pytest.approx(clean[key], rel=1e-6, abs=1e-7), key
    # the student's tokens only: 3 environment tokens per row left out of the denominators
    assert clean["response_tokens"] == out["unmasked"]["response_tokens"] - 3 * ROWS
    assert out["unmasked_perturbed"]["loss"] != pytest.approx(out["unmasked"]["loss"], rel=1e-3)
    # a micro-batch of failed episodes only (env.on_error=mask): trained on nothing, the step goes on
    assert out["failed"]["response_tokens"] == clean["response_tokens"] / 2 and np.isfinite(out["failed"]["loss"])


ENVS = ["data.envs.calc=tests.envs_fixture:TurnsEnv", "data.envs.add=tests.envs_fixture:FlakyEnv",
        "data.envs.sort=tests.envs_fixture:HangingEnv"]


def test_multi_turn_run_with_failing_hanging_and_slow_environments(local_ray, artifacts, tmp_path):
    """Two MOPD steps on episodes of up to three assistant turns: environments answer from their actors, a
    quarter of the add episodes' environments raise, a quarter of the sort episodes' never answer (their actor is
    replaced after the step), another quarter is slow; the run goes on, the failures are counted and masked."""
    from mopd_ray.orchestrator import Orchestrator

    run = tmp_path / "run"
    # a random tiny student ends a turn at most ids (they are all end-of-turn ids here), so episodes take turns
    stops = ",".join(str(i) for i in range(2, 200))
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"run.output_dir={run}", f"run.checkpoint_dir={tmp_path}/ck",
                      "run.total_steps=2", "run.save_every=0", "data.domains=[calc,add,sort]",
                      "data.prompts_per_step=8", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=64",
                      f"rollout.stop_token_ids=[{stops}]", "teachers.routing.calc=add_expert", *ENVS,
                      "env.max_turns=3", "env.step_timeout_s=3", "env.actors_per_replica=1",
                      # '%' ... '&' as the reasoning block (one token each here): cut for rewards and the
                      # environments, and from the later turns' context
                      "rollout.strip_thinking=true", "rollout.thinking_tags=['%','&']", "env.thinking_in_context=strip",
                      # no evaluation (the demo's test evaluates the tool domain's episodes): its episodes
                      # waited out the hanging environment's timeouts again, ~20 of the test's 65 s
                      "run.eval_every=0", "logging.wandb_mode=disabled", "logging.progress_bar=false")
    Orchestrator(cfg, str(run)).run()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["env/episodes"] == 16
        assert r["env/turns_mean"] > 1.2 and r["env/turns_max"] <= 3, r
        assert r["env/tokens"] > 0
        # the learner's tokens are the student's own: fewer than the responses' (environment turns inside them)
        assert r["response_tokens"] < r["rollout/mean_response_len"] * 16
        # the teacher scored the student's tokens (the sampled estimate of its KL may be of either sign)
        assert np.isfinite(r["loss"]) and r["teacher/add_expert/tokens"] > 0 and r["teacher/add_expert/reverse_kl"] != 0
    assert sum(r["env/errors/add"] for r in rows) >= 1  # FlakyEnv raised
    assert sum(r["env/timeouts"] for r in rows) >= 1 and sum(r["env/errors/sort"] for r in rows) >= 1  # HangingEnv
    assert rows[-1]["weight_version"] == 2


def test_carried_episodes_do_not_hold_a_step_and_a_resume_sends_them_again(local_ray, artifacts, tmp_path):
    """env.carry_over=0.5: 12 groups in flight for 8 per step; an episode of 6 tool turns (one row in eight) is
    trained by a later step than the one it started in. A checkpoint keeps the prompts still in flight and a resume
    sends them again (nothing lost, nothing twice: the same 4 carried groups)."""
    import json

    from mopd_ray.orchestrator import Orchestrator

    stops = ",".join(str(i) for i in range(2, 200))
    common = [f"run.artifacts_dir={artifacts}", f"run.checkpoint_dir={tmp_path}/ck", "run.save_every=2",
              "data.domains=[calc,add]", "data.prompts_per_step=8", "rollout.n_samples_per_prompt=2",
              "rollout.max_new_tokens=96", f"rollout.stop_token_ids=[{stops}]", "teachers.routing.calc=add_expert",
              "data.env=tests.envs_fixture:LongTailEnv", "data.envs.calc=tests.envs_fixture:LongTailEnv",
              "env.max_turns=8", "env.carry_over=0.5", "env.max_episode_lag=3", "run.eval_every=0",
              "logging.wandb_mode=disabled", "logging.progress_bar=false"]
    first = tmp_path / "first"
    Orchestrator(compose_cfg(*common, "run.total_steps=3", f"run.output_dir={first}"), str(first)).run()
    rows = read_metrics(first)
    assert all(r["env/carried_groups"] == 4 and r["env/episodes"] == 16 for r in rows)
    assert max(r["env/episode_lag_max"] for r in rows) >= 1  # an episode begun under older weights, trained later
    [state] = (tmp_path / "ck").glob("*/step_000002/state.json")
    saved = json.loads(state.read_text())["run_state"]
    assert len(saved["in_flight"]) == 4  # sent before the step-2 batch, still running at the checkpoint
    import shutil

    shutil.rmtree(state.parent.parent / "step_000003")  # as if the job had died after the step-2 checkpoint
    second = tmp_path / "second"
    Orchestrator(compose_cfg(*common, "run.total_steps=4", "run.resume=auto", f"run.output_dir={second}"),
                 str(second)).run()
    again = read_metrics(second)
    assert [r["step"] for r in again] == [2, 3]
    assert all(r["env/carried_groups"] == 4 for r in again)  # the 4 sent again + 8 new, 8 trained
