"""Local mode listens on loopback only; secrets never reach logs, config dumps or checkpoints."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_LISTENERS = textwrap.dedent("""
    import json, os, time, psutil
    from omegaconf import OmegaConf
    from mopd_ray.cluster import init_ray
    from mopd_ray.config import ClusterConfig
    init_ray(OmegaConf.structured(ClusterConfig(include_dashboard=True)), 2)
    import ray
    class Probe:
        def ping(self):
            return 1
    probe = ray.remote(num_cpus=1)(Probe).remote()
    ray.get(probe.ping.remote())
    time.sleep(2)
    # this driver and what it started (Ray's processes, the worker): not other processes on the machine
    kids = psutil.Process().children(recursive=True)
    ours = {os.getpid(), *(p.pid for p in kids)}
    new = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in ours})
    # Python workers that nothing uses (Ray prestarts them unless told not to: cluster.LOCAL_SYSTEM_CONFIG)
    idle = [p.pid for p in kids if " ".join(p.cmdline()).startswith("ray::IDLE")]
    print(json.dumps({"listen": new, "node": [n["NodeManagerAddress"] for n in ray.nodes()], "idle": idle}))
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
    assert out["idle"] == [], "a local instance started Python workers that no role uses"


def test_trust_remote_code_is_off_by_default():
    from mopd_ray.config import MOPDConfig

    assert MOPDConfig().model.trust_remote_code is False


# A real training run's listeners and the wandb key: tests/runtime/test_end_to_end.py
# (test_main_trains_student_against_two_domain_teachers_and_self).
