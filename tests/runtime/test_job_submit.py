"""`ray job submit` to a loopback head: a driver killed mid-run, resubmitted, continues its run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mopd_ray.metrics import read_metrics

from ..helpers import FAST, ROOT

pytestmark = pytest.mark.slow


def _wait_for_port(port: int, timeout_s: float) -> None:
    import socket

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(3)  # the job API comes up with the dashboard
                return
        time.sleep(1)
    raise TimeoutError(f"the Ray head's dashboard did not open port {port} in {timeout_s} s")


def _free_port():
    from mopd_ray.cluster import free_port

    return free_port()


# long enough that `ray job stop` (a CLI start of a few seconds) lands before the killed job ends: at 24 steps
# of ~0.2 s the job once finished first; at 64 the stop landed at step 13 and 17 of two suite runs (2026-12-07),
# so 40 leaves more than twice that lag (the resumed job's steps were about a third of the test's CPU time)
STEPS = 40


def test_ray_job_submit_to_a_loopback_head(artifacts, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": f"http://127.0.0.1:{dash}", "PYTHON": sys.executable}
    ray_cli = str(Path(venv_bin) / "ray")
    # its own temp folder: the job supervisor finds "its" cluster through <temp dir>/ray_current_cluster, which
    # in the shared /tmp/ray names the newest cluster on the machine (another test's, when tests run in parallel)
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # --block keeps the head in this process group, so the test stops exactly this cluster
    # (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(gcs), "--temp-dir", temp_dir, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "8", "--disable-usage-stats",
                             # own agent ports: another Ray on this machine may hold the defaults
                             "--dashboard-agent-listen-port", str(_free_port()),
                             "--dashboard-agent-grpc-port", str(_free_port()),
                             "--metrics-export-port", str(_free_port()),
                             "--runtime-env-agent-port", str(_free_port())], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(dash, 180)
        first, run, ck = tmp_path / "job_killed", tmp_path / "job_run", tmp_path / "ck"
        # a teacher added from the command line, a reward function from a module shipped with the job;
        # checkpoints on storage that outlives a job (the job's working directory does not)
        submit = ["bash", str(ROOT / "launch" / "submit.sh"), "experiment=local_smoke",
                  f"run.artifacts_dir={artifacts}", f"run.total_steps={STEPS}", "run.save_every=4",
                  f"run.checkpoint_dir={ck}", "run.resume=auto",
                  "algorithm=full_vocab", "learner=zero3", "data.domains=[add]", *FAST,  # only cli_add starts
                  f"teachers.models.cli_add.model_path={artifacts}/tiny/teacher_add", "teachers.routing.add=cli_add",
                  "~teachers.models.add_expert",
                  *[f"data.rewards.{d}=tests.rewards_fixture:half_if_nonempty" for d in ("add", "reverse", "sort")]]
        # 1. the driver is killed (`ray job stop`) once step_000004 is complete
        for _ in range(12):  # the head's job agent registers a little after its dashboard opens
            proc = subprocess.run(submit + [f"hydra.run.dir={first}"], cwd=ROOT, env={**env, "NO_WAIT": "1",
                                  "JOB_ID": "mopd_killed"}, capture_output=True, text=True, timeout=600)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(5)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        deadline = time.time() + 400
        while not list(ck.glob("*/step_000004/COMPLETE")):
            assert time.time() < deadline, "the first job wrote no checkpoint"
            time.sleep(0.5)
        subprocess.run([ray_cli, "job", "stop", "--address", env["RAY_ADDRESS"], "mopd_killed"], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
        killed = read_metrics(first)
        assert 4 <= len(killed) < STEPS  # stopped mid-run
        # 2. resubmitted as it was: run.resume=auto continues from the newest complete checkpoint
        proc = subprocess.run(submit + [f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "succeeded" in proc.stdout.lower()
        rows = read_metrics(run)
        start = rows[0]["step"]
        assert start >= 4 and start % 4 == 0 and [r["step"] for r in rows] == list(range(start, STEPS))
        # the same run (the first job's id), from its newest complete checkpoint
        run_id = json.loads((first / "identity.json").read_text())["run_id"]
        assert json.loads((run / "identity.json").read_text())["run_id"] == run_id
        assert f"resuming from checkpoint {ck / run_id / f'step_{start:06d}'}" in (run / "main.log").read_text()
        assert rows[-1]["weight_version"] == STEPS and rows[-1]["rows_trained"] == STEPS * 4 * 2  # every row once
        if len(killed) > start:  # the same step from the same checkpoint: the same rows, the same loss
            assert rows[0]["loss"] == pytest.approx(killed[start]["loss"], rel=1e-6)
        rows = rows[:2]
        assert all(r["distill_loss"] > 0 for r in rows)  # exact full-vocabulary KL, under ZeRO-3
        assert all("teacher/cli_add/score_latency_s" in r and "teacher/add_expert/score_latency_s" not in r
                   for r in rows)
        # the user's function scored every row where the responses are (0.5 for any non-empty answer)
        assert all(0.0 < r["reward/mean"] <= 0.5 for r in rows) and all(r["reward/timeouts"] == 0 for r in rows)
        # the job joined the existing cluster rather than starting its own
        assert "joining Ray cluster" in (run / "main.log").read_text()
    finally:
        _kill_cluster(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_cluster(head: subprocess.Popen) -> None:
    """Stop exactly this test's Ray cluster: every process under the `ray start --block` process (GCS, raylet,
    dashboard, workers, the jobs' drivers) killed at once. Its graceful stop (SIGTERM) took 32 s of the test's
    122 (2026-12-07); nothing of the cluster outlives the test, which removes its temp folder."""
    import signal

    import psutil

    try:
        procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything started in its session since
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    head.wait(timeout=30)
    assert not alive, f"processes of the test's Ray cluster still running: {alive}"
