"""DeepSpeed set-up shared by learner ranks: distributed env, CPU quirks, the ZeRO config dict."""

from __future__ import annotations

import os


def set_dist_env(rank: int, world_size: int, master_addr: str, master_port: int, device_index: int = 0):
    """Every rank needs these five, else DeepSpeed falls back to MPI discovery. LOCAL_RANK is the CUDA
    device DeepSpeed selects (``set_device(LOCAL_RANK)``): the index of this process's own device among
    the ones it sees (0 when Ray gives each actor one GPU), never the global rank (rank >= 1 would ask for
    a device that does not exist)."""
    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(device_index),
    })


def init_distributed(timeout_s: float = 600.0, init_method: str | None = None, rank: int = -1,
                     world_size: int = -1) -> None:
    """deepspeed.init_distributed on NCCL (GPU) or gloo (CPU), skipping the CPU shm op's 40 s JIT build.
    ``init_method`` file://PATH rendezvous through a file (one node) instead of a TCP store (env://)."""
    import datetime

    import torch

    from ..utils.heavy import heavy_imports

    with heavy_imports():
        import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # ZeRO does not use it
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s), init_method=init_method,
                               rank=rank, world_size=world_size)


def zero_config(*, stage: int, micro_batch_size: int, grad_accum: int, world_size: int, dtype: str = "float32",
                grad_clip: float = 1.0, offload_optimizer: bool = False) -> dict:
    """The DeepSpeed config dict: ZeRO stage, batch arithmetic, precision; a client torch optimizer."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW: FusedAdam/CPUAdam would JIT-compile for a minute
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    if offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg
