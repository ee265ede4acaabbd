"""The GPU smoke check: ``python -m mopd_ray.smoke`` (``launch/gpu_smoke.sh``), for the first machine with GPUs.

No network: it builds its tiny models itself (mopd_ray/models/tiny.py). For every family of the
architecture matrix it runs a short MOPD job on the same code path as a user's run (mopd_ray.main's
``run``), in one driver process so that engines and learner ranks are rebuilt in place between families:

- the student and a teacher of that family; the teacher with the full-vocabulary signal (its head rebuilt
  on the learner, compared with its engine by the pre-flight), the frozen student with the sampled one;
- weight sync after every step with the post-sync check (the engine must serve the learner's weights);
- on GPUs every role takes a fraction of one GPU (``num_gpus_per_shard``, small ``gpu_memory_utilization``).
  NCCL cannot put two members of a group on one GPU, so with one GPU the weights travel through the
  object store; with two or more the learner holds a GPU of its own and the weights are broadcast over
  NCCL, and a last check runs a 2-rank learner (its ranks on two GPUs).

``--device cpu`` is its CPU twin (gloo, vLLM's CPU build), run by the test suite on a few families.
One line per check, ``PASS`` or ``FAIL`` with the reason; exit 1 if any failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from .config import TINY_ARCHS, compose_config

log = logging.getLogger("mopd_ray.smoke")

TIED = ("qwen3", "gemma2", "gemma3")  # as their small real checkpoints are (Qwen3-0.6B..4B, Gemma)
GPU_SHARE = 0.2  # of one GPU per engine / learner rank when roles share it
GPU_MEMORY = 0.15  # gpu_memory_utilization of each engine sharing a GPU
KV_BYTES = 256 << 20  # each engine's KV cache on a shared GPU


def placement_overrides(gpus: int, learners: int) -> tuple[list, str]:
    """(overrides, weight-sync transport) placing every role for ``gpus`` GPUs (0: CPU) and ``learners`` ranks."""
    if gpus == 0:
        return [f"learner.world_size={learners}", "rollout.weight_sync=broadcast"], "broadcast (gloo)"
    # a fixed KV cache: engines that share a GPU and start at once would otherwise profile each other's memory
    engines = [f"rollout.num_gpus_per_shard={GPU_SHARE}", f"rollout.gpu_memory_utilization={GPU_MEMORY}",
               f"rollout.kv_cache_memory_bytes={KV_BYTES}"]
    for t in ("expert", "self"):
        engines += [f"teachers.models.{t}.num_gpus_per_shard={GPU_SHARE}",
                    f"teachers.models.{t}.gpu_memory_utilization={GPU_MEMORY}",
                    f"teachers.models.{t}.kv_cache_memory_bytes={KV_BYTES}"]
    common = [f"cluster.num_gpus={gpus}", f"learner.world_size={learners}", *engines]
    if learners > 1:  # more than half a GPU each: Ray cannot pack two ranks onto one device
        return [*common, "learner.num_gpus_per_rank=0.6", "rollout.weight_sync=object_store"], "object store"
    if gpus >= 2:  # the learner alone on a GPU: the engines are elsewhere, NCCL can broadcast to them
        return [*common, "learner.num_gpus_per_rank=1", "rollout.weight_sync=broadcast"], "broadcast (NCCL)"
    return [*common, f"learner.num_gpus_per_rank={GPU_SHARE}", "rollout.weight_sync=object_store"], "object store"


def family_overrides(family: str, out: Path, steps: int, launch: str = "run") -> list:
    """One family's job. Its models are built once under ``out`` and reused; its run directory and
    checkpoints are the ``launch``'s own (a second smoke check into the same folder is a new run)."""
    tied = str(family in TIED).lower()
    models = out / "models" / family
    return ["experiment=local_smoke", "teachers=smoke", f"run.name=smoke_{family}", f"run.total_steps={steps}",
            "run.eval_every=0", f"run.output_dir={out / 'runs' / launch / family}",
            f"run.checkpoint_dir={out / 'ck' / launch / family}",
            f"run.artifacts_dir={out / 'artifacts'}", f"model.path={models / 'student'}", f"model.tiny.arch={family}",
            f"model.tiny.tie_word_embeddings={tied}", f"teachers.models.expert.model_path={models / 'teacher'}",
            f"teachers.models.expert.tiny.arch={family}", f"teachers.models.expert.tiny.tie_word_embeddings={tied}",
            "cluster.include_dashboard=false", "logging.wandb_mode=disabled", "rollout.check_weight_sync=true"]


def checks(families: list, gpus: int, out: Path, steps: int, launch: str = "run") -> list:
    """[(name, overrides, what it runs)]."""
    learners = 2 if gpus == 0 else 1  # CPU: the 2-rank gloo learner in every run; GPUs: its own check
    place, transport = placement_overrides(gpus, learners)
    out_checks = [(f, [*family_overrides(f, out, steps, launch), *place],
                   f"student + full-vocab teacher, {learners} learner rank(s), sync by {transport}")
                  for f in families]
    if gpus >= 2:
        place, transport = placement_overrides(gpus, 2)
        f = families[0]
        out_checks.append((f"{f} 2-rank", [*family_overrides(f, out, steps, f"{launch}_two_ranks"), *place],
                           f"2 learner ranks on 2 GPUs (NCCL), sync by {transport}"))
    return out_checks


@contextlib.contextmanager
def _output_into(path: Path):
    """Everything the run prints (its plan, progress, summary, logs, Ray's worker lines) into ``path``: the
    console keeps one line per check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        before = [h.setStream(f) for h in handlers]
        try:
            yield
        finally:
            for h, stream in zip(handlers, before):
                h.setStream(stream)


def run_check(name: str, overrides: list, steps: int) -> tuple[bool, str]:
    """Run one job in this process; (passed, detail)."""
    from .main import run
    from .metrics import read_metrics

    cfg = compose_config(overrides)
    rc = run(cfg)
    if rc != 0:
        return False, f"the run exited {rc} (its error is logged above)"
    rows = read_metrics(Path(cfg.run.output_dir))
    if [r["step"] for r in rows] != list(range(steps)):
        return False, f"steps logged {[r['step'] for r in rows]}, expected 0..{steps - 1}"
    gaps = [r["weight_sync/probe_gap"] for r in rows if "weight_sync/probe_gap" in r]
    if len(gaps) < steps:
        return False, f"the post-sync check ran after {len(gaps)} of {steps} syncs"
    return True, f"post-sync gap max {max(gaps):.1e} nats/token, loss {rows[0]['loss']:.3g} -> {rows[-1]['loss']:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mopd_ray.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPUs this machine has, else CPU")
    p.add_argument("--families", default=",".join(TINY_ARCHS), help=f"comma-separated, of {', '.join(TINY_ARCHS)}")
    p.add_argument("--out", default="outputs/gpu_smoke", help="models, runs and checkpoints go here")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in TINY_ARCHS]
    if unknown or not families or args.steps < 1:
        print(f"smoke: unknown families {unknown} (known: {', '.join(TINY_ARCHS)}) or --steps < 1", file=sys.stderr)
        return 2
    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "gpu" and gpus == 0:
        print("smoke: --device gpu, but torch sees no CUDA device (a CPU-only torch, or CUDA_VISIBLE_DEVICES)",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    where = f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}" if gpus else "CPU (the CPU twin: gloo, vLLM's CPU build)"
    print(f"smoke: {len(families)} famil{'y' if len(families) == 1 else 'ies'} on {where}; output in {out}")
    t_all, failed = time.perf_counter(), 0
    launch = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # this launch's own runs and logs
    for name, overrides, what in checks(families, gpus, out, args.steps, launch):
        t0 = time.perf_counter()
        log_file = out / "logs" / launch / f"{name.replace(' ', '_')}.log"
        try:
            with _output_into(log_file):
                ok, detail = run_check(name, overrides, args.steps)
        except Exception as e:  # one family's failure must not hide the others'
            with open(log_file, "a") as f:
                import traceback

                traceback.print_exc(file=f)
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name:<14} {what}: {detail} ({time.perf_counter() - t0:.0f} s)"
              + ("" if ok else f"; log: {log_file}"), flush=True)
    print(f"smoke: {'all passed' if not failed else f'{failed} failed'} in {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    from .console import configure

    configure(False)
    rc = main()
    from .console import skip_exit_collection

    skip_exit_collection()
    sys.exit(rc)
