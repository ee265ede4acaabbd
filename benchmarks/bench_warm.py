"""Warm engines between runs of one driver (``cluster.reuse_engines``, mopd_ray/warm.py): the wall time of
N short runs in one process, as the demonstration's comparison runs, the cascade's stages or a sweep's
jobs run them, with reuse on and off.

    .venv/bin/python benchmarks/bench_warm.py [--runs 3] [--steps 4] [--vary] [--out FILE]

Each mode runs in its own process (its own local Ray), one after the other; every run has the same roles
(``experiment=local_smoke``: a vLLM rollout engine, three vLLM teachers, two learner ranks) and its own
seed, so a warm rollout engine is reset to the student's weights and the learners are rebuilt. Prints
the seconds of each run, and the ratio of the later runs' mean (warm) to the first run's (cold).
``--vary``: every run with other engine settings (the rollout's response length, the teachers' context),
as a sweep's points or the cascade's stages differ: warm rollout and teacher processes are rebuilt in
place (RoleWorker.rebuild) instead of reset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one_mode(reuse: bool, runs: int, steps: int, root: str, vary: bool = False) -> list:
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from mopd_ray.config import finalize, register_configs
    from mopd_ray.orchestrator import Orchestrator

    register_configs()
    seconds = []
    for i in range(runs):
        over = ["experiment=local_smoke", f"run.total_steps={steps}", f"run.seed={i}", f"run.artifacts_dir={root}/art",
                f"run.checkpoint_dir={root}/ck", "logging.wandb_mode=disabled", "logging.progress_bar=false",
                "cluster.include_dashboard=false", f"cluster.reuse_engines={str(reuse).lower()}"]
        if vary:
            over += [f"rollout.max_new_tokens={8 + 4 * i}",
                     *[f"teachers.models.{t}.max_model_len={256 - 32 * i}" for t in ("add_expert", "reverse_expert", "self")]]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = finalize(compose(config_name="config", overrides=over))
        if i == 0:
            from mopd_ray.models.prepare import prepare_models

            prepare_models(cfg)
        t0 = time.perf_counter()
        Orchestrator(cfg, f"{root}/run{i}_{'warm' if reuse else 'cold'}").run()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--vary", action="store_true", help="other engine settings in every run (rebuilt in place)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--mode", choices=["on", "off"], help=argparse.SUPPRESS)  # one mode, in a child process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_one_mode(args.mode == "on", args.runs, args.steps, args.root, args.vary)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for mode in ("off", "on"):
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--runs", str(args.runs), "--steps",
                                   str(args.steps), "--root", f"{root}/{mode}", *(["--vary"] if args.vary else [])],
                                  capture_output=True, text=True,
                                  cwd=ROOT, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, secs in results.items():
        print(f"reuse_engines={mode:<3}  " + "  ".join(f"run {i}: {s:6.1f} s" for i, s in enumerate(secs)))
    off, on = results["off"], results["on"]
    later = lambda s: sum(s[1:]) / max(len(s) - 1, 1)  # noqa: E731
    print(f"later runs, mean: {later(off):.1f} s cold, {later(on):.1f} s warm ({later(on) / later(off):.2f}x); "
          f"{args.runs} runs in all: {sum(off):.1f} s cold, {sum(on):.1f} s warm ({sum(on) / sum(off):.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": args.runs, "steps": args.steps, "vary": args.vary, "seconds": results,
                                              "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


if __name__ == "__main__":
    main()
