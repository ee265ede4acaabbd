"""Why does reward-only GRPO collapse at the demonstration's scale, and what makes it learn?

Every run starts from the demonstration's base student (bootstrap cached under artifacts/demo/seed<N>)
with no teacher: GRPO on the rewards of the three synthetic domains (exact match, or partial credit where
named; the evaluation always judges by exact match), 64 rows a step, changing
one or two knobs at a time from the demonstration's baseline (16 prompts x 4 samples, lr 1e-4, std-scaled
group advantages, sampling at temperature 1). Prints, and writes under the output folder, a table of
held-out greedy accuracy and a plot of every run's curves side by side (benchmarks/study_sampled.py's
report); the metrics of each run (reward, entropy, finished fraction, response length) are in its folder.

    .venv/bin/python benchmarks/study_grpo.py [--only a,b] [--out DIR] [Hydra overrides ...]

Runs that already finished in --out with the same overrides are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study_sampled import run_study  # noqa: E402

GRPO = ["algorithm.signal=none", "algorithm.alpha=1.0", "demo.baselines=false"]
G4 = ["data.prompts_per_step=16", "rollout.n_samples_per_prompt=4"]
G16 = ["data.prompts_per_step=4", "rollout.n_samples_per_prompt=16"]
SIMILARITY = [f"data.train_rewards.{d}=similarity" for d in ("add", "reverse", "sort")]
LR = (lambda lr: [f"learner.lr={lr}", f"learner.min_lr={lr / 10}"])
STUDY = [
    # the demonstration's baseline as it ran before algorithm.skip_signal_free_steps (an optimizer step
    # on every batch, also those where no group has a reward: Adam's momentum still moves the weights)
    ("grpo_every_step", GRPO + G4 + LR(1e-4) + ["algorithm.skip_signal_free_steps=false"]),
    # the baseline now: no step without a learning signal
    ("grpo", GRPO + G4 + LR(1e-4)),
    # sample (and learn) at a lower temperature: a weak student's samples at temperature 1 are mostly noise
    ("grpo_temp0.7", GRPO + G4 + LR(1e-4) + ["rollout.temperature=0.7"]),
    # more samples per prompt: more groups with at least one success (the rest carry no signal)
    ("grpo_n16_temp0.7", GRPO + G16 + LR(1e-4) + ["rollout.temperature=0.7"]),
    # Dr. GRPO: the group mean as baseline, no division by the group's std (no up-weighting of rare wins)
    ("grpo_no_std_temp0.7", GRPO + G4 + LR(1e-4) + ["rollout.temperature=0.7",
                                                     "algorithm.outcome_estimator=grpo_no_std"]),
    # a smaller step
    ("grpo_lr1e-5_temp0.7", GRPO + G4 + LR(1e-5) + ["rollout.temperature=0.7"]),
    # partial credit: trained on 1 - edit distance / length (data.train_rewards), judged by exact match;
    # nearly every group then has unequal rewards (a signal on every step), at both step sizes
    ("grpo_similarity_lr1e-5_temp0.7", GRPO + G4 + LR(1e-5) + ["rollout.temperature=0.7", *SIMILARITY]),
    ("grpo_similarity_lr1e-4_temp0.7", GRPO + G4 + LR(1e-4) + ["rollout.temperature=0.7", *SIMILARITY]),
]

if __name__ == "__main__":
    run_study(STUDY, __doc__, "outputs/study_grpo", "benchmarks/study_grpo.py")
