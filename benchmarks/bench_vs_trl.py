"""Side by side with TRL's DistillationTrainer at the same shapes, in one run: tokens/s and the ratio,
the stage breakdown and the orchestration overhead.

    .venv/bin/python -m pip install -e ".[bench]"        # TRL 1.16 beside the project
    .venv/bin/python benchmarks/bench_vs_trl.py [--rounds 2] [--out benchmarks/results/<dir>]

Shapes (both sides): student Qwen2 hidden 128 x 2 layers, one teacher hidden 256 x 4 layers, the
project's tokenizer, 16 prompts x 1 sample x up to 32 new tokens, fp32, reverse KL, learner world 1,
steps 3..20 timed (the first ones warm up). Our side is ``python -m mopd_ray.main
experiment=bench_trl_shapes`` (vLLM rollout, a vLLM teacher, a DeepSpeed learner, Ray between them);
TRL's is benchmarks/trl_side.py (HF generate, the teacher's forward and the update in one process).
Rounds alternate the tools so that drift of the shared machine hits both alike.

Figures per configuration of ours: generated-and-trained tokens/s, the medians of each stage
(rollout generate, teacher scoring, learner wait for its rows, learner compute, weight sync) and the
orchestration overhead = step time - critical path, where the critical path of an on-policy step is
generate + learner wait (the scoring still running when the learner asks) + learner compute + sync.
With max_staleness >= 1 no overhead is printed: the next generate runs during the step, and the sync's
measured span includes waiting for that generate to finish (the engine loads weights between
requests), so the stage times overlap and no critical path can be formed from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {  # label -> overrides of experiment=bench_trl_shapes
    "on-policy": [],
    "on-policy, 2 shards": ["rollout.shards_per_replica=2"],
    "max_staleness=1": ["algorithm.max_staleness=1"],
    # TRL's math: no importance correction of the rollout engine against the trainer, so vLLM is not asked
    # for the sampled tokens' log-probs (TRL does not ask either)
    "on-policy, no IS correction": ["algorithm.is_correction=none"],
    "max_staleness=1, no IS correction": ["algorithm.max_staleness=1", "algorithm.is_correction=none"],
    "max_staleness=1, 2 shards": ["algorithm.max_staleness=1", "rollout.shards_per_replica=2"],
    # the teacher as a plain HF forward in its actor (as TRL's teacher); measured 2026-12-02: no faster at
    # these sizes (the scoring is the forward's arithmetic, not vLLM's per-request machinery)
    "on-policy, hf teacher": ["teachers.models.expert.backend=hf"],
    "max_staleness=1, hf teacher": ["algorithm.max_staleness=1", "teachers.models.expert.backend=hf"],
    # two teacher replicas: each step's one shard split between them (both cores score at once)
    "on-policy, 2 teacher replicas": ["teachers.models.expert.replicas=2"],
    "max_staleness=1, 2 teacher replicas": ["algorithm.max_staleness=1", "teachers.models.expert.replicas=2"],
    # every role on both cores as data parallelism (TRL puts 2 threads on each stage): 2 rollout engines
    # generating half the prompts each, 2 teacher replicas, 2 learner ranks
    "on-policy, 2 of each role": ["rollout.replicas=2", "teachers.models.expert.replicas=2", "learner.world_size=2"],
    "max_staleness=1, 2 of each role": ["algorithm.max_staleness=1", "rollout.replicas=2",
                                        "teachers.models.expert.replicas=2", "learner.world_size=2"],
}


def run_ours(label: str, overrides: list, out: Path, warmup: int) -> dict:
    run_dir = out / f"ours_{label.replace(' ', '').replace(',', '_').replace('=', '')}_{int(time.time())}"
    cmd = [sys.executable, "-m", "mopd_ray.main", "experiment=bench_trl_shapes", f"hydra.run.dir={run_dir}",
           "cluster.include_dashboard=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {**summarize(run_dir, warmup), "label": label, "command": " ".join(cmd[1:])}


def summarize(run_dir: Path, warmup: int) -> dict:
    """tokens/s, stage medians and overhead of one of our runs, from its metrics.jsonl.

    Critical path of an on-policy step: generate + learner wait + learner compute + sync (one after
    another). Overhead = step time - critical path (driver work, Ray scheduling, metrics); None with
    max_staleness >= 1 (the stages overlap, see the module's docstring)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    med = (lambda key: statistics.median(r[key] for r in rows))
    score = statistics.median(max(v for k, v in r.items() if k.endswith("/score_latency_s")) for r in rows)
    stages = {"generate_s": med("rollout/generate_s"), "teacher_score_s": score, "learner_wait_s": med("learner/fetch_s"),
              "learner_compute_s": med("learner/compute_s"), "weight_sync_s": med("weight_sync_s")}

    def critical(r) -> float:
        return r["rollout/generate_s"] + r["learner/fetch_s"] + r["learner/compute_s"] + r["weight_sync_s"]

    on_policy = all(r["rollout/staleness"] == 0 for r in rows)
    overhead = [r["step_s"] - critical(r) for r in rows] if on_policy else None
    tokens, seconds = sum(r["response_tokens"] for r in rows), sum(r["step_s"] for r in rows)
    return {"tool": "mopd_ray", "tokens_per_s": tokens / seconds, "step_s_median": med("step_s"),
            "stages": stages, "overhead_s_median": statistics.median(overhead) if overhead else None,
            "overhead_fraction": statistics.median(o / r["step_s"] for o, r in zip(overhead, rows)) if overhead else None,
            "mean_response_len": med("rollout/mean_response_len"), "staleness": rows[-1]["rollout/staleness"]}


def _overhead(rows: list) -> str:
    fractions = [r["overhead_fraction"] for r in rows if r["overhead_fraction"] is not None]
    return f"{statistics.median(fractions):.0%}" if fractions else "-"


def run_trl(steps: int, warmup: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_side.py"), "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (pip install -e '.[bench]' first?):\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(OURS), help="which of ours: " + ", ".join(OURS))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_vs_trl"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rnd in range(args.rounds):
        trl = run_trl(args.steps, args.warmup)
        trl["round"] = rnd
        results.append(trl)
        print(f"round {rnd}: TRL {trl['tokens_per_s']:7.0f} tokens/s", flush=True)
        for label in args.configs:
            ours = run_ours(label, OURS[label], out, args.warmup)
            ours["round"], ours["ratio_to_trl"] = rnd, ours["tokens_per_s"] / trl["tokens_per_s"]
            results.append(ours)
            st = ours["stages"]
            print(f"round {rnd}: ours {label:26s} {ours['tokens_per_s']:7.0f} tokens/s = {ours['ratio_to_trl']:.2f}x TRL; "
                  f"step {ours['step_s_median'] * 1e3:.0f} ms: generate {st['generate_s'] * 1e3:.0f}, score "
                  f"{st['teacher_score_s'] * 1e3:.0f}, learner wait {st['learner_wait_s'] * 1e3:.0f} + compute "
                  f"{st['learner_compute_s'] * 1e3:.0f}, sync {st['weight_sync_s'] * 1e3:.0f}, overhead "
                  + (f"{ours['overhead_s_median'] * 1e3:.0f} ms ({ours['overhead_fraction']:.0%})"
                     if ours["overhead_s_median"] is not None else "- (stages overlap)"), flush=True)
    print("\n| ours | tokens/s | x TRL (per round) | step ms | generate | score | learner wait | learner compute | "
          "sync | overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    trl_rows = [r for r in results if r["tool"] == "trl"]
    print(f"| TRL DistillationTrainer | {statistics.median(r['tokens_per_s'] for r in trl_rows):.0f} | 1.00 | "
          f"{statistics.median(r['step_s_median'] for r in trl_rows) * 1e3:.0f} | - | - | - | - | - | - |")
    for label in args.configs:
        rows = [r for r in results if r.get("label") == label]
        ms = (lambda k: statistics.median(r["stages"][k] for r in rows) * 1e3)
        ratios = " / ".join(f"{r['ratio_to_trl']:.2f}" for r in rows)
        print(f"| {label} | {statistics.median(r['tokens_per_s'] for r in rows):.0f} | {ratios} | "
              f"{statistics.median(r['step_s_median'] for r in rows) * 1e3:.0f} | {ms('generate_s'):.0f} | "
              f"{ms('teacher_score_s'):.0f} | {ms('learner_wait_s'):.0f} | {ms('learner_compute_s'):.0f} | "
              f"{ms('weight_sync_s'):.0f} | {_overhead(rows)} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nall figures: {out / 'results.json'}")


if __name__ == "__main__":
    main()
