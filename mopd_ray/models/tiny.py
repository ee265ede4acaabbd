"""Tiny causal LMs and their tokenizer, built here from a seed (no model hub).

``build_tokenizer(seed)`` trains a byte-level BPE with the ``tokenizers`` library on a corpus of the
project's prompt templates, with special tokens and a ChatML chat template. Digits are split one per
token and the corpus holds no upper-case words, so task payloads (numbers, upper-case letters) are
character-level while template words are merged: tiny models can learn the synthetic domains.

``build_tiny_model(out_dir, spec)`` writes a model of one of ``TINY_ARCHS`` in transformers format
(config.json, model.safetensors, tokenizer files) that loads in transformers, vLLM (CPU build) and
under DeepSpeed. Weights depend only on ``spec.seed``; the tokenizer only on the tokenizer seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..config import TINY_ARCHS  # the families a tiny model can be built of

PAD, EOS, IM_START, IM_END = "<|endoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
TOKENIZER_VOCAB_SIZE = 320  # 256 byte symbols + specials + template merges
MARKER = "mopd_tiny.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Words of the prompt templates of the synthetic domains and the chat roles: the BPE merges them.
_TEMPLATE_WORDS = (
    "user assistant system add the numbers sum of plus reverse the letters string sort the digits "
    "ascending count how many times appears in answer question what is result please give only "
    "compute return output input task domain and a an of to"
).split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_TEMPLATE_WORDS) for _ in range(rng.randint(3, 9))]
        out.append(" ".join(words) + rng.choice([":", "?", ".", " =", ""]))
    return out


def build_tokenizer(seed: int = 0):
    """A deterministic byte-level BPE tokenizer as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def _padded(n: int, multiple: int) -> int:
    return n if multiple <= 1 else ((n + multiple - 1) // multiple) * multiple




def tiny_model_config(spec, tokenizer):
    """A transformers config for ``spec`` (a TinyModelConfig or anything with its fields): the family's
    own config class with its defaults (Gemma 2's logit soft-caps, Gemma 3's sliding window, Qwen3's q/k
    norms, Qwen3-MoE's experts), sized by the spec."""
    import transformers

    arch = spec.arch
    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny model arch '{arch}' is not one of {', '.join(TINY_ARCHS)}")
    head_dim = spec.hidden_size // spec.num_heads
    common = dict(
        vocab_size=_padded(len(tokenizer), spec.vocab_pad_to),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        rms_norm_eps=1e-6,
        initializer_range=0.05,
        dtype="float32",
    )
    extra = {
        "qwen2": ("Qwen2Config", {}), "llama": ("LlamaConfig", {}), "olmo2": ("Olmo2Config", {}),
        "phi3": ("Phi3Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": head_dim}),
        "mistral": ("MistralConfig", {"head_dim": head_dim, "sliding_window": None}),
        "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": head_dim, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": max(spec.intermediate_size // 4, 16),
                                         "decoder_sparse_step": 1}),
        # a final-logit cap small enough to bite at tiny logit sizes (its default, 30, would not), so that a
        # full-vocab head that ignores it is caught by the tests
        "gemma2": ("Gemma2Config", {"head_dim": head_dim, "sliding_window": 64, "query_pre_attn_scalar": head_dim,
                                    "final_logit_softcapping": 0.5}),
        "gemma3": ("Gemma3TextConfig", {"head_dim": head_dim, "sliding_window": 64,
                                        "query_pre_attn_scalar": head_dim}),
    }
    cls, kw = extra[arch]
    return getattr(transformers, cls)(**common, **kw)


def build_tiny_model(out_dir: str | os.PathLike, spec, tokenizer_seed: int = 0) -> Path:
    """Write a tiny model folder (atomically: a temp folder renamed into place). Returns its path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer(tokenizer_seed)
    config = tiny_model_config(spec, tokenizer)
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(devnull_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                         bos_token_id=config.bos_token_id).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"spec": _spec_dict(spec), "tokenizer_seed": tokenizer_seed},
                                             indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _spec_dict(spec) -> dict:
    if hasattr(spec, "__dataclass_fields__"):
        return asdict(spec)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(spec, resolve=True)


def ensure_tiny_model(path: str | os.PathLike, spec, tokenizer_seed: int = 0) -> tuple[Path, bool]:
    """Build the tiny model at ``path`` unless a folder is already there. Returns (path, built).

    An existing folder is never overwritten (it may hold trained weights); if it was built from another
    spec, the mismatch is an error that says how to resolve it.
    """
    p = Path(path)
    if (p / "config.json").exists():
        marker = p / MARKER
        if marker.exists():
            have = json.loads(marker.read_text())
            want = {"spec": _spec_dict(spec), "tokenizer_seed": tokenizer_seed}
            if have != want:
                raise ValueError(
                    f"model folder {p} was built from another tiny spec ({have}) than the config asks for "
                    f"({want}); delete the folder to rebuild it, or point the config at another path")
        return p, False
    return build_tiny_model(p, spec, tokenizer_seed), True


def _default_spec(**overrides):
    from ..config import TinyModelConfig

    return TinyModelConfig(**overrides)


def cli(argv: list[str] | None = None) -> None:
    """mopd-build-tiny --out DIR [--seed N] [--arch qwen2|llama] [--hidden-size H] ..."""
    ap = argparse.ArgumentParser(prog="mopd-build-tiny", description=cli.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-seed", type=int, default=0)
    ap.add_argument("--arch", default="qwen2", choices=list(TINY_ARCHS))
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=2)
    ap.add_argument("--num-kv-heads", type=int, default=1)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--force", action="store_true", help="overwrite an existing folder")
    a = ap.parse_args(argv)
    spec = _default_spec(arch=a.arch, hidden_size=a.hidden_size, num_layers=a.num_layers, num_heads=a.num_heads,
                         num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size, seed=a.seed)
    from ..config import ConfigError, validate  # noqa: F401  (head-dim rule lives with the config)
    from ..config import _tiny_ok

    _tiny_ok("mopd-build-tiny", spec)
    if a.force or not Path(a.out, "config.json").exists():
        path = build_tiny_model(a.out, spec, a.tokenizer_seed)
    else:
        path, _ = ensure_tiny_model(a.out, spec, a.tokenizer_seed)
    print(f"tiny model at {path}")


if __name__ == "__main__":
    cli()
