"""Environment actors: a rollout replica's pool of Ray actors that host its episodes' environments.

Each actor is threaded (``env.max_concurrency`` calls at once), so a slow or hanging episode holds one thread,
not the actor. Every call carries the episode's row and whole conversation: an actor that died (or was
restarted after calls that hung) rebuilds an episode's environment from them. A call that raises, answers
wrongly or runs past ``env.step_timeout_s`` fails that episode only (``EpisodeFailure``); the rollout worker
masks the row (or stops the run, ``env.on_error=fail``). Actors with hung calls are replaced between steps.
"""

from __future__ import annotations

import time
import traceback
from typing import Optional

from .base import EnvError, as_reply, load_env_class


class EnvActor:
    """Hosts the environments of episodes (one instance per episode key) of the classes it is asked for."""

    def __init__(self, kwargs_by_spec: dict, search_path: tuple = ()):
        import sys

        for p in search_path:  # the driver's working directory: a user's environment module beside the job
            if p not in sys.path:
                sys.path.append(p)
        self.kwargs_by_spec = kwargs_by_spec
        self.envs: dict = {}
        self.classes: dict = {}

    def step(self, key: str, spec: str, row: dict, messages: list) -> dict:
        """One step of episode ``key``; {"ok": reply fields} or {"error": text} (never raises: a user's
        exception is the episode's failure, not the actor's)."""
        try:
            env = self.envs.get(key)
            if env is None:
                if spec not in self.classes:
                    self.classes[spec] = load_env_class(spec)
                env = self.envs[key] = self.classes[spec](row, **dict(self.kwargs_by_spec.get(spec) or {}))
            reply = as_reply(env.step(messages), spec)
            if reply.done:
                self.close(key)
            return {"ok": {"messages": reply.messages, "done": reply.done, "reward": reply.reward}}
        except EnvError as e:
            self.envs.pop(key, None)
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - the user's code: any exception fails the episode
            self.envs.pop(key, None)
            tb = traceback.format_exc(limit=-3)
            return {"error": f"environment '{spec}' raised {type(e).__name__}: {e}\n{tb}"}

    def close(self, key: str) -> None:
        env = self.envs.pop(key, None)
        if env is not None and callable(getattr(env, "close", None)):
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def open_episodes(self) -> int:
        return len(self.envs)


class EnvPool:
    """The actors of one rollout replica, with the calls in flight on them."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.actors: list = []
        self.hung: set = set()  # actors with a call past its deadline: replaced by ``tidy``
        self.restarts = 0
        self.made_by: dict = {}  # call ref -> the actor it went to (a dead actor is replaced once, not per call)

    def _start(self):
        import ray

        cls = ray.remote(EnvActor).options(num_cpus=float(self.cfg.get("num_cpus", 0.0)),
                                           max_concurrency=int(self.cfg.get("max_concurrency", 16)),
                                           max_restarts=0)
        kwargs = {spec: dict(self.cfg.get("kwargs") or {}) for spec in self._specs()}
        return cls.remote(kwargs, tuple(self.cfg.get("search_path") or ()))

    def _specs(self) -> list:
        return sorted({s for s in [self.cfg.get("default"), *dict(self.cfg.get("by_domain") or {}).values()] if s})

    def ensure(self) -> None:
        n = max(1, int(self.cfg.get("actors_per_replica", 1)))
        while len(self.actors) < n:
            self.actors.append(self._start())

    def call(self, episode_index: int, key: str, spec: str, row: dict, messages: list):
        """(actor index, ObjectRef) of one step of an episode (episodes keep their actor)."""
        self.ensure()
        a = episode_index % len(self.actors)
        ref = self.actors[a].step.remote(key, spec, row, messages)
        self.made_by[ref] = self.actors[a]
        return a, ref

    def result(self, a: int, ref) -> dict:
        """The answer of a finished call: {"ok": ...} or {"error": ...} (a dead actor is replaced)."""
        import ray

        actor = self.made_by.pop(ref, None)
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            if actor is self.actors[a]:  # its other calls fail too: the actor already replaced stays
                self._replace(a)
            return {"error": f"the environment's actor died ({type(e).__name__}); it was restarted"}

    def timed_out(self, a: int, ref=None) -> None:
        self.made_by.pop(ref, None)
        self.hung.add(a)

    def _replace(self, a: int) -> None:
        import ray

        try:
            ray.kill(self.actors[a], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[a] = self._start()
        self.restarts += 1

    def tidy(self, busy=()) -> None:
        """Between steps: replace actors whose calls hung (their threads would never come back), except those
        with calls of other episodes still in flight (``busy``: carried episodes; replaced at a later call)."""
        for a in sorted(self.hung - set(busy)):
            self._replace(a)
            self.hung.discard(a)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        self.made_by.clear()


def wait_any(refs: list, timeout: float) -> list:
    """The refs among ``refs`` that are done, waiting up to ``timeout`` seconds for the first of them."""
    import ray

    if not refs:
        time.sleep(min(timeout, 0.01))
        return []
    first, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    if not first:
        return []
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return ready


def deadline_passed(started: float, timeout_s: Optional[float]) -> bool:
    return timeout_s is not None and timeout_s > 0 and time.monotonic() - started > timeout_s
