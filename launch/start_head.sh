#!/usr/bin/env bash
# Start the Ray head node of a multi-node cluster (run on the head machine, in the project's env).
#
#   launch/start_head.sh            # GCS on :6379, dashboard/job API on :8265
#
# HEAD_IP (default: this host's first address) is what workers and `ray job submit` reach.
# DASHBOARD_HOST defaults to HEAD_IP: the job API listens only there (use 127.0.0.1 on one machine).
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
exec ray start --head --node-ip-address "$HEAD_IP" --port "${RAY_PORT:-6379}" \
  --dashboard-host "${DASHBOARD_HOST:-$HEAD_IP}" --dashboard-port "${DASHBOARD_PORT:-8265}" \
  --disable-usage-stats ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} ${NUM_GPUS:+--num-gpus "$NUM_GPUS"} "$@"
