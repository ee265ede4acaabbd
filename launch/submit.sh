#!/usr/bin/env bash
# Submit a mopd_ray run to a running Ray cluster with `ray job submit`.
#
#   RAY_ADDRESS=http://<head>:8265 launch/submit.sh experiment=qwen3_math_code [more Hydra overrides]
#
# Ships this repository as the job's working directory (without .venv, artifacts, outputs, checkpoints) and runs
# `python -m mopd_ray.main cluster=ray_cluster <overrides>` on the cluster; the driver joins the
# cluster and places each role with placement groups. NO_WAIT=1 returns after submission.
# Ray 2.60 clusters authenticate with a token: RAY_AUTH_MODE=token must be set here and on the head.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
PY=${PYTHON:-python}
RUNTIME_ENV=$("$PY" - <<'PYEOF'
import json, os
env = {k: os.environ[k] for k in ("WANDB_MODE", "WANDB_PROJECT", "HF_HOME") if k in os.environ}
print(json.dumps({
    # stated here, not left to Ray's reading of .gitignore: a copy without it (or with
    # RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) would ship every local checkpoint with the job
    "excludes": [".venv/", "artifacts/", "outputs/", "multirun/", "wandb/", ".git/", "*.egg-info/", "__pycache__/",
                 "checkpoints/", "build/", ".pytest_cache/"],
    "env_vars": {"PYTHONUNBUFFERED": "1", **env},
}))
PYEOF
)
args=(--address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV")
[ -n "${NO_WAIT:-}" ] && args+=(--no-wait)
[ -n "${JOB_ID:-}" ] && args+=(--submission-id "$JOB_ID")
exec ray job submit "${args[@]}" -- "$PY" -m mopd_ray.main cluster=ray_cluster "$@"
