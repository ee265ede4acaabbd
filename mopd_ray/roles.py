"""Building the role groups on Ray and the start-up checks that run before any work."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import OmegaConf

from .cluster import ActorGroup, Bundle
from .config import SELF_TEACHER, resolved_signal
from .models.compat import check_compatible, tokenizer_fingerprint
from .workers.learner import LearnerWorker
from .workers.rollout import RolloutWorker
from .workers.teacher import TeacherWorker

log = logging.getLogger(__name__)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


@dataclass
class Roles:
    rollout: ActorGroup
    teachers: dict  # name -> ActorGroup (replicas)
    learners: ActorGroup
    teacher_names: list  # sorted; a row's teacher_index points here

    def shutdown(self) -> None:
        for g in [self.rollout, self.learners, *self.teachers.values()]:
            try:
                g.shutdown()
            except Exception:  # best effort at exit
                pass


def teacher_model_path(cfg, name: str) -> str:
    t = cfg.teachers.models[name]
    return cfg.model.path if (name == SELF_TEACHER and not t.model_path) else t.model_path


def build_roles(cfg, student_fp: dict) -> Roles:
    cl, ro, ln = cfg.cluster, cfg.rollout, cfg.learner
    common = dict(placement_timeout_s=cl.placement_timeout_s, call_timeout_s=cl.call_timeout_s)
    trc = cfg.model.trust_remote_code
    max_len = cfg.data.max_prompt_len + ro.max_new_tokens
    rollout = ActorGroup(
        "rollout", RolloutWorker, ro.replicas,
        Bundle(ro.num_cpus_per_shard * ro.tensor_parallel_size, ro.num_gpus_per_shard * ro.tensor_parallel_size,
               dict(ro.custom_resources) or None),
        init_args=lambda i: ((cfg.model.path, _plain(ro), max_len, i, trc), {}), **common)
    teacher_names = sorted(cfg.teachers.models)
    teachers = {}
    for name in teacher_names:
        t = cfg.teachers.models[name]
        teachers[name] = ActorGroup(
            f"teacher:{name}", TeacherWorker, t.replicas,
            Bundle(t.num_cpus_per_shard * t.tensor_parallel_size, t.num_gpus_per_shard * t.tensor_parallel_size,
                   dict(t.custom_resources) or None),
            init_args=lambda i, name=name: ((name, teacher_model_path(cfg, name), _plain(cfg.teachers.models[name]),
                                             i, trc), {}), **common)
    rows = cfg.data.prompts_per_step * ro.n_samples_per_prompt
    weights = [cfg.teachers.models[n].weight for n in teacher_names]
    signals = [resolved_signal(cfg, n) for n in teacher_names]
    learners = ActorGroup(
        "learner", LearnerWorker, ln.world_size,
        Bundle(ln.num_cpus_per_rank, ln.num_gpus_per_rank, dict(ln.custom_resources) or None),
        init_args=lambda i: ((i, ln.world_size, cfg.model.path, _plain(ln), _plain(cfg.algorithm), teacher_names,
                              weights, signals, cfg.run.total_steps, rows, ro.temperature, cfg.run.seed, trc), {}),
        **common)
    roles = Roles(rollout, teachers, learners, teacher_names)
    try:
        # Engines load in parallel; any failure (bad model folder, OOM) surfaces here with its role named.
        rollout.gather(rollout.call_all("ready"), "start (loading the student in vLLM)")
        for name, g in teachers.items():
            g.gather(g.call_all("ready"), f"start (loading teacher '{name}')")
        check_tokenizers(cfg, roles, student_fp)
        addr, port = learners.gather(learners.call(0, "master_address"), "master_address")
        infos = learners.gather(learners.call_all("setup", addr, port, cl.call_timeout_s), "setup (DeepSpeed init)")
        log.info("learners ready: %s", infos[0])
        _share_teacher_heads(cfg, roles)
        if ro.weight_sync == "broadcast":
            init_broadcast_group(cfg, roles)
    except BaseException:
        roles.shutdown()
        raise
    return roles


def check_tokenizers(cfg, roles: Roles, student_fp: dict) -> None:
    for name, g in roles.teachers.items():
        fp = g.gather(g.call(0, "fingerprint"), "fingerprint")
        check_compatible(student_fp, cfg.model.path, fp, f"{name} ({teacher_model_path(cfg, name)})")


def _share_teacher_heads(cfg, roles: Roles) -> None:
    """Full-vocabulary teachers hand their frozen output heads to the learners (refs only via the driver)."""
    heads = {}
    for i, name in enumerate(roles.teacher_names):
        if resolved_signal(cfg, name) == "full_vocab":
            heads[i] = roles.teachers[name].call(0, "output_head")
    if heads:
        # Ray resolves refs nested in a dict only in the callee: pass {index: ref}, learners ray.get them.
        roles.learners.gather(roles.learners.call_all("set_teacher_heads_from_refs", heads), "set_teacher_heads")


def init_broadcast_group(cfg, roles: Roles) -> None:
    """One process group: learner rank 0 (rank 0 of the group) + every rollout engine."""
    ro = cfg.rollout
    world = 1 + len(roles.rollout)
    host, port = roles.learners.gather(roles.learners.call(0, "master_address"), "master_address")
    metas = roles.learners.gather(roles.learners.call(0, "param_metas"), "param_metas")
    bucket = ro.weight_sync_bucket_mb << 20
    refs = [roles.learners.call(0, "init_sync_group", host, port, world, cfg.cluster.call_timeout_s)]
    refs += [roles.rollout.call(i, "init_sync_group", host, port, i + 1, world, metas, bucket,
                                cfg.cluster.call_timeout_s) for i in range(len(roles.rollout))]
    roles.rollout.gather(refs, "init_sync_group")


def student_fingerprint(tokenizer, model_path: str) -> dict:
    from transformers import AutoConfig

    return tokenizer_fingerprint(tokenizer, AutoConfig.from_pretrained(model_path).vocab_size)
