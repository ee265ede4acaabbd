"""Bytes each learner rank fetches per step, per signal, at learner world 1, 2 and 4 (real runs).

    .venv/bin/python benchmarks/bench_dispatch.py [--steps 2] [--worlds 1 2 4]

Each point is ``python -m mopd_ray.main`` in local mode (vLLM rollout and teachers, DeepSpeed ranks
on gloo) at 16 prompts x 2 samples x 32 new tokens; the learner reports ``learner/fetched_bytes``
(its own rows: rollout part + teacher scores) and the sum over ranks. Before per-rank dispatch every
rank pulled the whole step, i.e. world x the step's payload in total.

How it grows: per rank = step payload / world, where the payload is rows x (prompt + response)
x 8 B of rollout data plus response tokens x (4 B sampled | 8K B top-K | 2H B hidden states in bf16).
On paper, 512 sequences x 8k response tokens with hidden 4096: 32 GB per step, 4 GB per rank at world 8
(it was 32 GB on every rank).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"sampled": ["algorithm=sampled"], "topk": ["algorithm=topk"], "full_vocab": ["algorithm=full_vocab"]}


def run(signal: str, world: int, steps: int, out: Path) -> dict:
    run_dir = out / f"{signal}_w{world}"
    cmd = [sys.executable, "-m", "mopd_ray.main", *SIGNALS[signal], f"learner.world_size={world}",
           "data.prompts_per_step=16", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=32",
           "learner.micro_batch_size=8", f"run.total_steps={steps}", "run.eval_every=0", f"hydra.run.dir={run_dir}",
           "logging.wandb_mode=disabled", "logging.progress_bar=false", "cluster.include_dashboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"signal": signal, "world": world, "rank0_bytes": last["learner/fetched_bytes"],
            "all_ranks_bytes": last["learner/fetched_bytes_all_ranks"], "response_tokens": last["response_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--signals", nargs="+", default=list(SIGNALS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="mopd_bench_dispatch_"))
    results = []
    for signal in args.signals:
        for world in args.worlds:
            r = run(signal, world, args.steps, out)
            results.append(r)
            print(f"{signal:10s} world {world}: rank 0 fetched {r['rank0_bytes'] / 1024:8.1f} KB of "
                  f"{r['all_ranks_bytes'] / 1024:8.1f} KB in all ({r['rank0_bytes'] / r['all_ranks_bytes']:.2f})",
                  flush=True)
    print("\n| signal | world | rank 0 fetches | all ranks | rank 0 share | before (every rank: the whole step) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['signal']} | {r['world']} | {r['rank0_bytes'] / 1024:.1f} KB | {r['all_ranks_bytes'] / 1024:.1f} KB | "
              f"{r['rank0_bytes'] / r['all_ranks_bytes']:.2f} | {r['all_ranks_bytes'] / 1024:.1f} KB per rank |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
