#!/usr/bin/env bash
# Record the demonstration's figures into benchmarks/results/ (benchmarks/record.sh demo ...).
#   benchmarks/run_demo.sh [Hydra overrides, e.g. run.total_steps=2000 demo.seed=1]
exec bash "$(dirname "$0")/record.sh" demo "$@"
