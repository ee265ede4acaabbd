#!/usr/bin/env bash
# Record the figures of a demonstration-style command: run it, then copy results.md/json and the plot
# into benchmarks/results/<date>_<name>/ with the command that produced them.
#   benchmarks/record.sh demo|cascade [Hydra overrides, e.g. run.total_steps=2000 demo.run_seeds=[0,1,2]]
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; shift
case "$name" in demo|cascade) ;; *) echo "usage: $0 demo|cascade [overrides]" >&2; exit 2 ;; esac
bash launch/setup_local.sh
stamp=$(date +%Y-%m-%d_%H-%M-%S)
out="outputs/$name/$stamp"
.venv/bin/python -m "mopd_ray.$name" "run.output_dir=$out" "$@"
dest="benchmarks/results/${stamp}_$name"
mkdir -p "$dest"
cp "$out/results.md" "$out/results.json" "$out/accuracy.png" "$dest/"
echo ".venv/bin/python -m mopd_ray.$name run.output_dir=$out $*" > "$dest/command.txt"
echo "recorded in $dest"
