"""The GPU smoke check's CPU twin: ``python -m mopd_ray.smoke --device cpu`` (launch/gpu_smoke.sh runs the
same module on GPUs), in this process and on this session's Ray cluster, on one family whose teacher side
differs most from a plain decoder's (Gemma 2: tied head, final-logit soft-cap on the full-vocab head)."""

import pytest

from mopd_ray import smoke

pytestmark = pytest.mark.slow


def test_the_smoke_check_runs_a_family_through_sync_and_the_full_vocab_head_on_cpu(local_ray, tmp_path, capsys):
    rc = smoke.main(["--device", "cpu", "--families", "gemma2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out + "".join(p.read_text()[-3000:] for p in (tmp_path / "logs").rglob("*.log"))
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 1 and lines[0].startswith("PASS gemma2"), out
    assert "2 learner rank(s), sync by broadcast (gloo)" in lines[0] and "post-sync gap max" in lines[0]
    assert len(list((tmp_path / "runs").glob("*/gemma2/student_final"))) == 1


def test_a_failed_check_is_a_fail_line_naming_its_log_and_exit_1(tmp_path, capsys, monkeypatch):
    def broken(name, overrides, steps):
        print("the run's own output")
        raise RuntimeError("engine died\nmore")

    monkeypatch.setattr(smoke, "run_check", broken)
    assert smoke.main(["--device", "cpu", "--families", "qwen3,llama", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and "RuntimeError: engine died" in fails[0] and "log: " in fails[0], out
    assert "the run's own output" in next((tmp_path / "logs").glob("*/qwen3.log")).read_text()
    assert smoke.main(["--device", "cpu", "--families", "qwen9"]) == 2


def test_gpu_placement_keeps_nccl_members_on_distinct_gpus():
    """How the roles share GPUs (what launch/gpu_smoke.sh runs on its first GPU machine): one GPU: every
    role on a fraction of it, weights through the object store (NCCL refuses two members on one GPU);
    two: the learner on a GPU of its own, weights broadcast over NCCL; 2 ranks: > 0.5 GPU each."""
    one, transport = smoke.placement_overrides(1, 1)
    assert "rollout.weight_sync=object_store" in one and "learner.num_gpus_per_rank=0.2" in one
    two, transport = smoke.placement_overrides(2, 1)
    assert "rollout.weight_sync=broadcast" in two and "learner.num_gpus_per_rank=1" in two and "NCCL" in transport
    ranks, _ = smoke.placement_overrides(2, 2)
    assert "learner.num_gpus_per_rank=0.6" in ranks and "learner.world_size=2" in ranks
    names = [c[0] for c in smoke.checks(["qwen3", "gemma2"], 2, smoke.Path("/x"), 2, "L")]
    assert names == ["qwen3", "gemma2", "qwen3 2-rank"]
    from mopd_ray.config import compose_config, validate

    for f, overrides, _ in smoke.checks(["qwen3_moe"], 1, smoke.Path("/x"), 2):
        validate(compose_config(overrides))  # every GPU check composes into a valid config
