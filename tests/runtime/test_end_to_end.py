"""The default run end to end: `python -m mopd_ray.main` on the real vLLM, DeepSpeed and Ray."""

import json
import os
import subprocess
import sys
import time

import pytest

from mopd_ray.metrics import read_metrics

from ..helpers import FAST, ROOT

pytestmark = pytest.mark.slow


def _listening(root: int) -> set:
    """Listening sockets of process ``root`` and its descendants (the run's driver, its Ray processes and
    actors), not those of other processes on this machine (a parallel test's cluster)."""
    import psutil

    try:
        tree = psutil.Process(root)
        pids = {root, *(p.pid for p in tree.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()
    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_main_trains_student_against_two_domain_teachers_and_self(artifacts, tmp_path):
    """The default run on the real engines. Also the security check of a real local-mode run: while it
    trains, every socket any process listens on is loopback (the learners' DeepSpeed and weight-sync
    groups rendezvous through files); afterwards the wandb key is in no file of the run or its
    checkpoints (tests/security holds the other security tests). Its student has embedding rows past its
    tokenizer (384 rows for 320 tokens, as real checkpoints pad; its teachers 320): the pre-flight's probe,
    the post-sync check after every sync and the self teacher's zero KL at step 0 hold only if the engines
    and the learner leave the padded rows out of every distribution alike (they carry a sixth of the mass
    at random init: 0.18 nats/token)."""
    secret = "wandb-SECRET-" + os.urandom(6).hex()
    run, ck = tmp_path / "run", tmp_path / "ck"
    env = {**os.environ, "WANDB_API_KEY": secret, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "mopd_ray.main", f"run.artifacts_dir={artifacts}",
                             f"hydra.run.dir={run}", "run.total_steps=16", f"run.checkpoint_dir={ck}",
                             "run.save_every=8", f"model.path={tmp_path}/padded_student", "model.tiny.vocab_pad_to=128",
                             *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    seen, deadline = set(), time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:  # training: every group is up
            seen |= _listening(proc.pid)
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
                "teacher/reverse_expert/score_latency_s", "teacher/self/token_share", "rollout/truncated_fraction/add",
                "rollout/truncated_fraction"):
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
