"""A shared teacher pool vs one engine per teacher: scoring time per step and resident memory.

    .venv/bin/python benchmarks/bench_teacher_pool.py [--teachers 3 6] [--hidden 64 512] [--layers 2 8]

Builds N teachers of one architecture with the project's tiny builder (different seeds), then, for each
N and size, scores the same steps two ways on the real vLLM CPU engine:
- dedicated: N teacher groups of one replica each (today's layout: N engines);
- pooled: one pool replica serving all N (``teachers.pools``), weights swapped in place between calls
  from the workers' host cache (and, as a third row, with the cache off: from disk every swap).
A step is 32 rows (prompt 20 + response 32 tokens) routed to the N teachers at random, the calls issued
every teacher's call at once, in a fixed teacher order (so N swaps per step; the orchestrator puts a replica's previous teacher first, one swap fewer).
Reported: seconds per step (mean of steps 2..), swaps and swap seconds per step, and the teachers'
resident memory (sum of the RSS of their actor processes after the steps).

How it grows: dedicated memory = N engines x (weights + KV cache + runtime); pooled = one engine + the
host cache, which holds each worker's shard of every teacher it served (N x model / TP per worker;
``cache_gb`` bounds it, the rest is re-read from disk). Pooled step time = the dedicated scoring work done
one teacher after another on fewer engines + N swaps per replica (a host-to-device copy of the shard per
swap on GPUs; a memory copy here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb(pids: list) -> float:
    import psutil

    return sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20


def _batch(rows: int, seed: int):
    import numpy as np

    from mopd_ray.batch import RolloutBatch

    rng = np.random.default_rng(seed)
    plen, rlen = 20, 32
    tokens = rng.integers(3, 300, (rows, plen + rlen)).astype(np.int32)
    return RolloutBatch(tokens, np.full(rows, plen, np.int32), np.full(rows, rlen, np.int32),
                        np.zeros(tokens.shape, np.float32), np.arange(rows), np.zeros(rows, np.int32),
                        np.full(rows, np.nan, np.float32), np.ones(rows, bool), tuple("d" for _ in range(rows)))


def run(n_teachers: int, hidden: int, layers: int, steps: int, work: Path) -> list:
    import numpy as np
    import ray

    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model
    from mopd_ray.roles import make_pool_group, make_teacher_group
    from tests.helpers import compose_cfg

    names = [f"t{i}" for i in range(n_teachers)]
    spec = dict(hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64), num_kv_heads=1,
                intermediate_size=2 * hidden)
    for i, n in enumerate(names):
        if not (work / f"h{hidden}l{layers}" / n / "config.json").exists():
            build_tiny_model(work / f"h{hidden}l{layers}" / n, TinyModelConfig(**spec, seed=10 + i))
    base = [f"run.artifacts_dir={work}", "teachers=empty", "data.max_prompt_len=24", "rollout.max_new_tokens=40",
            *[f"teachers.models.{n}.model_path={work}/h{hidden}l{layers}/{n}" for n in names],
            *[f"teachers.models.{n}.num_cpus_per_shard=0.25" for n in names]]
    results = []
    for mode in ("dedicated", "pooled", "pooled, no cache"):
        cfg = compose_cfg(*base, "teachers.pools.shared.replicas=1", "teachers.pools.shared.num_cpus_per_shard=0.25",
                          f"teachers.pools.shared.cache_gb={0 if 'no cache' in mode else 16}")
        if mode == "dedicated":
            groups = {n: make_teacher_group(cfg, n) for n in names}
        else:
            pool = make_pool_group(cfg, "shared", names)
            groups = {n: pool for n in names}
        distinct = list({id(g): g for g in groups.values()}.values())
        try:
            for g in distinct:
                g.gather(g.call_all("ready"))
            times, swaps, swap_s = [], [], []
            for step in range(steps):
                batch = ray.put(_batch(32, step))
                route = np.random.default_rng(step).integers(0, n_teachers, 32)
                t0 = time.perf_counter()
                refs = []
                for t, n in enumerate(names):
                    rows = np.nonzero(route == t)[0].astype(np.int32)
                    refs.append(groups[n].actors[0].score_parts.options(num_returns=2).remote(n, [rows], 0, False, batch))
                metas = ray.get([m for _, m in refs])
                times.append(time.perf_counter() - t0)
                swaps.append(sum(m.get("swaps", 0) for m in metas))
                swap_s.append(sum(m.get("swap_s", 0.0) for m in metas))
            pids = [p for g in distinct for p in ray.get([a.__ray_call__.remote(lambda self: __import__("os").getpid())
                                                         for a in g.actors])]
            results.append({"teachers": n_teachers, "hidden": hidden, "layers": layers, "mode": mode,
                            "engines": len(distinct), "step_s": float(np.mean(times[1:])),
                            "swaps_per_step": float(np.mean(swaps[1:])), "swap_s_per_step": float(np.mean(swap_s[1:])),
                            "rss_mb": _rss_mb(pids)})
            print(json.dumps(results[-1]), flush=True)
        finally:
            for g in distinct:
                g.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", type=int, nargs="+", default=[3, 6])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    from mopd_ray.cluster import WORKER_ENV

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pool_"))
    rows = []
    for hidden, layers in zip(args.hidden, args.layers):
        for n in args.teachers:
            rows += run(n, hidden, layers, args.steps, work)
    print("\n| teachers | model | layout | engines | s / step | swaps / step | swap s / step | teachers' RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['teachers']} | h{r['hidden']} x {r['layers']} | {r['mode']} | {r['engines']} | {r['step_s']:.3f} | "
              f"{r['swaps_per_step']:.1f} | {r['swap_s_per_step']:.3f} | {r['rss_mb']:,.0f} MB |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
