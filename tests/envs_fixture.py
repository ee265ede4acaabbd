"""Environments given by module path in the tests (a user's own module, shipped with the job)."""

import itertools
import time
import zlib

_made = {}  # class -> count of its environments made in this actor process: every fourth one misbehaves


def _nth(cls) -> int:
    return next(_made.setdefault(cls, itertools.count()))


class TurnsEnv:
    """Answers every assistant turn with a tool turn ``ok <k>`` until ``turns`` tool turns were given, then ends
    the episode with reward 1.0."""

    def __init__(self, row: dict, turns: int = 2):
        self.left = turns

    def step(self, messages: list) -> dict:
        assert messages[-1]["role"] == "assistant"
        if self.left == 0:
            return {"done": True, "reward": 1.0}
        self.left -= 1
        return {"messages": [{"role": "tool", "content": f"ok {self.left}"}]}


class FlakyEnv(TurnsEnv):
    """A TurnsEnv that raises for every fourth episode (the first one of each actor among them)."""

    def __init__(self, row: dict):
        super().__init__(row, turns=2)
        self.nth = _nth(FlakyEnv)

    def step(self, messages: list) -> dict:
        if self.nth % 4 == 0:
            raise ValueError("the user's environment broke")
        return super().step(messages)


class HangingEnv(TurnsEnv):
    """A TurnsEnv that never answers (sleeps an hour) for every fourth episode, and is slow (0.3 s) for the next."""

    def __init__(self, row: dict):
        super().__init__(row, turns=1)
        self.mode = _nth(HangingEnv) % 4

    def step(self, messages: list) -> dict:
        if self.mode == 0:
            time.sleep(3600)
        if self.mode == 1:
            time.sleep(0.3)
        return super().step(messages)


class NoStep:
    """Not an environment: no step method."""


class LongTailEnv(TurnsEnv):
    """Episodes of 1 tool turn mostly, and of 6 for one row in eight (by id): a heavy tail of episode lengths."""

    def __init__(self, row: dict, long_turns: int = 6):
        super().__init__(row, turns=long_turns if zlib.crc32(str(row.get("id")).encode()) % 8 == 0 else 1)
