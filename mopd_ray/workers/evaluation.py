"""Greedy accuracy and pass@k of a vLLM engine on held-out prompts, the domain's reward as the judge
(a rollout engine evaluates the current student with it; mopd_ray/evaluate.py, any model folder).

pass@k uses the unbiased estimator of Chen et al. (2021) from n >= k samples at temperature 1:
1 - C(n - c, k) / C(n, k), c = correct samples (reward >= 1).
"""

from __future__ import annotations

import math
from collections import defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_llm(llm, tokenizer, prompts: list, rewards, k: int = 4, seed: int = 0, max_new_tokens: int = 16,
                 stop_token_ids=None, env: dict | None = None, model_name: str = "the model", runner=None,
                 thinking_tags=None) -> dict:
    """prompts: rows with prompt_ids, domain, answer (and ``env``: played as multi-turn episodes with the
    environments of ``env``, mopd_ray.roles.env_spec, by ``runner`` or one made here); rewards: a
    mopd_ray.rewards.Rewards. ``thinking_tags``: responses are judged without their reasoning block.
    Returns {domain: {accuracy, pass@k, n}} over the domains that have a reward."""
    prompts = [p for p in prompts if rewards.has_reward(p["domain"]) and p.get("answer") is not None]
    if not prompts:
        return {}
    own = None
    if any(p.get("env") for p in prompts):
        if runner is None:
            own = runner = _runner(llm, tokenizer, env, model_name)
        play = _episodes(runner, tokenizer, env, stop_token_ids, max_new_tokens, thinking_tags)
    else:
        play = _single_turn(llm, tokenizer, stop_token_ids, max_new_tokens, thinking_tags)
    try:
        scores = _judge(rewards, prompts, play(prompts, 1, 0.0, None))
        correct, passk, count = defaultdict(float), defaultdict(float), defaultdict(int)
        for p, r in zip(prompts, scores):
            count[p["domain"]] += 1
            correct[p["domain"]] += r
        out = {d: {"accuracy": correct[d] / count[d], "n": count[d]} for d in count}
        if k > 0:
            flat = iter(_judge(rewards, prompts, play(prompts, k, 1.0, seed)))
            for p in prompts:
                c = sum(next(flat) >= 1.0 for _ in range(k))
                passk[p["domain"]] += pass_at_k(k, int(c), k)
            for d in count:
                out[d][f"pass@{k}"] = passk[d] / count[d]
        return out
    finally:
        if own is not None:
            own.pool.shutdown()


def _judge(rewards, prompts: list, played: list) -> list:
    """Scores of the (text, own reward or None) outcomes of every prompt: an episode's own reward, else the
    domain's reward of the text."""
    todo = [(p["domain"], text, p["answer"]) for p, outs in zip(prompts, played) for text, own in outs if own is None]
    judged = iter(rewards.score(todo))
    return [own if own is not None else next(judged) for outs in played for _, own in outs]


def _single_turn(llm, tokenizer, stop_token_ids, max_new_tokens: int, thinking_tags=None):
    from vllm import SamplingParams

    from ..rewards import strip_thinking

    text = (lambda o: tokenizer.decode(o.token_ids, skip_special_tokens=True)) if not thinking_tags else (
        lambda o: strip_thinking(tokenizer.decode(o.token_ids, skip_special_tokens=True), tuple(thinking_tags)))

    def play(prompts: list, n: int, temperature: float, seed):
        inputs = [{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens,
                                 stop_token_ids=list(stop_token_ids or []),
                                 seed=None if seed is None else seed * 7919 + i) for i in range(len(prompts))]
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [[(text(o), None) for o in g.outputs] for g in outs]
    return play


def _runner(llm, tokenizer, env: dict | None, model_name: str):
    from ..envs.pool import EnvPool
    from .episodes import EpisodeRunner
    from .episodes import sampled_logprobs as _sampled_logprobs

    if env is None:
        raise ValueError("rows with an environment need its settings (env: mopd_ray.roles.env_spec)")
    return EpisodeRunner(llm, tokenizer, EnvPool(env), model_name, _sampled_logprobs)


def _episodes(runner, tokenizer, env: dict, stop_token_ids, max_new_tokens: int, thinking_tags=None):
    """Plays rows as episodes (rows without an environment: one turn); an episode's reward is its environment's
    (None: the domain's reward of its last assistant turn); a failed episode scores 0."""
    from ..envs.base import ENV_ROW_KEYS
    from .episodes import EpisodeSettings

    stops = list(stop_token_ids or []) or [tokenizer.eos_token_id]

    def play(prompts: list, n: int, temperature: float, seed):
        s = EpisodeSettings.of(env, temperature, 1.0, max_new_tokens, stops, False, thinking_tags, on_error="mask")
        # the row the environment gets: as the rollout items carry it, or from a row of the data itself
        items = [{**p, "group_id": i, "row": p.get("row") or {k: p[k] for k in ENV_ROW_KEYS if p.get(k) is not None}}
                 for i, p in enumerate(prompts)]
        eps = runner.run(items, n, s, lambda it, k: None if seed is None else (seed * 7919 + it["group_id"] * 31 + k))
        return [[(e.last_text, 0.0 if e.error else e.reward) for e in eps[i * n:(i + 1) * n]] for i in range(len(items))]
    return play
