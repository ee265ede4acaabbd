#!/usr/bin/env bash
# Local single-node mode: set up the environment if needed, then run with any Hydra overrides.
#   launch/local.sh algorithm=topk run.total_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_local.sh
exec .venv/bin/python -m mopd_ray.main "$@"
