#!/usr/bin/env bash
# Join a worker node to the cluster started by launch/start_head.sh.
#
#   HEAD_IP=10.0.0.1 launch/start_worker.sh [--resources '{"teacher_node": 8}']
#
# Copy the head's token (~/.ray/auth_token) to this machine first: the cluster authenticates with it.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
: "${HEAD_IP:?set HEAD_IP to the head node's address}"
exec ray start --address "$HEAD_IP:${RAY_PORT:-6379}" --disable-usage-stats \
  ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} ${NUM_GPUS:+--num-gpus "$NUM_GPUS"} "$@"
