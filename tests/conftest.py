"""Shared fixtures: tiny models built once per session (the project builds its own; no hub)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

from mopd_ray.utils.heavy import heavy_imports  # noqa: E402

with heavy_imports():  # what every test process imports, without the cycle collector's passes (see the module)
    import ray  # noqa: F401
    import torch  # noqa: F401


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


def ensure_local_ray():
    """Start the tests' local Ray cluster unless one is up (a test that starts its own calls this after
    shutting that one down, as the multi-node one does)."""
    import ray

    from mopd_ray.cluster import LOCAL_SYSTEM_CONFIG, WORKER_ENV

    if not ray.is_initialized():
        # address="local": always a new instance, never one found on this machine (a `ray start` head of
        # the job-submit test, or its stale address file, would otherwise be joined)
        ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False,
                 _system_config=dict(LOCAL_SYSTEM_CONFIG))
    return ray


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (one per module cost ~5 s each); every test shuts down the
    actors it starts."""
    import ray

    if ray.is_initialized():  # one a test before left up (the demo's, sized for the demo): start ours
        ray.shutdown()
    yield ensure_local_ray()
    if ray.is_initialized():
        ray.shutdown()


# The files that take longest (measured: `make test` prints the slowest tests), in that order.
LONGEST_FIRST = ("tests/runtime/test_job_submit.py", "tests/demo/test_demo.py", "tests/runtime/test_model_families.py",
                 "tests/runtime/test_end_to_end.py", "tests/runtime/test_multi_node.py", "tests/runtime/test_faults.py",
                 "tests/runtime/test_run_ownership.py", "tests/runtime/test_long_task.py", "tests/runtime/test_multirun.py",
                 "tests/runtime/test_served_teacher.py", "tests/runtime/test_agentic.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other tests with real engines, then the fast ones. `make test` runs
    the suite on two workers, a file per worker at a time (pytest-xdist, --dist loadfile): a long file
    started last would leave one worker alone at the end; the short fast files fill in the ends."""
    def order(item):
        path = item.nodeid.split("::")[0]
        rank = LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
        return rank, item.get_closest_marker("slow") is None

    items.sort(key=order)


def pytest_sessionfinish(session, exitstatus):
    """Each pytest process (and xdist worker) exits without collecting the heap of vLLM, torch and transformers that
    its in-process engines imported (mopd_ray.console.skip_exit_collection: ~2.5 s of CPU each)."""
    from mopd_ray.console import skip_exit_collection

    skip_exit_collection()
