"""Checkpoint folders: atomic commit, newest complete wins, partial or corrupt ones are skipped."""

import json

import pytest

from mopd_ray import checkpoint as ckpt


def _write(root, step, *, complete=True, state=None, learner=True):
    tmp = ckpt.begin(root, step)
    if learner:
        (tmp / "learner").mkdir()
        (tmp / "learner" / "rank0.pt").write_text("x")
    if not complete:
        return tmp
    return ckpt.commit(tmp, step, state or {"step": step, "secret": {"wandb_api_key": "SENTINEL"}})


def test_commit_is_atomic_and_redacts_secrets(tmp_path):
    p = _write(tmp_path, 10)
    assert p.name == "step_000010" and (p / ckpt.MARKER).exists()
    assert not list(tmp_path.glob("*.tmp-*"))
    assert "SENTINEL" not in (p / "state.json").read_text()


def test_newest_complete_wins_and_bad_ones_are_skipped_with_a_warning(tmp_path, caplog):
    _write(tmp_path, 2)
    _write(tmp_path, 4)
    tmp = _write(tmp_path, 6, complete=False)  # crashed while writing: still a .tmp folder
    partial = tmp_path / "step_000008"  # renamed but no marker
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"step": 8}))
    corrupt = _write(tmp_path, 9)
    (corrupt / "state.json").write_text("{not json")
    no_learner = _write(tmp_path, 12, learner=False)
    assert no_learner.exists()
    with caplog.at_level("WARNING"):
        assert ckpt.find_latest(tmp_path).name == "step_000004"
    text = caplog.text
    assert "step_000012" in text and "learner state missing" in text
    assert "step_000009" in text and "unreadable" in text
    assert "step_000008" in text and "no completion marker" in text
    assert tmp.name in text
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002", "step_000004"]


def test_keep_prunes_old_checkpoints(tmp_path):
    for s in (1, 2, 3):
        tmp = ckpt.begin(tmp_path, s)
        (tmp / "learner").mkdir()
        (tmp / "learner" / "r").write_text("x")
        ckpt.commit(tmp, s, {"step": s}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume("never", tmp_path) is None
    p = _write(tmp_path, 3)
    assert ckpt.resolve_resume(str(p), tmp_path) == p
    (p / ckpt.MARKER).unlink()
    with pytest.raises(ValueError, match="no completion marker.*run.resume=auto"):
        ckpt.resolve_resume(str(p), tmp_path)
