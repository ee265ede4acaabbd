"""A run's checkpoints are its own: which checkpoint a launch starts from (mopd_ray.run_identity), with
checkpoint folders of other runs, of another architecture and of the old layout (no identity) beside
it. No engines: the real-engine scenarios are tests/runtime/test_run_ownership.py."""

import json
from types import SimpleNamespace

import pytest

from mopd_ray import checkpoint as ckpt
from mopd_ray.config import to_container
from mopd_ray.run_identity import RunIdentityError, fingerprint_parts, plan_run

from .helpers import compose_cfg


def _model(root, name, **arch):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, **arch,
                                               "_name_or_path": str(d)}))
    return d


def _cfg(root, *overrides, model="student"):
    return compose_cfg(f"model.path={root / model}", "model.tiny=null", f"run.checkpoint_dir={root / 'ck'}",
                       *overrides)


def _save(cfg, step: int, identity=None):
    """A complete checkpoint of ``cfg``'s run (``identity`` of a plan), as the orchestrator writes it."""
    root = cfg.run.checkpoint_dir if identity is None else identity.root
    tmp = ckpt.begin(root, step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "rank0").write_text("x")
    state = {"step": step, "config": to_container(cfg)}
    if identity is not None:
        state["identity"] = identity.identity.record()
    return ckpt.commit(tmp, step, state)


@pytest.fixture
def root(tmp_path):
    _model(tmp_path, "student")
    _model(tmp_path, "llama", model_type="llama", hidden_size=128)
    return tmp_path


def test_a_fresh_run_writes_under_its_own_id_beside_other_runs(root):
    first = plan_run(_cfg(root))
    _save(_cfg(root), 60, first)
    second = plan_run(_cfg(root))  # the same command again, resume=never (the default)
    assert second.identity.run_id != first.identity.run_id and second.resume_from is None
    assert second.root == root / "ck" / second.identity.run_id != first.root
    assert second.identity.fingerprint == first.identity.fingerprint


def test_resume_auto_continues_this_run_not_a_newer_one_of_another_config(root):
    mine = plan_run(_cfg(root))
    own = _save(_cfg(root), 4, mine)
    other = plan_run(_cfg(root, "algorithm=topk"))
    _save(_cfg(root, "algorithm=topk"), 9, other)  # newer, and a later step
    again = plan_run(_cfg(root, "run.resume=auto", "learner.lr=3e-4"))  # lr is not part of the fingerprint
    assert again.identity.run_id == mine.identity.run_id and again.resume_from == own and again.root == mine.root


def test_resume_auto_refuses_another_runs_checkpoints_listing_the_differences(root):
    _save(_cfg(root), 4, plan_run(_cfg(root)))
    with pytest.raises(RunIdentityError) as e:
        plan_run(_cfg(root, "run.resume=auto", "algorithm=topk"))
    msg = str(e.value)
    assert "signal.signal: 'sampled' -> 'topk'" in msg and "run.resume=<its step_NNNNNN folder>" in msg
    assert "run.name / run.checkpoint_dir" in msg and str(root / "ck") in msg
    with pytest.raises(RunIdentityError) as e:  # another student architecture
        plan_run(_cfg(root, "run.resume=auto", model="llama"))
    assert "student.architecture" in str(e.value) and "student.model" in str(e.value)


def test_checkpoints_without_identity_are_never_adopted(root):
    _save(_cfg(root, model="llama"), 3)  # the old layout: step folders directly in the directory, no identity
    with pytest.raises(RunIdentityError, match="records no run identity"):
        plan_run(_cfg(root, "run.resume=auto"))
    fresh = plan_run(_cfg(root))  # a fresh run beside them: its own folder, nothing loaded
    assert fresh.resume_from is None and fresh.root.parent == root / "ck"


def test_a_named_checkpoint_is_taken_as_a_fork_or_continued_as_the_same_run(root, caplog):
    mine = plan_run(_cfg(root))
    path = _save(_cfg(root), 4, mine)
    same = plan_run(_cfg(root, f"run.resume={path}"))
    assert same.identity.run_id == mine.identity.run_id and same.resume_from == path
    with caplog.at_level("WARNING"):
        fork = plan_run(_cfg(root, f"run.resume={path}", "algorithm=full_vocab"))
    assert fork.identity.run_id != mine.identity.run_id and fork.identity.parent == str(path)
    assert fork.resume_from == path and "signal.signal" in caplog.text


def test_run_id_names_the_run_to_continue(root):
    a, b = plan_run(_cfg(root)), plan_run(_cfg(root))
    _save(_cfg(root), 2, a)
    pb = _save(_cfg(root), 2, b)
    chosen = plan_run(_cfg(root, "run.resume=auto", f"run.id={b.identity.run_id}"))
    assert chosen.resume_from == pb
    with pytest.raises(RunIdentityError, match="would write over them"):
        plan_run(_cfg(root, f"run.id={a.identity.run_id}"))  # resume=never onto an existing run
    new = plan_run(_cfg(root, "run.resume=auto", "run.id=my-run"))
    assert new.identity.run_id == "my-run" and new.resume_from is None


def test_recovery_and_retention_see_only_their_own_run(root):
    mine = plan_run(_cfg(root))
    _save(_cfg(root), 2, mine)
    # another run's checkpoint moved into this run's folder (a copy by hand, a tool): never this run's
    stranger = plan_run(_cfg(root, model="llama"))
    foreign = _save(_cfg(root, model="llama"), 8, stranger)
    moved = mine.root / foreign.name
    foreign.rename(moved)
    assert ckpt.find_latest(mine.root).name == "step_000008"
    assert ckpt.find_latest(mine.root, run_id=mine.identity.run_id).name == "step_000002"
    for s in (3, 4, 5):  # keep=2 prunes this run's older ones, never the stranger's
        tmp = ckpt.begin(mine.root, s)
        (tmp / "learner").mkdir()
        (tmp / "learner" / "r").write_text("x")
        ckpt.commit(tmp, s, {"step": s, "identity": mine.identity.record()}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(mine.root)] == ["step_000004", "step_000005", "step_000008"]


def test_fingerprint_holds_model_data_routing_signal_teachers(root):
    base = fingerprint_parts(_cfg(root))
    for override, key in [("data.domains=[add]", "data"), ("teachers.routing.sort=add_expert", "routing"),
                          ("algorithm.alpha=0.5", "signal"), ("teachers.models.add_expert.weight=2", "teachers"),
                          ("learner.world_size=1", "learner")]:
        assert fingerprint_parts(_cfg(root, override))[key] != base[key], override
    assert fingerprint_parts(_cfg(root, "learner.lr=1e-4", "run.total_steps=99", "run.seed=3")) == base


def test_each_multirun_job_gets_its_own_checkpoint_folder(root):
    from hydra.types import RunMode

    from mopd_ray.main import sweep_checkpoint_dir

    dirs = []
    for num, od in enumerate(["learner.lr=0.001", "learner.lr=0.0001", ""]):
        cfg = compose_cfg()
        sweep_checkpoint_dir(cfg, SimpleNamespace(mode=RunMode.MULTIRUN, job=SimpleNamespace(override_dirname=od,
                                                                                            num=num)))
        dirs.append(cfg.run.checkpoint_dir)
    assert dirs == ["checkpoints/mopd_local/learner.lr=0.001", "checkpoints/mopd_local/learner.lr=0.0001",
                    "checkpoints/mopd_local/job2"]
    cfg = compose_cfg(f"run.checkpoint_dir={root}/mine")  # the user's own choice is kept
    sweep_checkpoint_dir(cfg, SimpleNamespace(mode=RunMode.MULTIRUN, job=SimpleNamespace(override_dirname="x", num=0)))
    assert cfg.run.checkpoint_dir == f"{root}/mine"
