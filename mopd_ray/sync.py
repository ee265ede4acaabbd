"""Weight sync from learner rank 0 to the rollout engines: two transports behind one interface.

- ``broadcast``: a torch.distributed process group of its own (learner rank 0 + every vLLM worker
  process of every engine, one per TP shard), built from a TCPStore so it is independent of the
  learners' DeepSpeed group: NCCL on GPUs, gloo on CPU, so the same path is tested here. Parameters
  travel in flat buckets, in a fixed name order both sides know (``ParamMeta``); each worker loads a
  bucket as soon as it arrives (workers/vllm_ext.py), so no side holds the whole model twice.
- ``object_store``: rank 0 puts {name: ndarray} once; every engine reads it zero-copy and hands it to
  its workers bucket by bucket.

Under ZeRO-3 parameters are gathered one at a time (``GatheredParameters``), so rank 0 never needs
more than one full layer beyond its bucket.
"""

from __future__ import annotations

import datetime
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .collectives import broadcast
from .collectives import make_group as group_on

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def checkpoint_layout(module: torch.nn.Module):
    """``(name, tensor) -> [(name, tensor)]``: a parameter as the model's checkpoint files hold it.

    transformers >= 5 may keep a model in memory in another layout than its files (Qwen3-MoE, Mixtral,
    DeepSeek: every expert's gate/up/down fused into 3-D tensors); vLLM loads the files' layout, and a
    fused tensor sent under its in-memory name is not loaded (measured: a Qwen3-MoE engine 0.35 nats off
    after one sync). The model's own reverse conversion (what ``save_pretrained`` writes) is applied per
    parameter; works on meta tensors too (``param_meta``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: memory layout == file layout
        return lambda name, t: [(name, t)]
    if not getattr(module, "_weight_conversions", None):
        from transformers.conversion_mapping import get_model_conversion_mapping

        if not hasattr(module, "config") or not get_model_conversion_mapping(module, add_legacy=False):
            return lambda name, t: [(name, t)]
    return lambda name, t: list(revert_weight_conversion(module, {name: t}).items())


def iter_full_params(module: torch.nn.Module, zero_stage: int,
                     checkpoint_names: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every parameter, in the checkpoint's layout (``checkpoint_layout``;
    ``checkpoint_names=False``: the in-memory one). Collective under ZeRO-3: call on all ranks."""
    gathered = None
    if zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters
    convert = checkpoint_layout(module) if checkpoint_names else (lambda name, t: [(name, t)])
    for name, p in module.named_parameters():
        ctx = gathered([p], modifier_rank=None) if gathered is not None else nullcontext()
        with ctx:
            yield from convert(name, p.data.detach().clone())


def param_meta(module: torch.nn.Module, zero_stage: int) -> list[ParamMeta]:
    """(name, shape, dtype) of what ``iter_full_params`` yields, in its order, without gathering."""
    convert = checkpoint_layout(module)
    out = []
    for n, p in module.named_parameters():
        shape = tuple(p.ds_shape) if zero_stage == 3 else tuple(p.shape)
        for name, t in convert(n, torch.empty(shape, dtype=p.dtype, device="meta")):
            out.append(ParamMeta(name, tuple(t.shape), dtype_name(t.dtype)))
    return out


def make_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0,
               listen_fd: int | None = None):
    """A standalone process group. gloo on CPU, NCCL when CUDA is present. ``host`` file://PATH: the
    members rendezvous through that file (one node, no listening socket); else rank 0 hosts a TCPStore, on the
    socket ``listen_fd`` when given (already listening on ``port``: cluster.listening_socket)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if host.startswith("file://"):
        store = dist.FileStore(host[len("file://"):], world_size)
        store.set_timeout(timeout)
    else:
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout,
                              **({"master_listen_fd": listen_fd} if rank == 0 and listen_fd is not None else {}))
    return group_on(store, rank, world_size, timeout_s)


def choose_bucket_bytes(configured: int, free_bytes: list) -> int:
    """The weight stream's bucket size: the configured one (``rollout.weight_sync_bucket_mb``; 0: one tensor
    per bucket), but at most a quarter of the least free memory among the engines' workers. A receiver holds
    about two buckets at once (the one arriving and the one whose last layer is still incomplete) beside a
    layer being processed, so this keeps a sync inside half the memory the engine has left (on a GPU: what
    gpu_memory_utilization leaves free). At least 1 MiB; a single tensor larger than a bucket still travels
    alone in one."""
    if configured <= 0:
        return 0
    known = [int(f) for f in free_bytes if f is not None and f > 0]
    if not known:
        return int(configured)
    return int(max(1 << 20, min(configured, min(known) // 4)))


def _buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Group consecutive same-dtype parameters into buckets of at most ``bucket_bytes`` (one may exceed)."""
    out, cur, size = [], [], 0
    for m in metas:
        nbytes = m.numel * torch.tensor([], dtype=_DTYPES[m.dtype]).element_size()
        if cur and (size + nbytes > bucket_bytes or cur[-1].dtype != m.dtype):
            out.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += nbytes
    if cur:
        out.append(cur)
    return out


def broadcast_send(group, named_params: Iterator[tuple[str, torch.Tensor]], metas: list[ParamMeta],
                   bucket_bytes: int, is_sender: bool, device: str = "cpu") -> int:
    """Learner side. All learner ranks iterate (ZeRO-3 gathers are collective); rank 0 sends. Returns bytes."""
    sent = 0
    it = iter(named_params)
    for bucket in _buckets(metas, bucket_bytes):
        parts = []
        for m in bucket:
            name, t = next(it)
            if name != m.name:
                raise RuntimeError(f"weight sync order mismatch: expected {m.name}, got {name}")
            parts.append(t.reshape(-1).to(_DTYPES[m.dtype]))
        if is_sender:
            flat = torch.cat(parts).to(device)
            broadcast(group, flat, 0)
            sent += flat.numel() * flat.element_size()
    return sent


def recv_buckets(group, metas: list[ParamMeta], bucket_bytes: int, device="cpu") -> Iterator[list]:
    """Engine side: yield each broadcast bucket as [(name, tensor view)] as soon as it has arrived.

    A fresh buffer per bucket (a consumer may hold views of earlier buckets); nothing else is kept,
    so the receiver never holds more than the buckets its consumer still references.
    """
    for bucket in _buckets(metas, bucket_bytes):
        flat = torch.empty(sum(m.numel for m in bucket), dtype=_DTYPES[bucket[0].dtype], device=device)
        broadcast(group, flat, 0)
        named, offset = [], 0
        for m in bucket:
            named.append((m.name, flat[offset: offset + m.numel].view(m.shape)))
            offset += m.numel
        yield named


def state_buckets(state, bucket_bytes: int) -> Iterator[list]:
    """{name: ndarray or tensor} (object-store zero-copy views), or an iterable of (name, tensor) pairs,
    as buckets of [(name, tensor)] of at most ``bucket_bytes`` each (one tensor may exceed it); no copy."""
    import warnings

    bucket, size = [], 0
    for name, arr in (state.items() if isinstance(state, dict) else state):
        with warnings.catch_warnings():  # read-only object-store views: vLLM copies them, never writes
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr) if isinstance(arr, np.ndarray) else arr
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def to_numpy_state(named_params: Iterator[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """For the object store: bfloat16 has no numpy dtype, so it travels as float32."""
    return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in named_params}


def from_numpy_state(state: dict[str, np.ndarray], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {n: (torch.from_numpy(np.array(a)) if dtype is None else torch.from_numpy(np.array(a)).to(dtype))
            for n, a in state.items()}
