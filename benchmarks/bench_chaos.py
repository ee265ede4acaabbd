"""The chaos run: a few hundred steps with checkpoints every k steps, during which a teacher replica, a
rollout replica and a learner rank are SIGKILLed (their processes, as the kernel's OOM killer or a lost
node would) at seeded random steps. It must finish without a person, train every row exactly once after
the last restart point, and end with the same student as an uninterrupted run with the same seeds.

    .venv/bin/python benchmarks/bench_chaos.py [--steps 200] [--save-every 20] [--seed 0] [--out DIR]

Runs the calm run and the chaos run (each in its own process, one after the other) with the same config
(``experiment=local_smoke``: two domains with vLLM teachers, learner world 2, ZeRO-2), then prints kills,
restarts, steps redone, wall-clock cost and the largest difference between the two final students.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overrides(run_dir: Path, steps: int, save_every: int) -> list:
    return ["experiment=local_smoke", "data.domains=[add,reverse]", f"run.total_steps={steps}",
            f"run.save_every={save_every}", "run.keep_checkpoints=2", f"run.checkpoint_dir={run_dir}/ck",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", "cluster.include_dashboard=false",
            "cluster.learner_restarts=2", "cluster.call_timeout_s=300"]


def kill_plan(steps: int, save_every: int, seed: int) -> list:
    """[(step, role)]: one kill per role at seeded random steps, spread over the run, never two in one
    checkpoint interval (so each restart point differs)."""
    rng = np.random.default_rng(seed)
    roles = list(rng.permutation(["teacher", "rollout", "learner"]))
    intervals = rng.choice(np.arange(1, steps // save_every - 1), size=3, replace=False)
    return sorted((int(i * save_every + rng.integers(1, save_every)), str(r)) for i, r in zip(intervals, roles))


def one_run(mode: str, run_dir: Path, steps: int, save_every: int, seed: int) -> dict:
    import ray

    from mopd_ray.config import compose_config, finalize
    from mopd_ray.metrics import read_metrics
    from mopd_ray.models.prepare import prepare_models
    from mopd_ray.orchestrator import Orchestrator

    cfg = compose_config([f"run.artifacts_dir={ROOT / 'artifacts'}", *overrides(run_dir, steps, save_every)])
    cfg = finalize(cfg) or cfg
    prepare_models(cfg)  # the tiny student and teachers, built once from their seeds
    orch = Orchestrator(cfg, str(run_dir))
    plan = kill_plan(steps, save_every, seed) if mode == "chaos" else []
    kills = []

    def target(role: str):
        r = orch.roles
        if role == "teacher":
            return next(iter(r.teachers.values())).actors[0]
        return r.rollout.actors[0] if role == "rollout" else r.learners.actors[1]

    def killer():
        for at, role in plan:
            while getattr(orch, "roles", None) is None or orch.state.step < at:
                time.sleep(0.02)
            try:
                pid = ray.get(target(role).pid.remote(), timeout=60)
                os.kill(pid, signal.SIGKILL)
                kills.append({"role": role, "at_step": at, "pid": pid, "time": time.time()})
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                kills.append({"role": role, "at_step": at, "error": repr(e)})

    threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    last = orch.run()
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    return {"mode": mode, "wall_s": wall, "steps_logged": len(rows), "kills": kills, "plan": plan,
            "rows_trained": last["rows_trained"], "rows_expected": steps * cfg.data.prompts_per_step
            * cfg.rollout.n_samples_per_prompt, "learner_restarts": last["faults/learner_restarts"],
            "steps_redone": last["faults/steps_redone"], "rollout_retries": last["faults/rollout_retries"],
            "teacher_restarts": last["faults/teacher_restarts"], "final_loss": last["loss"],
            "student": str(run_dir / "student_final")}


def compare(a: str, b: str) -> dict:
    from safetensors.numpy import load_file

    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    diffs = {k: float(np.abs(wa[k].astype(np.float64) - wb[k]).max()) for k in wa}
    return {"tensors": len(diffs), "identical": sum(d == 0 for d in diffs.values()),
            "max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_chaos"))
    ap.add_argument("--one", choices=["calm", "chaos"], help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    out = Path(args.out)
    if args.one:
        res = one_run(args.one, out / args.one, args.steps, args.save_every, args.seed)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in ("calm", "chaos"):
        cmd = [sys.executable, __file__, "--one", mode, "--steps", str(args.steps), "--save-every",
               str(args.save_every), "--seed", str(args.seed), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        (out / f"{mode}.log").write_text(proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"the {mode} run failed (exit {proc.returncode}); see {out / f'{mode}.log'}")
        results[mode] = json.loads(lines[-1][len("RESULT "):])
        r = results[mode]
        print(f"{mode}: {r['wall_s']:.0f} s, rows trained {r['rows_trained']} of {r['rows_expected']}, kills "
              f"{[(k['role'], k['at_step']) for k in r['kills']]}, learner restarts {r['learner_restarts']}, "
              f"steps redone {r['steps_redone']}, rollout retries {r['rollout_retries']}, teacher restarts "
              f"{r['teacher_restarts']}", flush=True)
    calm, chaos = results["calm"], results["chaos"]
    results["final_students"] = compare(calm["student"], chaos["student"])
    results["wall_cost"] = chaos["wall_s"] / calm["wall_s"]
    fs = results["final_students"]
    print(f"final students: {fs['identical']} of {fs['tensors']} tensors bit-identical, max |diff| "
          f"{fs['max_abs_diff']:.3g} ({fs['worst']}); chaos wall-clock {results['wall_cost']:.2f}x calm; every row "
          f"once: {chaos['rows_trained'] == chaos['rows_expected']}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
