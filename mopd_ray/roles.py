"""Building the role groups on Ray, the start-up checks that run before any work, and weight sync."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from omegaconf import OmegaConf

from .algo.mismatch import needs_rollout_logprobs
from .cluster import ActorGroup, Bundle, get_with_deadline
from .config import resolved_backend, resolved_signal, teacher_model_path
from .data.run_rewards import rewards_spec
from .models.compat import tokenizer_fingerprint
from .warm import WARM, GroupSpec, host_key, reuse_key
from .workers.learner import LearnerWorker
from .workers.rollout import RolloutWorker
from .workers.teacher import PooledTeacherWorker, TeacherWorker

log = logging.getLogger(__name__)


# glibc keeps freed weight-sync buffers in the heap (its mmap threshold grows to 32 MB after the first
# free), so the rollout process would grow by about the model size after the first syncs; a fixed
# threshold hands every buffer of 1 MiB or more back to the system when it is freed.
ROLLOUT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


@dataclass
class Roles:
    rollout: ActorGroup
    teachers: dict  # name -> ActorGroup (replicas)
    learners: ActorGroup
    teacher_names: list  # sorted; a row's teacher_index points here

    def shutdown(self, park: bool = False) -> None:
        """Shut every group down, or with ``park`` keep them warm for the next run (mopd_ray/warm.py)."""
        groups = [self.rollout, self.learners, *self.teachers.values()]
        for g in [g for i, g in enumerate(groups) if all(g is not o for o in groups[:i])]:  # a pool once
            try:
                WARM.park(g) if park else g.shutdown()
            except Exception:  # best effort at exit
                pass

    def placement(self) -> dict:
        """Node id of every actor, by role: {role: [node ids]}."""
        out = {"rollout": ray_get(self.rollout.call_all("node_id")),
               "learner": ray_get(self.learners.call_all("node_id"))}
        for name, g in self.teachers.items():
            out[f"teacher:{name}"] = ray_get(g.call_all("node_id"))
        setup = getattr(self, "learner_setup", None) or []
        out["learner_ranks"] = [{k: s.get(k) for k in ("rank", "node_local_rank", "device", "local_rank_env")}
                                for s in setup]  # LOCAL_RANK is the device index, node_local_rank the rank on its node
        return out


def ray_get(refs, timeout_s: float = 120.0):
    return get_with_deadline(refs, "placement query", timeout_s)


def active_teachers(cfg) -> list:
    """Sorted teacher names taking part in the run (none for reward-only training)."""
    return [] if cfg.algorithm.signal == "none" else sorted(cfg.teachers.models)


def _common(cfg) -> dict:
    return dict(placement_timeout_s=cfg.cluster.placement_timeout_s, call_timeout_s=cfg.cluster.call_timeout_s)


def _warm(cfg, spec: GroupSpec, with_args: bool = True, extra=None, rebuild: bool = False) -> GroupSpec:
    """The spec's reuse keys (mopd_ray/warm.py); ``rebuild``: a parked group of its kind may become it."""
    spec.reuse_key = reuse_key(spec, with_args, extra) if cfg.cluster.reuse_engines else None
    spec.host_key = host_key(spec) if cfg.cluster.reuse_engines and rebuild else None
    return spec


def make_rollout_group(cfg, name: str = "rollout") -> ActorGroup:
    return WARM.realize([rollout_spec(cfg, name)])[0]


def make_teacher_group(cfg, name: str) -> ActorGroup:
    return WARM.realize([teacher_spec(cfg, name)])[0]


def make_pool_group(cfg, pool: str, members: list) -> ActorGroup:
    return WARM.realize([pool_spec(cfg, pool, members)])[0]


def make_learner_group(cfg, teacher_names: list) -> ActorGroup:
    return WARM.realize([learner_spec(cfg, teacher_names)])[0]


def env_spec(cfg) -> dict:
    """What a rollout replica needs to run episodes: env.* and the environment classes in use."""
    return {**_plain(cfg.env), "default": cfg.data.env,
            "by_domain": {d: v for d, v in dict(cfg.data.envs or {}).items() if v},
            "builtin": sorted({v for v in env_classes(cfg) if v}),
            "search_path": [os.getcwd()]}  # a user's module in the job's working directory imports in the actors


def env_classes(cfg) -> list:
    from .data.domains import DOMAINS

    return [cfg.data.env, *dict(cfg.data.envs or {}).values(), *(DOMAINS[d].env for d in cfg.data.domains if d in DOMAINS)]


def rollout_spec(cfg, name: str = "rollout") -> GroupSpec:
    """The vLLM rollout engines; ``name`` names the placement group (unique in the Ray namespace)."""
    ro = cfg.rollout
    max_len = cfg.data.max_prompt_len + ro.max_new_tokens
    logprobs = needs_rollout_logprobs(cfg.algorithm.is_correction, cfg.learner.recompute_old_logprobs)
    from .models.compat import run_stop_ids

    spec = {**_plain(ro), "logprobs": logprobs, "stop_token_ids": run_stop_ids(cfg), "env": env_spec(cfg)}
    if cfg.cluster.fault_exit_in_sync_version is not None:  # chaos testing (cluster.fault_exit_in_sync_version)
        spec["fault_exit"] = {"version": int(cfg.cluster.fault_exit_in_sync_version),
                              "marker": os.path.join(os.path.abspath(cfg.run.checkpoint_dir), "fault_exit_in_sync.done")}
    return _warm(cfg, GroupSpec(
        name, RolloutWorker, ro.replicas,
        Bundle(ro.num_cpus_per_shard, ro.num_gpus_per_shard, dict(ro.custom_resources) or None),
        dict(init_args=lambda i: ((cfg.model.path, spec, max_len, i, cfg.model.trust_remote_code),
                                  {"rewards": rewards_spec(cfg), "train_rewards": rewards_spec(cfg, train=True)}),
             # a restarted engine comes back with the initial weights: the driver re-syncs, then retries
             max_restarts=cfg.cluster.max_restarts, max_task_retries=0, runtime_env={"env_vars": ROLLOUT_ENV},
             shards=ro.tensor_parallel_size, **_common(cfg))), rebuild=True)


def teacher_spec(cfg, name: str) -> GroupSpec:
    t = cfg.teachers.models[name]
    served = resolved_backend(cfg, name) == "endpoint"  # an HTTP client: no GPU, no shards
    return _warm(cfg, GroupSpec(
        f"teacher:{name}", TeacherWorker, t.replicas,
        Bundle(t.num_cpus_per_shard, 0.0 if served else t.num_gpus_per_shard, dict(t.custom_resources) or None),
        dict(init_args=lambda i: ((name, teacher_model_path(cfg, name),
                                   {**_plain(t), "backend": resolved_backend(cfg, name)}, i,
                                   cfg.model.trust_remote_code), {}),
             # teachers are frozen and stateless: Ray restarts a dead replica and retries its calls
             max_restarts=cfg.cluster.max_restarts, max_task_retries=cfg.cluster.max_restarts,
             shards=1 if served else t.tensor_parallel_size, **_common(cfg))),
        rebuild=True)


def pool_spec(cfg, pool: str, members: list) -> GroupSpec:
    """The engines of teacher pool ``pool``, serving the teachers ``members`` (names)."""
    p = cfg.teachers.pools[pool]
    folders = {n: teacher_model_path(cfg, n) for n in members}
    return _warm(cfg, GroupSpec(
        f"teacher_pool:{pool}", PooledTeacherWorker, p.replicas,
        Bundle(p.num_cpus_per_shard, p.num_gpus_per_shard, dict(p.custom_resources) or None),
        dict(init_args=lambda i: ((pool, folders, _plain(p), i, cfg.model.trust_remote_code), {}),
             # a restarted replica serves its first teacher again; every call names (and swaps in) its own
             max_restarts=cfg.cluster.max_restarts, max_task_retries=cfg.cluster.max_restarts,
             shards=p.tensor_parallel_size, **_common(cfg))),
        rebuild=True)


def pool_replica(cfg, teacher_names: list, name: str):
    """The pool replica that serves a pooled teacher (its place among the pool's teachers in this run,
    modulo the replicas: each teacher stays on one replica, so it is swapped in at most once per step);
    None for a teacher with its own group (its replicas take calls in turn)."""
    pool = cfg.teachers.models[name].pool
    if pool is None:
        return None
    members = [n for n in teacher_names if cfg.teachers.models[n].pool == pool]
    return members.index(name) % cfg.teachers.pools[pool].replicas


def learner_spec(cfg, teacher_names: list) -> GroupSpec:
    """The DeepSpeed ranks. Reused by size, resources and ZeRO stage: a taken group is rebuilt with this
    run's model and settings (LearnerWorker.reuse, then setup in the same process group)."""
    ln, ro = cfg.learner, cfg.rollout
    rows = cfg.data.prompts_per_step * ro.n_samples_per_prompt
    weights = [cfg.teachers.models[n].weight for n in teacher_names]
    signals = [resolved_signal(cfg, n) for n in teacher_names]
    spec = GroupSpec(
        "learner", LearnerWorker, ln.world_size,
        Bundle(ln.num_cpus_per_rank, ln.num_gpus_per_rank, dict(ln.custom_resources) or None),
        dict(init_args=lambda i: ((i, ln.world_size, cfg.model.path, _plain(ln),
                                   {**_plain(cfg.algorithm), "teacher_combine": cfg.teachers.combine}, teacher_names,
                                   weights, signals, cfg.run.total_steps, rows, ro.temperature, cfg.run.seed,
                                   cfg.model.trust_remote_code), {}),
             **_common(cfg)))
    # ZeRO-3 leaves process-wide state in transformers (its HfDeepSpeedConfig): a group keeps its stage
    return _warm(cfg, spec, with_args=False, extra={"zero_stage": ln.zero_stage,
                                                    "trust_remote_code": cfg.model.trust_remote_code})


def _single_node(cfg) -> bool:
    """Local mode: every role on this machine, so groups rendezvous through files (loopback only)."""
    return cfg.cluster.mode == "local" and not os.environ.get("RAY_ADDRESS")


def start_learner_setup(cfg, learners: ActorGroup) -> list:
    """Start every rank's DeepSpeed init (refs; gather them with ``learners.gather``)."""
    from .collectives import check_distinct_gpus

    uuids = learners.gather(learners.call_all("gpu_uuid"), "gpu_uuid")
    check_distinct_gpus({f"learner rank {i}": u for i, u in enumerate(uuids)}, "learners' process group",
                        "Give each rank a GPU of its own: learner.num_gpus_per_rank > 0.5 (Ray packs fractional "
                        "GPUs onto one device), or learner.world_size=1 when the roles share a single GPU.")
    addr, port = learners.gather(learners.call(0, "master_address", _single_node(cfg)), "master_address")
    nodes = learners.gather(learners.call_all("node_id"), "node_id")
    ranks = node_local_ranks(nodes)
    return [learners.call(i, "setup", addr, port, cfg.cluster.call_timeout_s, ranks[i]) for i in range(len(learners))]


def node_local_ranks(nodes: list) -> list:
    """[(index among the ranks on the same node, how many ranks that node holds)] per rank, in rank order."""
    seen: dict = {}
    out = []
    for n in nodes:
        out.append(seen.get(n, 0))
        seen[n] = seen.get(n, 0) + 1
    return [(i, seen[n]) for i, n in zip(out, nodes)]


def setup_learners(cfg, learners: ActorGroup) -> list:
    return learners.gather(start_learner_setup(cfg, learners), "setup (DeepSpeed init)")


def build_roles(cfg, tokenizer, teacher_names: list | None = None) -> Roles:
    """Create every group, wait until all engines are up, run the pre-flight checks, wire weight sync.
    ``teacher_names``: the teachers the data routes to (default: every defined one)."""
    from . import preflight

    teacher_names = active_teachers(cfg) if teacher_names is None else list(teacher_names)
    groups = []
    try:
        # every group at once: warm ones of an earlier run are taken before any is built (mopd_ray/warm.py)
        pooled = {}  # pool -> its members, in teacher order
        for name in teacher_names:
            if cfg.teachers.models[name].pool is not None:
                pooled.setdefault(cfg.teachers.models[name].pool, []).append(name)
        dedicated = [n for n in teacher_names if cfg.teachers.models[n].pool is None]
        specs = [rollout_spec(cfg), *(teacher_spec(cfg, n) for n in dedicated),
                 *(pool_spec(cfg, pool, members) for pool, members in pooled.items()),
                 learner_spec(cfg, teacher_names)]
        groups = WARM.realize(specs)
        rollout, learners = groups[0], groups[-1]
        teachers = dict(zip(dedicated, groups[1:1 + len(dedicated)]))
        for pool, g in zip(pooled, groups[1 + len(dedicated):-1]):
            teachers.update(dict.fromkeys(pooled[pool], g))
        teachers = {n: teachers[n] for n in teacher_names}
        roles = Roles(rollout, teachers, learners, teacher_names)
        # Engines load and learners initialise DeepSpeed in parallel; a failure (bad model folder, OOM)
        # surfaces here with its role named.
        learners_up = start_learner_setup(cfg, learners)
        rollout.gather(rollout.call_all("ready"), "start (loading the student in vLLM)")
        for name, g in teachers.items():
            g.gather(g.call_all("ready"), f"start (loading teacher '{name}'"
                     + (f", pool '{cfg.teachers.models[name].pool}')" if cfg.teachers.models[name].pool else ")"))
        roles.learner_setup = learners.gather(learners_up, "setup (DeepSpeed init)")
        log.debug("learners ready: %s", roles.learner_setup)
        log.info("%s", preflight.run(cfg, roles, student_fingerprint(tokenizer, cfg.model.path), tokenizer))
        share_teacher_heads(cfg, roles)
        if cfg.rollout.weight_sync == "broadcast":
            init_broadcast_group(cfg, learners, rollout)
    except BaseException:
        for g in groups:
            try:
                g.shutdown()
            except Exception:
                pass
        raise
    return roles


def share_teacher_heads(cfg, roles: Roles) -> None:
    """Full-vocabulary teachers hand their frozen output heads to the learners (refs only via the driver)."""
    heads = {}
    for i, name in enumerate(roles.teacher_names):
        if resolved_signal(cfg, name) == "full_vocab":
            heads[i] = roles.teachers[name].call(0, "output_head", name)
    if heads:
        roles.learners.gather(roles.learners.call_all("set_teacher_heads_from_refs", heads), "set_teacher_heads")


def init_broadcast_group(cfg, learners: ActorGroup, rollout: ActorGroup) -> None:
    """One process group: learner rank 0 (rank 0 of the group) + every worker process (TP shard) of
    every rollout engine, which receive the buckets themselves."""
    from .collectives import check_distinct_gpus

    tp = cfg.rollout.tensor_parallel_size
    world = 1 + len(rollout) * tp
    members = {"learner rank 0": learners.gather(learners.call(0, "gpu_uuid"), "gpu_uuid")}
    for i, uuids in enumerate(rollout.gather(rollout.call_all("engine_gpu_uuids"), "engine_gpu_uuids")):
        members.update({f"rollout replica {i} shard {s}": u for s, u in enumerate(uuids)})
    check_distinct_gpus(members, "weight-sync group (rollout.weight_sync=broadcast)",
                        "Use rollout.weight_sync=object_store when the learner and the engines share a GPU, or "
                        "give them GPUs of their own (num_gpus_per_shard / learner.num_gpus_per_rank of 1).")
    host, port = learners.gather(learners.call(0, "master_address", _single_node(cfg)), "master_address")
    metas = learners.gather(learners.call(0, "param_metas"), "param_metas")
    from .sync import choose_bucket_bytes

    free = [b for per_engine in rollout.gather(rollout.call_all("engine_free_memory"), "engine_free_memory")
            for b in per_engine]
    bucket = choose_bucket_bytes(cfg.rollout.weight_sync_bucket_mb << 20, free)
    if bucket != cfg.rollout.weight_sync_bucket_mb << 20:
        log.warning("weight-sync buckets of %d MiB instead of rollout.weight_sync_bucket_mb=%d: an engine worker "
                    "has %.0f MiB free (a sync holds about two buckets)", bucket >> 20,
                    cfg.rollout.weight_sync_bucket_mb, min(free) / 2**20)
    rollout.sync_bucket_bytes = bucket  # both sides cut the stream into the same buckets
    refs = [learners.call(0, "init_sync_group", host, port, world, cfg.cluster.call_timeout_s)]
    refs += [rollout.call(i, "init_sync_group", host, port, 1 + i * tp, world, metas, bucket, cfg.cluster.call_timeout_s)
             for i in range(len(rollout))]
    rollout.gather(refs, "init_sync_group")


def sync_weights(cfg, learners: ActorGroup, rollout: ActorGroup, version: int) -> float:
    """Push the learners' current weights to every rollout engine, then check that the engines serve them
    (``rollout.check_weight_sync``: its figures in ``rollout.last_sync_check``). Returns the sync's seconds."""
    t0 = time.perf_counter()
    ro = cfg.rollout
    if ro.weight_sync == "broadcast":
        refs = learners.call_all("broadcast_weights", getattr(rollout, "sync_bucket_bytes", ro.weight_sync_bucket_mb << 20))
        refs += rollout.call_all("receive_weights", version)
        rollout.gather(refs, "weight sync (broadcast)")
    else:
        exported = learners.gather(learners.call_all("export_to_store"), "weight export")
        state_ref = exported[0][0]  # an ObjectRef owned by learner rank 0; engines resolve it themselves
        rollout.gather(rollout.call_all("update_weights_from_store", state_ref, version), "weight sync (store)")
    seconds = time.perf_counter() - t0
    if ro.check_weight_sync:
        from .sync_check import check_engines

        rollout.last_sync_check = check_engines(cfg, learners, rollout, version)
    return seconds


def student_fingerprint(tokenizer, model_path: str) -> dict:
    from transformers import AutoConfig

    return tokenizer_fingerprint(tokenizer, AutoConfig.from_pretrained(model_path).vocab_size, model_path)
