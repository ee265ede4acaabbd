"""The teachers' section of the configuration (``teachers``: each model, the shared engine pools, the pre-flight,
the routing of domains to teachers) with its checks, and the routes the rest of the system reads from it."""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from .config_base import (DTYPES, SELF_TEACHER, SIGNALS, TinyModelConfig, _check_choice, _check_fraction,
                          _check_positive, _fail, _open_dict, _tiny_ok)


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


def _active_teachers_cfg(cfg):
    """The teachers section, or an empty one when no teacher takes part (signal none: their checks skipped)."""
    return TeachersConfig() if cfg.algorithm.signal == "none" else cfg.teachers
