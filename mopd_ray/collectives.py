"""Every collective of the learner ranks and the weight-sync group goes through here, so one place owns
two invariants that the rest of the code would otherwise get wrong one call at a time:

- tensors are on the group's device: NCCL groups only take CUDA tensors (the learners' statistics and
  totals are built on CPU), gloo groups only CPU ones; results come back on the caller's device;
- groups have a timeout and NCCL reports errors asynchronously, so a dead peer fails the call instead of
  hanging a GPU run (TORCH_NCCL_ASYNC_ERROR_HANDLING).

It also answers which device a learner actor owns: under Ray each actor sees only its own GPU(s)
(CUDA_VISIBLE_DEVICES), so the device index is the position of Ray's GPU id among the visible ones (0
when Ray isolates the actor), not the rank; the rank within its node is reported separately.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def backend_of(group=None) -> str:
    """"nccl" or "gloo" of a torch.distributed group (None: the default one) or a standalone ProcessGroup."""
    name = type(group).__name__ if group is not None else ""
    if "NCCL" in name or "Gloo" in name:  # a standalone ProcessGroupNCCL / ProcessGroupGloo
        return "nccl" if "NCCL" in name else "gloo"
    return str(dist.get_backend(group)).lower()


def nccl_defaults() -> None:
    """NCCL's error handling for this process (before its first NCCL group); the user's own settings win."""
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)


def group_device(group=None) -> torch.device:
    if backend_of(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce ``t`` in place on the group's device (copied there and back if need be); returns ``t``."""
    dev = group_device(group)
    work = t if t.device == dev else t.to(dev)
    dist.all_reduce(work, op=op, group=group)
    if work is not t:
        t.copy_(work)
    return t


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, dist.ReduceOp.MAX, group).item() > 0)


def broadcast(group, t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast on a standalone ProcessGroup (the weight-sync group); ``t`` must be on the group's device
    (buffers are allocated there: copying a bucket back and forth would double its memory)."""
    want = "cuda" if backend_of(group) == "nccl" else "cpu"
    if t.device.type != want:
        raise ValueError(f"weight-sync broadcast of a {t.device.type} tensor on a {backend_of(group)} group: "
                         f"allocate the bucket on {want}")
    group.broadcast(t, src).wait()
    return t


def make_group(store, rank: int, world_size: int, timeout_s: float):
    """A standalone group on ``store``: NCCL when CUDA is present (with its timeout and async error
    handling), else gloo."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        nccl_defaults()
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def local_device_index() -> int:
    """The CUDA device index this process owns (0 without CUDA): Ray's GPU id among the visible devices."""
    if not torch.cuda.is_available():
        return 0
    try:
        import ray

        ids = [str(int(i)) for i in ray.get_gpu_ids()]
    except Exception:  # not in a Ray worker
        ids = []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ids and visible and ids[0] in visible:
        return visible.index(ids[0])
    if ids and not visible:
        return int(ids[0])
    return 0


def device_uuid(device=None) -> str | None:
    """The physical GPU of this process (its CUDA UUID, unique across nodes), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    return str(torch.cuda.get_device_properties(index).uuid)


class SharedGPUError(RuntimeError):
    """Two members of one NCCL group on the same GPU: NCCL refuses them ("Duplicate GPU detected")."""


def check_distinct_gpus(members: dict, group: str, fix: str) -> None:
    """``members``: {process name: device_uuid() or None}. NCCL cannot put two ranks of a group on one GPU
    (ncclInvalidUsage, "Duplicate GPU detected"): say which ones share, before the group is made, and how to
    place them apart. Processes without a GPU (CPU, gloo) never conflict."""
    seen: dict = {}
    clashes = []
    for name, uuid in members.items():
        if uuid is None:
            continue
        if uuid in seen:
            clashes.append(f"{seen[uuid]} and {name}")
        else:
            seen[uuid] = name
    if clashes:
        raise SharedGPUError(f"the {group} is an NCCL group, and NCCL cannot have two of its members on one GPU: "
                             f"{'; '.join(clashes)} share one (GPU {next(iter(u for u in seen))[:13]}...). {fix}")
