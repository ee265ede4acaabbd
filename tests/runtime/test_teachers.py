"""Teacher groups on the real engines: sharded scoring, backends agree, start-up checks."""

import numpy as np
import pytest
import ray

from mopd_ray.batch import RolloutBatch, pad_sequences
from mopd_ray.cluster import PlacementError
from mopd_ray.config import TinyModelConfig
from mopd_ray.models.compat import TokenizerMismatchError, check_compatible, tokenizer_fingerprint
from mopd_ray.roles import make_learner_group, make_teacher_group
from mopd_ray.warm import WARM

from .conftest import compose_cfg

pytestmark = pytest.mark.slow


def _batch():
    seqs = [[1, 298, 201, 67, 70, 70, 19, 20, 2, 201, 1, 275, 307, 201, 21, 22, 2],
            [1, 298, 201, 80, 33, 34, 35, 2, 201, 1, 275, 307, 201, 35, 34, 33, 2, 201],
            [1, 298, 201, 80, 33, 34, 35, 2, 201, 1, 275, 307, 201, 40, 2]]
    plens = np.array([14, 13, 13], np.int32)
    rlens = np.array([len(s) for s in seqs], np.int32) - plens
    tokens = pad_sequences(seqs, 0)
    return RolloutBatch(tokens, plens, rlens, np.zeros(tokens.shape, np.float32), np.arange(3), np.zeros(3, np.int32),
                        np.full(3, np.nan, np.float32), np.ones(3, bool), ("add", "reverse", "reverse"))


def _dense(scores, name, L):
    """A TeacherScores field back at token positions, [R, L, ...]."""
    arr = getattr(scores, name + ("_RT" if name == "teacher_logprobs" else "_RTK"))
    return scores.to_positions(arr, L)


def _score(group, batch, rows, topk=0, hidden=False):
    ref = ray.put(batch)
    scores, meta = group.gather(group.actors[0].score.options(num_returns=2).remote(ref, rows, topk, hidden))
    assert meta["rows"] == len(rows)
    return scores


def test_sharded_teacher_scores_equal_unsharded_and_hf(local_ray, artifacts):
    """Sampled log-probs, top-k and the full-vocabulary payload (hidden states captured in vLLM's
    workers, and the output head) agree between a TP=1 and a TP=2 vLLM teacher and a transformers one."""
    batch = _batch()
    rows = np.array([0, 2], np.int32)
    out, hidden, heads = {}, {}, {}
    for label, overrides in {
        "tp1": ["teachers.models.add_expert.tensor_parallel_size=1"],
        "tp2": ["teachers.models.add_expert.tensor_parallel_size=2"],
        "hf": ["teachers.models.add_expert.backend=hf"],
    }.items():
        cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "teachers.models.add_expert.num_cpus_per_shard=1",
                          "teachers.models.add_expert.hidden_dtype=float32", *overrides)
        group = make_teacher_group(cfg, "add_expert")
        try:
            group.gather(group.call_all("ready"))
            out[label] = _score(group, batch, rows, topk=4)
            hidden[label] = _score(group, batch, rows, hidden=True)
            heads[label] = group.gather(group.call(0, "output_head"))
        finally:
            WARM.park(group)  # the transformers teacher rebuilds the TP=1 one's process in place (mopd_ray/warm.py)
    mask = batch.response_mask_BL()[rows]
    L = mask.shape[1]
    assert out["tp1"].teacher_logprobs_RT.shape[1] == batch.response_lens_B[rows].max()  # prompts not shipped
    assert mask.sum() > 0 and (_dense(out["tp1"], "teacher_logprobs", L)[mask] < 0).all()
    np.testing.assert_allclose(_dense(out["tp2"], "teacher_logprobs", L), _dense(out["tp1"], "teacher_logprobs", L), atol=1e-4)
    np.testing.assert_allclose(_dense(out["hf"], "teacher_logprobs", L), _dense(out["tp1"], "teacher_logprobs", L), atol=1e-4)
    # top-k: same ids and log-probs from the vLLM engine (sharded or not) and the transformers forward
    for label in ("tp2", "hf"):
        np.testing.assert_array_equal(_dense(out[label], "topk_ids", L)[mask], _dense(out["tp1"], "topk_ids", L)[mask])
        np.testing.assert_allclose(_dense(out[label], "topk_logprobs", L)[mask], _dense(out["tp1"], "topk_logprobs", L)[mask], atol=1e-4)
    assert np.all(np.diff(_dense(out["tp1"], "topk_logprobs", L)[mask], axis=-1) <= 1e-6)  # sorted by rank
    # full vocabulary: the same last-layer (post-norm) states at response positions, zeros elsewhere
    ref = hidden["hf"].to_positions(hidden["hf"].hidden_RTH, L)
    assert np.abs(ref[mask]).sum(-1).min() > 0 and not ref[~mask].any()
    for label in ("tp1", "tp2"):
        assert hidden[label].hidden_dtype == "float32"
        np.testing.assert_allclose(hidden[label].to_positions(hidden[label].hidden_RTH, L), ref, atol=1e-4)
        np.testing.assert_array_equal(heads[label][0], heads["hf"][0])
        assert heads[label][1] is None and heads["hf"][1] is None


def test_tokenizer_mismatch_names_both_models(tmp_path):
    from transformers import AutoTokenizer

    from mopd_ray.models import tiny

    student = tiny.build_tiny_model(tmp_path / "student", TinyModelConfig())
    old = tiny.TOKENIZER_VOCAB_SIZE
    tiny.TOKENIZER_VOCAB_SIZE = 300  # another vocabulary
    try:
        other = tiny.build_tiny_model(tmp_path / "other", TinyModelConfig(seed=1))
    finally:
        tiny.TOKENIZER_VOCAB_SIZE = old
    fp_s = tokenizer_fingerprint(AutoTokenizer.from_pretrained(student), 320)
    fp_o = tokenizer_fingerprint(AutoTokenizer.from_pretrained(other), 320)
    with pytest.raises(TokenizerMismatchError, match="teacher 'math'.*student 'stu'"):
        check_compatible(fp_s, "stu", fp_o, "math")
    # a padded embedding (more rows than tokens) is tolerated; fewer rows is not
    check_compatible(fp_s, "stu", {**fp_s, "embedding_rows": 384}, "padded")
    with pytest.raises(TokenizerMismatchError, match="fewer than"):
        check_compatible(fp_s, "stu", {**fp_s, "embedding_rows": 100}, "short")


def test_impossible_placement_fails_fast_with_a_clear_error(local_ray, artifacts):
    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "learner.num_cpus_per_rank=64", "cluster.placement_timeout_s=3")
    with pytest.raises(PlacementError, match="role 'learner' could not be placed within 3 s.*'CPU': 64"):
        make_learner_group(cfg, sorted(cfg.teachers.models))


def _perturb(actor):
    """Runs inside a teacher actor: noise on the weights its vLLM engine's worker holds (one replica)."""
    def add_noise(worker):
        import torch

        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in worker.model_runner.get_model().parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return True

    return actor.llm.collective_rpc(add_noise)


def test_preflight_probe_catches_a_replica_serving_other_weights(local_ray, artifacts):
    """Two replicas of one teacher agree with each other and with a transformers forward of the folder;
    after one replica's weights are perturbed in its engine, the probe fails naming that replica, against
    the transformers reference and (without a reference) against replica 0."""
    from transformers import AutoTokenizer

    from mopd_ray import preflight
    from mopd_ray.roles import student_fingerprint

    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", "teachers.models.add_expert.replicas=2")
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    fp = student_fingerprint(tok, cfg.model.path)
    probes = preflight.probe_sequences(tok, fp["stop_ids"])
    group = make_teacher_group(cfg, "add_expert")
    try:
        group.gather(group.call_all("ready"))
        found = preflight.check_teachers(cfg, {"add_expert": group}, fp, probes)
        assert found["reference"] < 1e-4 and found["replicas"] == 0.0
        assert ray.get(group.actors[1].__ray_call__.remote(_perturb)) == [True]
        with pytest.raises(preflight.PreflightError, match="teacher 'add_expert' replica 1 \\(Qwen2ForCausalLM\\): its "
                                                           "engine's log-probs of the probe sequences differ from a "
                                                           "transformers forward"):
            preflight.check_teachers(cfg, {"add_expert": group}, fp, probes)
        no_ref = compose_cfg(f"run.artifacts_dir={artifacts}", "teachers.models.add_expert.replicas=2",
                             "teachers.preflight.reference_max_gb=0")
        with pytest.raises(preflight.PreflightError, match="teacher 'add_expert' replica 1 disagrees with replica 0"):
            preflight.check_teachers(no_ref, {"add_expert": group}, fp, probes)
    finally:
        group.shutdown()
