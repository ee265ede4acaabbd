"""Weight sync on a ~100M-parameter student: seconds per sync and the rollout process's extra memory.

    .venv/bin/python benchmarks/bench_weight_sync.py [--hidden 768 --layers 12] [--bucket-mb 64 256]

Builds a student with the project's tiny builder (same architecture, larger sizes: hidden 768 x 12
layers, about 104M parameters, 0.4 GB in fp32), starts one real vLLM rollout engine and one DeepSpeed
learner rank, and syncs the learner's weights into the engine several times per transport and bucket
size. For each sync it samples the rollout process's anonymous resident memory (RssAnon, every 2 ms:
its own heap, not the object store's shared pages that a zero-copy read maps) and reports the peak
against the resting size before the sync, and the resting size after. The script only uses the public role API, so the same file measures an older checkout
(``--repo DIR``: the before/after comparison of the issue).

How it grows: the rollout side holds at most the bucket being received plus the layers whose tensors
have not all arrived (about two buckets); bytes on the wire per engine worker = the model size per
sync (a broadcast: NCCL pipelines it, the sender's cost does not grow with the number of engines).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeak:
    """Samples a process's anonymous resident memory (RssAnon: its own heap, not the object store's
    shared pages it maps) every ``period_s`` while the ``with`` block runs; ``peak_kb`` is the maximum."""

    def __init__(self, pid: int, period_s: float = 0.002):
        import threading

        self.pid, self.period_s, self.peak_kb, self._stop = pid, period_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _rss_kb(self.pid, "RssAnon"))
            time.sleep(self.period_s)

    def __enter__(self):
        self.peak_kb = _rss_kb(self.pid, "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_kb(self.pid, "RssAnon"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--transports", nargs="+", default=["broadcast", "object_store"])
    ap.add_argument("--syncs", type=int, default=4)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout to measure")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, args.repo)
    os.chdir(args.repo)
    import ray

    from mopd_ray.cluster import WORKER_ENV
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import ensure_tiny_model
    from mopd_ray.roles import init_broadcast_group, make_learner_group, make_rollout_group, setup_learners, sync_weights

    sys.path.insert(0, str(Path(args.repo) / "tests"))
    from helpers import compose_cfg

    root = Path(tempfile.gettempdir()) / "mopd_bench_sync"
    spec = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                           num_kv_heads=max(1, args.hidden // 64 // 3), intermediate_size=4 * args.hidden, seed=0)
    student, _ = ensure_tiny_model(root / f"student_h{args.hidden}_l{args.layers}", spec)
    env = {**WORKER_ENV, "PYTHONPATH": args.repo}  # the actors import the checkout being measured
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env},
             log_to_driver=False)
    results = []
    try:
        for transport in args.transports:
            for bucket in args.bucket_mb:
                cfg = compose_cfg(f"model.path={student}", "model.tiny=null", "learner.world_size=1",
                                  "learner.micro_batch_size=4", f"rollout.weight_sync={transport}",
                                  f"rollout.weight_sync_bucket_mb={bucket}", "rollout.kv_cache_memory_bytes=67108864",
                                  "data.prompts_per_step=4", "rollout.n_samples_per_prompt=1")
                rollout = make_rollout_group(cfg)
                learners = make_learner_group(cfg, sorted(cfg.teachers.models))
                try:
                    rollout.gather(rollout.call_all("ready"))
                    params = setup_learners(cfg, learners)[0]["params"]
                    if transport == "broadcast":
                        init_broadcast_group(cfg, learners, rollout)
                    pid, where = ray.get(rollout.actors[0].__ray_call__.remote(
                        lambda self: (os.getpid(), sys.modules[type(self).__module__].__file__)))
                    print(f"rollout actor runs {where}", flush=True)
                    for i in range(args.syncs):
                        rest = _rss_kb(pid, "RssAnon")
                        with AnonPeak(pid) as sampled:
                            t0 = time.perf_counter()
                            sync_weights(cfg, learners, rollout, version=i + 1)
                            seconds = time.perf_counter() - t0
                        peak, after = sampled.peak_kb, _rss_kb(pid, "RssAnon")
                        row = {"transport": transport, "bucket_mb": bucket, "sync": i, "params": params,
                               "model_mb": params * 4 / 2**20, "seconds": seconds, "rest_before_mb": rest / 1024,
                               "peak_extra_mb": (peak - rest) / 1024, "rest_after_mb": after / 1024}
                        results.append(row)
                        print(f"{transport:12s} bucket {bucket:4d} MB  sync {i}: {seconds:6.2f} s   rollout process "
                              f"{rest / 1024:7.0f} MB at rest, peak +{(peak - rest) / 1024:6.0f} MB, "
                              f"after {after / 1024:7.0f} MB", flush=True)
                finally:
                    learners.shutdown()
                    rollout.shutdown()
    finally:
        ray.shutdown()
    print(f"\nmodel: {results[0]['params'] / 1e6:.1f}M parameters, {results[0]['model_mb']:.0f} MB in fp32")
    print("| transport | bucket | sync s (median) | peak extra MB (max over syncs) | resting growth MB (first to last) |")
    print("|---|---|---|---|---|")
    for transport in args.transports:
        for bucket in args.bucket_mb:
            rows = [r for r in results if r["transport"] == transport and r["bucket_mb"] == bucket]
            secs = sorted(r["seconds"] for r in rows)
            print(f"| {transport} | {bucket} MB | {secs[len(secs) // 2]:.2f} | {max(r['peak_extra_mb'] for r in rows):.0f} | "
                  f"{rows[-1]['rest_after_mb'] - rows[0]['rest_before_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
