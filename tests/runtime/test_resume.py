"""Resume: N steps, stop, resume=auto; the next steps' losses equal an uninterrupted run's (on-policy,
fixed seeds), and the stop falls on an epoch boundary (8 prompts, 4 per step: 2 steps per epoch)."""

import json

import pytest

from mopd_ray.metrics import read_metrics
from mopd_ray.orchestrator import Orchestrator

from .conftest import compose_cfg

pytestmark = pytest.mark.slow

COMMON = ["experiment=local_smoke", "data.domains=[add,reverse]", "data.num_train_per_domain=4",
          "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=4",
          "logging.wandb_mode=disabled", "logging.progress_bar=false", "run.keep_checkpoints=0",
          "algorithm.normalize_advantages=teacher",  # moments all-reduced across the 2 learner ranks
          *[f"teachers.models.{t}.backend=hf" for t in ("add_expert", "reverse_expert", "self")]]


def _run(artifacts, run_dir, *overrides):
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", *COMMON, *overrides)
    Orchestrator(cfg, str(run_dir)).run()
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def runs(local_ray, artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # an uninterrupted run of the same config first, in the same folder: its finished checkpoint (step 4)
    # must not be taken by the resume below (a newer launch of the config is the run to continue)
    straight = _run(artifacts, root / "straight", "run.total_steps=4", f"run.checkpoint_dir={root}/ck_a")
    stopped = _run(artifacts, root / "first", "run.total_steps=4", "run.steps_per_launch=2",
                   f"run.checkpoint_dir={root}/ck_a")
    # debris the resume must skip: a write that never finished and a checkpoint with a corrupt state
    mine = root / "ck_a" / json.loads((root / "first" / "identity.json").read_text())["run_id"]
    (mine / "step_000003.tmp-deadbeef").mkdir()
    bad = mine / "step_000005"
    (bad / "learner").mkdir(parents=True)
    (bad / "learner" / "x").write_text("x")
    (bad / "state.json").write_text("{truncated")
    (bad / "COMPLETE").write_text("5")
    resumed = _run(artifacts, root / "resumed", "run.total_steps=4", "run.resume=auto",
                   f"run.checkpoint_dir={root}/ck_a")
    return mine, stopped, resumed, straight


def test_resumed_losses_equal_uninterrupted(runs):
    _, stopped, resumed, straight = runs
    assert [r["step"] for r in stopped] == [0, 1] and [r["step"] for r in resumed] == [2, 3]
    for key in ("loss", "reverse_kl", "grad_norm", "response_tokens"):
        for a, b in zip(straight[:2], stopped):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for a, b in zip(straight[2:], resumed):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert resumed[-1]["rows_trained"] == straight[-1]["rows_trained"] == 4 * 8
    # no domain of [add, reverse] routes to `self`: it was not started
    assert set(json.loads((runs[0].parents[1] / "first" / "placement.json").read_text())) == {
        "rollout", "learner", "teacher:add_expert", "teacher:reverse_expert", "learner_ranks"}


def test_resume_at_an_epoch_boundary_continues_into_the_next_epoch(runs):
    mine, stopped, resumed, _ = runs
    state = json.loads((mine / "step_000002" / "state.json").read_text())
    assert state["run_state"]["sampler"]["epoch"] == 1 and state["run_state"]["sampler"]["position"] == 0
    assert stopped[-1]["data/epoch"] == 1  # the stop fell exactly on the epoch boundary
    assert [r["data/epoch"] for r in resumed] == [1, 2] and len(resumed) == 2  # trained, not zero steps
    saved = json.loads((mine / "step_000004" / "state.json").read_text())
    assert saved["identity"]["run_id"] == state["identity"]["run_id"] == mine.name  # resumed: the same run
    assert saved["step"] == 4 and saved["config"]["run"]["total_steps"] == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(mine / "step_000004" / "student")
