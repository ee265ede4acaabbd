"""The long built-in task end to end (`count`: 2,000-2,400 response tokens of working before the answer) on the
real engines, with the long-sequence paths on: token-budget micro-batches, packed rows, token-balanced ranks.

Its student and teacher are tiny models taught the task's format by the project's own SFT (mopd_ray.bootstrap,
24 + 4 steps: enough that they rarely end a response early, not enough to count right), so a run samples,
scores and trains >= 2k-token responses at a tiny size."""

import pytest

from mopd_ray.metrics import read_metrics


pytestmark = pytest.mark.slow
MAX_NEW = 2560
LONG = ["data.domains=[count]", "data.num_train_per_domain=64", "data.num_eval_per_domain=8", "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
        f"rollout.max_new_tokens={MAX_NEW}", "model.max_model_len=2624"]


@pytest.fixture(scope="module")
def long_writers(tmp_path_factory, local_ray):
    """(student, teacher): a tiny model SFT'd 24 steps on the long task, and that one 4 steps further."""
    from mopd_ray.bootstrap import sft
    from mopd_ray.data.domains import generate_split
    from mopd_ray.models.prepare import prepare_models
    from mopd_ray.roles import make_learner_group, setup_learners
    from mopd_ray.warm import WARM

    from ..helpers import compose_cfg

    root = tmp_path_factory.mktemp("long")
    cfg = compose_cfg(f"run.artifacts_dir={root}", f"model.path={root}/init", "model.tiny.max_position_embeddings=4096",
                      *LONG,
                      "teachers=empty", "algorithm=sampled_grpo")
    prepare_models(cfg)
    rows = generate_split(["count"], 64, 0, "train")
    learners = make_learner_group(cfg, [])
    try:
        setup_learners(cfg, learners)
        sft(cfg, cfg.model.path, f"{root}/student", rows, steps=24, lr=5e-3, batch=4, seed=0, learners=learners)
        sft(cfg, f"{root}/student", f"{root}/teacher", rows, steps=4, lr=5e-3, batch=4, seed=1, learners=learners)
    finally:
        WARM.park(learners)  # the run's learners (mopd_ray/warm.py)
    return f"{root}/student", f"{root}/teacher"


def test_a_long_reasoning_run_trains_2k_token_responses_packed_and_balanced(long_writers, tmp_path, caplog):
    import logging

    from mopd_ray.orchestrator import Orchestrator

    from ..helpers import compose_cfg

    student, teacher = long_writers
    run = tmp_path / "run"
    cfg = compose_cfg(f"run.artifacts_dir={tmp_path}", f"run.output_dir={run}", f"run.checkpoint_dir={tmp_path}/ck",
                      "run.total_steps=2", "run.save_every=0", f"model.path={student}", "model.tiny=null", *LONG,
                      "teachers=empty", f"+teachers.models.count_expert.model_path={teacher}",
                      "teachers.models.count_expert.max_model_len=2624", "teachers.routing.count=count_expert",
                      "algorithm=sampled", "learner.max_tokens_per_micro_batch=4096", "learner.balance_tokens=true",
                      # no evaluation (the demo's and the main run's tests have it): here it sampled 32 more
                      # long answers before and after training, ~25 of the test's 55 s
                      "run.eval_every=0", "logging.wandb_mode=disabled", "logging.progress_bar=false")
    with caplog.at_level(logging.INFO, logger="mopd_ray"):
        Orchestrator(cfg, str(run)).run()
    out = caplog.text
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    lengths = [(r["rollout/mean_response_len"], r["rollout/truncated_fraction"]) for r in rows]
    assert any(r["rollout/truncated_fraction"] > 0 for r in rows), lengths  # rows of 2,560 tokens
    for r in rows:
        # the long task's working: responses of 1-2.5k tokens, some cut at the 2,560-token limit (the tiny
        # writers still end some early)
        assert r["rollout/mean_response_len"] >= 1200 and r["response_tokens"] >= 8 * 1200, lengths
        assert r["learner/padding_fraction"] == 0  # packed: no forward work on padding
        # 8 rows of ~2.3k tokens in micro-batches of at most 4,096 tokens: several, as many on each rank
        assert r["learner/micro_batches"] + r["learner/zero_weight_micro_batches"] >= 2
        assert r["teacher/count_expert/tokens"] == r["response_tokens"] and r["teacher/count_expert/reverse_kl"] > 0
        assert 0.0 <= r["rollout/truncated_fraction/count"] <= 1.0
    assert rows[-1]["weight_version"] == 2
