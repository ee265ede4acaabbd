"""End-to-end runs of `python -m mopd_ray.main` on the real vLLM, DeepSpeed and Ray."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mopd_ray.metrics import read_metrics

from .conftest import compose_cfg

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = ["cluster.include_dashboard=false", "logging.wandb_mode=offline"]


def _run(args, cwd=ROOT, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "mopd_ray.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _listening() -> set:
    import psutil

    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_main_trains_student_against_two_domain_teachers_and_self(artifacts, tmp_path):
    """The default run on the real engines. Also the security check of a real local-mode run: while it
    trains, every socket any process listens on is loopback (the learners' DeepSpeed and weight-sync
    groups rendezvous through files); afterwards the wandb key is in no file of the run or its
    checkpoints (tests/security holds the other security tests)."""
    secret = "wandb-SECRET-" + os.urandom(6).hex()
    run, ck = tmp_path / "run", tmp_path / "ck"
    env = {**os.environ, "WANDB_API_KEY": secret, "WANDB_MODE": "offline"}
    before = _listening()
    proc = subprocess.Popen([sys.executable, "-m", "mopd_ray.main", f"run.artifacts_dir={artifacts}",
                             f"hydra.run.dir={run}", "run.total_steps=16", f"run.checkpoint_dir={ck}",
                             "run.save_every=8", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    seen, deadline = set(), time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:  # training: every group is up
            seen |= _listening() - before
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert seen, "no listener sampled while the run was training"
    public = sorted((ip, port) for ip, port, _ in seen if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"))
    assert not public, f"listening beyond loopback while training: {public}"
    assert secret not in out + err
    scanned = 0
    for root in (run, ck):
        for f in root.rglob("*"):
            if f.is_file():
                scanned += 1
                assert secret.encode() not in f.read_bytes(), f
    run_id = json.loads((run / "identity.json").read_text())["run_id"]
    assert scanned > 10 and list(ck.glob(f"{run_id}/step_*/COMPLETE"))  # under the run's own id
    assert "pre-flight: 3 teacher(s), 3 replica(s)" in out + err and "probe log-probs agree" in out + err
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(16))
    first = rows[0]
    for key in ("loss", "entropy", "grad_norm", "is_clip_fraction", "learner_step_s", "weight_sync_s",
                "rollout/tokens_per_s", "reverse_kl", "reward/add", "reward/reverse", "reward/sort",
                "teacher/add_expert/token_share", "teacher/add_expert/reverse_kl",
                "teacher/reverse_expert/score_latency_s", "teacher/self/token_share"):
        assert key in first, key
    shares = sum(first[f"teacher/{t}/token_share"] for t in ("add_expert", "reverse_expert", "self"))
    assert abs(shares - 1.0) < 1e-6
    # the student moves toward each domain teacher: reverse KL falls over the run
    for t in ("add_expert", "reverse_expert"):
        kl = [r[f"teacher/{t}/reverse_kl"] for r in rows if f"teacher/{t}/reverse_kl" in r]
        assert sum(kl[-4:]) / 4 < 0.7 * sum(kl[:4]) / 4, (t, kl)
    # self starts at the student: zero KL (up to engine/learner numerics)
    assert abs(rows[0]["teacher/self/reverse_kl"]) < 1e-4
    assert rows[-1]["weight_version"] == 16 and all(r["rollout/staleness"] == 0 for r in rows)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "student_final")
    placement = json.loads((run / "placement.json").read_text())
    assert set(placement) == {"rollout", "learner", "teacher:add_expert", "teacher:reverse_expert", "teacher:self",
                              "learner_ranks"}
    assert [(r["rank"], r["node_local_rank"], r["local_rank_env"]) for r in placement["learner_ranks"]] == \
        [(0, 0, "0"), (1, 1, "0")]  # one node: ranks 0 and 1 of it, each on the device it owns


def test_multirun_sweep_each_in_its_own_dir_and_driver_memory_flat(artifacts, tmp_path):
    """Two sweep points whose payloads differ 8x: the driver fetches the same few bytes per step. The jobs
    share one run name and the default checkpoint folder: each writes checkpoints of its own."""
    sweep = tmp_path / "sweep"
    _run(cwd=tmp_path, args=["-m", "experiment=local_smoke", f"run.artifacts_dir={artifacts}", f"hydra.sweep.dir={sweep}",
          "rollout.n_samples_per_prompt=2,8", "rollout.max_new_tokens=16", "learner.micro_batch_size=2",
          "run.total_steps=4", "data.domains=[sort]", "learner.world_size=1",  # one teacher (self), one rank
          "teachers.models.self.backend=hf", *FAST])
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(dirs) == 2
    ids = [json.loads((d / "identity.json").read_text())["run_id"] for d in dirs]
    finals = sorted(tmp_path.glob("checkpoints/local_smoke/*/*/step_000004/COMPLETE"))
    assert len(finals) == 2 and len({f.parents[2] for f in finals}) == 2  # a folder per job
    assert sorted(f.parents[1].name for f in finals) == sorted(ids) and ids[0] != ids[1]
    runs = [read_metrics(d) for d in dirs]
    assert all(len(r) == 4 for r in runs)
    small, large = sorted(runs, key=lambda r: r[-1]["response_tokens"])

    def payload(rows):
        return sum(v for r in rows for k, v in r.items() if k.endswith("/payload_bytes"))

    assert payload(large) > 3 * payload(small)
    fetched_small = max(r["driver/fetched_bytes"] for r in small[1:])
    fetched_large = max(r["driver/fetched_bytes"] for r in large[1:])
    assert fetched_large < 1.5 * fetched_small + 512  # metadata only, independent of payload size
    assert fetched_large < payload(large[1:2]) / 4
    assert large[-1]["driver/rss_mb"] - large[1]["driver/rss_mb"] < 50


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


def test_ray_job_submit_to_a_loopback_head(artifacts, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": f"http://127.0.0.1:{dash}", "PYTHON": sys.executable}
    ray_cli = str(Path(venv_bin) / "ray")
    # --block keeps the head in this process group, so the test stops exactly this cluster
    # (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
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
                  f"run.artifacts_dir={artifacts}", "run.total_steps=24", "run.save_every=4",
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
        assert 4 <= len(killed) < 24  # stopped mid-run
        # 2. resubmitted as it was: run.resume=auto continues from the newest complete checkpoint
        proc = subprocess.run(submit + [f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "succeeded" in proc.stdout.lower()
        rows = read_metrics(run)
        start = rows[0]["step"]
        assert start >= 4 and start % 4 == 0 and [r["step"] for r in rows] == list(range(start, 24))
        # the same run (the first job's id), from its newest complete checkpoint
        run_id = json.loads((first / "identity.json").read_text())["run_id"]
        assert json.loads((run / "identity.json").read_text())["run_id"] == run_id
        assert f"resuming from checkpoint {ck / run_id / f'step_{start:06d}'}" in (run / "main.log").read_text()
        assert rows[-1]["weight_version"] == 24 and rows[-1]["rows_trained"] == 24 * 4 * 2  # every row once
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
        import signal

        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_roles_on_different_nodes_of_a_multi_node_cluster(artifacts, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from mopd_ray.cluster import WORKER_ENV
    from mopd_ray.orchestrator import Orchestrator

    from .conftest import compose_cfg

    if ray.is_initialized():
        ray.shutdown()
    # the two learner ranks on two nodes: each writes its part of the checkpoints from its own node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"learner_node": 1}})
    cluster.add_node(num_cpus=1, resources={"learner_node": 1})
    cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
    cluster.add_node(num_cpus=3, resources={"teacher_node": 3})
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
        over = [
            "experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=3", "cluster=ray_cluster",
            f"run.checkpoint_dir={tmp_path}/shared/ck",
            "algorithm=sampled_grpo", "algorithm.max_staleness=1", "data.domains=[add,sort]",
            f"cluster.address={cluster.address}", "logging.wandb_mode=disabled", "logging.progress_bar=false",
            "+rollout.custom_resources.rollout_node=1", "+learner.custom_resources.learner_node=1",
            *[f"+teachers.models.{t}.custom_resources.teacher_node=1" for t in ("add_expert", "reverse_expert", "self")],
            *[f"teachers.models.{t}.backend=hf" for t in ("add_expert", "reverse_expert", "self")]]
        from mopd_ray.models.prepare import prepare_models

        prepare_models(compose_cfg(*over))
        # 2 steps, stopped with a checkpoint; then relaunched with run.resume=auto for the third
        Orchestrator(compose_cfg(*over, "run.steps_per_launch=2"), str(tmp_path / "first")).run()
        last = Orchestrator(compose_cfg(*over, "run.resume=auto"), str(tmp_path / "resumed")).run()
        assert last["weight_version"] == 3 and last["rows_trained"] == 3 * 4 * 2
        first, resumed = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "resumed")
        assert [r["step"] for r in first] == [0, 1] and [r["step"] for r in resumed] == [2]
        # next rollout overlapped each update: batches after the first of a launch are one version stale
        assert [r["rollout/staleness"] for r in first + resumed] == [0, 1, 0]
        assert all("reward/mean" in r for r in first + resumed)
        ids = [json.loads((tmp_path / d / "identity.json").read_text())["run_id"] for d in ("first", "resumed")]
        assert ids[0] == ids[1] and (tmp_path / "shared" / "ck" / ids[0] / "step_000003" / "COMPLETE").exists()
        placement = json.loads((tmp_path / "resumed" / "placement.json").read_text())
        learner_nodes, rollout_nodes = set(placement["learner"]), set(placement["rollout"])
        teacher_nodes = {n for k, v in placement.items() if k.startswith("teacher:") for n in v}
        assert len(learner_nodes) == 2 and len(rollout_nodes) == len(teacher_nodes) == 1
        assert len(learner_nodes | rollout_nodes | teacher_nodes) == 4
        # one rank per node: each is rank 0 of its node and owns device 0 (LOCAL_RANK), whatever its global rank
        assert [(r["rank"], r["node_local_rank"], r["local_rank_env"]) for r in placement["learner_ranks"]] == \
            [(0, 0, "0"), (1, 0, "0")]
    finally:
        ray.shutdown()
        cluster.shutdown()
        from ..conftest import ensure_local_ray

        ensure_local_ray()  # the session's local cluster, for the tests after this one


def test_async_rollouts_up_to_max_staleness_and_every_row_once(local_ray, artifacts, tmp_path):
    """max_staleness=2: two rollouts run ahead of each update (3 shards per replica, parts per rank);
    the add domain is scored by two teachers (its expert, and self at weight 0.2); sampling at
    temperature 0.7 (the pre-flight compares engine and learner at temperature 1, as vLLM scores prompts;
    the rollout log-probs are of the tempered distribution, as the learner's)."""
    from mopd_ray.orchestrator import Orchestrator

    cfg = compose_cfg("experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=5",
                      "algorithm.max_staleness=2", "rollout.shards_per_replica=3", "logging.wandb_mode=disabled",
                      f"run.checkpoint_dir={tmp_path}/ck",
                      "rollout.temperature=0.7",
                      "teachers.routing.add=[{teacher: add_expert}, {teacher: self, weight: 0.2}]",
                      "logging.progress_bar=false", *[f"teachers.models.{t}.backend=hf" for t in
                                                      ("add_expert", "reverse_expert", "self")])
    last = Orchestrator(cfg, str(tmp_path)).run()
    rows = read_metrics(tmp_path)
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 2, 2, 2]
    assert rows[0]["train_rollout_logprob_gap"] < 1e-3  # step 0 is on-policy: same tempered log-probs
    assert last["rows_trained"] == 5 * 4 * 2 and last["weight_version"] == 5
    assert all(0 < r["learner/fetched_bytes"] < r["learner/fetched_bytes_all_ranks"] for r in rows)
    # self scored the sort rows and, beside add_expert, the add rows: every token but the reverse ones
    for r in rows:
        assert r["teacher/self/tokens"] == r["response_tokens"] - r["teacher/reverse_expert/tokens"]
    assert sum(r["teacher/add_expert/tokens"] for r in rows) > 0 and all(r["loss"] == r["loss"] for r in rows)


def test_a_shard_split_among_teacher_replicas_trains_as_one_replica(local_ray, artifacts, tmp_path):
    """One rollout shard a step and a teacher with two replicas: the shard's rows are split between them
    (both score every step), every row is scored exactly once (the learner checks) and the update equals
    the one with a single replica scoring everything."""
    from mopd_ray.orchestrator import Orchestrator

    runs = {}
    for replicas in (1, 2):
        cfg = compose_cfg("experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=2",
                          "logging.wandb_mode=disabled", "logging.progress_bar=false", "run.eval_every=0",
                          f"run.checkpoint_dir={tmp_path}/ck",
                          f"teachers.models.add_expert.replicas={replicas}", "teachers.models.add_expert.backend=hf",
                          "data.domains=[add]")  # only the teacher under test starts
        Orchestrator(cfg, str(tmp_path / f"r{replicas}")).run()
        runs[replicas] = read_metrics(tmp_path / f"r{replicas}")
    assert [r["teacher/add_expert/replicas_busy"] for r in runs[2]] == [2, 2]
    assert [r["teacher/add_expert/replicas_busy"] for r in runs[1]] == [1, 1]
    for one, two in zip(runs[1], runs[2]):
        assert one["rows_trained"] == two["rows_trained"]
        assert one["teacher/add_expert/tokens"] == two["teacher/add_expert/tokens"] > 0
        assert abs(one["loss"] - two["loss"]) < 1e-5 and abs(one["grad_norm"] - two["grad_norm"]) < 1e-4
