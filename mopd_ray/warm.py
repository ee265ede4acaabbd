"""Actor groups kept warm between the runs of one driver process (``cluster.reuse_engines``).

Starting a role costs more than a short run: each vLLM engine process imports vLLM (~6 s of CPU
here), loads its model and, on GPUs, captures graphs; each learner rank initialises its process group.
The demonstration's comparison runs, the cascade's stages and a Hydra sweep's jobs run one after
another in one driver with mostly the same engines, so a run that ends cleanly parks its groups here
and the next run takes those whose spec is its own:

- a rollout engine or teacher is taken only when every constructor argument is equal (same model
  folder, engine settings, rewards, resources); a rollout engine is reset to the folder's weights
  (weight version 0, prefix cache cleared) and the pre-flight probe checks it serves them;
- otherwise a parked rollout or teacher group of the same kind (class, size, resources, restart policy,
  runtime environment) is rebuilt in place with the new arguments (``RoleWorker.rebuild``: the engine is
  shut down and built again in the same processes, so vLLM is not imported again); if that fails, the
  group is shut down and a new one started;
- a learner group is taken when its size, resources and ZeRO stage are equal, and rebuilt with the new
  run's model and settings in the same processes (their process group kept);
- parked groups that the new run does not take are shut down when their resources are needed (oldest
  first), and all of them when Ray is shut down. A run that fails shuts its groups down instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Optional

import ray

from .cluster import BEFORE_RESERVE, ActorGroup, Bundle

log = logging.getLogger(__name__)


@dataclass
class GroupSpec:
    """An ActorGroup to build (ActorGroup's arguments) and its reuse key (None: never reused)."""

    name: str
    actor_cls: type
    n: int
    bundle: Bundle
    kwargs: dict = field(default_factory=dict)
    reuse_key: Optional[str] = None
    host_key: Optional[str] = None  # None: its processes never become another group of its kind

    def init_args(self, i: int) -> tuple:
        make = self.kwargs.get("init_args")
        return make(i) if make else ((), {})


def reuse_key(spec: GroupSpec, with_args: bool = True, extra=None) -> str:
    """Everything that makes two groups interchangeable: class, size, resources, restart policy, runtime
    environment, and (``with_args``) every actor's constructor arguments."""
    kw = {k: v for k, v in spec.kwargs.items() if k not in ("init_args", "call_timeout_s", "placement_timeout_s")}
    key = {"name": spec.name, "class": f"{spec.actor_cls.__module__}.{spec.actor_cls.__qualname__}", "n": spec.n,
           "bundle": spec.bundle.as_dict(), "kwargs": kw, "extra": extra,
           "args": [spec.init_args(i) for i in range(spec.n)] if with_args else None}
    return json.dumps(key, sort_keys=True, default=str)


def host_key(spec: GroupSpec) -> str:
    """What lets a group's processes become a group of ``spec`` in place (``RoleWorker.rebuild``): the same
    class, size, resources, restart policy and runtime environment; any name and constructor arguments."""
    return reuse_key(replace(spec, name="*"), with_args=False, extra="host")


class WarmGroups:
    def __init__(self) -> None:
        self._parked: list = []  # (reuse key, host key, Ray job id, group), oldest first

    def __len__(self) -> int:
        return len(self._parked)

    def _job(self) -> Optional[str]:
        """This driver's Ray session (job ids repeat across local clusters: the driver's node id does not)."""
        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        return f"{ctx.get_node_id()}/{ctx.get_job_id()}"

    @staticmethod
    def _stop(group: ActorGroup) -> None:
        try:
            group.shutdown()
        except Exception:  # its actors are gone already (a lost node, a finished session)
            pass

    def park(self, group: ActorGroup) -> None:
        key = getattr(group, "reuse_key", None)
        if key is None or self._job() is None:
            self._stop(group)
            return
        self._parked.append((key, getattr(group, "host_key", None), self._job(), group))

    def _take(self, key: str, host: bool = False) -> Optional[ActorGroup]:
        """The oldest parked group with reuse key ``key`` (``host``: with host key ``key``), if alive."""
        job = self._job()
        self._parked = [p for p in self._parked if p[2] == job]  # another Ray session's handles are gone
        for i, (k, h, _, group) in enumerate(self._parked):
            if (h if host else k) == key:
                del self._parked[i]
                if group.alive():
                    return group
                self._stop(group)
                return None
        return None

    def free_for(self, bundles: list) -> None:
        """Shut parked groups down, oldest first, until the cluster has the resources ``bundles`` ask for."""
        need: dict = {}
        for b in bundles:
            for k, v in b.as_dict().items():
                need[k] = need.get(k, 0.0) + v
        while self._parked and any(ray.available_resources().get(k, 0.0) + 1e-9 < v for k, v in need.items()):
            self._stop(self._parked.pop(0)[3])

    def evict(self) -> None:
        while self._parked:
            self._stop(self._parked.pop(0)[3])

    def realize(self, specs: list) -> list:
        """One ActorGroup per spec: a parked one with its key (reset for the new run), else a new one."""
        groups: list = [None] * len(specs)
        for i, s in enumerate(specs):
            if s.reuse_key is not None:
                groups[i] = self._take(s.reuse_key)
        rebuilt = set()
        for i, s in enumerate(specs):  # after every exact match: a group of the same kind, rebuilt in place
            if groups[i] is None and s.host_key is not None:
                groups[i] = self._rebuild(s)
                if groups[i] is not None:
                    rebuilt.add(i)
        fresh = [s for g, s in zip(groups, specs) if g is None]
        if fresh:
            self.free_for([s.bundle for s in fresh for _ in range(s.n * s.kwargs.get("shards", 1))])
        built = []
        try:
            for i, s in enumerate(specs):
                if i in rebuilt:
                    continue
                if groups[i] is not None:
                    log.debug("reusing the warm %s group", s.name)
                    groups[i].call_timeout_s = s.kwargs.get("call_timeout_s", groups[i].call_timeout_s)
                    groups[i].gather([groups[i].call(j, "reuse", *s.init_args(j)[0], **s.init_args(j)[1])
                                      for j in range(s.n)], "reuse")
                    continue
                groups[i] = ActorGroup(s.name, s.actor_cls, s.n, s.bundle, **s.kwargs)
                groups[i].reuse_key, groups[i].host_key = s.reuse_key, s.host_key
                built.append(groups[i])
        except BaseException:
            for g in [*built, *(g for g in groups if g is not None and g not in built)]:
                self._stop(g)
            raise
        return groups

    def _rebuild(self, s: GroupSpec) -> Optional[ActorGroup]:
        """A parked group of ``s``'s kind, its actors rebuilt with ``s``'s arguments; None if there is none
        or it could not be rebuilt (then it is shut down: a new group is started instead)."""
        group = self._take(s.host_key, host=True)
        if group is None:
            return None
        try:
            group.gather([group.call(j, "rebuild", *s.init_args(j)[0], **s.init_args(j)[1]) for j in range(s.n)],
                         "rebuild")
        except Exception as e:  # e.g. GPU memory the old engine did not give back
            log.info("the warm %s group could not become %s (%s): starting a new one", group.name, s.name,
                     str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._stop(group)
            return None
        log.debug("rebuilt the warm %s group as %s", group.name, s.name)
        group.name, group.reuse_key, group.rebuilt = s.name, s.reuse_key, True
        group.call_timeout_s = s.kwargs.get("call_timeout_s", group.call_timeout_s)
        return group


WARM = WarmGroups()
BEFORE_RESERVE.append(WARM.free_for)  # a group built elsewhere finds the resources parked groups held
