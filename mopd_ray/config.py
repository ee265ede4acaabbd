"""Structured configuration: every default lives in the schema, once (here, and the sections in config_base.py,
config_teachers.py and config_demo.py). YAML under conf/ only overrides.

The dataclasses are registered with Hydra's ConfigStore as the schema of conf/config.yaml, so an
unknown key or a value of the wrong type fails at composition with the key's full name.
``validate(cfg)`` then checks the cross-field invariants and raises ``ConfigError`` with a message
that names the key and what to change.
"""

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

# the choices, the tiny model's shape and the checks every section uses (config_base.py); the teachers' section and
# its routes (config_teachers.py); the demonstration's and the cascade's (config_demo.py): re-exported here, where
# every module reads the schema
from .config_base import (ADVANTAGE_NORMS, DTYPES, RUN_SIGNALS, SELF_TEACHER, SIGNALS, TINY_ARCHS,  # noqa: F401
                          VLLM_CPU_HEAD_DIMS, ConfigError, TinyModelConfig, _check_choice, _check_fraction,
                          _check_positive, _fail, _open_dict, _tiny_ok)
from .config_demo import CascadeConfig, CascadeStageConfig, DemoConfig, check_cascade, check_demo  # noqa: F401
from .config_teachers import (PreflightConfig, TeacherConfig, TeacherPoolConfig, TeachersConfig,  # noqa: F401
                              _check_pools, _check_routing, _check_teachers, parse_route, resolved_backend,
                              resolved_signal, route_of, route_slots, routes, teacher_model_path)

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
    check_demo(cfg)


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
