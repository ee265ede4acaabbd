"""Verifiable rewards for any data domain: ``data.rewards.DOMAIN=NAME``.

NAME is one of
- ``exact``: the response (cut at the first special-token marker, stripped) equals the answer;
- ``numeric``: the last number in the response equals the answer as a number (``0.5`` = ``1/2`` = ``.50``);
- ``math_verify``: the math-verify package's LaTeX / expression equivalence (``\\frac{1}{2}`` = ``0.5``,
  ``\\boxed{...}`` answers), the checker GPU math recipes use;
- ``similarity``: partial credit, 1 - (character edit distance) / (length of the longer of response and
  answer); 1.0 only for an exact match. A training reward for GRPO where exact matches are too rare to
  learn from (``data.train_rewards``), not a judge;
- ``package.module:function``: a user function ``f(response: str, answer) -> float`` (1.0 = correct).

The built-in synthetic domains (add, reverse, sort) use ``exact`` unless configured otherwise; any other
domain without an entry has no reward (NaN: GRPO and the evaluation skip it). ``data.train_rewards.DOMAIN=NAME``
replaces a domain's reward for training only (the rollouts GRPO learns from); the evaluation keeps judging
by ``data.rewards``. Rewards run where the
responses are (the rollout engines' actors). ``math_verify`` and user functions run in a child process,
one call at a time under ``data.reward_timeout_s`` each: a call that takes longer scores 0 and is
counted (``reward/timeouts``), a call that raises stops the run with a ``RewardError`` naming the
domain, the function, the response and the fix.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)
END_MARKER_PREFIX = "<|"  # special tokens such as <|im_end|> start with this; nothing after it is the answer
BUILTIN_REWARDS = ("exact", "numeric", "math_verify", "similarity")
IN_PROCESS = ("exact", "numeric", "similarity")  # cheap and bounded: no child process needed
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")


class RewardError(RuntimeError):
    """A reward function that cannot run or raised; the message names the domain, function and fix."""


def strip_thinking(text: str, tags=("<think>", "</think>")) -> str:
    """The text without its reasoning block: after the last closing tag (templates that open the block in the
    prompt leave only the closing one in the response), else before an opening tag that never closed."""
    open_tag, close_tag = tags
    if close_tag in text:
        return text.rsplit(close_tag, 1)[1].lstrip()
    if open_tag in text:
        return text.split(open_tag, 1)[0]
    return text


def answer_text(response: str) -> str:
    """The response up to the first special-token marker, stripped."""
    return response.split(END_MARKER_PREFIX, 1)[0].strip()


def exact_match(response: str, answer: Any) -> float:
    return 1.0 if answer_text(response) == str(answer).strip() else 0.0


def _to_number(text: str) -> Optional[Fraction]:
    text = text.replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        value = float(text)
        return Fraction(value) if math.isfinite(value) else None
    except (ValueError, ZeroDivisionError):
        return None


def numeric_match(response: str, answer: Any) -> float:
    """1.0 when the last number in the response equals the answer (relative tolerance 1e-6)."""
    gold = _to_number(str(answer))
    if gold is None:
        raise ValueError(f"answer {answer!r} is not a number (the 'numeric' reward needs numeric answers)")
    found = _NUMBER.findall(answer_text(response))
    pred = _to_number(found[-1]) if found else None
    if pred is None:
        return 0.0
    return 1.0 if abs(float(pred) - float(gold)) <= 1e-6 * max(1.0, abs(float(gold))) else 0.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of characters), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(response: str, answer: Any) -> float:
    """Partial credit in [0, 1]: 1 - edit distance / longer length (1.0 only for an exact match)."""
    pred, gold = answer_text(response), str(answer).strip()
    longer = max(len(pred), len(gold))
    return 1.0 if longer == 0 else 1.0 - edit_distance(pred, gold) / longer


def math_verify_match(response: str, answer: Any) -> float:
    """math-verify equivalence of the response's final answer and the gold answer (LaTeX or plain)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" notes: we time calls ourselves
    gold_text = str(answer)
    gold = parse(gold_text if "$" in gold_text or "\\boxed" in gold_text else f"${gold_text}$", parsing_timeout=None)
    pred = parse(answer_text(response), parsing_timeout=None)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=None) else 0.0


_FUNCTIONS: dict[str, Callable[[str, Any], float]] = {"exact": exact_match, "numeric": numeric_match,
                                                      "math_verify": math_verify_match, "similarity": similarity}


def resolve(name: str) -> Callable[[str, Any], float]:
    """The reward function called ``name`` (a built-in or ``package.module:function``); RewardError if none."""
    if name in _FUNCTIONS:
        return _FUNCTIONS[name]
    if ":" not in name:
        raise RewardError(f"unknown reward '{name}': use one of {', '.join(BUILTIN_REWARDS)} or a function "
                          "given as package.module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward function '{name}' cannot be loaded ({type(e).__name__}: {e}); check the module "
                          "is importable from the run's working directory (or installed) and defines the function"
                          ) from None
    if not callable(fn):
        raise RewardError(f"reward '{name}' is not a function")
    return fn


def reward_names(by_domain: dict, builtin_domains) -> dict:
    """domain -> reward name: the configured ones, and ``exact`` for the built-in synthetic domains."""
    return {**{d: "exact" for d in builtin_domains}, **dict(by_domain)}


class _Sandbox:
    """A child process that runs reward calls one at a time, each under a wall-clock limit (SIGALRM)."""

    def __init__(self, search_path: tuple = ()):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-m", "mopd_ray.rewards", str(to_child_r), str(from_child_w)],
                                     pass_fds=(to_child_r, from_child_w), env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          "PYTHONPATH": os.pathsep.join([*search_path, *filter(None, sys.path)])})
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.recv = Connection(from_child_r, writable=False)

    def call(self, name: str, items: list, timeout_s: float) -> list:
        self.send.send((name, items, timeout_s))
        # each call is bounded in the child; this outer bound catches a child stuck outside Python code
        if not self.recv.poll(timeout_s * len(items) + 60.0):
            self.close()
            raise RewardError(f"reward '{name}' did not return within {timeout_s:g} s x {len(items)} calls + 60 s "
                              "(stuck outside Python code?); fix the function or raise data.reward_timeout_s")
        return self.recv.recv()

    def close(self) -> None:
        for c in (self.send, self.recv):
            c.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Rewards:
    """The reward of each domain, scored in batches where the responses are."""

    def __init__(self, by_domain: dict, timeout_s: float = 10.0, builtin_domains=(), search_path: tuple = ()):
        self.search_path = tuple(search_path)  # where user modules are found (the driver's working directory)
        self.names = reward_names(by_domain, builtin_domains)
        self.timeout_s = float(timeout_s)
        self.timeouts = 0  # calls that ran out of time (scored 0), cumulative
        self._sandbox: Optional[_Sandbox] = None

    def has_reward(self, domain: str) -> bool:
        return domain in self.names

    def score(self, items: list) -> list:
        """items: (domain, response, answer). Returns a reward (float) or None (no reward) per item."""
        out: list = [None] * len(items)
        by_name: dict[str, list[int]] = {}
        for i, (domain, _, answer) in enumerate(items):
            if domain in self.names and answer is not None:
                by_name.setdefault(self.names[domain], []).append(i)
        for name, idx in by_name.items():
            pairs = [(items[i][1], items[i][2]) for i in idx]
            if name in IN_PROCESS:
                results = [_call(_FUNCTIONS[name], r, a) for r, a in pairs]
            else:
                if self._sandbox is None:
                    self._sandbox = _Sandbox(self.search_path)
                results = self._sandbox.call(name, pairs, self.timeout_s)
            for i, (status, value) in zip(idx, results):
                domain, response, answer = items[i]
                if status == "timeout":
                    self.timeouts += 1
                    out[i] = 0.0
                elif status == "error":
                    raise RewardError(f"reward '{name}' of domain '{domain}' failed on response {response[:80]!r} "
                                      f"(answer {answer!r}): {value}; fix the function, or route the domain to "
                                      f"another reward with data.rewards.{domain}=<name>")
                else:
                    out[i] = value
        return out

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


class _Timeout(Exception):
    pass


def _call(fn, response: str, answer: Any) -> tuple:
    try:
        value = fn(response, answer)
    except _Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the parent with the function's own message
        return "error", f"{type(e).__name__}: {e}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "error", f"returned {value!r}, not a number"
    return ("ok", value) if math.isfinite(value) else ("error", f"returned {value}, not a finite number")


def _serve(recv: Connection, send: Connection) -> None:
    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    functions: dict = {}
    while True:
        try:
            name, items, timeout_s = recv.recv()
        except EOFError:
            return
        try:
            fn = functions[name] if name in functions else functions.setdefault(name, resolve(name))
        except RewardError as e:
            send.send([("error", str(e))] * len(items))
            continue
        results = []
        for response, answer in items:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                results.append(_call(fn, response, answer))
            except _Timeout:
                results.append(("timeout", None))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        send.send(results)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
