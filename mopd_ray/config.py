"""Structured configuration: every default lives here, once. YAML under conf/ only overrides.

The dataclasses are registered with Hydra's ConfigStore as the schema of conf/config.yaml, so an
unknown key or a value of the wrong type fails at composition with the key's full name.
``validate(cfg)`` then checks the cross-field invariants and raises ``ConfigError`` with a message
that names the key and what to change.
"""

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

# vLLM's CPU attention accepts only these head sizes (PLATFORM.md); GPU backends accept a superset.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SIGNALS = ("sampled", "topk", "full_vocab")
DTYPES = ("float32", "bfloat16", "float16")
RUN_SIGNALS = SIGNALS + ("none",)  # none: no teacher, verifiable rewards only (GRPO; needs alpha > 0)
SELF_TEACHER = "self"
ADVANTAGE_NORMS = ("none", "batch", "teacher", "batch_mean", "teacher_mean")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def _open_dict() -> DictConfig:
    """An empty mapping that command-line overrides may add keys to without a leading '+'."""
    return OmegaConf.create({}, flags={"struct": False})


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


@dataclass
class ModelConfig:
    """The student. ``path`` is a transformers-format folder; ``tiny`` builds it there when absent."""

    path: str = "artifacts/tiny/student"
    tiny: Optional[TinyModelConfig] = field(default_factory=TinyModelConfig)
    tokenizer_seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    max_model_len: int = 256


def _check_model_and_run(cfg) -> None:
    """model.* and run.id."""
    m = cfg.model
    _check_choice("model.dtype", m.dtype, DTYPES)
    _tiny_ok("model.tiny", m.tiny)
    if not m.path:
        _fail("model.path", "is empty; give a transformers-format model folder")
    rid = cfg.run.get("id")
    if rid is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", str(rid))
                            or re.fullmatch(r"step_\d+", str(rid))):
        _fail("run.id", f"{rid!r} must be a folder name (letters, digits, '.', '_', '-'; not step_N): it names "
              "the run's folder under run.checkpoint_dir")


@dataclass
class TeacherConfig:
    """One teacher: an actor group of ``replicas`` x ``tensor_parallel_size`` shards."""

    model_path: Optional[str] = None  # None only for the "self" teacher (a frozen initial student)
    tiny: Optional[TinyModelConfig] = None  # build a tiny teacher at model_path when absent
    backend: str = "auto"  # vllm | hf | auto (= vllm; hf for models vLLM cannot load). Both serve every signal
    weight: float = 1.0  # coefficient of this teacher's distillation advantage / loss
    signal: Optional[str] = None  # override algorithm.signal for rows routed here
    replicas: int = 1
    tensor_parallel_size: int = 1
    max_model_len: int = 256
    max_logprobs: int = 20  # vLLM engine limit on top-k log-probs
    dtype: str = "float32"
    hidden_dtype: str = "bfloat16"  # dtype of hidden states shipped for full_vocab
    num_cpus_per_shard: float = 1.0
    num_gpus_per_shard: float = 0.0
    custom_resources: Dict[str, float] = field(default_factory=dict)  # e.g. pin to nodes with {teacher_node: 1}
    # the engine's KV cache. null: 256 MiB on CPU, sized from gpu_memory_utilization on GPUs; a number: that
    # size on either (vLLM then skips its memory profiling: engines that share a GPU and start at once)
    kv_cache_memory_bytes: Optional[int] = None
    # fraction of its GPU's memory the engine may take (weights + KV cache + activations); roles that share a
    # GPU (fractional num_gpus_per_shard) must fit their fractions together
    gpu_memory_utilization: float = 0.6
    # vLLM's eager mode: no torch.compile (and on GPUs no CUDA graphs). False compiles the engine at
    # start-up (cached under ~/.cache/vllm across runs): on GPUs the normal setting; on CPU it starts
    # 10-45 s slower and scores ~5% faster at tiny sizes
    enforce_eager: bool = True
    micro_batch_size: int = 16  # rows per forward (hf backend)
    # a teacher served elsewhere (workers/endpoint.py): an OpenAI-compatible base URL (http://HOST:PORT/v1) of
    # a vLLM server; model_path is then a local folder with its tokenizer and config (the pre-flight compares
    # it with the server's /tokenize, and its transformers forward with the server's log-probs). Sampled and
    # top-k signals; no full-vocab (hidden states stay on the server)
    endpoint: Optional[str] = None
    model: Optional[str] = None  # the served model's name (null: model_path)
    api_key_env: Optional[str] = None  # the environment variable holding the API key (read in the teacher's process)
    max_concurrency: int = 8  # requests in flight per replica
    rows_per_request: int = 8  # sequences per completions request
    request_timeout_s: float = 120.0
    max_retries: int = 6  # on connection errors, timeouts and 5xx, with exponential backoff; then the call fails
    # hf backend: at most this many tokens per forward instead (packed rows where the model packs), as
    # learner.max_tokens_per_micro_batch; null: micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = None
    # pre-flight checks to skip for this teacher (stop_ids, template, probe), when a difference is intended
    skip_checks: List[str] = field(default_factory=list)
    # serve this teacher from a shared pool of engines (teachers.pools.NAME) instead of its own group; the
    # pool's engine settings apply (replicas, tensor_parallel_size, dtype, ...), the ones above are unused
    pool: Optional[str] = None


def _check_teachers(cfg) -> None:
    """teachers.models.*: each teacher's settings against the run's lengths and signal."""
    ts, al, da, ro = _active_teachers_cfg(cfg), cfg.algorithm, cfg.data, cfg.rollout
    if not ts.models and al.signal != "none":
        _fail("teachers.models", "no teacher is defined; add at least one (e.g. teachers=local_tiny)")
    for name, t in ts.models.items():
        key = f"teachers.models.{name}"
        _check_choice(f"{key}.backend", t.backend, ("auto", "vllm", "hf", "endpoint"))
        if t.endpoint is not None or t.backend == "endpoint":
            _check_endpoint(cfg, name, t, ts)
        _check_choice(f"{key}.dtype", t.dtype, DTYPES)
        _check_choice(f"{key}.hidden_dtype", t.hidden_dtype, DTYPES)
        _tiny_ok(f"{key}.tiny", t.tiny)
        if t.signal is not None:
            _check_choice(f"{key}.signal", t.signal, SIGNALS)
        for check in t.skip_checks:
            _check_choice(f"{key}.skip_checks", check, ("stop_ids", "template", "probe"))
        if t.pool is not None:
            if t.pool not in ts.pools:
                _fail(f"{key}.pool", f"'{t.pool}' is not a defined pool; defined pools: "
                      f"{', '.join(sorted(ts.pools)) or 'none'} (add teachers.pools.{t.pool}.replicas=1)")
            if t.backend == "hf":
                _fail(f"{key}.backend", "a pooled teacher is served by the pool's vLLM engines; use backend=auto")
        if name != SELF_TEACHER and not t.model_path:
            _fail(f"{key}.model_path", f"teacher '{name}' has no model_path (only the '{SELF_TEACHER}' teacher, "
                  "a frozen copy of the initial student, may omit it)")
        if t.weight < 0:
            _fail(f"{key}.weight", f"must be >= 0, got {t.weight}")
        _check_positive(f"{key}.replicas", t.replicas)
        if t.max_tokens_per_micro_batch is not None:
            _check_positive(f"{key}.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch)
        _check_positive(f"{key}.tensor_parallel_size", t.tensor_parallel_size)
        _check_fraction(f"{key}.gpu_memory_utilization", t.gpu_memory_utilization)
        need = da.max_prompt_len + ro.max_new_tokens
        if t.pool is None and not t.endpoint and t.max_model_len < need:  # pooled / served: their engines' settings
            _fail(f"{key}.max_model_len", f"{t.max_model_len} is shorter than prompt + response = "
                  f"data.max_prompt_len ({da.max_prompt_len}) + rollout.max_new_tokens ({ro.max_new_tokens}) "
                  f"= {need}; raise it to at least {need}")
        signal = resolved_signal(cfg, name)
        if signal == "topk":
            if t.pool is None and resolved_backend(cfg, name) == "vllm" and al.topk > t.max_logprobs:
                _fail("algorithm.topk", f"top-k {al.topk} exceeds teacher '{name}' engine limit "
                      f"{key}.max_logprobs={t.max_logprobs}; lower algorithm.topk or raise max_logprobs")


def _check_endpoint(cfg, name: str, t, ts) -> None:
    key = f"teachers.models.{name}"
    if not t.endpoint or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(t.endpoint)):
        _fail(f"{key}.endpoint", f"{t.endpoint!r} is not an http(s) URL; give the server's OpenAI base URL, e.g. "
              "http://teacher-host:8000/v1")
    if t.backend not in ("auto", "endpoint"):
        _fail(f"{key}.backend", f"'{t.backend}' with an endpoint: a served teacher is scored by its server; use "
              "backend=auto")
    if t.pool is not None:
        _fail(f"{key}.pool", "a served teacher is not served by a pool; remove one of pool / endpoint")
    if name == SELF_TEACHER:
        _fail(f"{key}.endpoint", f"the '{SELF_TEACHER}' teacher is a frozen copy of the student inside the job")
    if resolved_signal(cfg, name) == "full_vocab":
        _fail(f"{key}.signal", "full_vocab needs the teacher's hidden states, which a served teacher does not return; "
              f"use {key}.signal=topk or sampled")
    _check_positive(f"{key}.max_concurrency", t.max_concurrency)
    _check_positive(f"{key}.rows_per_request", t.rows_per_request)
    _check_positive(f"{key}.request_timeout_s", t.request_timeout_s)
    _check_positive(f"{key}.max_retries", t.max_retries, allow_zero=True)


@dataclass
class TeacherPoolConfig:
    """M vLLM engine replicas serving N teachers of one architecture, swapping weights between calls."""

    replicas: int = 1
    tensor_parallel_size: int = 1
    max_model_len: int = 256
    max_logprobs: int = 20
    dtype: str = "float32"
    hidden_dtype: str = "bfloat16"
    num_cpus_per_shard: float = 1.0
    num_gpus_per_shard: float = 0.0
    custom_resources: Dict[str, float] = field(default_factory=dict)
    kv_cache_memory_bytes: Optional[int] = None  # as teachers.models.NAME.kv_cache_memory_bytes
    gpu_memory_utilization: float = 0.6  # as teachers.models.NAME.gpu_memory_utilization
    enforce_eager: bool = True  # as teachers.models.NAME.enforce_eager
    # host memory per replica for the weights of the pool's teachers (one copy per replica, in its actor
    # process, handed to the engine's workers bucket by bucket at a swap); a teacher that does not fit is
    # re-read from its folder at every swap. 0: always from disk
    cache_gb: float = 16.0


def _check_pools(cfg) -> None:
    """teachers.pools.*."""
    ts, al, da, ro = _active_teachers_cfg(cfg), cfg.algorithm, cfg.data, cfg.rollout
    for name, p in ts.pools.items():
        key = f"teachers.pools.{name}"
        _check_positive(f"{key}.replicas", p.replicas)
        _check_positive(f"{key}.tensor_parallel_size", p.tensor_parallel_size)
        _check_fraction(f"{key}.gpu_memory_utilization", p.gpu_memory_utilization)
        _check_choice(f"{key}.dtype", p.dtype, DTYPES)
        _check_choice(f"{key}.hidden_dtype", p.hidden_dtype, DTYPES)
        _check_positive(f"{key}.cache_gb", p.cache_gb, allow_zero=True)
        need = da.max_prompt_len + ro.max_new_tokens
        if p.max_model_len < need:
            _fail(f"{key}.max_model_len", f"{p.max_model_len} is shorter than prompt + response = {need}; raise it "
                  f"to at least {need}")
        members = [n for n, t in ts.models.items() if t.pool == name]
        if al.topk > p.max_logprobs and any(resolved_signal(cfg, n) == "topk" for n in members):
            _fail("algorithm.topk", f"top-k {al.topk} exceeds pool '{name}' engine limit {key}.max_logprobs="
                  f"{p.max_logprobs}; lower algorithm.topk or raise max_logprobs")


@dataclass
class PreflightConfig:
    """Checks before step 0 (mopd_ray/preflight.py): tokenizer, end-of-turn ids, chat template, and a
    log-prob probe of every teacher replica against a transformers forward of its folder and against
    the other replicas, and of the student's rollout engine against the learner."""

    enabled: bool = True
    # mean |difference| of log-probs per probe token allowed; null: 1e-3 when both sides compute in
    # float32, 0.05 otherwise (bf16/fp16 kernels differ by more)
    logprob_tolerance: Optional[float] = None
    # the transformers reference is built only for teachers whose safetensors are at most this size
    # (it loads a second copy of the weights on the replica's CPU, once); larger ones are checked
    # replica against replica
    reference_max_gb: float = 4.0


@dataclass
class TeachersConfig:
    # name -> TeacherConfig. Held untyped and open (not struct) so that teachers can be added, changed and
    # removed from the command line (teachers.models.NAME.model_path=DIR, teachers.models={NAME: {...}},
    # ~teachers.models.NAME); finalize() then gives every entry TeacherConfig's defaults and types, and
    # names the key of an unknown or wrongly typed setting.
    models: Dict[str, Any] = field(default_factory=lambda: _open_dict())
    pools: Dict[str, Any] = field(default_factory=lambda: _open_dict())  # name -> TeacherPoolConfig (open, as models)
    # data domain -> a teacher name, or a weighted list of teachers that all score the domain's samples:
    #   routing.math: [{teacher: math_expert, weight: 1.0}, {teacher: self, weight: 0.2}]   (see routes())
    routing: Dict[str, Any] = field(default_factory=lambda: _open_dict())
    default: Optional[Any] = None  # route of domains missing from routing (None: such a domain is an error)
    # how a sample's teachers are combined: fixed (each entry's weight) | confidence (per token, each
    # weight scaled by that teacher's probability of the sampled token, renormalised to the same total)
    combine: str = "fixed"
    preflight: PreflightConfig = field(default_factory=PreflightConfig)


def _check_routing(cfg) -> None:
    """teachers.routing / default / combine: every route names a defined teacher, every domain has one."""
    ts, al, da, ro = _active_teachers_cfg(cfg), cfg.algorithm, cfg.data, cfg.rollout
    if al.signal == "topk" and al.topk > ro.max_logprobs:
        _fail("algorithm.topk", f"top-k {al.topk} exceeds the rollout engine's rollout.max_logprobs="
              f"{ro.max_logprobs}; lower algorithm.topk or raise rollout.max_logprobs")
    _check_choice("teachers.combine", ts.combine, ("fixed", "confidence"))
    for domain, route in routes(cfg, ts).items():
        key = "teachers.default" if domain == "*" else f"teachers.routing.{domain}"
        for i, (teacher, _) in enumerate(route):
            if teacher not in ts.models:
                _fail(key if len(route) == 1 else f"{key}[{i}]", f"routes to teacher '{teacher}', which is not "
                      f"defined; defined teachers: {', '.join(sorted(ts.models))}")
    if da.train_path is None and al.signal != "none":  # synthetic domains are known now; files when loaded
        for domain in da.domains:
            if domain not in ts.routing and ts.default is None:
                _fail("teachers.routing", f"data domain '{domain}' has no route; add "
                      f"teachers.routing.{domain}=<teacher> or set teachers.default")


@dataclass
class RolloutConfig:
    replicas: int = 1
    tensor_parallel_size: int = 1
    n_samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    # ids that end a response besides the student's own EOS. null: every end-of-turn id of the student's and
    # the teachers' folders (tokenizer EOS + generation_config.json eos_token_id), so a base student with an
    # instruct teacher stops where the teacher expects (models/compat.py run_stop_ids); [] : the student's only
    stop_token_ids: Optional[List[int]] = None
    max_new_tokens: int = 32
    # responses cut at max_new_tokens (finish reason "length"): keep (trained as they are) | mask (no loss on
    # them; they still count in the metrics) | penalty (DAPO's overlong reward shaping: a row whose length
    # enters the last overlong_buffer tokens of the limit loses up to overlong_penalty of its verifiable
    # reward, linearly, and a truncated one all of it; rows without a verifiable reward are untouched)
    overlong: str = "keep"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    max_logprobs: int = 20
    dtype: str = "float32"
    # vLLM's eager mode. False: torch.compile (CUDA graphs on GPUs), compiled at start-up and cached under
    # ~/.cache/vllm; on 2 CPU cores a tiny student generated 1.2x faster compiled (benchmarks/bench_vs_trl.py)
    enforce_eager: bool = True
    kv_cache_memory_bytes: Optional[int] = None  # as teachers.models.NAME.kv_cache_memory_bytes
    gpu_memory_utilization: float = 0.6
    num_cpus_per_shard: float = 1.0
    num_gpus_per_shard: float = 0.0
    custom_resources: Dict[str, float] = field(default_factory=dict)
    # a response's reasoning block (thinking_tags) is cut before its reward is judged and before an environment
    # sees the turn (the text after the closing tag; the tokens stay as generated and are trained)
    strip_thinking: bool = False
    thinking_tags: List[str] = field(default_factory=lambda: ["<think>", "</think>"])  # opening and closing tag
    weight_sync: str = "broadcast"  # broadcast (torch.distributed group: NCCL/gloo) | object_store
    weight_sync_bucket_mb: int = 256  # bucket size of the weight stream (0: one tensor per bucket)
    # after every sync, engines and learner score a fixed probe; a mean gap above the tolerance (null: the
    # pre-flight's, 1e-3 nats/token in fp32, else 5e-2) stops the run naming what did not load (sync_check.py)
    check_weight_sync: bool = True
    weight_sync_check_tolerance: Optional[float] = None
    # rollout shards per replica and step: > 1 lets teachers score finished shards while the rest generate,
    # at the cost of smaller engine batches (on 2 CPU cores with a tiny model, 2 shards generated 40%
    # slower than 1, which the overlap did not win back: benchmarks/bench_vs_trl.py)
    shards_per_replica: int = 1
    seed: int = 0


@dataclass
class LearnerConfig:
    world_size: int = 2
    zero_stage: int = 2
    micro_batch_size: int = 8  # rows per forward/backward on one rank
    # positions per chunk when the learner turns its last hidden states into log-probs, entropy and the
    # top-k / full-vocab KL (workers/token_terms.py): extra memory ~ chunk x vocabulary x 4 bytes x ~5 (at
    # 152k: ~1.5 GB for 512 positions), never
    # the [rows, length, vocabulary] logits (each chunk is recomputed in the backward)
    logit_chunk_size: int = 512
    # token-budget micro-batches (workers/packing.py): at most this many tokens per forward/backward on a
    # rank instead of micro_batch_size rows (null: micro_batch_size rows, padded to their longest). The
    # same loss and gradients; every rank runs as many micro-batches (the largest number any rank needs)
    max_tokens_per_micro_batch: Optional[int] = None
    # with a token budget, pack a micro-batch's rows into one sequence (position ids restart per row), where
    # the set-up check finds the architecture packs; else (or false) length-sorted padded micro-batches
    packing: bool = True
    # transformers' attention for the learner's forward (null: its default, sdpa). On GPUs flash_attention_2
    # (the flash-attn package) runs packed rows as variable-length sequences; with sdpa, packed rows attend row
    # by row (workers/packing.py use_varlen_attention), never over the whole packed length
    attn_implementation: Optional[str] = None
    # rows to ranks by tokens, not rows (mopd_ray/dispatch.py balance_by_tokens): each rank fetches every
    # part's rollout rows (small: tokens and log-probs), keeps a token-balanced share of the step's prompts
    # and fetches only the teacher scores of the parts it trains. Needs max_tokens_per_micro_batch
    balance_tokens: bool = False
    mini_batches_per_step: int = 1  # optimizer steps per rollout batch (PPO-style reuse when > 1)
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    dtype: str = "float32"
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: float = 0.0
    custom_resources: Dict[str, float] = field(default_factory=dict)
    recompute_old_logprobs: bool = True  # pi_old from the learner instead of the rollout engine


def _check_batch(cfg) -> None:
    """rollout.*, learner.*, data.*: sizes, and the batch's split into mini-batches, ranks and micro-batches."""
    m, ro, ln, da = cfg.model, cfg.rollout, cfg.learner, cfg.data
    for key, v in (("rollout.n_samples_per_prompt", ro.n_samples_per_prompt), ("rollout.replicas", ro.replicas),
                   ("rollout.tensor_parallel_size", ro.tensor_parallel_size),
                   ("rollout.max_new_tokens", ro.max_new_tokens), ("learner.world_size", ln.world_size),
                   ("rollout.shards_per_replica", ro.shards_per_replica),
                   ("learner.micro_batch_size", ln.micro_batch_size), ("learner.logit_chunk_size", ln.logit_chunk_size),
                   ("learner.mini_batches_per_step", ln.mini_batches_per_step), ("learner.lr", ln.lr),
                   ("data.prompts_per_step", da.prompts_per_step), ("data.max_prompt_len", da.max_prompt_len),
                   ("run.total_steps", cfg.run.total_steps)):
        _check_positive(key, v)
    _check_fraction("rollout.gpu_memory_utilization", ro.gpu_memory_utilization)
    _check_choice("rollout.overlong", ro.overlong, ("keep", "mask", "penalty"))
    if not 0 <= ro.overlong_buffer < ro.max_new_tokens:
        _fail("rollout.overlong_buffer", f"must be in [0, rollout.max_new_tokens={ro.max_new_tokens}), got "
              f"{ro.overlong_buffer}")
    _check_positive("rollout.overlong_penalty", ro.overlong_penalty, allow_zero=True)
    if ro.temperature <= 0:
        _fail("rollout.temperature", f"must be > 0 for on-policy sampling, got {ro.temperature}")
    _check_choice("rollout.dtype", ro.dtype, DTYPES)
    _check_choice("rollout.weight_sync", ro.weight_sync, ("broadcast", "object_store"))
    if ln.max_tokens_per_micro_batch is not None:
        _check_positive("learner.max_tokens_per_micro_batch", ln.max_tokens_per_micro_batch)
    elif ln.balance_tokens:
        _fail("learner.balance_tokens", "balances ranks by tokens, which needs token-budget micro-batches (ranks with "
              "other row counts run as many of them); set learner.max_tokens_per_micro_batch too (e.g. 16384)")
    _check_choice("learner.zero_stage", ln.zero_stage, (1, 2, 3))
    _check_choice("learner.lr_schedule", ln.lr_schedule, ("constant", "cosine", "linear"))
    _check_choice("learner.dtype", ln.dtype, DTYPES)
    if ln.min_lr > ln.lr:
        _fail("learner.min_lr", f"{ln.min_lr} is above learner.lr={ln.lr}")
    rows = da.prompts_per_step * ro.n_samples_per_prompt
    per_mini = rows // ln.mini_batches_per_step
    if rows % ln.mini_batches_per_step:
        _fail("learner.mini_batches_per_step", f"{ln.mini_batches_per_step} does not divide the {rows} rows of a "
              f"step (data.prompts_per_step x rollout.n_samples_per_prompt)")
    if per_mini % ln.world_size:
        _fail("learner.world_size", f"{ln.world_size} ranks do not divide the batch of {per_mini} rows per "
              f"optimizer step (data.prompts_per_step={da.prompts_per_step} x rollout.n_samples_per_prompt="
              f"{ro.n_samples_per_prompt} / learner.mini_batches_per_step={ln.mini_batches_per_step}); "
              f"pick a world size that divides {per_mini}")
    if da.prompts_per_step % (ln.mini_batches_per_step * ln.world_size):
        cells = ln.mini_batches_per_step * ln.world_size
        _fail("data.prompts_per_step", f"{da.prompts_per_step} prompts do not split evenly into learner.mini_batches_"
              f"per_step x learner.world_size = {ln.mini_batches_per_step} x {ln.world_size} = {cells} parts (each "
              f"rank trains whole prompts, so a prompt's samples never straddle ranks); use a multiple of {cells}")
    if (per_mini // ln.world_size) % ln.micro_batch_size and ln.micro_batch_size < per_mini // ln.world_size:
        _fail("learner.micro_batch_size", f"{ln.micro_batch_size} does not divide the {per_mini // ln.world_size} "
              "rows each rank gets per optimizer step")
    if m.max_model_len < da.max_prompt_len + ro.max_new_tokens:
        _fail("model.max_model_len", f"{m.max_model_len} < data.max_prompt_len + rollout.max_new_tokens = "
              f"{da.max_prompt_len + ro.max_new_tokens}")
    if da.eval_path is not None and da.train_path is None:
        _fail("data.eval_path", "is set without data.train_path")


@dataclass
class AlgorithmConfig:
    signal: str = "sampled"  # sampled | topk | full_vocab
    advantage: str = "reverse_kl"
    kl_gamma: float = 0.0  # discount of future per-token KL in the sampled advantage (0: per token)
    # normalise the sampled-token advantages within groups of rows (mean over response tokens):
    # none | batch | teacher (whiten) | batch_mean | teacher_mean (subtract the mean only: a baseline)
    normalize_advantages: str = "none"
    alpha: float = 0.0  # weight of the GRPO outcome advantage mixed into the distillation advantage
    outcome_estimator: str = "grpo"  # grpo | grpo_no_std
    # reward-only GRPO: a mini-batch in which every group's rewards are equal (no advantage anywhere)
    # takes no optimizer step (Adam would still move the weights by its momentum); counted in
    # signal_free_minibatches
    skip_signal_free_steps: bool = True
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    loss_agg: str = "token_mean"
    is_correction: str = "tis"  # none | tis | icepop
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    topk: int = 8
    topk_divergence: str = "forward"  # forward | reverse
    full_vocab_chunk_size: int = 1024  # the reference path's chunks (loss.terms_from_logits); a run chunks by learner.logit_chunk_size
    kl_estimator: str = "k3"  # reported estimator
    max_staleness: int = 0  # 0: on-policy; k >= 1: up to k later rollouts overlap this update (async)


def _check_algorithm(cfg) -> None:
    """algorithm.*: registered names, ranges."""
    from .algo import (ADVANTAGE_ESTIMATORS, IS_CORRECTIONS, KL_ESTIMATORS, LOSS_AGGREGATIONS,
                       OUTCOME_ESTIMATORS, POLICY_LOSSES)

    al = cfg.algorithm
    _check_choice("algorithm.signal", al.signal, RUN_SIGNALS)
    if al.signal == "none" and al.alpha <= 0:
        _fail("algorithm.alpha", "signal 'none' trains on verifiable rewards only: set algorithm.alpha > 0")
    _check_choice("algorithm.advantage", al.advantage, ADVANTAGE_ESTIMATORS.names())
    _check_choice("algorithm.normalize_advantages", al.normalize_advantages, ADVANTAGE_NORMS)
    _check_choice("algorithm.outcome_estimator", al.outcome_estimator, OUTCOME_ESTIMATORS.names())
    _check_choice("algorithm.policy_loss", al.policy_loss, POLICY_LOSSES.names())
    _check_choice("algorithm.loss_agg", al.loss_agg, LOSS_AGGREGATIONS.names())
    _check_choice("algorithm.is_correction", al.is_correction, IS_CORRECTIONS.names())
    _check_choice("algorithm.kl_estimator", al.kl_estimator, KL_ESTIMATORS.names())
    _check_choice("algorithm.topk_divergence", al.topk_divergence, ("forward", "reverse"))
    _check_positive("algorithm.max_staleness", al.max_staleness, allow_zero=True)
    if not 0.0 <= al.kl_gamma <= 1.0:
        _fail("algorithm.kl_gamma", f"must be in [0, 1], got {al.kl_gamma}")
    if al.alpha < 0:
        _fail("algorithm.alpha", f"must be >= 0 (0 disables outcome rewards), got {al.alpha}")
    if not (0 < al.clip_low < 1) or al.clip_high <= 0:
        _fail("algorithm.clip_low", f"need 0 < clip_low < 1 and clip_high > 0, got {al.clip_low}, {al.clip_high}")
    if al.dual_clip is not None and al.dual_clip <= 1:
        _fail("algorithm.dual_clip", f"must be > 1 or null, got {al.dual_clip}")
    if al.tis_cap <= 0:
        _fail("algorithm.tis_cap", f"must be > 0, got {al.tis_cap}")
    if not 0 <= al.icepop_low < 1 < al.icepop_high:
        _fail("algorithm.icepop_low", f"need 0 <= icepop_low < 1 < icepop_high, got {al.icepop_low}, {al.icepop_high}")
    _check_positive("algorithm.topk", al.topk)
    _check_positive("algorithm.full_vocab_chunk_size", al.full_vocab_chunk_size)


@dataclass
class DataConfig:
    train_path: Optional[str] = None  # JSONL/Parquet; None: generate the synthetic domains
    eval_path: Optional[str] = None
    prompt_key: str = "prompt"
    domain_key: str = "domain"
    answer_key: str = "answer"
    domains: List[str] = field(default_factory=lambda: ["add", "reverse", "sort"])
    num_train_per_domain: int = 2000
    num_eval_per_domain: int = 100
    prompts_per_step: int = 16
    max_prompt_len: int = 48
    shuffle: bool = True
    seed: int = 0
    # domain -> reward: exact | numeric | math_verify | package.module:function (mopd_ray/rewards.py); the
    # synthetic domains use exact. Used by GRPO mixing (algorithm.alpha) and the evaluation
    rewards: Dict[str, str] = field(default_factory=lambda: _open_dict())
    # domain -> reward for training only (the rollouts' rewards), e.g. similarity (partial credit) where exact
    # matches are too rare for GRPO to learn from; the evaluation still judges by data.rewards
    train_rewards: Dict[str, str] = field(default_factory=lambda: _open_dict())
    reward_timeout_s: float = 10.0  # per call of math_verify or a user function; a call over it scores 0
    # package.module:Class of the environment of every domain's episodes (multi-turn rollouts with tools;
    # mopd_ray/envs/base.py); null: single-turn, except built-in domains with their own (calc)
    env: Optional[str] = None
    # domain -> package.module:Class, overriding data.env for that domain ("" or null: single-turn)
    envs: Dict[str, Optional[str]] = field(default_factory=lambda: _open_dict())


@dataclass
class EnvConfig:
    """Multi-turn episodes (the rows whose domain has an environment: data.env / data.envs)."""

    max_turns: int = 4  # assistant turns per episode; an episode the environment would go on with is truncated
    # tokens per assistant turn (null: the rest of the episode's budget, rollout.max_new_tokens, which counts the
    # student's and the environment's tokens of an episode)
    max_turn_tokens: Optional[int] = None
    step_timeout_s: float = 30.0  # per environment call; a call over it fails its episode (on_error)
    # a failing episode (the environment raised, answered wrongly, timed out or its actor died): mask (the row
    # is kept with no loss and counted in env/errors) | fail (the run stops with the environment's error)
    on_error: str = "mask"
    # environment actors per rollout replica (episodes spread over them; each runs max_concurrency calls at once:
    # raise it for environments that compute in Python rather than wait on tools)
    actors_per_replica: int = 1
    max_concurrency: int = 16  # calls one environment actor runs at once (threads)
    num_cpus: float = 0.0  # CPUs each environment actor reserves from Ray
    # episodes carried over between steps, as a fraction of a step's prompts (0: every step waits for all its
    # episodes). f > 0: the run keeps (1 + f) x data.prompts_per_step groups in flight and each step trains the
    # groups that finished first; the rest go on in the engine (paused while the learner trains) and are trained
    # by a later step, so a long episode no longer holds a step (mopd_ray/workers/episodes.py)
    carry_over: float = 0.0
    max_episode_lag: int = 2  # a carried episode begun more weight versions ago than this is ended (truncated)
    # an earlier turn's reasoning block in the context of later turns: keep (the tokens as generated) | strip (cut
    # from the sequence when the turn ends, as templates such as Qwen3's render earlier turns: those tokens are then
    # in no later context and not trained; rollout.thinking_tags must each be one token of the student's vocabulary)
    thinking_in_context: str = "keep"
    kwargs: Dict[str, Any] = field(default_factory=lambda: _open_dict())  # keyword arguments of the class


def _check_env(cfg) -> None:
    """env.* limits, and every environment class of data.env / data.envs loads here (as it will in its actors)."""
    from .envs.base import EnvError, load_env_class

    e = cfg.env
    _check_choice("env.on_error", e.on_error, ("mask", "fail"))
    _check_choice("env.thinking_in_context", e.thinking_in_context, ("keep", "strip"))
    if len(cfg.rollout.thinking_tags) != 2 or not all(cfg.rollout.thinking_tags):
        _fail("rollout.thinking_tags", f"{list(cfg.rollout.thinking_tags)}: give the opening and the closing tag")
    for key in ("max_turns", "actors_per_replica", "max_concurrency"):
        _check_positive(f"env.{key}", e[key])
    _check_positive("env.step_timeout_s", e.step_timeout_s)
    if e.max_turn_tokens is not None:
        _check_positive("env.max_turn_tokens", e.max_turn_tokens)
    _check_positive("env.num_cpus", e.num_cpus, allow_zero=True)
    _check_positive("env.carry_over", e.carry_over, allow_zero=True)
    _check_positive("env.max_episode_lag", e.max_episode_lag, allow_zero=True)
    specs = {"data.env": cfg.data.env, **{f"data.envs.{d}": v for d, v in (cfg.data.envs or {}).items()}}
    for key, spec in specs.items():
        if spec:
            try:
                load_env_class(spec)
            except EnvError as err:
                _fail(key, str(err))


@dataclass
class ClusterConfig:
    mode: str = "local"  # local: start Ray on this machine | cluster: join address
    address: Optional[str] = None  # Ray address in cluster mode (None: "auto")
    num_cpus: Optional[int] = None  # local mode: CPUs given to Ray (None: all)
    num_gpus: int = 0
    num_nodes: int = 1  # cluster size the recipe expects (resource arithmetic is checked against it)
    gpus_per_node: int = 0
    cpus_per_node: int = 0
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = True
    placement_timeout_s: float = 120.0
    call_timeout_s: float = 600.0  # deadline of every remote wait: a hung engine is an error, not a hang
    max_restarts: int = 3  # restarts of a dead rollout or teacher replica
    # in-job restarts of the learner group after a rank died (process killed, node lost): the group is
    # rebuilt, loads the newest complete checkpoint (step 0 without one), re-syncs the engines and goes on
    # with the same rows after it; 0: stop with the checkpoint to resume from (run.resume=auto)
    learner_restarts: int = 2
    # chaos testing: the weight version during whose sync rollout replica 0's process exits after the
    # first bucket (once per run: a marker file in run.checkpoint_dir), deterministically inside
    # receive_weights. null: never (the default; not for production runs)
    fault_exit_in_sync_version: Optional[int] = None
    object_store_memory: Optional[int] = None
    # keep the engines and learner ranks of a run that ends cleanly for the next run of this driver process
    # whose spec matches (demo variants, cascade stages, sweep jobs): mopd_ray/warm.py
    reuse_engines: bool = True


def _check_cluster(cfg) -> None:
    """cluster.* and logging.*."""
    cl = cfg.cluster
    _check_choice("cluster.mode", cl.mode, ("local", "cluster"))
    _check_choice("logging.wandb_mode", cfg.logging.wandb_mode, ("offline", "online", "disabled"))
    if cl.mode == "local" and cl.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        _fail("cluster.dashboard_host", f"local mode binds to loopback only; got {cl.dashboard_host!r}")


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "mopd_ray"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    jsonl: bool = True
    progress_bar: bool = True
    verbose: bool = False  # true: the resolved config and Ray / vLLM / DeepSpeed / wandb INFO logs on the console


@dataclass
class RunConfig:
    name: str = "mopd_local"
    seed: int = 0
    total_steps: int = 20
    eval_every: int = 10  # evaluate at start, every N steps and at the end (0: never)
    eval_pass_k: int = 4
    eval_max_prompts: int = 0  # 0: the whole eval split; else this many, every domain equally represented
    save_every: int = 0  # 0: only at the end
    steps_per_launch: int = 0  # stop (with a checkpoint) after this many steps; resume=auto continues (0: off)
    output_dir: str = "."  # Hydra's run directory by default
    artifacts_dir: str = "artifacts"
    # never: a new run (a new id) | auto: continue this run (run.id, else the newest run in checkpoint_dir
    # with this config's fingerprint; another run's checkpoints are refused) | <step_NNNNNN path>: that one
    resume: str = "never"
    id: Optional[str] = None  # the run's id (None: a new one, or the continued run's); checkpoint_dir/<id>/
    # each run writes under <checkpoint_dir>/<run id>/; on a cluster: storage every node mounts, absolute.
    # A Hydra multirun job's default is checkpoints/<name>/<its overrides> (mopd_ray/main.py)
    checkpoint_dir: str = "checkpoints/${run.name}"
    keep_checkpoints: int = 2  # newest complete checkpoints of this run kept (0: all)
    max_consecutive_skips: int = 3  # non-finite steps in a row before the run stops
    dry_run: bool = False  # build models, print the resolved config and the plan, then stop


@dataclass
class DemoConfig:
    """The demonstration's bootstrap recipe (mopd_ray.bootstrap) and its comparison runs (mopd_ray.demo)."""

    seed: int = 0
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, seed=0))
    batch: int = 64
    base_steps: int = 60
    base_lr: float = 1e-3
    # the base student's SFT on tool domains (calc): False, on the bare answer (it never saw the tool: MOPD teaches
    # the calls); True, on the demonstrated episodes, as an instruction-tuned student has seen tool calls (the
    # experts train on them for longer)
    base_tool_use: bool = False
    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    signals: List[str] = field(default_factory=lambda: ["topk", "full_vocab", "sampled"])
    # extra overrides of the MOPD run of one signal, e.g. {sampled: [algorithm.normalize_advantages=true]}
    signal_overrides: Dict[str, List[str]] = field(default_factory=dict)
    baselines: bool = True  # single-teacher distillation (the seesaw) and reward-only GRPO
    single_teacher: str = "add"  # domain whose teacher the seesaw baseline uses for every prompt
    single_teacher_signal: Optional[str] = None  # signal of the seesaw baseline (None: signals[0])
    grpo_overrides: List[str] = field(default_factory=list)  # e.g. its own learning rate
    # every comparison run once per run seed (run.seed), in <out>/seed<N>/<run>; the table shows the mean
    # and +- half the range. Empty: once, with run.seed, in <out>/<run>
    run_seeds: List[int] = field(default_factory=list)


@dataclass
class CascadeStageConfig:
    """One stage of a sequential pipeline: train on ``domains`` only, from the previous stage's student."""

    name: str = "???"  # also the teacher name of this stage's final checkpoint in the recovery runs
    domains: List[str] = field(default_factory=list)
    # distil from this teacher (a name in teachers.models) on the stage's domains; None: GRPO on their rewards
    teacher: Optional[str] = None
    steps: int = 200
    overrides: List[str] = field(default_factory=list)  # Hydra overrides of this stage's run only


@dataclass
class CascadeConfig:
    """The cascade (mopd_ray.cascade): stages trained one after another from the base student, each
    stage's final checkpoint exported and evaluated on every domain (what the pipeline forgot), then
    MOPD from the last stage's student with every stage's checkpoint as the teacher of its domains."""

    stages: List[CascadeStageConfig] = field(default_factory=list)
    signals: List[str] = field(default_factory=lambda: ["sampled", "topk", "full_vocab"])
    # weight of the `self` teacher (the frozen last-stage student) added to every domain's route; each
    # signal is run once per entry (0: without it)
    self_weights: List[float] = field(default_factory=lambda: [0.0])
    recovery_steps: int = 200
    signal_overrides: Dict[str, List[str]] = field(default_factory=dict)  # per signal, as demo.signal_overrides
    run_seeds: List[int] = field(default_factory=lambda: [0])  # recovery runs repeated per run.seed
    grpo_baseline: bool = True  # reward-only GRPO from the last stage's student, per seed (demo.grpo_overrides)
    # serve every recovery teacher (each stage's checkpoint and `self`, all grown from one student, so of
    # one architecture) from one shared pool of engines, teachers.pools.cascade (replicas: 1 unless set),
    # instead of one engine group per teacher: N + 1 teachers on one engine's devices, weights swapped
    teacher_pool: bool = False


@dataclass
class MOPDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)


def register_configs() -> None:
    """Register the schema: conf/config.yaml's defaults list starts from ``mopd_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="mopd_schema", node=MOPDConfig)


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides=(), config_dir: str = CONF_DIR) -> DictConfig:
    """conf/config.yaml with Hydra overrides, outside a Hydra app (demo, evaluate, tests), finalized."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(f"cannot compose the config from {list(overrides)}: {e}") from None
    return finalize(cfg)


def finalize(cfg):
    """Give every teacher entry TeacherConfig's defaults and types, in place (idempotent); returns cfg.

    Raises ConfigError naming ``teachers.models.NAME.KEY`` for an unknown or wrongly typed setting.
    """
    if not isinstance(cfg, DictConfig):
        return cfg
    _finalize_entries(cfg.teachers.models, TeacherConfig, "teachers.models", "teacher")
    _finalize_entries(cfg.teachers.pools, TeacherPoolConfig, "teachers.pools", "teacher pool")
    return cfg


def _finalize_entries(models, schema, prefix: str, what: str) -> None:
    for name in list(models.keys()):
        entry = models._get_node(name)
        if isinstance(entry, DictConfig) and OmegaConf.get_type(entry) is schema:
            continue
        key = f"{prefix}.{name}"
        if entry is None or (not isinstance(entry, DictConfig) and entry._is_none()):
            entry = {}
        elif not isinstance(entry, DictConfig):
            _fail(key, f"must be a mapping of {what} settings (e.g. {key}.replicas=1), got {entry!r}")
        try:
            node = OmegaConf.merge(OmegaConf.structured(schema), entry)
        except (ConfigKeyError, ValidationError) as e:
            sub = getattr(e, "full_key", None) or ""
            detail = str(e).splitlines()[0]
            if not isinstance(e, ConfigKeyError):
                _fail(f"{key}.{sub}", f"has the wrong type ({detail})")
            if "." in sub:  # inside a nested setting (tiny)
                _fail(f"{key}.{sub}", f"is not a setting there ({detail})")
            _fail(f"{key}.{sub}", f"is not a {what} setting; {what} settings: "
                  f"{', '.join(f.name for f in fields(schema))}")
        models[name] = node


# --------------------------------------------------------------------------- validation


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


def resolved_signal(cfg, teacher_name: str) -> str:
    """The signal used for rows routed to ``teacher_name`` (teacher override, else algorithm.signal)."""
    t = cfg.teachers.models[teacher_name]
    return t.signal or cfg.algorithm.signal


def parse_route(value, key: str) -> list:
    """A route as [(teacher name, weight), ...]: a name, a list of names, or a list of
    {teacher: NAME, weight: W} entries (weight defaults to 1). Raises ConfigError naming ``key``."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        return [(value, 1.0)]
    if not isinstance(value, list) or not value:
        _fail(key, f"must be a teacher name or a non-empty list of {{teacher: NAME, weight: W}}, got {value!r}")
    out = []
    for i, e in enumerate(value):
        if isinstance(e, str):
            e = {"teacher": e}
        if not isinstance(e, dict) or not isinstance(e.get("teacher"), str) or set(e) - {"teacher", "weight"}:
            _fail(f"{key}[{i}]", f"must be a teacher name or {{teacher: NAME, weight: W}}, got {e!r}")
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            _fail(f"{key}[{i}].weight", f"must be a finite number >= 0, got {w!r}")
        out.append((e["teacher"], float(w)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        _fail(key, f"lists a teacher twice ({names}); give each teacher once, with its total weight")
    return out


def routes(cfg, ts=None) -> dict:
    """{domain: [(teacher, weight), ...]} of teachers.routing, plus "*" for teachers.default if set."""
    ts = cfg.teachers if ts is None else ts
    out = {d: parse_route(v, f"teachers.routing.{d}") for d, v in ts.routing.items()}
    if ts.default is not None:
        out["*"] = parse_route(ts.default, "teachers.default")
    return out


def route_of(cfg, domain: str) -> list:
    r = routes(cfg)
    return r[domain] if domain in r else r["*"]


def route_slots(cfg) -> int:
    """The most teachers any sample has (the width of a batch's teacher slots)."""
    return max((len(r) for r in routes(cfg).values()), default=1) if cfg.algorithm.signal != "none" else 1


def teacher_model_path(cfg, name: str) -> str:
    """The teacher's model folder (the student's for the "self" teacher without one of its own)."""
    t = cfg.teachers.models[name]
    return cfg.model.path if (name == SELF_TEACHER and not t.model_path) else t.model_path


def resolved_backend(cfg, teacher_name: str) -> str:
    """The scoring backend of a teacher: "endpoint" when it is served elsewhere; else its own setting, "auto"
    being vLLM (it serves every signal)."""
    t = cfg.teachers.models[teacher_name]
    if t.get("endpoint"):
        return "endpoint"
    return "vllm" if t.backend == "auto" else t.backend


def validate(cfg: Union[DictConfig, MOPDConfig]) -> None:
    """Check cross-field invariants; raise ConfigError naming the key and the fix. Each group's checks
    sit beside its schema above."""
    finalize(cfg)
    _check_model_and_run(cfg)
    _check_algorithm(cfg)
    _check_teachers(cfg)
    _check_pools(cfg)
    _check_routing(cfg)
    _check_batch(cfg)
    validate_rewards(cfg)
    _check_env(cfg)
    _check_cluster(cfg)
    _check_resources(cfg)
    _check_demo(cfg)


def _active_teachers_cfg(cfg):
    """The teachers section, or an empty one when no teacher takes part (signal none: their checks skipped)."""
    return TeachersConfig() if cfg.algorithm.signal == "none" else cfg.teachers


def validate_rewards(cfg) -> None:
    """Every data.rewards and data.train_rewards entry names a built-in reward or a function that imports from here."""
    from .rewards import BUILTIN_REWARDS, RewardError, resolve

    _check_positive("data.reward_timeout_s", cfg.data.reward_timeout_s)
    for key in ("rewards", "train_rewards"):
        for domain, name in cfg.data[key].items():
            if name in BUILTIN_REWARDS:
                continue
            if ":" not in str(name):
                _fail(f"data.{key}.{domain}", f"{name!r} is not a reward: use one of {', '.join(BUILTIN_REWARDS)} "
                      "or a function given as package.module:function")
            try:
                resolve(name)
            except RewardError as e:
                _fail(f"data.{key}.{domain}", str(e))


def _check_demo(cfg) -> None:
    dm = cfg.demo
    if not dm.signals:
        _fail("demo.signals", "is empty; name at least one of " + ", ".join(SIGNALS))
    for s in dm.signals:
        _check_choice("demo.signals", s, SIGNALS)
    for s in dm.signal_overrides:
        _check_choice(f"demo.signal_overrides.{s}", s, SIGNALS)
    if dm.single_teacher_signal is not None:
        _check_choice("demo.single_teacher_signal", dm.single_teacher_signal, SIGNALS)
    if len(set(dm.run_seeds)) != len(dm.run_seeds):
        _fail("demo.run_seeds", f"{list(dm.run_seeds)} repeats a seed; list each run seed once")


def check_cascade(cfg) -> None:
    """The cascade section against the rest (mopd_ray.cascade; the runs it starts do not use it)."""
    cc = cfg.cascade
    if not cc.stages:
        _fail("cascade.stages", "is empty; use experiment=cascade or give the stages")
    names = [st.name for st in cc.stages]
    for i, st in enumerate(cc.stages):
        key = f"cascade.stages[{i}]"
        if st.name in ("???", "", "self") or not st.name.replace("_", "").isalnum():
            _fail(f"{key}.name", f"{st.name!r} is not a usable name; give each stage a word such as stage_{i}")
        if st.name in names[:i]:
            _fail(f"{key}.name", f"{st.name!r} names two stages; each stage's checkpoint is a teacher by its name")
        if not st.domains:
            _fail(f"{key}.domains", "is empty; name the domains this stage trains on (from data.domains)")
        for dom in st.domains:
            _check_choice(f"{key}.domains", dom, list(cfg.data.domains))
        if st.teacher is not None and st.teacher not in cfg.teachers.models:
            _fail(f"{key}.teacher", f"{st.teacher!r} is not in teachers.models ({', '.join(cfg.teachers.models)}); "
                  "name one, or null to train the stage by GRPO on its domains' rewards")
        _check_positive(f"{key}.steps", st.steps)
    covered = {dom for st in cc.stages for dom in st.domains}
    missing = [d for d in cfg.data.domains if d not in covered]
    if missing:
        _fail("cascade.stages", f"no stage trains {missing}: the recovery needs a stage teacher for every domain")
    if not cc.signals:
        _fail("cascade.signals", "is empty; name at least one of " + ", ".join(SIGNALS))
    for s in [*cc.signals, *cc.signal_overrides]:
        _check_choice("cascade.signals", s, SIGNALS)
    for w in cc.self_weights:
        if w < 0:
            _fail("cascade.self_weights", f"{w} is negative; 0 runs without the self teacher")
    _check_positive("cascade.recovery_steps", cc.recovery_steps)
    if not cc.run_seeds or len(set(cc.run_seeds)) != len(cc.run_seeds):
        _fail("cascade.run_seeds", f"{list(cc.run_seeds)}: give each run seed once, at least one (e.g. [0])")


def resource_demand(cfg) -> Dict[str, float]:
    """Total CPUs and GPUs every role's placement asks for."""
    ro, ln = cfg.rollout, cfg.learner
    cpus = ro.replicas * ro.tensor_parallel_size * ro.num_cpus_per_shard + ln.world_size * ln.num_cpus_per_rank
    gpus = ro.replicas * ro.tensor_parallel_size * ro.num_gpus_per_shard + ln.world_size * ln.num_gpus_per_rank
    engines = [t for t in cfg.teachers.models.values() if t.pool is None]
    engines += [p for name, p in cfg.teachers.pools.items() if any(t.pool == name for t in cfg.teachers.models.values())]
    for t in engines:
        cpus += t.replicas * t.tensor_parallel_size * t.num_cpus_per_shard
        gpus += t.replicas * t.tensor_parallel_size * t.num_gpus_per_shard
    return {"CPU": cpus, "GPU": gpus}


def _check_resources(cfg) -> None:
    cl = cfg.cluster
    if cl.mode != "cluster" or not cl.gpus_per_node:
        return
    demand = resource_demand(cfg)
    have = cl.num_nodes * cl.gpus_per_node
    if demand["GPU"] > have:
        _fail("cluster.num_nodes", f"the roles need {demand['GPU']:g} GPUs but cluster.num_nodes x "
              f"cluster.gpus_per_node = {cl.num_nodes} x {cl.gpus_per_node} = {have}; add nodes or shrink "
              "replicas / tensor_parallel_size / learner.world_size")
    for name, t in list(cfg.teachers.models.items()) + [("rollout", cfg.rollout)]:
        if t.num_gpus_per_shard and t.tensor_parallel_size * t.num_gpus_per_shard > cl.gpus_per_node:
            key = "rollout" if name == "rollout" else f"teachers.models.{name}"
            _fail(f"{key}.tensor_parallel_size", f"{t.tensor_parallel_size} shards x {t.num_gpus_per_shard:g} GPU "
                  f"do not fit in one node of {cl.gpus_per_node} GPUs (a replica must stay on one node)")
    if cl.cpus_per_node and demand["CPU"] > cl.num_nodes * cl.cpus_per_node:
        _fail("cluster.cpus_per_node", f"the roles need {demand['CPU']:g} CPUs, the cluster has "
              f"{cl.num_nodes * cl.cpus_per_node}")


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else OmegaConf.to_container(
        OmegaConf.structured(cfg), resolve=True)


__all__ = ["MISSING", "ConfigError", "MOPDConfig", "compose_config", "finalize", "register_configs",
           "resolved_signal", "validate", "validate_rewards", "resource_demand", "to_container"]
