"""Shared fixtures: tiny models built once per session (the project builds its own; no hub)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "student", TinyModelConfig(seed=0)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model

    spec = TinyModelConfig(arch="llama", num_kv_heads=2, seed=3, tie_word_embeddings=True)
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", spec))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Tiny student and teachers of the default config, built once for the session."""
    from mopd_ray.models.prepare import prepare_models

    from .helpers import compose_cfg

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
