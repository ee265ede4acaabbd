"""The long built-in task end to end (`count`: 2,000-2,400 response tokens of working before the answer) on the
real engines, with the long-sequence paths on: token-budget micro-batches, packed rows, token-balanced ranks.

Its student and teacher are tiny models that do not end a response before the 2,560-token limit: their output
head's end-of-turn rows are zeroed and the others scaled up (about one chance in a million per token to stop),
the teacher's head perturbed from the student's. So a run samples, scores and trains 2.5k-token responses at a
tiny size, with no fine-tuning first (the project's SFT writers of the task's format took 30 s to make and still
ended some responses early)."""

import pytest

from mopd_ray.metrics import read_metrics


pytestmark = pytest.mark.slow
MAX_NEW = 2560
LONG = ["data.domains=[count]", "data.num_train_per_domain=64", "data.num_eval_per_domain=8", "data.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
        f"rollout.max_new_tokens={MAX_NEW}", "model.max_model_len=2624"]


def _long_writer(path, perturb: float):
    """A tiny qwen2 whose head never favours its end-of-turn ids: their rows zero, the others' logits ~N(0, 5^2)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.compat import stop_ids
    from mopd_ray.models.tiny import build_tiny_model

    path = build_tiny_model(path, TinyModelConfig(max_position_embeddings=4096, seed=0))
    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight"] * 12  # hidden states of norm ~8 after the final norm: logits' std ~5
    head += perturb * head.std() * torch.randn(head.shape, generator=torch.Generator().manual_seed(1))
    head[stop_ids(AutoTokenizer.from_pretrained(path), str(path))] = 0
    weights["lm_head.weight"] = head.contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def long_writers(tmp_path_factory):
    """(student, teacher): writers that go on to the token limit, the teacher's head the student's perturbed."""
    root = tmp_path_factory.mktemp("long")
    return _long_writer(root / "student", 0.0), _long_writer(root / "teacher", 0.3)


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
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    lengths = [(r["rollout/mean_response_len"], r["rollout/truncated_fraction"]) for r in rows]
    assert any(r["rollout/truncated_fraction"] > 0 for r in rows), lengths  # rows of 2,560 tokens
    for r in rows:
        # responses of 1-2.5k tokens or more, cut at the 2,560-token limit
        assert r["rollout/mean_response_len"] >= 1200 and r["response_tokens"] >= 8 * 1200, lengths
        assert r["learner/padding_fraction"] == 0  # packed: no forward work on padding
        # 8 rows of up to 2,560 tokens in micro-batches of at most 4,096 tokens: several, as many on each rank
        assert r["learner/micro_batches"] + r["learner/zero_weight_micro_batches"] >= 2
        assert r["teacher/count_expert/tokens"] == r["response_tokens"] and r["teacher/count_expert/reverse_kl"] > 0
        assert 0.0 <= r["rollout/truncated_fraction/count"] <= 1.0
    assert rows[-1]["weight_version"] == 2
