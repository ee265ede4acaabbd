"""The entry point composes, validates, builds the tiny models and prints the plan."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _main(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "mopd_ray.main", f"run.artifacts_dir={tmp_path}/artifacts",
         f"hydra.run.dir={tmp_path}/run", *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_dry_run_prints_resolved_config_and_plan(tmp_path):
    proc = _main(tmp_path, "run.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher   add_expert" in proc.stdout and "domains=['sort']" in proc.stdout
    assert (tmp_path / "artifacts/tiny/student/model.safetensors").exists()
    assert (tmp_path / "artifacts/tiny/teacher_reverse/config.json").exists()
    assert "algorithm:" in (tmp_path / "run/resolved_config.yaml").read_text()


def test_config_error_exits_2_with_key(tmp_path):
    proc = _main(tmp_path, "learner.world_size=3", "run.dry_run=true")
    assert proc.returncode == 2
    assert "learner.world_size" in proc.stderr + proc.stdout
    assert not (tmp_path / "artifacts").exists()  # nothing is built for a config that cannot run
