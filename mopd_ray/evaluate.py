"""Per-domain evaluation: greedy accuracy and pass@k through vLLM, the domain's reward as the judge.

``evaluate_llm`` runs on any vLLM ``LLM`` (a rollout engine holding the current student, or a
stand-alone engine for a teacher or a checkpoint). pass@k uses the unbiased estimator of Chen et al.
(2021) from n >= k samples at temperature 1: 1 - C(n - c, k) / C(n, k), c = correct samples.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .data.domains import reward_for


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_llm(llm, tokenizer, prompts: list, k: int = 4, seed: int = 0, max_new_tokens: int = 16) -> dict:
    """prompts: rows with prompt_ids, domain, answer. Returns {domain: {accuracy, pass@k, n}}."""
    from vllm import SamplingParams

    inputs = [{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts]
    greedy = llm.generate(inputs, SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    sampled = None
    if k > 0:
        sampled = llm.generate(inputs, [SamplingParams(n=k, temperature=1.0, max_tokens=max_new_tokens,
                                                       seed=seed * 7919 + i) for i in range(len(prompts))],
                               use_tqdm=False)
    correct, passk, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for i, p in enumerate(prompts):
        d = p["domain"]
        text = tokenizer.decode(greedy[i].outputs[0].token_ids, skip_special_tokens=True)
        r = reward_for(d, text, p.get("answer"))
        if r is None:
            continue
        count[d] += 1
        correct[d] += r
        if sampled is not None:
            c = sum(reward_for(d, tokenizer.decode(o.token_ids, skip_special_tokens=True), p["answer"]) >= 1.0
                    for o in sampled[i].outputs)
            passk[d] += pass_at_k(k, int(c), k)
    out = {d: {"accuracy": correct[d] / count[d], "n": count[d]} for d in count}
    if sampled is not None:
        for d in count:
            out[d][f"pass@{k}"] = passk[d] / count[d]
    return out


def merge_results(parts: list) -> dict:
    """Combine per-replica results weighted by their counts."""
    out: dict = {}
    for part in parts:
        for d, r in part.items():
            acc = out.setdefault(d, {"n": 0})
            n = acc["n"] + r["n"]
            for key, v in r.items():
                if key != "n":
                    acc[key] = (acc.get(key, 0.0) * acc["n"] + v * r["n"]) / n
            acc["n"] = n
    return out


def evaluate_model_dir(model_path: str, prompts: list, k: int = 4, seed: int = 0, max_new_tokens: int = 16,
                       max_model_len: int = 256) -> dict:
    """Stand-alone evaluation of a model folder (teachers, checkpoints) with an in-process engine."""
    from transformers import AutoTokenizer

    from .workers.vllm_engine import make_llm

    llm = make_llm(model_path, max_model_len=max_model_len, kv_cache_memory_bytes=128 << 20)
    try:
        return evaluate_llm(llm, AutoTokenizer.from_pretrained(model_path), prompts, k, seed, max_new_tokens)
    finally:
        del llm
