"""Multi-turn episodes on one vLLM engine: the student writes an assistant turn, the row's environment answers
(in its own Ray actor, mopd_ray/envs/pool.py), the answer's ids are appended, and so on until the environment ends
the episode or a limit is reached.

Episodes advance independently on the engine's step loop (continuous batching of turns): while one episode waits
for its environment, the others keep generating, and an episode's next turn joins the running batch as soon as
its environment answers; nothing waits for the slowest episode's turn. The trajectory is one token sequence: the
prompt, then every turn as generated (the student's sampled ids, the environment's rendered ids), with a mask of
the student's own tokens and their sampled log-probs. Rows without an environment are one-turn episodes.

Episodes carry over between steps (``env.carry_over``): a call returns as soon as the groups it was asked for have
finished, oldest first, and pauses the rest: their turns in generation are aborted with the tokens sampled so far
kept (vLLM streams them as deltas) and resumed at the next call, under the weights of then (a partial rollout: each
token keeps the log-prob it was sampled with, which the mismatch gate reads); their environment calls stay in
flight. So a step waits for its share of episodes, not for the longest one. An episode older than
``env.max_episode_lag`` weight versions is ended (truncated) at the next call.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..envs.base import EnvError
from ..envs.chat import TurnRenderer
from ..envs.pool import EnvPool, deadline_passed, wait_any
from ..rewards import strip_thinking


@dataclass
class Episode:
    key: str  # unique: engine request ids and environment instances
    item: dict  # the prompt item: prompt_ids, domain, answer, env, row, group_id, ...
    seed: Optional[int]
    seq: list  # prompt ids, then every turn's ids
    messages: list  # the conversation as the environment sees it
    plen: int
    action: list = field(default_factory=list)  # per response position: 1 the student's token, 0 the environment's
    lp: list = field(default_factory=list)  # per response position: sampled log-prob (0 at environment tokens)
    turn: list = field(default_factory=list)  # the student's ids of the turn in generation
    turn_start: int = 0  # where in seq the turn in generation (or the last one) began
    turns: int = 0
    requests: int = 0  # engine requests made (a paused turn resumes with a new one)
    last_text: str = ""
    reward: Optional[float] = None
    error: Optional[str] = None
    timed_out: bool = False
    finished: bool = False  # ended by the environment or the student's end-of-turn (not by a limit)
    truncated: bool = False  # ended by the token budget (or the turn limit while the environment went on)
    done: bool = False
    version: int = 0  # weight version of its first token
    started: float = 0.0
    ended: float = 0.0
    active_s: float = 0.0  # time inside generate calls (a paused episode's clock stops)
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
    max_episode_lag: Optional[int] = None  # carried episodes older than this many weight versions end truncated
    strip_thinking: bool = False  # the environment and the reward see a turn without its reasoning block
    thinking_tags: tuple = ("<think>", "</think>")
    thinking_in_context: str = "keep"  # strip: an earlier turn's reasoning block is cut from the later context

    @classmethod
    def of(cls, env: dict, temperature: float, top_p: float, max_new_tokens: int, stop_ids: list,
           logprobs: bool = True, thinking_tags=None, on_error: Optional[str] = None,
           max_episode_lag: Optional[int] = None) -> "EpisodeSettings":
        """From the env.* settings (mopd_ray.roles.env_spec) and the sampling of the caller; ``thinking_tags``:
        strip reasoning blocks with these tags (None: keep them)."""
        return cls(temperature, top_p, max_new_tokens, list(stop_ids), logprobs, int(env["max_turns"]),
                   env.get("step_timeout_s"), on_error or env.get("on_error", "mask"), env.get("max_turn_tokens"),
                   max_episode_lag, bool(thinking_tags), tuple(thinking_tags or ("<think>", "</think>")),
                   env.get("thinking_in_context", "keep"))


class EpisodeRunner:
    """The episodes of a rollout replica on ``llm`` (a vllm.LLM) with environments from ``pool``: those started
    and not yet returned live here between calls (``advance``)."""

    def __init__(self, llm, tokenizer, pool: Optional[EnvPool], model_name: str, sampled_logprobs: Callable):
        self.llm, self.tokenizer, self.pool, self.model_name = llm, tokenizer, pool, model_name
        self.sampled_logprobs = sampled_logprobs
        self.renderers: dict = {}
        self.calls = 0
        self.reset()

    def reset(self) -> None:
        """Forget every episode (a restored run re-sends the ones it had in flight)."""
        engine = self.llm.llm_engine
        if getattr(self, "generating", None):
            engine.abort_request(list(self.generating))
        if self.pool is not None:  # environment calls in flight are dropped
            for ref in getattr(self, "waiting", {}):
                self.pool.made_by.pop(ref, None)
        self.generating: dict = {}  # engine request id -> episode
        self.waiting: dict = {}  # environment call ref -> (episode, actor index, call start)
        self.paused: list = []  # episodes whose next turn (or the rest of one) is to be submitted
        self.groups: dict = {}  # group key -> its episodes
        self.done: list = []  # keys of finished groups, in the order they finished
        self.order: dict = {}  # group key -> (call it started in, position): returned oldest first
        self.paused_at = None

    @property
    def carried(self) -> int:
        """Groups started and not yet returned."""
        return len(self.groups)

    def _renderer(self, tools, stop_ids) -> TurnRenderer:
        key = json.dumps(tools or [], sort_keys=True)
        if key not in self.renderers:
            self.renderers[key] = TurnRenderer(self.tokenizer, stop_ids, self.model_name, tools or None)
        return self.renderers[key]

    def start(self, items: list, n: int, seed_of: Callable, version: int = 0) -> list:
        """``n`` new episodes of every item (``seed_of(item, sample)``: the engine seed of a sample's first
        turn); returns the items' group keys."""
        self.calls += 1
        now = time.monotonic()
        keys = []
        for i, it in enumerate(items):
            row = it.get("row") or {}
            first = list(row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}])
            g = f"mopd-ep{self.calls}-{i}"
            self.groups[g] = [Episode(f"{g}-{k}", it, seed_of(it, k), list(it["prompt_ids"]), list(first),
                                      len(it["prompt_ids"]), version=version, started=now) for k in range(n)]
            self.order[g] = (self.calls, i)
            self.paused += self.groups[g]
            keys.append(g)
        return keys

    def run(self, items: list, n: int, s: EpisodeSettings, seed_of: Callable, version: int = 0) -> list:
        """Every episode of ``items`` to its end (nothing carried): the Episodes in item order, ``n`` per item."""
        keys = self.start(items, n, seed_of, version)
        done = {k: g for k, g in self.advance(s, None, version, keys=keys)}
        return [e for k in keys for e in done[k]]

    def advance(self, s: EpisodeSettings, want: Optional[int], version: int = 0, keys=None) -> list:
        """Run the engine until ``want`` groups have finished (None: all of them, or all of ``keys``), then pause the
        rest. Returns (group key, episodes) of the finished groups taken, oldest started first."""
        engine = self.llm.llm_engine
        t_call = time.monotonic()
        if self.paused_at is not None:  # the environments' clocks stop while paused (the learner trains)
            gap = t_call - self.paused_at
            self.waiting = {ref: (ep, a, t0 + gap) for ref, (ep, a, t0) in self.waiting.items()}
        live = [e for g in self.groups.values() for e in g if not e.done]
        for ep in live:
            if s.max_episode_lag is not None and version - ep.version > s.max_episode_lag and ep in self.paused:
                self.paused.remove(ep)
                self._end(ep, truncated=True)
        for ep in self.paused:
            self._submit(engine, ep, s)
        self.paused = []
        target = (lambda: len(self.done) >= want) if want is not None else (
            lambda: all(k in self.done for k in keys) if keys is not None else not self.generating and not self.waiting)
        while not target() and (self.generating or self.waiting):
            if self.generating:
                for out in engine.step():
                    ep = self.generating.get(out.request_id)
                    if ep is not None:
                        self._tokens(ep, out, s)
            for ref in wait_any(list(self.waiting), 0.0 if self.generating else 0.05):
                ep, a, t0 = self.waiting.pop(ref)
                ep.env_s += time.monotonic() - t0
                self._env_answered(engine, ep, self.pool.result(a, ref), s)
            for ref, (ep, a, t0) in list(self.waiting.items()):
                if deadline_passed(t0, s.step_timeout_s):
                    del self.waiting[ref]
                    self.pool.timed_out(a, ref)
                    ep.env_s += time.monotonic() - t0
                    ep.timed_out = True
                    self._fail(ep, f"environment '{ep.item['env']}' did not answer within env.step_timeout_s="
                                   f"{s.step_timeout_s:g} s", s)
        self._pause(engine, t_call)
        take = sorted(self.done if keys is None else [k for k in self.done if k in keys], key=self.order.get)
        take = take if want is None else take[:want]
        out = [(k, self.groups.pop(k)) for k in take]
        self.done = [k for k in self.done if k not in set(take)]
        for k in take:
            self.order.pop(k)
        if self.pool is not None:
            self.pool.tidy({a for _, a, _ in self.waiting.values()})
        return out

    def _pause(self, engine, t_call: float) -> None:
        """Abort the turns in generation (their sampled tokens are kept) and stop the episodes' clocks."""
        now = time.monotonic()
        if self.generating:
            engine.abort_request(list(self.generating))
            self.paused += list(self.generating.values())
            self.generating = {}
        for g in self.groups.values():
            for ep in g:
                end = min(now, ep.ended) if ep.done else now
                ep.active_s += max(0.0, end - max(t_call, ep.started))
        self.paused_at = now

    def _submit(self, engine, ep: Episode, s: EpisodeSettings) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = s.max_new_tokens - ep.response_len
        turn_room = room if not s.max_turn_tokens else min(room, s.max_turn_tokens - len(ep.turn))
        if room <= 0 or turn_room <= 0:
            return self._turn_done(ep, "length", s)
        params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=turn_room,
                                stop_token_ids=list(s.stop_ids), logprobs=0 if s.logprobs else None,
                                detokenize=False, flat_logprobs=True, output_kind=RequestOutputKind.DELTA,
                                seed=None if ep.seed is None else (ep.seed + 7919 * ep.requests) % (2**31))
        if not ep.turn:
            ep.turn_start = len(ep.seq)
        rid = f"{ep.key}-r{ep.requests}"
        ep.requests += 1
        engine.add_request(rid, {"prompt_token_ids": list(ep.seq)}, params)
        self.generating[rid] = ep

    def _tokens(self, ep: Episode, out, s: EpisodeSettings) -> None:
        """A delta of a turn in generation; at its end, the turn goes to the environment."""
        o = out.outputs[0]
        toks = list(o.token_ids)
        ep.seq += toks
        ep.turn += toks
        ep.action += [1] * len(toks)
        ep.lp += self.sampled_logprobs(o.logprobs, toks) if (o.logprobs and toks) else [0.0] * len(toks)
        if out.finished:
            del self.generating[out.request_id]
            self._turn_done(ep, o.finish_reason, s)

    def _turn_done(self, ep: Episode, finish_reason, s: EpisodeSettings) -> None:
        ep.turns += 1
        ep.last_text = self.tokenizer.decode(ep.turn, skip_special_tokens=True)
        if s.strip_thinking:
            ep.last_text = strip_thinking(ep.last_text, tuple(s.thinking_tags))
        ep.turn = []
        ep.messages.append({"role": "assistant", "content": ep.last_text})
        cut = finish_reason == "length"
        if not ep.item.get("env") or (cut and ep.response_len >= s.max_new_tokens):  # one turn, or no budget left
            return self._end(ep, finished=not cut, truncated=cut)
        # a turn cut at env.max_turn_tokens goes to the environment as it is
        a, ref = self.pool.call(zlib.crc32(ep.key.encode()), ep.key, ep.item["env"], ep.item.get("row") or {},
                                ep.messages)
        self.waiting[ref] = (ep, a, time.monotonic())

    def _env_answered(self, engine, ep: Episode, answer: dict, s: EpisodeSettings) -> None:
        if "error" in answer:
            return self._fail(ep, answer["error"], s)
        reply = answer["ok"]
        if reply["done"]:
            ep.reward = reply["reward"]
            return self._end(ep, finished=True)
        if ep.turns >= s.max_turns:
            return self._end(ep, truncated=True)
        if s.thinking_in_context == "strip":
            self._cut_thinking(ep, s)
        ids = self._renderer(ep.item.get("row", {}).get("tools"), s.stop_ids).turn_ids(reply["messages"])
        if ep.response_len + len(ids) >= s.max_new_tokens:  # no room for the student's next token
            return self._end(ep, truncated=True)
        ep.seq += ids
        ep.action += [0] * len(ids)
        ep.lp += [0.0] * len(ids)
        ep.messages += reply["messages"]
        self._submit(engine, ep, s)

    def _tag_ids(self, s: EpisodeSettings) -> tuple:
        if getattr(self, "_tags", None) is None:
            ids = []
            for tag in s.thinking_tags:
                enc = self.tokenizer(tag, add_special_tokens=False)["input_ids"]
                if len(enc) != 1:
                    raise EnvError(f"env.thinking_in_context=strip needs each of rollout.thinking_tags to be one token "
                                   f"of {self.model_name}'s vocabulary; '{tag}' is {len(enc)} tokens {enc}: set the "
                                   "tags its chat template uses, or env.thinking_in_context=keep")
                ids.append(enc[0])
            self._tags = tuple(ids)
        return self._tags

    def _cut_thinking(self, ep: Episode, s: EpisodeSettings) -> None:
        cut_thinking(ep, *self._tag_ids(s))

    def _fail(self, ep: Episode, why: str, s: EpisodeSettings) -> None:
        row_id = (ep.item.get("row") or {}).get("id", "?")
        if s.on_error == "fail":
            raise EnvError(f"episode of row '{row_id}' (domain {ep.item['domain']}): {why}; the run stops "
                           "(env.on_error=fail; env.on_error=mask keeps the run going without that row's loss)")
        ep.error = why
        ep.action = [0] * len(ep.action)  # the row stays (its group, its shapes) but trains nothing
        self._end(ep)

    def _end(self, ep: Episode, finished: bool = False, truncated: bool = False) -> None:
        ep.finished, ep.truncated, ep.done, ep.ended = finished, truncated, True, time.monotonic()
        g = ep.key.rsplit("-", 1)[0]
        if g in self.groups and all(e.done for e in self.groups[g]) and g not in self.done:
            self.done.append(g)


def cut_thinking(ep: Episode, open_id: int, close_id: int) -> None:
    """Cut the last turn's reasoning block (tags included) from the episode's sequence, as templates that drop
    earlier reasoning render the conversation. Without a closing tag nothing is cut (the turn had no answer after
    it); without an opening tag the block began in the prompt (the template opened it): cut from the turn's start."""
    turn = ep.seq[ep.turn_start:]
    if close_id not in turn:
        return
    j = ep.turn_start + len(turn) - 1 - turn[::-1].index(close_id)
    head = turn[:j - ep.turn_start]
    i = ep.turn_start + head.index(open_id) if open_id in head else ep.turn_start
    a, b = i - ep.plen, j + 1 - ep.plen  # response positions
    del ep.seq[i:j + 1], ep.action[a:b], ep.lp[a:b]


def episode_stats(eps: list, carried: int = 0, version: int = 0) -> dict:
    """Small numbers for the step's metrics: turns, environment tokens and errors, how long episodes took (time
    inside generate calls), groups carried to the next call."""
    if not eps:
        return {}
    dur = [e.active_s for e in eps]
    return {"episodes": len(eps), "episode_turns_sum": sum(e.turns for e in eps),
            "episode_turns_max": max(e.turns for e in eps),
            "env_tokens": sum(len(e.action) - sum(e.action) for e in eps if e.error is None),
            "env_errors": sum(e.error is not None for e in eps), "env_timeouts": sum(e.timed_out for e in eps),
            "env_wait_s_sum": sum(e.env_s for e in eps), "episode_s_max": max(dur), "episode_s_sum": sum(dur),
            "episode_groups_carried": carried, "episode_lag_max": max(version - e.version for e in eps)}


def sampled_logprobs(logprobs, resp: list) -> list:
    """The rollout log-prob of each sampled token, from vLLM's flat log-probs (``logprobs=0``: the sampled
    token is each position's first entry) or, should the engine return them, per-position dicts."""
    from vllm.logprobs import FlatLogprobs

    if isinstance(logprobs, FlatLogprobs):
        starts = np.asarray(logprobs.start_indices, np.int64)
        if np.array_equal(np.asarray(logprobs.token_ids, np.int64)[starts], np.asarray(resp, np.int64)):
            return np.asarray(logprobs.logprobs, np.float32)[starts].tolist()
    return [logprobs[i][t].logprob for i, t in enumerate(resp)]
