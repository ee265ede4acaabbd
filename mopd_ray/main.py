"""Entry point: ``python -m mopd_ray.main [group=option ...] [key=value ...]`` (a Hydra app).

Composes conf/ over the schema in mopd_ray/config.py, validates it, prepares the models and runs.
``run.dry_run=true`` stops after printing the resolved config and the plan.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import (CONF_DIR, ConfigError, register_configs, resolved_backend, resolved_signal, resource_demand,
                     routes, validate)

log = logging.getLogger("mopd_ray")

register_configs()


def describe_plan(cfg, model_paths: dict[str, str], started: list | None = None) -> str:
    """A short human-readable summary of the roles, their placement and the routing."""
    ro, ln = cfg.rollout, cfg.learner
    lines = [
        f"run {cfg.run.name}: {cfg.run.total_steps} steps x {cfg.data.prompts_per_step} prompts x "
        f"{ro.n_samples_per_prompt} samples, signal={cfg.algorithm.signal}, alpha={cfg.algorithm.alpha}",
        f"  student   {model_paths['student']}",
        f"  rollout   {ro.replicas} replica(s) x TP{ro.tensor_parallel_size} vLLM, max_new_tokens={ro.max_new_tokens}",
        f"  learner   {ln.world_size} DeepSpeed ZeRO-{ln.zero_stage} rank(s), lr={ln.lr}",
    ]
    table = routes(cfg)
    for name, t in cfg.teachers.models.items():
        domains = [("<default>" if d == "*" else d) + ("" if len(r) == 1 and w == 1.0 else f" x{w:g}")
                   for d, r in table.items() for n, w in r if n == name]
        p = cfg.teachers.pools[t.pool] if t.pool else None
        engine = (f"pool '{t.pool}' ({p.replicas} x TP{p.tensor_parallel_size} vllm, shared)" if p else
                  f"{t.replicas} x TP{t.tensor_parallel_size} {resolved_backend(cfg, name)}")
        lines.append(f"  teacher   {name:<16} {engine}, "
                     f"weight={t.weight}, signal={resolved_signal(cfg, name)}, domains={domains or 'none'}, "
                     f"model={model_paths[f'teacher:{name}']}"
                     + ("" if started is None or name in started or cfg.algorithm.signal == "none"
                        else " (no domain of the training data routes here: not started)"))
    demand = resource_demand(cfg)
    lines.append(f"  resources CPU={demand['CPU']:g} GPU={demand['GPU']:g} ({cfg.cluster.mode} mode)")
    return "\n".join(lines)


def _prepare(cfg, out: Path) -> tuple:
    """Everything checked before any engine starts: models, tokenizers, data, storage, whose checkpoints
    this launch may load. Returns (model paths, prompt pool, RunStart); raises on bad input."""
    from .utils.heavy import heavy_imports

    with heavy_imports():  # the driver's big libraries, without the cycle collector's passes over them
        from transformers import AutoTokenizer

    from .data.prompts import build_prompt_pool
    from .models.compat import check_context_lengths, check_local_tokenizers
    from .models.prepare import prepare_models
    from .run_identity import plan_run
    from .storage import check_writable_locations

    model_paths = prepare_models(cfg)
    check_local_tokenizers(cfg)
    check_context_lengths(cfg)
    # data problems surface here (and prompts are rendered once)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    pool = build_prompt_pool(cfg, tokenizer)
    check_writable_locations(cfg, str(out))
    return model_paths, pool, plan_run(cfg)


def run(cfg: DictConfig) -> int:
    try:
        validate(cfg)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.run.dry_run or cfg.logging.verbose:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    from .storage import StorageError

    try:
        model_paths, pool, start = _prepare(cfg, out)
    except (FileNotFoundError, ValueError, StorageError) as e:  # RunIdentityError is a ValueError
        log.error("%s", e)
        return 2
    print(describe_plan(cfg, model_paths, pool.teacher_names))
    print(f"  data      {len(pool.train)} train / {len(pool.eval)} eval prompts; {pool.dropped_too_long} dropped as "
          f"longer than data.max_prompt_len={cfg.data.max_prompt_len}")
    print(f"  config    {out / 'resolved_config.yaml'}")
    print(f"  run id    {start.identity.run_id}: checkpoints in {start.root}"
          + (f", starting from {start.resume_from}" if start.resume_from else ""))
    if cfg.run.dry_run:
        return 0
    from .console import summary
    from .utils.heavy import heavy_imports

    with heavy_imports():
        from .collectives import SharedGPUError
        from .models.compat import TokenizerMismatchError
        from .orchestrator import Orchestrator
    from .preflight import PreflightError
    from .rewards import RewardError
    from .sync_check import WeightSyncCheckError

    orch = Orchestrator(cfg, str(out), pool=pool, start=start)
    try:
        last = orch.run()
    except RewardError as e:  # raised where the responses are: Ray wraps it, the cause has the message
        log.error("%s", getattr(e, "cause", None) or e)
        return 2
    except (PreflightError, TokenizerMismatchError, StorageError, SharedGPUError) as e:  # a start-up check failed
        log.error("%s", e)
        return 2
    except WeightSyncCheckError as e:  # the checkpoints written so far are kept
        log.error("%s", e)
        return 2
    mode = cfg.logging.wandb_mode
    paths = {"run directory": out, "metrics": out / "metrics.jsonl", "student": out / "student_final",
             "checkpoint": orch.last_checkpoint, f"wandb ({mode})": None if mode == "disabled" else out / "wandb"}
    print(summary(cfg.run.name, orch.state.step, orch.wall_s, orch.first_metrics, last, orch.eval_history, paths))
    return 0


def sweep_checkpoint_dir(cfg, hydra_cfg) -> None:
    """A multirun job with the default checkpoint folder gets its own below it, named by its overrides (the
    same on a relaunch of the sweep, so run.resume=auto finds each job's run)."""
    import hashlib

    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.run.checkpoint_dir != f"checkpoints/{cfg.run.name}":
        return
    name = hydra_cfg.job.override_dirname.replace("/", "_").replace("\\", "_") or f"job{hydra_cfg.job.num}"
    if len(name) > 96:
        name = f"{name[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    cfg.run.checkpoint_dir = f"checkpoints/{cfg.run.name}/{name}"


_STARTED = False  # set once Hydra has composed the config and handed it to us


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    global _STARTED
    _STARTED = True
    from .console import configure

    configure(bool(cfg.logging.get("verbose", False)))
    from hydra.core.hydra_config import HydraConfig

    if cfg.run.output_dir == ".":
        cfg.run.output_dir = HydraConfig.get().runtime.output_dir
    sweep_checkpoint_dir(cfg, HydraConfig.get())
    rc = run(cfg)
    if rc:
        sys.exit(rc)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .console import skip_exit_collection

    try:
        _hydra_main()
    except SystemExit as e:
        # Hydra reports a config it cannot compose (unknown key, wrong type: `learner.lr=fast`) and
        # exits 1 before calling us; every configuration error exits 2
        if e.code == 1 and not _STARTED:
            sys.exit(2)
        raise
    finally:
        skip_exit_collection()


if __name__ == "__main__":
    main()
