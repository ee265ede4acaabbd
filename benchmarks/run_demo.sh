#!/usr/bin/env bash
# Record the demonstration's figures: run it, then copy results.md/json and the plot into
# benchmarks/results/<date>/ with the command that produced them.
#   benchmarks/run_demo.sh [Hydra overrides, e.g. run.total_steps=2000 demo.seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_local.sh
stamp=$(date +%Y-%m-%d_%H-%M-%S)
out="outputs/demo/$stamp"
.venv/bin/python -m mopd_ray.demo "run.output_dir=$out" "$@"
dest="benchmarks/results/$stamp"
mkdir -p "$dest"
cp "$out/results.md" "$out/results.json" "$out/accuracy.png" "$dest/"
echo ".venv/bin/python -m mopd_ray.demo run.output_dir=$out $*" > "$dest/command.txt"
echo "recorded in $dest"
