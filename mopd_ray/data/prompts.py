"""The run's prompt pool: rows loaded or generated, rendered once with the student's chat template.

Rendering happens once, with the student's template, and teachers score exactly those ids (a
chat-template mismatch between base student and instruct teacher ruined a reproduction:
tinker-cookbook #796). Prompts longer than ``data.max_prompt_len`` are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import route_of, route_slots
from .dataset import DataError, PromptSampler, check_routes, filter_long_prompts, load_prompts
from .domains import generate_split, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class PromptPool:
    train: list  # rows: prompt, domain, answer, id, prompt_ids, teacher_index
    eval: list
    dropped_too_long: int
    teacher_names: list


def render(tokenizer, prompt: str, messages: list | None = None, tools: list | None = None) -> list:
    """A row's first turns as ids: its ``messages`` (or the prompt as one user turn) and its ``tools``, rendered
    by the student's chat template, ending with the assistant header."""
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages or [{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _render_row(tokenizer, row: dict, source: str) -> list:
    try:
        return render(tokenizer, row["prompt"], row.get("messages"), row.get("tools"))
    except Exception as e:  # jinja: roles or tools the template does not know
        raise DataError(f"{source}: row '{row['id']}' cannot be rendered by the student's chat template "
                        f"({type(e).__name__}: {e}); use the roles and tool format its template supports") from None


def env_of(cfg, domain: str):
    """The environment class (package.module:Class) of a domain's episodes: data.envs.DOMAIN, else data.env, else
    the built-in domain's own (calc); None: single-turn."""
    from .domains import DOMAINS

    by_domain = dict(cfg.data.get("envs") or {})
    if domain in by_domain:
        return by_domain[domain] or None
    if cfg.data.get("env"):
        return cfg.data.env
    return DOMAINS[domain].env if domain in DOMAINS else None


def _rows(cfg, split: str, artifacts: Path) -> tuple[list, str]:
    d = cfg.data
    path = d.train_path if split == "train" else d.eval_path
    if path is not None:
        return load_prompts(path, d.prompt_key, d.domain_key, d.answer_key), str(path)
    n = d.num_train_per_domain if split == "train" else d.num_eval_per_domain
    rows = generate_split(list(d.domains), n, d.seed, split)
    out = artifacts / "data" / f"synthetic_seed{d.seed}_{split}.jsonl"
    if not out.exists():
        write_jsonl(rows, out)
    return rows, f"synthetic {split} split ({out})"


def build_prompt_pool(cfg, tokenizer) -> PromptPool:
    """Both splits rendered with the student's template, each row with its teacher slots. The run's
    teachers are those that a domain of the training rows routes to (a defined teacher no domain uses
    is not started); they are indexed in sorted order."""
    reward_only = cfg.algorithm.signal == "none"
    routing, default = dict(cfg.teachers.routing), cfg.teachers.default
    slots = route_slots(cfg)
    artifacts = Path(cfg.run.artifacts_dir)
    splits = {}
    dropped = 0
    for split in ("train", "eval"):
        if split == "eval" and cfg.data.train_path is not None and cfg.data.eval_path is None:
            splits[split] = []
            continue
        rows, source = _rows(cfg, split, artifacts)
        if not reward_only:
            check_routes(rows, routing, default, source)
        ids = [_render_row(tokenizer, r, source) for r in rows]
        kept, n_drop = filter_long_prompts(rows, [len(i) for i in ids], cfg.data.max_prompt_len)
        if n_drop:
            log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_len=%d tokens", source, n_drop,
                        len(rows), cfg.data.max_prompt_len)
        dropped += n_drop
        keep_ids = {id(r) for r in kept}
        splits[split] = [{**r, "prompt_ids": i} for r, i in zip(rows, ids) if id(r) in keep_ids]
        if split == "train" and not splits[split]:
            raise DataError(f"{source}: no prompt fits data.max_prompt_len={cfg.data.max_prompt_len}; raise it")
    teacher_names = [] if reward_only else routed_teachers(cfg, {r["domain"] for r in splits["train"]})
    for rows in splits.values():
        for r in rows:
            r.update(_route_columns(cfg, r["domain"], teacher_names, slots))
            r["env"] = env_of(cfg, r["domain"])
    return PromptPool(splits["train"], splits["eval"], dropped, teacher_names)


def routed_teachers(cfg, domains: set) -> list:
    """Sorted names of the teachers that some domain in ``domains`` routes to."""
    return sorted({name for d in domains for name, _ in route_of(cfg, d)})


def _route_columns(cfg, domain: str, teacher_names: list, slots: int) -> dict:
    """A prompt's teacher slots: indices into the run's teacher names (-1: empty slot) and the route's
    weight of each (the teacher's own ``weight`` multiplies it in the learner)."""
    route = [] if not teacher_names else [e for e in route_of(cfg, domain) if e[0] in teacher_names]
    idx = [teacher_names.index(n) for n, _ in route] + [-1] * (slots - len(route))
    return {"teacher_index": idx, "route_weight": [w for _, w in route] + [0.0] * (slots - len(route))}


def make_sampler(pool: PromptPool, cfg) -> PromptSampler:
    """data.seed fixes the dataset (splits); the order prompts are drawn in also follows run.seed, so
    runs with another run.seed see the same data in another order."""
    return PromptSampler(pool.train, cfg.data.prompts_per_step, cfg.data.seed * 100_003 + cfg.run.seed,
                         cfg.data.shuffle)
