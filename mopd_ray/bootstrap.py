"""Bootstrap of the demonstration: a weak base student and one specialist teacher per domain, trained
here with the project's own learner (DeepSpeed ranks on Ray) from a tiny model built from a seed.

The base student is fine-tuned briefly on all domains (it learns the answer format, not the skills);
each teacher continues from the base on its own domain until it is strong there. Everything is cached
under ``<artifacts>/demo/seed<N>/`` with a manifest; a later run with the same recipe reuses it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _sft_rows(tokenizer, rows: list, max_prompt_len: int, tool_use: bool = False) -> tuple[list, list, list]:
    """(sequences, prompt lengths, masks of the trained tokens): the prompt rendered as in the runs, then the
    answer; with ``tool_use``, a domain's demonstrated episode (its assistant turns trained, its tool turns
    appended as multi-turn rollouts append them and not trained: mopd_ray/envs/chat.py)."""
    from .data.domains import DOMAINS
    from .data.prompts import render
    from .envs.chat import TurnRenderer

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    seqs, plens, masks = [], [], []
    for r in rows:
        p = render(tokenizer, r["prompt"], None, r.get("tools"))
        if len(p) > max_prompt_len:
            continue
        dom = DOMAINS.get(r["domain"])
        turns = dom.demonstration(r["prompt"], r["answer"]) if tool_use and dom and dom.demonstration else \
            [{"role": "assistant", "content": r["answer"]}]
        seq, mask = list(p), [0] * len(p)
        for t in turns:
            if t["role"] == "assistant":
                add, m = ids(t["content"]) + [im_end], 1
            else:
                add, m = TurnRenderer(tokenizer, [im_end], "the bootstrap's", r.get("tools")).turn_ids([t]), 0
            seq += add
            mask += [m] * len(add)
        seqs.append(seq)
        plens.append(len(p))
        masks.append(mask)
    return seqs, plens, masks


def sft_config(cfg, init_path: str, steps: int, lr: float, batch: int, seed: int):
    """The config of one SFT: the bootstrap's own optimizer settings, whatever the runs that follow use
    (recipe_of keys the rest)."""
    return OmegaConf.merge(cfg, {"model": {"path": init_path}, "learner": {"lr": lr, "min_lr": lr / 10,
                                                                         "micro_batch_size": batch, "warmup_steps": 0,
                                                                         "mini_batches_per_step": 1,
                                                                         "lr_schedule": "cosine"},
                                 "data": {"prompts_per_step": batch}, "rollout": {"n_samples_per_prompt": 1},
                                 "run": {"total_steps": steps, "seed": seed}})


def sft(cfg, init_path: str, out_path: str, rows: list, steps: int, lr: float, batch: int, seed: int,
        learners=None, tool_use: bool = False) -> list:
    """Supervised fine-tuning with the learner group; writes a transformers folder. Returns losses.
    ``learners``: a group already set up (kept; its ranks reload ``init_path``), else one made here.
    ``tool_use``: domains with a demonstrated episode (calc) are trained on it (an expert), else on the answer."""
    from transformers import AutoTokenizer

    from .roles import _plain, make_learner_group, setup_learners

    tokenizer = AutoTokenizer.from_pretrained(init_path)
    seqs, plens, masks = _sft_rows(tokenizer, rows, cfg.data.max_prompt_len, tool_use)
    c = sft_config(cfg, init_path, steps, lr, batch, seed)
    own = learners is None
    rng = np.random.default_rng(seed)
    losses = []
    try:
        if own:
            learners = make_learner_group(c, [])
            setup_learners(c, learners)
        else:
            learners.gather(learners.call_all("reload", init_path, _plain(c.learner), steps, batch, seed), "reload")
        for step in range(steps):
            idx = rng.choice(len(seqs), size=batch, replace=False)
            out = learners.gather(learners.call_all("sft_step", [seqs[i] for i in idx], [plens[i] for i in idx],
                                                    [masks[i] for i in idx]), "sft_step")
            losses.append(out[0]["sft_loss"])
            if step % 50 == 0 or step == steps - 1:
                log.info("sft %s step %d/%d loss %.4f", Path(out_path).name, step + 1, steps, losses[-1])
        tmp = f"{out_path}.tmp"
        learners.gather(learners.call_all("save_pretrained", tmp), "save_pretrained")
        if Path(out_path).exists():
            shutil.rmtree(out_path)
        Path(tmp).rename(out_path)
    finally:
        if own and learners is not None:
            learners.shutdown()
    return losses


def demo_dir(cfg) -> Path:
    return Path(cfg.run.artifacts_dir) / "demo" / f"seed{cfg.demo.seed}"


def bootstrap(cfg) -> dict:
    """Build (or reuse) the base student and the specialist teachers. Returns the manifest."""
    out = demo_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # One builder at a time per folder: a second demo or study launched beside this one waits, then reuses.
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _bootstrap_locked(cfg, out, recipe_of(cfg))


def recipe_of(cfg) -> dict:
    """Everything the bootstrap's models and figures depend on (and nothing else, e.g. not demo.signals).

    The SFT runs on the run's learner group, so the learner settings sft() does not pin are part of it
    (a quick demo with a constant learning rate must not reuse, or build, other teachers silently).
    """
    d, da = cfg.demo, cfg.data
    keys = ("seed", "model", "batch", "base_steps", "base_lr", "base_tool_use", "teacher_steps", "teacher_lr")
    learner = OmegaConf.to_container(cfg.learner, resolve=True)
    pinned = ("lr", "min_lr", "micro_batch_size", "warmup_steps", "mini_batches_per_step", "lr_schedule",
              "num_cpus_per_rank", "num_gpus_per_rank", "custom_resources")
    return {"demo": {k: OmegaConf.to_container(d, resolve=True)[k] for k in keys},
            "learner": {k: v for k, v in learner.items() if k not in pinned},
            "data": {"domains": list(da.domains), "num_train_per_domain": da.num_train_per_domain,
                     "num_eval_per_domain": da.num_eval_per_domain, "seed": da.seed},
            "tokenizer_seed": cfg.model.tokenizer_seed, "eval_max_new_tokens": cfg.rollout.max_new_tokens,
            # the held-out accuracies of tool domains are measured as episodes under these limits
            "eval_episodes": {"max_turns": cfg.env.max_turns, "max_turn_tokens": cfg.env.max_turn_tokens}}


def held_out_accuracy(cfg, paths: dict, evals: list | None = None) -> dict:
    """Greedy accuracy per domain of each model folder in ``paths`` (name -> folder) on the held-out split
    of the synthetic domains (``evals``: its rows, else generated from cfg.data), each in its own engine."""
    from transformers import AutoTokenizer

    from .data.domains import generate_split
    from .data.prompts import env_of, render
    from .data.run_rewards import rewards_from_cfg
    from .envs.pool import EnvPool
    from .evaluate import evaluate_model_dir
    from .roles import env_spec

    if evals is None:
        evals = generate_split(list(cfg.data.domains), cfg.data.num_eval_per_domain, cfg.data.seed, "eval")
    tok = AutoTokenizer.from_pretrained(next(iter(paths.values())))
    eval_rows = [{**r, "prompt_ids": render(tok, r["prompt"], r.get("messages"), r.get("tools")),
                  "env": env_of(cfg, r["domain"])} for r in evals]
    accuracy = {}
    rewards = rewards_from_cfg(cfg)
    pool = EnvPool(env_spec(cfg)) if any(r["env"] for r in eval_rows) else None  # one for every folder
    try:
        for name, p in paths.items():
            res = evaluate_model_dir(p, eval_rows, rewards, k=0, max_new_tokens=cfg.rollout.max_new_tokens,
                                     env=env_spec(cfg), env_pool=pool)
            accuracy[name] = {dom: r["accuracy"] for dom, r in res.items()}
            log.info("%s accuracy %s", name, accuracy[name])
    finally:
        rewards.close()
        if pool is not None:
            pool.shutdown()
    return accuracy


def sft_plan(cfg, out: Path, train: list) -> list:
    """The bootstrap's fine-tunings, in order: the base student from ``<out>/init`` on every domain (the tool domains
    on their demonstrated episodes when ``demo.base_tool_use``), then one expert per domain from the base student on
    its own rows, on its demonstrated episodes where the domain has them."""
    d = cfg.demo
    base = str(out / "student_base")
    plan = [{"name": "student_base", "init": str(out / "init"), "path": base, "rows": train, "steps": d.base_steps,
             "lr": d.base_lr, "seed": d.seed, "tool_use": bool(d.base_tool_use)}]
    for i, dom in enumerate(cfg.data.domains):
        plan.append({"name": f"teacher_{dom}", "init": base, "path": str(out / f"teacher_{dom}"),
                     "rows": [r for r in train if r["domain"] == dom], "steps": d.teacher_steps, "lr": d.teacher_lr,
                     "seed": d.seed + 1 + i, "tool_use": True})
    return plan


def _bootstrap_locked(cfg, out: Path, recipe: dict) -> dict:
    from .cluster import init_ray
    from .config import resource_demand
    from .data.domains import generate_split
    from .models.tiny import build_tiny_model

    d = cfg.demo
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("recipe") == recipe:
            log.info("bootstrap: reusing %s (built in %.0f s)", out, manifest["seconds"])
            return manifest
        log.warning("bootstrap: %s was built from another recipe; rebuilding", out)
        manifest_path.unlink()  # the models are about to change: an interrupted rebuild must not look complete
    t0 = time.time()
    init_ray(cfg.cluster, resource_demand(cfg)["CPU"])
    spec = OmegaConf.to_object(d.model) if not hasattr(d.model, "__dataclass_fields__") else d.model
    init = build_tiny_model(out / "init", spec, cfg.model.tokenizer_seed)
    domains = list(cfg.data.domains)
    train = generate_split(domains, cfg.data.num_train_per_domain, cfg.data.seed, "train")
    evals = generate_split(domains, cfg.data.num_eval_per_domain, cfg.data.seed, "eval")
    # one learner group trains every model in turn (a group's start costs ~10 s of imports per rank)
    from .roles import make_learner_group, setup_learners

    first = sft_config(cfg, str(init), d.base_steps, d.base_lr, d.batch, d.seed)
    learners = make_learner_group(first, [])
    try:
        setup_learners(first, learners)
        losses, paths = {}, {}
        for job in sft_plan(cfg, out, train):
            losses[job["name"]] = sft(cfg, job["init"], job["path"], job["rows"], job["steps"], job["lr"], d.batch,
                                      job["seed"], learners, tool_use=job["tool_use"])
            paths[job["name"]] = job["path"]
    finally:  # kept warm for the runs after the bootstrap when their learner group is of this shape
        from .warm import WARM

        WARM.park(learners) if cfg.cluster.reuse_engines else learners.shutdown()
    accuracy = held_out_accuracy(cfg, paths, evals)
    manifest = {"recipe": recipe, "paths": paths, "accuracy": accuracy, "final_sft_loss":
                {k: v[-1] for k, v in losses.items()}, "seconds": time.time() - t0}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest
