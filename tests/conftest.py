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
