"""Ray resources, the actor group abstraction and deadlines (three thin layers; the driver calls names).

- ``init_ray``: local mode starts Ray on this machine, bound to loopback; cluster mode joins one.
- ``reserve``: a placement group per role, with a ready-timeout that turns "cannot be placed" into a
  clear error listing what was asked and what the cluster has, instead of a hang.
- ``ActorGroup``: N actors of one class in one placement group; call all, call one, gather with a
  deadline.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

# Every engine and rank runs one thread: more threads than cores made vLLM 10x slower on CPU.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "1",
    "DS_ACCELERATOR": "cpu",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}


# A local instance starts no Python workers ahead of need: Ray prestarts some (up to one per logical CPU) when the
# first driver connects and more as tasks queue, all without the run's runtime environment, so no role can use
# them (each ~1 s of CPU to start; measured: 25 such idle workers in one test-suite run).
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


class PlacementError(RuntimeError):
    pass


class RemoteCallError(RuntimeError):
    pass


class WorkerDiedError(RuntimeError):
    pass


def rendezvous_file() -> str:
    """A fresh file:// URL for a process group's store on this node (torch removes the file when done)."""
    import tempfile

    return f"file://{tempfile.gettempdir()}/mopd_rdzv_{uuid.uuid4().hex}"


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (lo on Linux, lo0 on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening_socket(host: str) -> socket.socket:
    """A socket listening on ``host`` at a port the OS picks: held from the moment its port is handed out until
    a TCPStore takes it over (``master_listen_fd``), so no other process can take the port in between (with
    free_port another process on the node did, once: EADDRINUSE at the weight-sync group's rendezvous)."""
    s = socket.socket()
    s.bind((host, 0))
    s.listen(128)
    return s


def init_ray(cluster_cfg, cpu_demand: float = 0.0, gpu: bool = False) -> None:
    """Start (local mode) or join (cluster mode, or under ``ray job submit``) a Ray cluster."""
    if ray.is_initialized():
        return
    from .console import QUIET_ENV

    env = dict(WORKER_ENV)
    if gpu:
        env.pop("DS_ACCELERATOR")
    verbose = os.environ.get("MOPD_VERBOSE") == "1"
    env["MOPD_VERBOSE"] = "1" if verbose else "0"
    if "DS_ACCELERATOR" in env:  # the driver too (transformers imports DeepSpeed when saving a model)
        os.environ.setdefault("DS_ACCELERATOR", env["DS_ACCELERATOR"])
    if not verbose:
        env.update(QUIET_ENV)
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING}
    address = os.environ.get("RAY_ADDRESS") or (cluster_cfg.address if cluster_cfg.mode == "cluster" else None)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **quiet)
        return
    # Loopback only: Ray swaps a 127.0.0.1 node address for the machine's public one and binds its
    # servers to it; its local-only mode (as on macOS) keeps every listener on 127.0.0.1 instead.
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by raylet, GCS and workers
    ray_constants.ENABLE_RAY_CLUSTER = False
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # gloo's pair sockets (learner and weight-sync groups, vLLM's TP groups) on loopback, not the
    # address the hostname resolves to; the groups' stores are files (roles._single_node)
    env.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    # Logical CPUs: processes of different roles take turns (rollout, score, train), so local mode
    # may hold more one-thread actors than cores.
    num_cpus = cluster_cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpu_demand))
    log.debug("starting a local Ray instance on 127.0.0.1 with %d logical CPUs", num_cpus)
    ray.init(
        address="local",  # always a new instance: never attach to another Ray found on this machine
        num_cpus=num_cpus,
        num_gpus=cluster_cfg.num_gpus,
        _node_ip_address="127.0.0.1",
        dashboard_host=cluster_cfg.dashboard_host,
        include_dashboard=cluster_cfg.include_dashboard,
        object_store_memory=cluster_cfg.object_store_memory,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        _system_config=dict(LOCAL_SYSTEM_CONFIG),  # a copy: Ray adds its own keys to it
        **quiet,
    )


@dataclass(frozen=True)
class Bundle:
    cpus: float
    gpus: float = 0.0
    custom: Optional[dict] = None

    def as_dict(self) -> dict:
        d = {"CPU": self.cpus}
        if self.gpus:
            d["GPU"] = self.gpus
        d.update(self.custom or {})
        return d


# called with the bundles about to be reserved (mopd_ray/warm.py frees parked groups' resources for them)
BEFORE_RESERVE: list = []


def reserve(name: str, bundles: list[Bundle], strategy: str, timeout_s: float, pg_name: Optional[str] = None):
    """A placement group for one role, ready within ``timeout_s`` or a PlacementError."""
    for hook in BEFORE_RESERVE:
        hook(bundles)
    pg = placement_group([b.as_dict() for b in bundles], strategy=strategy, name=pg_name or name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        asked = [b.as_dict() for b in bundles]
        have = ray.available_resources()
        total = ray.cluster_resources()
        remove_placement_group(pg)
        raise PlacementError(
            f"role '{name}' could not be placed within {timeout_s:g} s (cluster.placement_timeout_s): it asks for "
            f"{len(asked)} bundle(s) {asked} with strategy {strategy}; the cluster has {total} in total and "
            f"{have} free. Lower the role's replicas / tensor_parallel_size / world_size or its per-shard "
            f"resources, or add nodes.")
    return pg


def answers(actors: list, timeout_s: float = 30.0) -> bool:
    """Every one of ``actors`` answers ``ready`` within ``timeout_s`` (False: dead, restarting or hung)."""
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
        return True
    except Exception:
        return False


class ActorGroup:
    """``n`` actors of ``actor_cls``, one per bundle of a placement group; with ``shards`` > 1 (a
    tensor-parallel engine), one placement group per actor of ``shards`` bundles of ``bundle`` each, packed
    on one node (STRICT_PACK), the actor on bundle 0.

    The shard layout is how vLLM places tensor-parallel workers on GPUs: its Ray executor takes the
    engine actor's placement group and starts one worker per bundle (each bundle at most one GPU, the
    actor itself holding none: workers/vllm_engine.py ``engine_placement``). On CPU the same groups are
    reserved and vLLM's multiprocessing executor runs the shards as the actor's child processes on the
    CPUs the other bundles hold (vLLM's CPU build has no Ray executor)."""

    def __init__(self, name: str, actor_cls, n: int, bundle: Bundle, *, strategy: str = "PACK",
                 placement_timeout_s: float = 120.0, call_timeout_s: float = 600.0, init_args=None,
                 runtime_env: Optional[dict] = None, max_restarts: int = 0, max_task_retries: int = 0,
                 shards: int = 1):
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.shards = shards
        # unique in the Ray namespace: a warm group of the same role may still hold its own (mopd_ray/warm.py)
        tag = uuid.uuid4().hex[:8]
        if shards == 1:
            self.pgs = [reserve(name, [bundle] * n, strategy, placement_timeout_s, f"{name}-{tag}")]
            places = [(self.pgs[0], i) for i in range(n)]
        else:
            self.pgs = [reserve(f"{name} replica {i}", [bundle] * shards, "STRICT_PACK", placement_timeout_s,
                                f"{name}-{tag}-{i}") for i in range(n)]
            places = [(pg, 0) for pg in self.pgs]
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        self.actors = []
        for i, (pg, index) in enumerate(places):
            args, kwargs = init_args(i) if init_args else ((), {})
            opts: dict[str, Any] = dict(
                # a sharded engine's GPUs belong to its tensor-parallel workers, one per bundle
                num_cpus=bundle.cpus, num_gpus=bundle.gpus if shards == 1 else 0, name=None,
                max_restarts=max_restarts, max_task_retries=max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
            )
            if bundle.custom:
                opts["resources"] = dict(bundle.custom)
            env = dict(runtime_env or {})
            if shards > 1 and bundle.gpus:
                # Ray would set an actor without GPUs to CUDA_VISIBLE_DEVICES="": the engine process could not
                # see the node's GPUs it places its tensor-parallel workers on (vLLM's own Ray workers get this too)
                env["env_vars"] = {**env.get("env_vars", {}), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
            if env:
                opts["runtime_env"] = env
            self.actors.append(remote_cls.options(**opts).remote(*args, **kwargs))

    def __len__(self) -> int:
        return len(self.actors)

    def call_all(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, i: int, method: str, *args, **kwargs):
        return getattr(self.actors[i], method).remote(*args, **kwargs)

    def gather(self, refs, what: str = "call", timeout_s: Optional[float] = None):
        return get_with_deadline(refs, f"{self.name}.{what}", timeout_s or self.call_timeout_s)

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Every actor answers within ``timeout_s``."""
        return answers(self.actors, timeout_s)

    def shutdown(self) -> None:
        if getattr(self, "_down", False):
            return
        self._down = True
        for a in self.actors:
            ray.kill(a, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
        if getattr(self, "rebuilt", False):  # its actors' recorded arguments (RoleWorker.rebuild) go with them
            forget_init_args([a._actor_id.hex() for a in self.actors])


# + an actor id: in Ray's KV store, the constructor arguments of the actor's latest in-place rebuild
# (mopd_ray/workers/base.py RoleWorker.rebuild), which a restart of that actor takes instead of its first ones
INIT_ARGS_KEY = "mopd/init_args/"


def forget_init_args(actor_ids: list) -> None:
    """Drop the recorded arguments of actors that are gone (the shutdown of a rebuilt group)."""
    from ray.experimental.internal_kv import _internal_kv_del

    for a in actor_ids:
        try:
            _internal_kv_del(INIT_ARGS_KEY + a)
        except Exception:  # Ray is shutting down: the store goes with it
            pass


def gather_fail_fast(refs: list, names: list, what: str, timeout_s: float, hint: str = "") -> list:
    """Like ray.get on a list, but the first failure or death surfaces at once, with its name.

    ranks of a collective must not wait out a deadline for a peer that already died: waiting on
    the refs as they finish, the failed one is seen first.
    """
    index = {r: i for i, r in enumerate(refs)}
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise RemoteCallError(f"{what} did not finish within {timeout_s:g} s (cluster.call_timeout_s) on "
                                  f"{', '.join(names[index[r]] for r in pending)}. {hint}")
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(f"{names[index[done[0]]]} died during {what} ({type(e).__name__}). {hint}") from None
        except ray.exceptions.RayTaskError as e:
            raise RemoteCallError(f"{what} failed on {names[index[done[0]]]}: {e}. {hint}") from None
    return ray.get(refs)


def get_with_deadline(refs, what: str, timeout_s: float):
    """ray.get with a deadline: a hung engine becomes an error naming the call, not a hang."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallError(f"{what} did not finish within {timeout_s:g} s (cluster.call_timeout_s); the remote "
                              "worker may be hung or overloaded") from None
