"""Runtime tests run the real engines (vLLM CPU, DeepSpeed on gloo, Ray) with tiny models."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mopd_ray.config import register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Tiny student and teachers of the default config, built once for the session."""
    from mopd_ray.models.prepare import prepare_models

    root = tmp_path_factory.mktemp("artifacts")
    prepare_models(compose_cfg(f"run.artifacts_dir={root}"))
    return root


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from mopd_ray.cluster import WORKER_ENV

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
    yield ray
    ray.shutdown()


os.environ.setdefault("RAY_DEDUP_LOGS", "1")
