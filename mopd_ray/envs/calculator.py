"""The built-in tool environment of the ``calc`` domain: a calculator the model calls as ``calc(a, b)``.

The task ("multiply with the tool: 37*58 =") is beyond a tiny model's arithmetic but not its copying: an expert
learns to call ``calc(37,58)``, read the tool's answer (``2146``) and write it as its final answer. One episode:
the assistant calls the tool (the environment answers with a ``tool`` turn holding the product), or answers (the
episode ends with reward 1.0 if the answer is the product, else 0.0). It is also the complete small example of
a user's environment (mopd_ray/envs/base.py): a class per episode with ``step(messages)``.
"""

from __future__ import annotations

import re

from ..rewards import answer_text

CALL = re.compile(r"calc\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")


class CalculatorEnv:
    """One episode of the calc domain; ``row["answer"]`` is the product asked for."""

    def __init__(self, row: dict, max_calls: int = 3):
        self.answer = str(row.get("answer", "")).strip()
        self.calls_left = int(max_calls)

    def step(self, messages: list) -> dict:
        said = answer_text(messages[-1]["content"])
        call = CALL.fullmatch(said)
        if call is None:  # a final answer
            return {"done": True, "reward": 1.0 if said == self.answer else 0.0}
        if self.calls_left <= 0:
            return {"done": True, "reward": 0.0}
        self.calls_left -= 1
        return {"messages": [{"role": "tool", "content": str(int(call.group(1)) * int(call.group(2)))}]}
