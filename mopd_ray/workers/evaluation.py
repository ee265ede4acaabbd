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
                 stop_token_ids=None) -> dict:
    """prompts: rows with prompt_ids, domain, answer; rewards: a mopd_ray.rewards.Rewards.
    Returns {domain: {accuracy, pass@k, n}} over the domains that have a reward."""
    from vllm import SamplingParams

    prompts = [p for p in prompts if rewards.has_reward(p["domain"]) and p.get("answer") is not None]
    if not prompts:
        return {}
    inputs = [{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts]
    greedy = llm.generate(inputs, SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                                 stop_token_ids=list(stop_token_ids or [])), use_tqdm=False)
    decode = (lambda o: tokenizer.decode(o.token_ids, skip_special_tokens=True))
    scores = rewards.score([(p["domain"], decode(g.outputs[0]), p["answer"]) for p, g in zip(prompts, greedy)])
    correct, passk, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for p, r in zip(prompts, scores):
        count[p["domain"]] += 1
        correct[p["domain"]] += r
    out = {d: {"accuracy": correct[d] / count[d], "n": count[d]} for d in count}
    if k > 0:
        sampled = llm.generate(inputs, [SamplingParams(n=k, temperature=1.0, max_tokens=max_new_tokens,
                                                       stop_token_ids=list(stop_token_ids or []),
                                                       seed=seed * 7919 + i) for i in range(len(prompts))],
                               use_tqdm=False)
        items = [(p["domain"], decode(o), p["answer"]) for p, s in zip(prompts, sampled) for o in s.outputs]
        flat = iter(rewards.score(items))
        for p in prompts:
            c = sum(next(flat) >= 1.0 for _ in range(k))
            passk[p["domain"]] += pass_at_k(k, int(c), k)
        for d in count:
            out[d][f"pass@{k}"] = passk[d] / count[d]
    return out
