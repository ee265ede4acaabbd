"""A served teacher against the same model as an in-job teacher: scoring tokens/s on the same batches.

    .venv/bin/python benchmarks/bench_served_teacher.py [--rounds 5] [--out FILE]

The tests' add expert (built here if absent) is served by vLLM's OpenAI server on a loopback port (the CPU build,
one thread, as the in-job engine) and loaded as an in-job vLLM teacher in this process. Both score the same
batches, alternating, ``--rounds`` times each: the demo's shapes (64 rows of ~22 prompt + 12 response tokens)
and longer rows (16 rows of 48 + 200). Top-k 5 (the demo's signal) and the sampled token's log-prob only.
Ends with one JSON line: tokens/s of each and ``served_vs_in_job`` per shape (target >= 0.8 at the demo's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _batch(rows: int, prompt: int, response: int, seed: int):
    from mopd_ray.batch import RolloutBatch

    rng = np.random.default_rng(seed)
    L = prompt + response
    tokens = rng.integers(3, 300, (rows, L)).astype(np.int32)
    return RolloutBatch(tokens, np.full(rows, prompt, np.int32), np.full(rows, response, np.int32),
                        np.zeros((rows, L), np.float32), np.arange(rows), np.zeros(rows, np.int32),
                        np.full(rows, np.nan, np.float32), np.ones(rows, bool), ("add",) * rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model
    from mopd_ray.workers.teacher import TeacherWorker
    from tests.runtime.test_served_teacher import _free_port, start_server, stop_server, wait_ready

    model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "teacher_add", TinyModelConfig(seed=1)))
    port = _free_port()
    proc = start_server(model_dir, port)
    try:
        wait_ready(proc, port)
        base = {"dtype": "float32", "max_model_len": 256, "max_logprobs": 20, "tensor_parallel_size": 1,
                "kv_cache_memory_bytes": 128 << 20, "hidden_dtype": "float32"}
        teachers = {"served": TeacherWorker("t", model_dir, {**base, "backend": "endpoint", "model": "tiny-teacher",
                                                             "endpoint": f"http://127.0.0.1:{port}/v1"}),
                    "in_job": TeacherWorker("t", model_dir, {**base, "backend": "vllm"})}
        shapes = {"demo": (64, 22, 12), "long": (16, 48, 200)}
        out = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "shapes": {}}
        for shape, (rows, p, r) in shapes.items():
            for topk in (5, 0):
                secs = {k: [] for k in teachers}
                for i in range(args.rounds + 1):  # the first round warms both up, not counted
                    batch = _batch(rows, p, r, i)
                    for name, t in teachers.items():
                        t0 = time.perf_counter()
                        t.score(batch, np.arange(rows, dtype=np.int32), topk=topk)
                        if i:
                            secs[name].append(time.perf_counter() - t0)
                tokens = rows * (p + r - 1)
                rate = {k: tokens / float(np.median(v)) for k, v in secs.items()}
                key = f"{shape}_top{topk}"
                out["shapes"][key] = {"tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
                                      "served_vs_in_job": round(rate["served"] / rate["in_job"], 3)}
                print(f"{key:>10}: served {rate['served']:9.1f} tok/s  in-job {rate['in_job']:9.1f} tok/s  "
                      f"ratio {rate['served'] / rate['in_job']:.3f}", flush=True)
    finally:
        stop_server(proc)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
