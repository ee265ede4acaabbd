"""What a user's environment is: a class with one instance per episode, stepped after every assistant turn.

    class MyEnv:
        def __init__(self, row: dict, **kwargs): ...      # row: the data record (id, domain, answer, messages,
                                                          # tools, metadata); kwargs: env.kwargs of the config
        def step(self, messages: list[dict]) -> dict: ... # the conversation so far, ending with the student's turn

``step`` returns ``{"messages": [...], "done": bool, "reward": float | None}`` (or an ``EnvReply``):
the turns to append (``{"role": "tool" | "user", "content": str}``, rendered with the student's chat template
and given to the student as context, never trained on), whether the episode ends, and at the end its reward
(None: the domain's verifiable reward of the last assistant turn, ``data.rewards``). Environments run in
Ray actors of their own (mopd_ray/envs/pool.py), never in the engine's process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional


# what an episode's environment is given of its data row
ENV_ROW_KEYS = ("id", "prompt", "domain", "answer", "messages", "tools", "metadata")


class EnvError(RuntimeError):
    """An environment that cannot be loaded or answered wrongly; the message names the class and the fix."""


@dataclass
class EnvReply:
    messages: list = field(default_factory=list)  # turns to append: {"role": ..., "content": ...}
    done: bool = False
    reward: Optional[float] = None


def load_env_class(spec: str):
    """The class named ``package.module:Class`` (EnvError naming the spec and the fix otherwise)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise EnvError(f"environment '{spec}': give it as package.module:Class (data.env / data.envs.DOMAIN)")
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"environment '{spec}' cannot be loaded ({type(e).__name__}: {e}); check that the module is "
                       "importable from the run's working directory (or installed) and defines the class") from None
    if not callable(getattr(cls, "step", None)):
        raise EnvError(f"environment '{spec}' has no step(messages) method; see mopd_ray/envs/base.py")
    return cls


def as_reply(out: Any, spec: str) -> EnvReply:
    """A step's answer, checked: an EnvReply or a dict of its fields with well-formed turns."""
    if isinstance(out, dict):
        unknown = set(out) - {"messages", "done", "reward"}
        if unknown:
            raise EnvError(f"environment '{spec}' returned unknown keys {sorted(unknown)}; "
                           "return {'messages': [...], 'done': bool, 'reward': float | None}")
        out = EnvReply(list(out.get("messages") or []), bool(out.get("done", False)), out.get("reward"))
    if not isinstance(out, EnvReply):
        raise EnvError(f"environment '{spec}' returned {type(out).__name__}; return a dict "
                       "{'messages': [...], 'done': bool, 'reward': float | None} or an EnvReply")
    for m in out.messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise EnvError(f"environment '{spec}' returned the turn {m!r}; each turn is "
                           "{'role': 'tool' | 'user', 'content': str}")
        if m["role"] == "assistant":
            raise EnvError(f"environment '{spec}' returned an assistant turn; assistant turns are the student's")
    if not out.done and not out.messages:
        raise EnvError(f"environment '{spec}' neither ended the episode nor answered; return done=True or a turn")
    if out.reward is not None:
        out.reward = float(out.reward)
    return out
