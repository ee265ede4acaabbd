"""Multi-turn episodes on one vLLM engine: the student writes an assistant turn, the row's environment answers
(in its own Ray actor, mopd_ray/envs/pool.py), the answer's ids are appended, and so on until the environment ends
the episode or a limit is reached.

Episodes advance independently on the engine's step loop (continuous batching of turns): while one episode waits
for its environment, the others keep generating, and an episode's next turn joins the running batch as soon as
its environment answers; nothing waits for the slowest episode's turn. The trajectory is one token sequence: the
prompt, then every turn as generated (the student's sampled ids, the environment's rendered ids), with a mask of
the student's own tokens and their sampled log-probs. Rows without an environment are one-turn episodes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..envs.base import EnvError
from ..envs.chat import TurnRenderer
from ..envs.pool import EnvPool, deadline_passed, wait_any


@dataclass
class Episode:
    key: str  # unique in the call: engine request ids and environment instances
    item: dict  # the prompt item: prompt_ids, domain, answer, env, row, ...
    seed: Optional[int]
    seq: list  # prompt ids, then every turn's ids
    messages: list  # the conversation as the environment sees it
    plen: int
    action: list = field(default_factory=list)  # per response position: 1 the student's token, 0 the environment's
    lp: list = field(default_factory=list)  # per response position: sampled log-prob (0 at environment tokens)
    turns: int = 0
    last_text: str = ""
    reward: Optional[float] = None
    error: Optional[str] = None
    timed_out: bool = False
    finished: bool = False  # ended by the environment or the student's end-of-turn (not by a limit)
    truncated: bool = False  # ended by the token budget (or the turn limit while the environment went on)
    started: float = 0.0
    ended: float = 0.0
    env_s: float = 0.0  # time spent waiting for its environment

    @property
    def response_len(self) -> int:
        return len(self.seq) - self.plen


@dataclass
class EpisodeSettings:
    temperature: float
    top_p: float
    max_new_tokens: int  # the response budget of an episode: the student's and the environment's tokens
    stop_ids: list
    logprobs: bool = True
    max_turns: int = 4
    step_timeout_s: Optional[float] = 30.0
    on_error: str = "mask"  # mask: the row is kept without loss, counted | fail: the run stops
    max_turn_tokens: Optional[int] = None  # per assistant turn (None: the rest of the episode's budget)


class EpisodeRunner:
    """Runs the episodes of one generate call on ``llm`` (a vllm.LLM) with environments from ``pool``."""

    def __init__(self, llm, tokenizer, pool: Optional[EnvPool], model_name: str, sampled_logprobs: Callable):
        self.llm, self.tokenizer, self.pool, self.model_name = llm, tokenizer, pool, model_name
        self.sampled_logprobs = sampled_logprobs
        self.renderers: dict = {}
        self.calls = 0

    def _renderer(self, tools, stop_ids) -> TurnRenderer:
        key = json.dumps(tools or [], sort_keys=True)
        if key not in self.renderers:
            self.renderers[key] = TurnRenderer(self.tokenizer, stop_ids, self.model_name, tools or None)
        return self.renderers[key]

    def run(self, items: list, n: int, s: EpisodeSettings, seed_of: Callable) -> list:
        """``n`` episodes of every item (``seed_of(item, sample)``: the engine seed of a sample's first turn).
        Returns the Episodes in item order, ``n`` per item."""
        self.calls += 1
        now = time.monotonic()
        eps = []
        for i, it in enumerate(items):
            row = it.get("row") or {}
            first = list(row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}])
            for k in range(n):
                eps.append(Episode(f"mopd-ep{self.calls}-{i}-{k}", it, seed_of(it, k), list(it["prompt_ids"]),
                                   list(first), len(it["prompt_ids"]), started=now))
        engine = self.llm.llm_engine
        generating: dict = {}
        waiting: dict = {}  # ref -> (episode, actor index, call start)
        for ep in eps:
            self._submit(engine, ep, s, generating)
        while generating or waiting:
            if generating:
                for out in engine.step():
                    if out.finished:
                        ep = generating.pop(out.request_id)
                        self._turn_done(ep, out.outputs[0], s, waiting)
            for ref in wait_any(list(waiting), 0.0 if generating else 0.05):
                ep, a, t0 = waiting.pop(ref)
                ep.env_s += time.monotonic() - t0
                self._env_answered(engine, ep, self.pool.result(a, ref), s, generating)
            for ref, (ep, a, t0) in list(waiting.items()):
                if deadline_passed(t0, s.step_timeout_s):
                    del waiting[ref]
                    self.pool.timed_out(a)
                    ep.env_s += time.monotonic() - t0
                    ep.timed_out = True
                    self._fail(ep, f"environment '{ep.item['env']}' did not answer within env.step_timeout_s="
                                   f"{s.step_timeout_s:g} s", s)
        if self.pool is not None:
            self.pool.tidy()
        return eps

    def _submit(self, engine, ep: Episode, s: EpisodeSettings, generating: dict) -> None:
        from vllm import SamplingParams

        room = s.max_new_tokens - ep.response_len
        if room <= 0:
            return self._end(ep, truncated=True)
        params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p,
                                max_tokens=min(room, s.max_turn_tokens or room),
                                stop_token_ids=list(s.stop_ids), logprobs=0 if s.logprobs else None,
                                detokenize=False, flat_logprobs=True,
                                seed=None if ep.seed is None else (ep.seed + 7919 * ep.turns) % (2**31))
        rid = f"{ep.key}-t{ep.turns}"
        engine.add_request(rid, {"prompt_token_ids": list(ep.seq)}, params)
        generating[rid] = ep

    def _turn_done(self, ep: Episode, o, s: EpisodeSettings, waiting: dict) -> None:
        toks = list(o.token_ids)
        ep.seq += toks
        ep.action += [1] * len(toks)
        ep.lp += self.sampled_logprobs(o.logprobs, toks) if o.logprobs else [0.0] * len(toks)
        ep.turns += 1
        ep.last_text = self.tokenizer.decode(toks, skip_special_tokens=True)
        ep.messages.append({"role": "assistant", "content": ep.last_text})
        cut = o.finish_reason == "length"
        if not ep.item.get("env") or (cut and ep.response_len >= s.max_new_tokens):  # one turn, or no budget left
            return self._end(ep, finished=not cut, truncated=cut)
        # a turn cut at env.max_turn_tokens goes to the environment as it is
        a, ref = self.pool.call(hash(ep.key), ep.key, ep.item["env"], ep.item.get("row") or {}, ep.messages)
        waiting[ref] = (ep, a, time.monotonic())

    def _env_answered(self, engine, ep: Episode, answer: dict, s: EpisodeSettings, generating: dict) -> None:
        if "error" in answer:
            return self._fail(ep, answer["error"], s)
        reply = answer["ok"]
        if reply["done"]:
            ep.reward = reply["reward"]
            return self._end(ep, finished=True)
        if ep.turns >= s.max_turns:
            return self._end(ep, truncated=True)
        ids = self._renderer(ep.item.get("row", {}).get("tools"), s.stop_ids).turn_ids(reply["messages"])
        if ep.response_len + len(ids) >= s.max_new_tokens:  # no room for the student's next token
            return self._end(ep, truncated=True)
        ep.seq += ids
        ep.action += [0] * len(ids)
        ep.lp += [0.0] * len(ids)
        ep.messages += reply["messages"]
        self._submit(engine, ep, s, generating)

    def _fail(self, ep: Episode, why: str, s: EpisodeSettings) -> None:
        row_id = (ep.item.get("row") or {}).get("id", "?")
        if s.on_error == "fail":
            raise EnvError(f"episode of row '{row_id}' (domain {ep.item['domain']}): {why}; the run stops "
                           "(env.on_error=fail; env.on_error=mask keeps the run going without that row's loss)")
        ep.error = why
        ep.action = [0] * len(ep.action)  # the row stays (its group, its shapes) but trains nothing
        self._end(ep)

    @staticmethod
    def _end(ep: Episode, finished: bool = False, truncated: bool = False) -> None:
        ep.finished, ep.truncated, ep.ended = finished, truncated, time.monotonic()


def episode_stats(eps: list) -> dict:
    """Small numbers for the step's metrics: turns, environment tokens and errors, how long episodes took."""
    if not eps:
        return {}
    dur = [e.ended - e.started for e in eps]
    return {"episodes": len(eps), "episode_turns_sum": sum(e.turns for e in eps),
            "episode_turns_max": max(e.turns for e in eps),
            "env_tokens": sum(len(e.action) - sum(e.action) for e in eps if e.error is None),
            "env_errors": sum(e.error is not None for e in eps), "env_timeouts": sum(e.timed_out for e in eps),
            "env_wait_s_sum": sum(e.env_s for e in eps),
            "episode_s_max": max(dur), "episode_s_sum": sum(dur)}
