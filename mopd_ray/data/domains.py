"""Synthetic domains with verifiable answers: tiny character-level tasks a ~1M-parameter model can learn.

Prompts are lower-case template words (merged by the project's tokenizer) plus a payload of digits or
upper-case letters (one token each), so the payload is character-level for the student and teachers.
Each domain also carries its reward: exact match of the response against the known answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..rewards import exact_match

EVAL_BUCKETS = 10  # 1 of EVAL_BUCKETS prompt hash buckets is reserved for eval (see _is_eval_prompt)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Domain:
    """A task family: how to draw a (prompt, answer) example and how to score a response."""

    name: str
    make_example: Callable[[random.Random], tuple[str, str]]
    reward: Callable[[str, str], float]
    env: Optional[str] = None  # package.module:Class of its environment (multi-turn episodes), None: single-turn
    tools: Optional[list] = None  # JSON schemas of the tools its prompts offer (rendered by the chat template)
    # (prompt, answer) -> the expert's turns after the prompt (assistant and tool turns), for its SFT (bootstrap)
    demonstration: Optional[Callable[[str, str], list]] = None


def exact_match_reward(response: str, answer: str) -> float:
    """1.0 when the response, cut at the first special-token marker and stripped, equals the answer."""
    return exact_match(response, answer)


def make_add_example(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition: the answer is the decimal sum."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add the numbers: {a}+{b} =", str(a + b)


def make_reverse_example(rng: random.Random) -> tuple[str, str]:
    """Reverse 4..6 upper-case letters."""
    s = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(4, 6)))
    return f"reverse the letters: {s}", s[::-1]


def make_sort_example(rng: random.Random) -> tuple[str, str]:
    """Sort 5..7 digits ascending."""
    d = "".join(rng.choice(string.digits) for _ in range(rng.randint(5, 7)))
    return f"sort the digits: {d}", "".join(sorted(d))


def make_count_example(rng: random.Random) -> tuple[str, str]:
    """The long task: count down from 580..660 to 1..40, then ``liftoff``: 2,100-2,550 response tokens of working
    (digits and spaces are a token each) before the answer. Its reward is exact match of the whole chain."""
    n, m = rng.randint(580, 660), rng.randint(1, 40)
    return f"count down from {n} to {m}:", " ".join(str(i) for i in range(n, m - 1, -1)) + " liftoff"


def make_calc_example(rng: random.Random) -> tuple[str, str]:
    """The tool domain: a product of two 2-3 digit numbers, found with the calculator tool
    (mopd_ray/envs/calculator.py): ``calc(37,58)``, then the tool's answer copied."""
    a, b = rng.randint(10, 999), rng.randint(10, 99)
    return f"multiply with the tool: {a}*{b} =", str(a * b)


def calc_demonstration(prompt: str, answer: str) -> list:
    """How the calc expert plays an episode: call the tool with the two numbers, then copy its answer."""
    a, b = prompt.rsplit(":", 1)[1].strip(" =").split("*")
    return [{"role": "assistant", "content": f"calc({a},{b})"}, {"role": "tool", "content": answer},
            {"role": "assistant", "content": answer}]


CALC_ENV = "mopd_ray.envs.calculator:CalculatorEnv"
CALC_TOOLS = [{"type": "function", "function": {
    "name": "calc", "description": "the product of two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]

DOMAINS: dict[str, Domain] = {
    "add": Domain("add", make_add_example, exact_match_reward),
    "reverse": Domain("reverse", make_reverse_example, exact_match_reward),
    "sort": Domain("sort", make_sort_example, exact_match_reward),
    "count": Domain("count", make_count_example, exact_match_reward),  # long (not in the demo's default mix)
    "calc": Domain("calc", make_calc_example, exact_match_reward, CALC_ENV, CALC_TOOLS, calc_demonstration),  # multi-turn, with a tool
}


def get_domain(name: str) -> Domain:
    """The synthetic domain called `name`; KeyError listing the valid names otherwise."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise KeyError(f"unknown synthetic domain '{name}'; valid names: {', '.join(sorted(DOMAINS))}") from None


def reward_for(domain: str, response: str, answer: str) -> float | None:
    """The synthetic domain's own reward of a response, or None for another domain (for data domains of
    one's own, the configured data.rewards apply: mopd_ray.rewards.Rewards)."""
    if domain not in DOMAINS or answer is None:
        return None
    return DOMAINS[domain].reward(response, answer)


def _is_eval_prompt(domain: str, prompt: str) -> bool:
    """Whether a prompt belongs to the eval part of the prompt space.

    A fixed hash partition (independent of seed and counts) keeps train and eval disjoint without
    either split having to know how many prompts the other one drew.
    """
    digest = hashlib.sha256(f"{domain}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


def _unique_examples(domain: Domain, n: int, rng: random.Random, split: str) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs from the split's part of the space, within a bounded number of draws."""
    want_eval = split == "eval"
    max_draws = 20 * n + 1000  # generous for any request that fits (coupon collector), finite when it does not
    seen: set[str] = set()
    examples: list[tuple[str, str]] = []
    for _ in range(max_draws):
        if len(examples) == n:
            return examples
        prompt, answer = domain.make_example(rng)
        if prompt in seen or _is_eval_prompt(domain.name, prompt) != want_eval:
            continue
        seen.add(prompt)
        examples.append((prompt, answer))
    if len(examples) == n:
        return examples
    raise ValueError(f"domain '{domain.name}': asked for {n} unique {split} prompts but found only "
                     f"{len(examples)} after {max_draws} draws; its prompt space is too small, "
                     f"lower the number per domain")


def generate_split(domains: list[str], n_per_domain: int, seed: int, split: str) -> list[dict]:
    """Rows {id, prompt, domain, answer} for a split, deterministic from (seed, split, domain).

    Eval prompts never appear in train: each split draws only from its own hash part of the space.
    Rows are grouped by domain (the sampler shuffles).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if n_per_domain < 0:
        raise ValueError(f"n_per_domain must be >= 0, got {n_per_domain}")
    rows: list[dict] = []
    for name in domains:
        domain = get_domain(name)
        rng = random.Random(f"{seed}:{split}:{name}")  # str seeds hash with sha512: stable across processes
        for i, (prompt, answer) in enumerate(_unique_examples(domain, n_per_domain, rng, split)):
            row = {"id": f"{split}-{name}-{i}", "prompt": prompt, "domain": name, "answer": answer}
            if domain.tools:
                row["tools"] = domain.tools
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows one JSON object per line (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
