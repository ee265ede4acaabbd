"""What every section of the configuration uses: the choices, ``ConfigError``, the tiny model's shape and the
primitive checks (mopd_ray/config.py holds the schema and re-exports these)."""

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

# vLLM's CPU attention accepts only these head sizes (PLATFORM.md); GPU backends accept a superset.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SIGNALS = ("sampled", "topk", "full_vocab")
DTYPES = ("float32", "bfloat16", "float16")
RUN_SIGNALS = SIGNALS + ("none",)  # none: no teacher, verifiable rewards only (GRPO; needs alpha > 0)
SELF_TEACHER = "self"
ADVANTAGE_NORMS = ("none", "batch", "teacher", "batch_mean", "teacher_mean")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


# The families a tiny model can be built of (mopd_ray/models/tiny.py; the architecture matrix:
# tests/runtime/test_model_families.py).
TINY_ARCHS = ("qwen2", "llama", "qwen3", "qwen3_moe", "mistral", "gemma2", "gemma3", "olmo2", "phi3")


@dataclass
class TinyModelConfig:
    """Shape of a tiny model that the project builds itself (no hub), of one of several families."""

    arch: str = "qwen2"  # one of TINY_ARCHS (qwen2, llama, qwen3, qwen3_moe, gemma3, ...)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    vocab_pad_to: int = 32  # embedding rows padded to a multiple of this (real models do it too)
    seed: int = 0


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        _fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_fraction(key: str, value) -> None:
    if not 0 < value <= 1:
        _fail(key, f"must be in (0, 1] (a fraction of the GPU's memory), got {value}")


def _tiny_ok(key: str, tiny) -> None:
    if tiny is None:
        return
    _check_choice(f"{key}.arch", tiny.arch, TINY_ARCHS)
    if tiny.hidden_size % tiny.num_heads:
        _fail(f"{key}.hidden_size", f"{tiny.hidden_size} is not divisible by num_heads={tiny.num_heads}")
    head_dim = tiny.hidden_size // tiny.num_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        _fail(f"{key}.num_heads", f"head dim hidden_size/num_heads = {head_dim} is not one vLLM's CPU attention "
              f"accepts ({', '.join(map(str, VLLM_CPU_HEAD_DIMS))}); change hidden_size or num_heads")
    if tiny.num_heads % tiny.num_kv_heads:
        _fail(f"{key}.num_kv_heads", f"num_heads={tiny.num_heads} is not divisible by num_kv_heads={tiny.num_kv_heads}")


def _open_dict() -> DictConfig:
    """An empty mapping that command-line overrides may add keys to without a leading '+'."""
    return OmegaConf.create({}, flags={"struct": False})
