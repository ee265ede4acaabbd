"""Per-domain evaluation: greedy accuracy and pass@k through vLLM, the domain's reward as the judge.

``evaluate_llm`` (mopd_ray/workers/evaluation.py) runs on any vLLM ``LLM`` (a rollout engine holding the current student, or a
stand-alone engine for a teacher or a checkpoint). pass@k uses the unbiased estimator of Chen et al.
(2021) from n >= k samples at temperature 1: 1 - C(n - c, k) / C(n, k), c = correct samples
(reward >= 1). Accuracy is the mean reward of the greedy answer (the fraction correct for 0/1 rewards).

The command evaluates model folders on an eval file with the configured rewards::

    python -m mopd_ray.evaluate --model DIR [DIR ...] --data eval.jsonl [--k 4] [--out results.json] \\
        [Hydra overrides: data.rewards.math=math_verify rollout.max_new_tokens=512 experiment=...]

It prints a table (one row per model, greedy accuracy and pass@k per domain) and writes the figures
as JSON. Domains without a reward are listed and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .workers.evaluation import evaluate_llm, pass_at_k  # noqa: F401  (pass_at_k: part of this module's API)

log = logging.getLogger("mopd_ray.evaluate")


def per_domain_subset(rows: list, n: int) -> list:
    """At most ``n`` rows with every domain equally represented (as far as it has rows), in file order
    within a domain: a prefix of an eval file grouped by domain would evaluate its first domain only."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    by_domain: dict = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    picked: list = []
    queues = [list(v) for v in by_domain.values()]
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    keep = {id(r) for r in picked}
    return [r for r in rows if id(r) in keep]


def merge_results(parts: list) -> dict:
    """Combine per-replica results weighted by their counts."""
    out: dict = {}
    for part in parts:
        for d, r in part.items():
            acc = out.setdefault(d, {"n": 0})
            n = acc["n"] + r["n"]
            for key, v in r.items():
                if key != "n":
                    acc[key] = (acc.get(key, 0.0) * acc["n"] + v * r["n"]) / n
            acc["n"] = n
    return out


def evaluate_model_dir(model_path: str, prompts: list, rewards, k: int = 4, seed: int = 0, max_new_tokens: int = 16,
                       max_model_len: int = 256, dtype: str = "float32", tensor_parallel_size: int = 1,
                       trust_remote_code: bool = False, env: dict | None = None, env_pool=None) -> dict:
    """Stand-alone evaluation of a model folder (teachers, checkpoints) with an in-process engine; rows with an
    environment (``env``: mopd_ray.roles.env_spec) are played as episodes, with the environment actors of
    ``env_pool`` (mopd_ray.envs.pool.EnvPool; None: started and stopped here)."""
    from transformers import AutoTokenizer

    from .workers.vllm_engine import make_llm, on_gpu

    llm = make_llm(model_path, dtype=dtype, max_model_len=max_model_len, kv_cache_memory_bytes=None if on_gpu() else 128 << 20,
                   tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        runner = None
        if env_pool is not None:
            from .workers.episodes import EpisodeRunner
            from .workers.episodes import sampled_logprobs as _sampled_logprobs

            runner = EpisodeRunner(llm, tok, env_pool, model_path, _sampled_logprobs)
        return evaluate_llm(llm, tok, prompts, rewards, k, seed, max_new_tokens, env=env, model_name=model_path,
                            runner=runner)
    finally:
        del llm


# --------------------------------------------------------------------------- the command


def table(results: dict, k: int) -> str:
    """A markdown table: one row per model, accuracy (and pass@k) per domain, then the mean."""
    domains = sorted({d for r in results.values() for d in r})
    cols = [f"{d} acc" for d in domains] + ([f"{d} pass@{k}" for d in domains] if k > 0 else [])
    lines = ["| model | " + " | ".join(cols) + " | mean acc |", "|---|" + "---|" * (len(cols) + 1)]
    for model, res in results.items():
        vals = [res.get(d, {}).get("accuracy") for d in domains]
        if k > 0:
            vals += [res.get(d, {}).get(f"pass@{k}") for d in domains]
        accs = [res[d]["accuracy"] for d in domains if d in res]
        mean = sum(accs) / len(accs) if accs else None
        lines.append(f"| {model} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
                     + f" | {'-' if mean is None else f'{100 * mean:.1f}'} |")
    counts = {d: next((r[d]["n"] for r in results.values() if d in r), 0) for d in domains}
    lines.append("")
    lines.append("prompts per domain: " + ", ".join(f"{d} {n}" for d, n in counts.items()))
    return "\n".join(lines)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m mopd_ray.evaluate", description=(
        "Greedy accuracy and pass@k per domain of model folders on an eval file, judged by the configured "
        "rewards (data.rewards), through vLLM. Extra arguments are Hydra overrides of conf/."))
    ap.add_argument("--model", nargs="+", required=True, help="transformers-format model folder(s)")
    ap.add_argument("--data", help="eval file (JSONL or Parquet); default: data.eval_path, else the synthetic "
                                   "eval split")
    ap.add_argument("--k", type=int, default=None, help="pass@k samples per prompt (default run.eval_pass_k; 0: off)")
    ap.add_argument("--max-prompts", type=int, default=0, help="N prompts, domains equally represented (0: all)")
    ap.add_argument("--out", default=None, help="JSON output path (default outputs/eval/<time>/results.json)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="vLLM's own logs on the console")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.rewards.math=math_verify")
    return ap.parse_args(argv)


def _eval_rows(cfg, path) -> tuple[list, str]:
    from .data.dataset import load_prompts
    from .data.domains import generate_split

    if path:
        d = cfg.data
        return load_prompts(path, d.prompt_key, d.domain_key, d.answer_key), str(path)
    return generate_split(list(cfg.data.domains), cfg.data.num_eval_per_domain, cfg.data.seed, "eval"), \
        "the synthetic eval split"


def _env_pool(cfg):
    """The environments of rows played as episodes, in Ray actors of their own (a local Ray started if none is)."""
    import ray

    from .envs.pool import EnvPool
    from .roles import env_spec

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return EnvPool(env_spec(cfg))


def _rendered(model: str, rows: list, cfg) -> list:
    """The rows with their prompts rendered by ``model``'s template; those over data.max_prompt_len left out (said)."""
    from transformers import AutoTokenizer

    from .data.prompts import render

    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=cfg.model.trust_remote_code)
    rendered = [{**r, "prompt_ids": render(tok, r["prompt"], r.get("messages"), r.get("tools"))} for r in rows]
    kept = [r for r in rendered if len(r["prompt_ids"]) <= cfg.data.max_prompt_len]
    if len(kept) < len(rendered):
        log.warning("%s: %d of %d prompts longer than data.max_prompt_len=%d tokens skipped", model,
                    len(rendered) - len(kept), len(rendered), cfg.data.max_prompt_len)
    return kept


def run_command(argv=None) -> int:
    from .config import ConfigError, compose_config, validate_rewards
    from .data.dataset import DataError
    from .data.run_rewards import rewards_from_cfg
    from .rewards import RewardError

    from .console import configure, quiet_torch

    args = _parse(sys.argv[1:] if argv is None else argv)
    configure(args.verbose)  # before vLLM and torch are imported: they read their log levels once
    try:
        cfg = compose_config(args.overrides)
        validate_rewards(cfg)
        rows, source = _eval_rows(cfg, args.data or cfg.data.eval_path)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    rows = per_domain_subset(rows, args.max_prompts)
    k = cfg.run.eval_pass_k if args.k is None else args.k
    rewards = rewards_from_cfg(cfg)
    missing = sorted({r["domain"] for r in rows if not rewards.has_reward(r["domain"])})
    if missing:
        log.warning("no reward for domain(s) %s: skipped (set data.rewards.DOMAIN=exact|numeric|math_verify|"
                    "module:function)", ", ".join(missing))
    max_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    quiet_torch()
    results, t0 = {}, time.time()
    from .data.prompts import env_of
    from .roles import env_spec

    rows = [{**r, "env": env_of(cfg, r["domain"])} for r in rows]
    pool = _env_pool(cfg) if any(r["env"] for r in rows) else None
    try:
        for model in args.model:
            if not (Path(model) / "config.json").exists():
                log.error("--model %s: not a transformers model folder (no config.json)", model)
                return 2
            kept = _rendered(model, rows, cfg)
            results[model] = evaluate_model_dir(model, kept, rewards, k, cfg.run.seed, cfg.rollout.max_new_tokens,
                                                max_len, cfg.rollout.dtype, args.tensor_parallel_size,
                                                cfg.model.trust_remote_code, env_spec(cfg), pool)
    except RewardError as e:
        log.error("%s", e)
        return 2
    finally:
        rewards.close()
        if pool is not None:
            pool.shutdown()
    out = Path(args.out or f"outputs/eval/{time.strftime('%Y-%m-%d_%H-%M-%S')}/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": source, "k": k, "rewards": rewards.names, "seed": cfg.run.seed,
                               "max_new_tokens": cfg.rollout.max_new_tokens, "results": results,
                               "seconds": round(time.time() - t0, 1)}, indent=1))
    print(table(results, k))
    print(f"results: {out}")
    return 0


def main() -> None:
    from .console import skip_exit_collection

    try:
        rc = run_command()
    finally:
        skip_exit_collection()
    sys.exit(rc)


if __name__ == "__main__":
    main()
