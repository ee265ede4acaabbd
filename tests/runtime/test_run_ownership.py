"""A run's checkpoints are its own, on the real engines: a new launch with the default name, in a
checkpoint folder that already holds another run's checkpoints (of another architecture, in the run-id
layout and in the old flat one), loses a learner rank before its first checkpoint and after it; each
time it restarts from its own state, and it never loads or deletes the other run's files."""

import json
import os
import shutil
import signal
import threading
import time

import pytest
import ray

from mopd_ray.metrics import read_metrics
from mopd_ray.orchestrator import Orchestrator
from mopd_ray.run_identity import plan_run

from .conftest import compose_cfg

pytestmark = pytest.mark.slow
COMMON = ["experiment=local_smoke", "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=4",
          "logging.wandb_mode=disabled", "logging.progress_bar=false",
          *[f"teachers.models.{t}.backend=hf" for t in ("add_expert", "reverse_expert", "self")]]


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                  if p.is_file())


def _sigkill_learner_at(orch, step, rank):
    def watch():
        while getattr(orch, "roles", None) is None or orch.state.step < step:
            time.sleep(0.05)
        os.kill(ray.get(orch.roles.learners.actors[rank].pid.remote()), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()


@pytest.fixture(scope="module")
def ownership(local_ray, artifacts, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    ck = root / "ck"
    # run A: another architecture (a Llama student and its own snapshot as the teacher), 2 steps
    a_over = [f"run.artifacts_dir={artifacts}", *COMMON, f"run.checkpoint_dir={ck}", "run.total_steps=2",
              f"model.path={tiny_llama_dir}", "model.tiny=null", "data.domains=[sort]"]
    Orchestrator(compose_cfg(*a_over), str(root / "a")).run()
    a_id = json.loads((root / "a" / "identity.json").read_text())["run_id"]
    # and a copy of its last checkpoint where the old layout kept them, with no identity
    legacy = ck / "step_000002"
    shutil.copytree(ck / a_id / "step_000002", legacy)
    state = json.loads((legacy / "state.json").read_text())
    state.pop("identity")
    (legacy / "state.json").write_text(json.dumps(state))
    before = _files(ck)
    # run B: the default student, same name, same folder, resume=never; learner rank 1 SIGKILLed in step 1
    # (before B's first checkpoint), rank 0 in step 3 (after B's step_000002)
    b_over = [f"run.artifacts_dir={artifacts}", *COMMON, f"run.checkpoint_dir={ck}", "run.total_steps=4",
              "run.save_every=2", "run.keep_checkpoints=0", "data.domains=[add,sort]", "cluster.learner_restarts=2"]
    orch = Orchestrator(compose_cfg(*b_over), str(root / "b"))
    _sigkill_learner_at(orch, 1, 1)
    _sigkill_learner_at(orch, 3, 0)
    last = orch.run()
    return {"root": root, "ck": ck, "a_id": a_id, "a_over": a_over, "b_over": b_over, "before": before,
            "orch": orch, "last": last, "b_rows": read_metrics(root / "b")}


def test_recovery_restarts_from_the_runs_own_state_only(ownership):
    rows, last = ownership["b_rows"], ownership["last"]
    assert [r["step"] for r in rows] == [0, 0, 1, 2, 2, 3]
    # before its first checkpoint: the run's own initial student (the same step 0, the same loss)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6, abs=1e-9)
    # after it: its own step_000002 (A has a step_000002 too, in both layouts)
    assert rows[4]["loss"] == pytest.approx(rows[3]["loss"], rel=1e-6, abs=1e-9)
    assert last["faults/learner_restarts"] == 2 and last["rows_trained"] == 4 * 4 * 2
    b_id = ownership["orch"].start.identity.run_id
    assert b_id != ownership["a_id"]
    ck = ownership["ck"]
    mine = sorted(p.name for p in (ck / b_id).glob("step_*") if (p / "COMPLETE").exists())
    assert mine == ["step_000002", "step_000004"]
    for p in (ck / b_id).glob("step_*"):
        assert json.loads((p / "state.json").read_text())["identity"]["run_id"] == b_id


def test_the_other_runs_files_are_untouched(ownership):
    ck = ownership["ck"]
    after = [f for f in _files(ck) if not f[0].startswith(ownership["orch"].start.identity.run_id)]
    assert after == ownership["before"]


def test_a_relaunch_continues_each_run_and_refuses_a_changed_one(ownership, artifacts):
    from mopd_ray.main import run

    ck, b_id = ownership["ck"], ownership["orch"].start.identity.run_id
    b = plan_run(compose_cfg(*ownership["b_over"], "run.resume=auto"))
    assert b.identity.run_id == b_id and b.resume_from == ck / b_id / "step_000004"
    a = plan_run(compose_cfg(*ownership["a_over"], "run.resume=auto"))
    assert a.identity.run_id == ownership["a_id"] and a.resume_from == ck / ownership["a_id"] / "step_000002"
    # the changed signal: refused before any engine starts, exit 2, nothing written in the folder
    files = _files(ck)
    t0 = time.time()
    cfg = compose_cfg(*ownership["b_over"], "run.resume=auto", "algorithm=topk",
                      f"run.output_dir={ownership['root'] / 'refused'}")
    assert run(cfg) == 2
    assert time.time() - t0 < 60 and _files(ck) == files
    assert not (ownership["root"] / "refused" / "metrics.jsonl").exists()
