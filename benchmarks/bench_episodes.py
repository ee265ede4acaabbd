"""Multi-turn episodes of heavy-tailed lengths: episodes carried over between steps against every step waiting for
all of its episodes.

    .venv/bin/python benchmarks/bench_episodes.py [--steps 8] [--carry 0,0.5,1.0] [--out FILE]

Each setting is one MOPD run of the real engines in this process (the project's tiny student and teachers, local
mode): 8 prompts x 2 samples per step, every domain's rows played as episodes of ``HeavyTailEnv``: the number of
tool turns of an episode is drawn from a Pareto tail (1 + floor(Pareto(1.1)), at most 12: most episodes take one
tool turn, one in ten five or more), and each tool answer takes a latency drawn from a log-normal (median 40 ms,
heavy right tail), as tools such as code execution or search do. A random tiny student ends its turns at most ids
(they are all end-of-turn ids here), so turns are short and an episode's length is its environment's.

Printed per setting: student tokens trained per second of step time (steps after the first: the environment actors'
start-up is not counted), the mean step time, and the mean and longest episode (time inside generate calls).
Ends with one JSON line; ``speedup_vs_wait_all`` is tokens/s against carry_over=0 (target >= 1.5x), and the step
time is compared with the mean and the longest episode.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class HeavyTailEnv:
    """Tool turns and tool latencies from heavy tails, seeded by the row (the same episodes in every setting)."""

    def __init__(self, row: dict, alpha: float = 1.1, max_turns: int = 12, latency_s: float = 0.04):
        rng = random.Random(zlib.crc32(str(row.get("id")).encode()))
        self.left = min(max_turns, int(rng.paretovariate(alpha)))
        self.latency = [latency_s * math.exp(rng.gauss(0.0, 0.8)) for _ in range(max_turns + 1)]
        self.calls = 0

    def step(self, messages: list) -> dict:
        time.sleep(self.latency[self.calls])
        self.calls += 1
        if self.left <= 0:
            return {"done": True, "reward": 1.0}
        self.left -= 1
        return {"messages": [{"role": "tool", "content": f"result {self.left}"}]}


def run(carry: float, steps: int, root: Path) -> dict:
    from mopd_ray.metrics import read_metrics
    from mopd_ray.orchestrator import Orchestrator
    from tests.helpers import compose_cfg

    stops = ",".join(str(i) for i in range(2, 200))
    out = root / f"carry{carry}"
    cfg = compose_cfg(f"run.artifacts_dir={root}/art", f"run.output_dir={out}", f"run.checkpoint_dir={out}/ck",
                      f"run.total_steps={steps}", "run.save_every=0", "run.eval_every=0", "data.domains=[add,sort]",
                      "data.prompts_per_step=8", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=160",
                      f"rollout.stop_token_ids=[{stops}]", "data.env=benchmarks.bench_episodes:HeavyTailEnv",
                      "env.max_turns=13", f"env.carry_over={carry}", "env.max_episode_lag=4",
                      "logging.wandb_mode=disabled", "logging.progress_bar=false")
    from mopd_ray.models.prepare import prepare_models

    prepare_models(cfg)
    Orchestrator(cfg, str(out)).run()
    rows = read_metrics(out)[1:]  # the first step starts the environment actors
    step_s = sum(r["step_s"] for r in rows)
    return {"carry_over": carry, "steps_timed": len(rows), "student_tokens_per_s": sum(r["response_tokens"] for r in rows) / step_s,
            "step_s_mean": step_s / len(rows), "episode_s_mean": sum(r["rollout/episode_s_mean"] for r in rows) / len(rows),
            "episode_s_max_mean": sum(r["rollout/episode_s_max"] for r in rows) / len(rows),
            "env_turns_mean": sum(r["env/turns_mean"] for r in rows) / len(rows),
            "env_turns_max": max(r["env/turns_max"] for r in rows), "episode_lag_max": max(r["env/episode_lag_max"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--carry", default="0,0.5,1.0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tests.conftest import ensure_local_ray  # the suite's local Ray (one thread per engine)

    ensure_local_ray()
    root = Path(tempfile.mkdtemp(prefix="bench_episodes_"))
    results = []
    for carry in [float(c) for c in args.carry.split(",")]:
        r = run(carry, args.steps, root)
        results.append(r)
        print(f"carry_over={carry:<4} student tokens/s {r['student_tokens_per_s']:7.1f}  step {r['step_s_mean']:.2f} s  "
              f"episode mean {r['episode_s_mean']:.2f} s, longest {r['episode_s_max_mean']:.2f} s  "
              f"turns mean {r['env_turns_mean']:.2f} max {r['env_turns_max']}  lag max {r['episode_lag_max']}", flush=True)
    base = next((r for r in results if r["carry_over"] == 0), None)
    for r in results:
        if base is not None:
            r["speedup_vs_wait_all"] = r["student_tokens_per_s"] / base["student_tokens_per_s"]
        r["step_over_mean_episode"] = r["step_s_mean"] / r["episode_s_mean"]
        r["step_over_longest_episode"] = r["step_s_mean"] / r["episode_s_max_mean"]
    summary = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results}
    line = json.dumps(summary)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
