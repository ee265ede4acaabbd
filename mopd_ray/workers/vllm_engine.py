"""Building a vLLM engine with the settings each platform needs (CPU quirks from PLATFORM notes)."""

from __future__ import annotations

import os


CPU_KV_CACHE_BYTES = 256 << 20  # a CPU engine's KV cache when the config leaves it to us


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_engine_env(omp_bind: str | None = None, enforce_eager: bool = True) -> dict[str, str]:
    """Environment for a vLLM CPU engine: in-process engine core, one thread, explicit core binding;
    eager engines compile nothing (see TORCHDYNAMO_DISABLE below)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: 2.5 s start, ~1 GB, faster on few cores
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    if enforce_eager:
        # vLLM wraps two small sampler ops in torch.compile even in eager mode (the rank of each scored
        # token, the random sample); on CPU their first call costs ~4 s of inductor compiling per engine
        # process (measured: a first prompt-log-prob request 4.08 s, 0.045 s without), paid at every start.
        # An eager engine runs them eager too (the rank count holds one [tokens, vocab] bool more, a quarter
        # of the log-prob tensor it reads). A compiled engine (enforce_eager=false) compiles them as well.
        env["TORCHDYNAMO_DISABLE"] = "1"
    if omp_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
    return env


_dynamo_off_by_us = False  # whether this process's TORCHDYNAMO_DISABLE=1 came from cpu_engine_env


def apply_cpu_engine_env(omp_bind: str | None, enforce_eager: bool, tensor_parallel_size: int) -> dict:
    """Set a CPU engine's environment in this process (before vLLM is imported; TP workers inherit it).
    A compiled engine made after an eager one in the same process compiles again (unless the user
    disabled dynamo themselves)."""
    global _dynamo_off_by_us
    env = cpu_engine_env(omp_bind, enforce_eager)
    if tensor_parallel_size > 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tensor_parallel_size)))
    if "TORCHDYNAMO_DISABLE" in env:
        _dynamo_off_by_us = _dynamo_off_by_us or os.environ.get("TORCHDYNAMO_DISABLE") != "1"
    elif _dynamo_off_by_us:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
        _dynamo_off_by_us = False
    os.environ.update(env)
    return env


def current_placement_group():
    """The placement group this Ray actor was scheduled in (ActorGroup), or None (no Ray, a driver)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.placement_group import get_current_placement_group

        return get_current_placement_group()
    except Exception:  # not in a Ray worker
        return None


def engine_placement(tensor_parallel_size: int, gpus_per_shard: float, gpu: bool, placement_group) -> tuple:
    """(LLM keyword arguments, environment) that place an engine's tensor-parallel workers.

    On GPUs inside a Ray placement group (an ActorGroup with ``shards``: one group per replica, one bundle
    of at most one GPU per shard, the engine actor on bundle 0 holding no GPU), vLLM's Ray executor starts
    one worker per bundle: ``VLLM_RAY_BUNDLE_INDICES`` names the replica's bundles, ``VLLM_RAY_PER_WORKER_GPUS``
    each worker's share of its GPU (fractional when roles share a GPU), and the actor's own
    ``CUDA_VISIBLE_DEVICES`` (Ray sets it empty for an actor without GPUs) is dropped so that vLLM sees the
    node's devices; its engine process joins the job's cluster through ``RAY_ADDRESS``. Elsewhere (CPU,
    whose vLLM build has no Ray executor; a GPU engine outside Ray) vLLM's multiprocessing executor runs
    the shards as child processes. ``None`` in the environment: drop the variable."""
    if tensor_parallel_size <= 1:
        return {}, {}
    if gpu and placement_group is not None:
        return ({"distributed_executor_backend": "ray"},
                {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(i) for i in range(tensor_parallel_size)),
                 "VLLM_RAY_PER_WORKER_GPUS": f"{float(gpus_per_shard or 1.0):g}", "CUDA_VISIBLE_DEVICES": None})
    return {"distributed_executor_backend": "mp"}, {}


def make_llm(model_path: str, *, dtype: str = "float32", max_model_len: int = 256, seed: int = 0,
             max_logprobs: int = 20, tensor_parallel_size: int = 1, kv_cache_memory_bytes: int | None = None,
             enforce_eager: bool = True, gpu_memory_utilization: float = 0.6, trust_remote_code: bool = False,
             omp_bind: str | None = None, gpus_per_shard: float = 1.0, **extra):
    """An ``LLM`` for ``model_path``. On CPU: in-process, KV cache sized in bytes (``kv_cache_memory_bytes``,
    default CPU_KV_CACHE_BYTES), eager mode. On GPUs: ``gpu_memory_utilization``, and a fixed KV cache when
    ``kv_cache_memory_bytes`` is given.
    Tensor-parallel workers are placed by ``engine_placement``; the choice is kept as ``llm.mopd_placement``."""
    from ..utils.heavy import heavy_imports

    with heavy_imports():  # torch (see the module)
        gpu = on_gpu()
    if not gpu:
        apply_cpu_engine_env(omp_bind, enforce_eager, tensor_parallel_size)
    pg = current_placement_group()
    placement, env = engine_placement(tensor_parallel_size, gpus_per_shard, gpu, pg)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if placement.get("distributed_executor_backend") == "ray" and not os.environ.get("RAY_ADDRESS"):
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # the engine process joins this cluster
    with heavy_imports():  # after the environment above: vLLM reads it
        from vllm import LLM

    kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, max_logprobs=max_logprobs,
                  tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                  trust_remote_code=trust_remote_code, load_format="safetensors",
                  use_tqdm_on_load=os.environ.get("MOPD_VERBOSE") == "1", **extra)
    if gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes:  # a fixed KV cache: no profiling (engines sharing a GPU start together)
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    else:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes or CPU_KV_CACHE_BYTES)
        # A seeded request whose prefill is split across engine steps fails on CPU ("CPU Generator does
        # not use offset"): give the scheduler a token budget that holds a whole batch's prefills.
        kwargs.setdefault("max_num_batched_tokens", 65536)
        kwargs.setdefault("max_num_seqs", 1024)
    kwargs.update(placement)
    kwargs.setdefault("worker_extension_cls", "mopd_ray.workers.vllm_ext.WorkerExtension")
    llm = LLM(**kwargs)
    mask_padded_rows(llm, model_path, trust_remote_code)
    llm.mopd_placement = {"tensor_parallel_size": tensor_parallel_size,
                          "backend": placement.get("distributed_executor_backend", "uni"),
                          "placement_group": pg.id.hex() if pg is not None else None,
                          "env": {k: v for k, v in env.items() if v is not None}}
    return llm


def mask_padded_rows(llm, model_path: str, trust_remote_code: bool = False) -> int:
    """Mask the embedding rows past the tokenizer in every worker of ``llm`` (a no-op when there are none);
    returns how many. A worker that did not mask them stops here: the engine would sample ids no tokenizer
    decodes and normalise its log-probs over rows the learner does not have."""
    from transformers import AutoTokenizer

    from ..models.compat import token_rows

    rows = int(llm.llm_engine.model_config.get_vocab_size())
    tokens = token_rows(AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code))
    if rows <= tokens:
        return 0
    masked = llm.collective_rpc("mopd_mask_padded_rows", args=(tokens,))
    if any(int(m) != rows - tokens for m in masked):
        raise RuntimeError(f"{model_path}: the engine's workers masked {masked} padded rows, expected {rows - tokens} "
                           f"each ({rows} output rows, {tokens} tokens)")
    return rows - tokens


def close_llm(llm) -> None:
    """Shut an engine down in this process (and its worker processes, with tensor parallelism) and free
    its memory, so that another can be built here (vLLM's own way for several LLMs in one process)."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, core
    gc.collect()
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
