"""Helpers shared by the tests."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from mopd_ray.config import finalize, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return finalize(compose(config_name="config", overrides=list(overrides)))


ROOT = Path(__file__).resolve().parents[1]
# a driver run from the tests: no dashboard, wandb offline
FAST = ["cluster.include_dashboard=false", "logging.wandb_mode=offline"]


def run_main(args, cwd=ROOT, env=None, timeout=600):
    """``python -m mopd_ray.main ARGS`` in its own interpreter; it must exit 0."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mopd_ray.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
