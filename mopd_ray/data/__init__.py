"""The data layer: synthetic verifiable domains, user prompt files and the resumable prompt sampler.

Pure Python + numpy: imports no torch, ray or vllm.
"""

from .dataset import DataError, PromptSampler, check_routes, filter_long_prompts, load_prompts
from .domains import DOMAINS, Domain, exact_match_reward, generate_split, get_domain, reward_for, write_jsonl

__all__ = [
    "DOMAINS", "DataError", "Domain", "PromptSampler", "check_routes", "exact_match_reward",
    "filter_long_prompts", "generate_split", "get_domain", "load_prompts", "reward_for", "write_jsonl",
]
