"""Local mode listens on loopback only; secrets never reach logs, config dumps or checkpoints."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_LISTENERS = textwrap.dedent("""
    import json, time, psutil
    from omegaconf import OmegaConf
    from mopd_ray.cluster import init_ray
    from mopd_ray.config import ClusterConfig
    before = {c.laddr for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    init_ray(OmegaConf.structured(ClusterConfig(include_dashboard=True)), 2)
    import ray
    ray.get(ray.remote(lambda: 1).remote())
    time.sleep(2)
    new = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr not in before})
    print(json.dumps({"listen": new, "node": [n["NodeManagerAddress"] for n in ray.nodes()]}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_local_mode_listens_on_loopback_only(tmp_path):
    import json

    script = tmp_path / "listeners.py"
    script.write_text(_LISTENERS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["node"] == ["127.0.0.1"]
    assert out["listen"], "no listener seen"
    assert set(out["listen"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, out["listen"]


def test_trust_remote_code_is_off_by_default():
    from mopd_ray.config import MOPDConfig

    assert MOPDConfig().model.trust_remote_code is False


def _listening() -> set:
    import psutil

    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.slow
def test_wandb_key_never_written_and_a_training_run_listens_on_loopback_only(artifacts, tmp_path):
    """One real local-mode run: while it trains, every socket any process listens on is loopback (the
    learners' DeepSpeed and weight-sync groups rendezvous through files); afterwards the wandb key is
    in no file of the run or its checkpoints."""
    import time

    secret = "wandb-SECRET-" + os.urandom(6).hex()
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_API_KEY": secret, "WANDB_MODE": "offline"}
    before = _listening()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mopd_ray.main", "experiment=local_smoke", f"run.artifacts_dir={artifacts}",
         f"hydra.run.dir={run}", f"run.checkpoint_dir={tmp_path}/ck", "run.total_steps=4", "run.save_every=2",
         "cluster.include_dashboard=false", "logging.wandb_mode=offline", "data.domains=[add]",
         "teachers.models.add_expert.backend=hf"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen, deadline = set(), time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:  # training: every group is up
            seen |= _listening() - before
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert seen, "no listener sampled while the run was training"
    public = sorted((ip, port) for ip, port, _ in seen if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"))
    assert not public, f"listening beyond loopback while training: {public}"
    assert secret not in out + err
    scanned = 0
    for root in (run, tmp_path / "ck"):
        for f in root.rglob("*"):
            if f.is_file():
                scanned += 1
                assert secret.encode() not in f.read_bytes(), f
    assert scanned > 10 and list((tmp_path / "ck").glob("step_*/COMPLETE"))
