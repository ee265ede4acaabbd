"""Does the sampled-token signal work when the student starts close to its teachers?

The cascade (python -m mopd_ray.cascade) leaves a student that forgot every earlier domain; its stage
checkpoints are then as far from it on their domains as the specialists were from the base student
(6-7 nats per token), and the sampled signal fails there as in the demonstration. Here the student is
the cascade's top-k-recovered student instead (``--student``, default: <cascade out>/seed0/recover_topk),
which is about 1-3 nats per token from the same stage teachers, and each run continues from it with
one signal or setting for the same steps. Held-out greedy accuracy per domain in a table and a plot.

    .venv/bin/python benchmarks/study_close_sampled.py [--cascade outputs/cascade/main] [--only a,b]
        [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mopd_ray.cascade import _compose, recovery_variants  # noqa: E402
from mopd_ray.demo import prepare, run_variants, write_report  # noqa: E402

SAMPLED = ["algorithm.signal=sampled"]
LR3 = ["learner.lr=3e-4", "learner.min_lr=3e-5"]
STUDY = [
    ("sampled", SAMPLED),
    ("sampled_lr3e-4", SAMPLED + LR3),
    ("sampled_norm_batch", SAMPLED + ["algorithm.normalize_advantages=batch"]),
    ("sampled_lr3e-4_norm_batch", SAMPLED + LR3 + ["algorithm.normalize_advantages=batch"]),
    ("topk", ["algorithm.signal=topk"]),
    ("full_vocab", ["algorithm.signal=full_vocab"]),
]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cascade", default="outputs/cascade/main", help="the cascade's output folder")
    ap.add_argument("--student", default=None, help="student folder (default: <cascade>/seed0/recover_topk/student_final)")
    ap.add_argument("--out", default="outputs/study_close_sampled")
    ap.add_argument("--only", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cascade = Path(args.cascade)
    student = Path(args.student or cascade / "seed0/recover_topk/student_final")
    base = ["experiment=cascade", f"run.output_dir={args.out}", *args.overrides]
    cfg = _compose(base)
    dirs = {st.name: str(cascade / "stages" / st.name / "student_final") for st in cfg.cascade.stages}
    for p in [student, *map(Path, dirs.values())]:
        if not (p / "config.json").exists():
            sys.exit(f"{p} is not a model folder: run python -m mopd_ray.cascade run.output_dir={cascade} first")
    # the recovery runs' teachers and routing (each stage's checkpoint for its domains), from this student
    common = [o for o in dict(recovery_variants(cfg, str(student), dirs))[f"recover_{cfg.cascade.signals[0]}"]
              if not o.startswith("algorithm.signal=")]
    only = [n for n in args.only.split(",") if n]
    todo = [(n, [*common, *o]) for n, o in STUDY if not only or n in only]
    cfg, out, manifest = prepare(base)
    runs = run_variants(base, todo, out)
    write_report(out, manifest, runs, list(cfg.data.domains), cfg.cascade.recovery_steps, cfg.demo.seed,
                 "benchmarks/study_close_sampled.py " + " ".join(sys.argv[1:]), cfg.run.seed)


if __name__ == "__main__":
    main()
