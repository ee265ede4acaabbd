"""What makes the sampled-token distillation signal work at the demonstration's scale?

Every run starts from the demonstration's base student (bootstrap cached under artifacts/demo/seed<N>)
with all three domain teachers, and differs from ``sampled`` (REINFORCE on the per-token
teacher-minus-student log-prob inside the PPO loss) in one or two knobs. ``topk`` and ``full_vocab``
are run beside them as the dense references. Prints, and writes under the output folder, a table of
held-out greedy accuracy and a plot of every run's curves side by side.

    .venv/bin/python benchmarks/study_sampled.py [--only a,b] [--out DIR] [Hydra overrides ...]

Runs that already finished in --out with the same overrides are reused, so the study can be split
over several launches (``--only``) and assembled by ``--report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mopd_ray.demo import prepare, run_variants, write_report  # noqa: E402

SAMPLED = ["algorithm.signal=sampled"]
STUDY = [
    # the plain estimator, as the demonstration ran it
    ("sampled", SAMPLED),
    # a smaller step for a noisier gradient
    ("sampled_lr3e-4", SAMPLED + ["learner.lr=3e-4", "learner.min_lr=3e-5"]),
    # whiten the per-token advantages over the batch: one baseline and one scale for all teachers
    ("sampled_norm_batch", SAMPLED + ["algorithm.normalize_advantages=batch"]),
    # per-teacher baseline (subtract each teacher's mean log-ratio), with and without its scale
    ("sampled_teacher_mean", SAMPLED + ["algorithm.normalize_advantages=teacher_mean"]),
    ("sampled_norm_teacher", SAMPLED + ["algorithm.normalize_advantages=teacher"]),
    # credit each token with the discounted future per-token KL (gamma 1: the sequence-level gradient)
    ("sampled_gamma1_teacher_mean", SAMPLED + ["algorithm.kl_gamma=1.0", "algorithm.normalize_advantages=teacher_mean"]),
    # sample (and learn) at a lower temperature: fewer off-distribution tokens for the teacher to score
    ("sampled_temp0.7", SAMPLED + ["rollout.temperature=0.7"]),
    # reuse each batch for 4 optimizer steps: the PPO clip now binds
    ("sampled_ppo4_teacher_mean", SAMPLED + ["learner.mini_batches_per_step=4", "learner.micro_batch_size=8",
                                             "algorithm.normalize_advantages=teacher_mean"]),
    # the knobs again on top of the best step size
    ("sampled_lr3e-4_norm_batch", SAMPLED + ["learner.lr=3e-4", "learner.min_lr=3e-5",
                                             "algorithm.normalize_advantages=batch"]),
    ("sampled_lr3e-4_gamma1", SAMPLED + ["learner.lr=3e-4", "learner.min_lr=3e-5", "algorithm.kl_gamma=1.0"]),
    ("sampled_lr3e-4_norm_batch_temp0.7", SAMPLED + ["learner.lr=3e-4", "learner.min_lr=3e-5",
                                                     "algorithm.normalize_advantages=batch", "rollout.temperature=0.7"]),
    ("sampled_lr3e-4_norm_batch_ppo4", SAMPLED + ["learner.lr=3e-4", "learner.min_lr=3e-5",
                                                  "algorithm.normalize_advantages=batch",
                                                  "learner.mini_batches_per_step=4", "learner.micro_batch_size=8"]),
    # the dense references
    ("topk", ["algorithm.signal=topk"]),
    ("full_vocab", ["algorithm.signal=full_vocab"]),
]


def run_study(study: list, doc: str, default_out: str, script: str) -> None:
    """The command line of a study: run (or with --report only assemble) the runs of ``study``."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--report", action="store_true", help="only assemble the table and plot of finished runs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. run.total_steps=800)")
    args = ap.parse_args()
    names = [n for n, _ in study]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"--only names unknown runs {unknown}; the study's runs are {names}")
    todo = [(n, o) for n, o in study if not only or n in only]
    # the studies are of the four-domain demonstration (two-digit addition included) at the quick run's length, as
    # they were recorded (each result folder's command.txt gives the code of its date); experiment=... picks another
    chosen = any(o.lstrip("+~").startswith("experiment=") for o in args.overrides)
    base = [] if chosen else ["experiment=demo_full", "run.total_steps=150", "run.eval_every=50"]
    overrides = [*base, f"run.output_dir={args.out}", *args.overrides]
    if args.report:  # assemble the finished runs found in --out; run nothing
        from mopd_ray.bootstrap import demo_dir
        from mopd_ray.demo import _compose, finished_run

        cfg, out = _compose(overrides), Path(args.out)
        manifest = json.loads((demo_dir(cfg) / "manifest.json").read_text())
        runs = {n: r for n, extra in todo if (r := finished_run(out / n, extra)) is not None}
    else:
        cfg, out, manifest = prepare(overrides)
        runs = run_variants(overrides, todo, out)
    write_report(out, manifest, runs, list(cfg.data.domains), cfg.run.total_steps, cfg.demo.seed,
                 f"{script} " + " ".join(sys.argv[1:]), cfg.run.seed)


if __name__ == "__main__":
    run_study(STUDY, __doc__, "outputs/study_sampled", "benchmarks/study_sampled.py")
