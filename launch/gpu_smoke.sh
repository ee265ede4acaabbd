#!/usr/bin/env bash
# The GPU smoke check, for the first machine with GPUs (nothing of mopd_ray has run on a GPU yet):
#   launch/gpu_smoke.sh [--families qwen3,gemma2] [--out DIR] [--steps N]
# Every family of the architecture matrix (tiny models built here: no network) as student and as a
# full-vocabulary teacher, through weight sync and the post-sync check, the roles sharing one GPU; with two
# or more GPUs the weights go over NCCL and a 2-rank learner runs too. One line per check, exit 1 on any
# failure; each check's full output is in <out>/logs/<launch>/ (every launch its own runs). Budget: <= 8 minutes on one H100/H200.
# Needs the GPU install (pip install -e '.[gpu]', or docker/Dockerfile.gpu); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: torch sees no CUDA device. Install the GPU extra (pip install -e '.[gpu]') on a GPU machine," \
       "or run the CPU twin: $PYTHON -m mopd_ray.smoke --device cpu" >&2
  exit 2
fi
start=$(date +%s)
rc=0
"$PYTHON" -m mopd_ray.smoke --device gpu "$@" || rc=$?
echo "gpu_smoke: $(( $(date +%s) - start )) s wall (budget 480 s)"
exit $rc
