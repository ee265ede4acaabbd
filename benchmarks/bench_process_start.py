"""The start of an engine process and a learner process with and without ``heavy_imports`` (mopd_ray/utils/heavy.py):
CPU seconds of a fresh interpreter that builds what a role's actor builds first.

    .venv/bin/python benchmarks/bench_process_start.py [--pairs 3] [--model DIR]

- engine: the rollout role's first steps, ``make_llm`` of the tiny student (vLLM's CPU build, in-process);
- learner: torch, transformers and DeepSpeed imported as ``LearnerWorker`` imports them, and the model loaded.

Arm ``heavy`` is the project's code path. Arm ``plain`` first imports the same libraries without the block (so the
block later imports nothing new and does nothing), then runs the same code. The arms alternate (heavy, plain, heavy,
...) and the ratio is taken pair by pair; it prints the medians. Start-up only: the whole-run effect is measured with
farm-bench on ``experiment=local_smoke`` (benchmarks/results/2026-12-07_heavy_imports/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
role, arm, model = sys.argv[2], sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
if arm == "plain":
    import torch, transformers  # noqa
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa
    if role == "engine":
        from vllm import LLM  # noqa
    else:
        import deepspeed  # noqa
if role == "engine":
    from mopd_ray.utils.heavy import heavy_imports
    with heavy_imports():
        import torch  # noqa
        from transformers import AutoTokenizer  # noqa
    from mopd_ray.workers.vllm_engine import make_llm
    make_llm(model)
else:
    import mopd_ray.workers.learner  # noqa: its module-level block
    from mopd_ray.utils.heavy import heavy_imports
    with heavy_imports():
        import deepspeed  # noqa
        from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(model)
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": u.ru_utime + u.ru_stime, "wall_s": time.perf_counter() - t0}))
"""


def _one(role: str, arm: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), role, arm, model], capture_output=True, text=True,
                         check=True, env={"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false",
                                          "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--model", default=None, help="a model folder (default: the tiny student, built here)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from mopd_ray.config import TinyModelConfig
        from mopd_ray.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "student", TinyModelConfig(seed=0)))
    for role in ("engine", "learner"):
        pairs = [(_one(role, "heavy", model), _one(role, "plain", model)) for _ in range(args.pairs)]
        med = {k: (statistics.median(h[k] for h, _ in pairs), statistics.median(p[k] for _, p in pairs))
               for k in ("cpu_s", "wall_s")}
        ratio = statistics.median(h["cpu_s"] / p["cpu_s"] for h, p in pairs)
        print(f"{role:8s} cpu s: heavy {med['cpu_s'][0]:.2f}, plain {med['cpu_s'][1]:.2f} (heavy/plain {ratio:.3f}); "
              f"wall s: heavy {med['wall_s'][0]:.2f}, plain {med['wall_s'][1]:.2f}  [{args.pairs} pairs]")


if __name__ == "__main__":
    main()
