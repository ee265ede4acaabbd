"""What every role's actor answers besides its work: where it runs, its process, and what it sees on disk;
and how a warm actor becomes another role of its kind in place (``rebuild``, mopd_ray/warm.py)."""

from __future__ import annotations

import functools
import os
from typing import Optional

_PROCESS_ENV: Optional[dict] = None  # this process's environment before its first role changed it


class RoleWorker:
    def __init_subclass__(cls, **kwargs):
        """Every role's constructor, in a new process (a first start, or Ray's restart of a dead actor),
        takes the arguments of the actor's latest ``rebuild``: Ray restarts an actor with the arguments it
        was created with, which would bring back the role it had before (another teacher's model)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            if not self.__dict__:  # not a rebuild, nor a subclass's super().__init__
                global _PROCESS_ENV
                if _PROCESS_ENV is None:
                    _PROCESS_ENV = dict(os.environ)
                args, kw = _latest_init_args(args, kw)
            init(self, *args, **kw)

        cls.__init__ = __init__

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> bool:
        return True

    def gpu_uuid(self):
        """This actor's own GPU (collectives.device_uuid), None on CPU."""
        from ..collectives import device_uuid

        return device_uuid()

    def engine_gpu_uuids(self) -> list:
        """The GPU of every worker process of this actor's vLLM engine (one per tensor-parallel shard)."""
        return list(self.llm.collective_rpc("mopd_device_uuid"))

    def engine_free_memory(self) -> list:
        """Free memory of every worker process of this actor's vLLM engine (bytes; vllm_ext.mopd_free_memory)."""
        return list(self.llm.collective_rpc("mopd_free_memory"))

    def engine_placement(self):
        """How this actor's vLLM engine placed its tensor-parallel workers (workers/vllm_engine.py), or None."""
        return getattr(getattr(self, "llm", None), "mopd_placement", None)

    def pid(self) -> int:
        import os

        return os.getpid()

    def reuse(self, *args, **kwargs) -> bool:
        """Taken by another run with these constructor arguments (mopd_ray/warm.py): a frozen role's own
        are equal to them, so nothing changes (roles with state reset it)."""
        return True

    def rebuild(self, *args, **kwargs) -> bool:
        """Become the role that these (other) constructor arguments make, in this process: the engine is
        shut down and built again here, without starting a process and importing vLLM again (~6-9 s of CPU).
        The arguments are recorded so that a restart of this actor by Ray comes back as this role."""
        self.close()
        _record_init_args(args, kwargs)
        if _PROCESS_ENV is not None:  # what the last engine set (its TP layout, thread binding) goes
            os.environ.clear()
            os.environ.update(_PROCESS_ENV)
        self.__dict__["_rebuilt"] = True  # a rebuild: the constructor takes these arguments as they are
        type(self).__init__(self, *args, **kwargs)
        return True

    def close(self) -> None:
        """Free what this role holds (its vLLM engine, its model) before it becomes another."""
        from ..utils.heavy import freeze_survivors

        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            from .vllm_engine import close_llm

            close_llm(llm)
        self.__dict__.clear()
        freeze_survivors()  # collected, then what survives frozen: the next engine's build skips it

    def read_token(self, path: str) -> tuple:
        """(this node's address, the file's text or None): the shared-storage probe (mopd_ray/storage.py)."""
        import ray

        try:
            with open(path, encoding="utf-8") as f:
                text: Optional[str] = f.read()
        except OSError:
            text = None
        return ray.util.get_node_ip_address(), text


def _actor_id() -> Optional[str]:
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        return None


def _record_init_args(args: tuple, kwargs: dict) -> None:
    actor = _actor_id()
    if actor is None:
        return
    import cloudpickle
    from ray.experimental.internal_kv import _internal_kv_put

    from ..cluster import INIT_ARGS_KEY

    _internal_kv_put(INIT_ARGS_KEY + actor, cloudpickle.dumps((args, kwargs)), overwrite=True)


def _latest_init_args(args: tuple, kwargs: dict) -> tuple:
    """``(args, kwargs)``, or the recorded arguments of this actor's latest rebuild when Ray restarted it."""
    actor = _actor_id()
    if actor is None:
        return args, kwargs
    import ray

    if not ray.get_runtime_context().was_current_actor_reconstructed:
        return args, kwargs
    import cloudpickle
    from ray.experimental.internal_kv import _internal_kv_get

    from ..cluster import INIT_ARGS_KEY

    blob = _internal_kv_get(INIT_ARGS_KEY + actor)
    return (args, kwargs) if blob is None else cloudpickle.loads(blob)

